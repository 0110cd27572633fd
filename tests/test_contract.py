"""Small items of the model contract (docs/compat.md) that the library-driven tests use only indirectly.

Each is compared with what transformers' own model does on the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf, tiny_configs
from helpers import assert_loss_equal, batch_of_two, load_lmport

ARCHS = ("llama", "gpt2", "mistral")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    import transformers

    root = tmp_path_factory.mktemp("contract")
    out = {}
    for arch, make in tiny_configs().items():
        folder = save_hf(root / arch, make())
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        out[arch] = (load_lmport(folder, dtype=torch.float32), ref)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_class_attributes_match_transformers(pairs: dict[str, tuple[Any, Any]], arch: str) -> None:
    ours, ref = pairs[arch]
    assert ours.main_input_name == ref.main_input_name == "input_ids"
    assert ours._keys_to_ignore_on_save == ref._keys_to_ignore_on_save == set()
    assert ours.supports_gradient_checkpointing and ref.supports_gradient_checkpointing
    assert ours.device == ref.device and ours.dtype == ref.dtype == torch.float32
    assert type(ours).__name__ == type(ref).__name__  # Trainer derives loss_type from the class name


@pytest.mark.parametrize("arch", ARCHS)
def test_shift_labels_keyword_equals_transformers(pairs: dict[str, tuple[Any, Any]], arch: str) -> None:
    ours, ref = pairs[arch]
    batch = batch_of_two(12, seed=3)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    ignored = torch.zeros_like(batch["labels"])  # with shift_labels, labels only say "take a loss"
    with torch.no_grad():
        loss_ours = ours(batch["input_ids"], labels=ignored, shift_labels=shifted).loss
        loss_ref = ref(batch["input_ids"], labels=ignored, shift_labels=shifted.contiguous()).loss
        plain = ours(batch["input_ids"], labels=batch["labels"]).loss
        assert ours(batch["input_ids"], shift_labels=shifted).loss is None  # as transformers: no labels, no loss
        assert ref(batch["input_ids"], shift_labels=shifted.contiguous()).loss is None
    assert_loss_equal(loss_ours, loss_ref)
    assert_loss_equal(loss_ours, plain)  # pre-shifted targets mean the same as labels


def test_input_require_grads_hook_as_transformers(pairs: dict[str, tuple[Any, Any]]) -> None:
    ours, ref = pairs["llama"]
    ids = torch.tensor([[1, 2, 3]])
    for model in (ours, ref):
        model.get_input_embeddings().weight.requires_grad_(False)
        assert not model.get_input_embeddings()(ids).requires_grad
        model.enable_input_require_grads()
        assert model.get_input_embeddings()(ids).requires_grad
        model.disable_input_require_grads()
        assert not model.get_input_embeddings()(ids).requires_grad
        model.get_input_embeddings().weight.requires_grad_(True)
