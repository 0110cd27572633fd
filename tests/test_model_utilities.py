"""Utilities fine-tuning code calls on a model, each compared with transformers' on the same checkpoint.

``resize_token_embeddings`` (with ``pad_to_multiple_of``, ``mean_resizing``, shrinking, tied
and untied heads, and through TRL's ``clone_chat_template``), ``get_memory_footprint``,
``can_generate``, ``base_model_prefix``, ``config.torch_dtype``, and the transformers
arguments of ``save_pretrained`` (``save_function``, ``is_main_process``, ``state_dict``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, save_hf, tiny_configs
from helpers import VOCAB, assert_logits_close, load_clean, load_lmport, make_tokenizer, one_intraop_thread, tensors_of

import lmport
from lmport import errors

ARCHS = ("llama", "llama_tied", "gpt2", "mistral")
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 99, 3], [4, 4, 8, 15, 16, 23, 42, 0]])  # ids < 100: survive a shrink


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints saved by transformers: untied Llama and Mistral, tied Llama and GPT-2."""
    import transformers

    root = tmp_path_factory.mktemp("utilities")
    configs = {name: make() for name, make in tiny_configs().items()}
    configs["llama_tied"] = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True)
    return {name: save_hf(root / name, configs[name]) for name in ARCHS}


def load_pair(folder: Path, **kwargs: Any) -> tuple[Any, Any]:
    import transformers

    return load_lmport(folder, **kwargs), load_clean(transformers.AutoModelForCausalLM, folder, **kwargs)


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- resize_token_embeddings ----------------------------------------------------------------------

RESIZES = [
    ({"new_num_tokens": 150}, 150),
    ({"new_num_tokens": 150, "mean_resizing": False}, 150),
    ({"new_num_tokens": 130, "pad_to_multiple_of": 64}, 192),
    ({"pad_to_multiple_of": 48}, 144),
    ({"new_num_tokens": 100}, 100),
    ({"new_num_tokens": VOCAB}, VOCAB),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_resize_token_embeddings_matches_transformers(ckpts: dict[str, Path], arch: str, tmp_path: Path) -> None:
    """Same seed, same rows as transformers (bitwise); old rows kept; head tied iff it was; config follows."""
    for kwargs, size in RESIZES:
        ours, ref = load_pair(ckpts[arch])
        tied = ours.config.tie_word_embeddings
        assert tied == (arch in ("llama_tied", "gpt2")) == (ref.lm_head.weight is ref.get_input_embeddings().weight)
        old_embed = ours.get_input_embeddings().weight.detach().clone()
        old_head = ours.lm_head.weight.detach().clone()
        before = logits(ours)
        torch.manual_seed(7)
        returned = ours.resize_token_embeddings(**kwargs)
        torch.manual_seed(7)
        ref.resize_token_embeddings(**kwargs)

        embed, head = ours.get_input_embeddings(), ours.get_output_embeddings()
        assert returned is embed and embed.weight.shape == (size, 64) and embed.num_embeddings == size
        assert head.weight.shape == (size, 64) and head.out_features == size
        assert ours.config.vocab_size == ours.vocab_size == ref.config.vocab_size == size, kwargs
        assert (head.weight is embed.weight) == tied, kwargs
        assert torch.equal(embed.weight, ref.get_input_embeddings().weight), kwargs
        assert torch.equal(head.weight, ref.get_output_embeddings().weight), kwargs
        keep = min(size, VOCAB)
        assert torch.equal(embed.weight[:keep], old_embed[:keep]) and torch.equal(head.weight[:keep], old_head[:keep])

        after = logits(ours)
        assert_logits_close(after, logits(ref))
        torch.testing.assert_close(after[..., :keep], before[..., :keep], atol=1e-5, rtol=0)  # old tokens unchanged
        added = size - VOCAB
        if added > 0 and kwargs.get("mean_resizing", True):
            # N(mean, 1e-9 * covariance): every new row sits at the old rows' mean, not all equal
            new_rows = embed.weight[VOCAB:]
            assert (new_rows - old_embed.mean(0)).abs().max() < 1e-4
            assert not torch.equal(new_rows[0], new_rows[1])
        elif added > 0:
            std = embed.weight[VOCAB:].std().item()
            assert 0.7 * ours.config.initializer_range < std < 1.3 * ours.config.initializer_range

    # the last resize grew the vocabulary: the save loads in transformers and lmport alike
    ours, _ = load_pair(ckpts[arch])
    ours.resize_token_embeddings(130, pad_to_multiple_of=8)
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "resized")
    assert json.loads((tmp_path / "resized" / "config.json").read_text())["vocab_size"] == 136
    reloaded_ours, reloaded_ref = load_pair(tmp_path / "resized")
    assert_logits_close(logits(reloaded_ref), expected)
    assert_logits_close(logits(reloaded_ours), expected)
    assert (reloaded_ours.lm_head.weight is reloaded_ours.get_input_embeddings().weight) == (
        arch in ("llama_tied", "gpt2")
    )


def test_resize_trains_new_rows_and_keeps_requires_grad(ckpts: dict[str, Path]) -> None:
    """A frozen embedding stays frozen; a trainable one gets gradients on the added rows too."""
    ours = load_lmport(ckpts["llama"])
    ours.get_input_embeddings().weight.requires_grad_(False)
    ours.resize_token_embeddings(140)
    assert not ours.get_input_embeddings().weight.requires_grad and ours.lm_head.weight.requires_grad
    ids = torch.tensor([[3, 130, 139, 5]])
    ours(input_ids=ids, labels=ids).loss.backward()
    assert ours.lm_head.weight.grad.shape == (140, 64) and ours.lm_head.weight.grad[130:].abs().sum() > 0


def test_resize_token_embeddings_bad_arguments(ckpts: dict[str, Path]) -> None:
    ours = load_lmport(ckpts["gpt2"])
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()  # nothing asked: nothing changes
    assert ours.config.vocab_size == VOCAB
    bad = ({"new_num_tokens": 0}, {"new_num_tokens": 12.5}, {"pad_to_multiple_of": 0}, {"pad_to_multiple_of": "8"})
    for kwargs in bad:
        with pytest.raises(errors.ArgumentError):
            ours.resize_token_embeddings(**kwargs)
    assert ours.config.vocab_size == VOCAB and ours.get_input_embeddings().weight.shape[0] == VOCAB


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trl_clone_chat_template(ckpts: dict[str, Path], arch: str, tmp_path: Path) -> None:
    """TRL's clone_chat_template (can_generate, get_text_config, generation_config, resize to a multiple)."""
    from trl import clone_chat_template

    source = make_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    source.save_pretrained(tmp_path / "source")

    results = []
    for model in load_pair(ckpts[arch]):
        torch.manual_seed(3)
        results.append(clone_chat_template(model, make_tokenizer(), str(tmp_path / "source"), resize_to_multiple_of=48))
    (ours, tok_ours, _), (ref, tok_ref, _) = results
    assert ours.vocab_size == ref.vocab_size == len(tok_ours.vocab) == len(tok_ref.vocab) == 144
    assert ours.config.eos_token_id == ref.config.eos_token_id == tok_ours.convert_tokens_to_ids("<|im_end|>")
    assert ours.generation_config.eos_token_id == ref.generation_config.eos_token_id
    assert torch.equal(ours.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert torch.equal(ours.get_output_embeddings().weight, ref.get_output_embeddings().weight)
    ids = torch.tensor([tok_ours("hi<|im_start|>yo<|im_end|>")["input_ids"]])
    assert_logits_close(logits(ours, ids), logits(ref, ids))


# --- memory footprint, can_generate, base_model_prefix --------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_footprint_equals_transformers(ckpts: dict[str, Path], arch: str) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = load_pair(ckpts[arch], dtype=dtype)
        for buffers in (True, False):
            assert ours.get_memory_footprint(return_buffers=buffers) == ref.get_memory_footprint(
                return_buffers=buffers
            ), (dtype, buffers)
        assert ours.get_memory_footprint() > ours.get_memory_footprint(return_buffers=False) or arch == "gpt2"
    ours.resize_token_embeddings(200)
    ref.resize_token_embeddings(200)
    assert ours.get_memory_footprint() == ref.get_memory_footprint()


def test_can_generate_and_base_model_prefix(ckpts: dict[str, Path]) -> None:
    for arch in ("llama", "gpt2"):
        ours, ref = load_pair(ckpts[arch])
        assert ours.can_generate() is True and type(ours).can_generate() is ref.can_generate() is True
        # peft and TRL find the model body as getattr(model, model.base_model_prefix)
        assert ours.base_model_prefix == type(ours).base_model_prefix == "model"
        assert getattr(ours, ours.base_model_prefix) is ours.model is ours.base_model
        assert hasattr(ours, ours.base_model_prefix)  # accelerate's bnb helper: "not a base model"


# --- config.torch_dtype -------------------------------------------------------------------------------


def test_config_torch_dtype_alias(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    ours = load_lmport(ckpts["llama"])
    ref_config = transformers.AutoConfig.from_pretrained(ckpts["llama"])
    assert ours.config.torch_dtype == ref_config.torch_dtype == torch.float32
    assert isinstance(ours.config.torch_dtype, torch.dtype)

    config = lmport.AutoConfig.from_pretrained(ckpts["llama"])
    config.torch_dtype = torch.bfloat16
    assert config.dtype == "bfloat16" and config.torch_dtype == torch.bfloat16
    config.torch_dtype = "float16"
    assert config.dtype == "float16" and config.torch_dtype == torch.float16
    config.save_pretrained(tmp_path / "cfg")
    raw = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert raw["dtype"] == "float16" and "torch_dtype" not in raw  # written once
    assert transformers.AutoConfig.from_pretrained(tmp_path / "cfg").dtype == torch.float16
    config.dtype = torch.bfloat16  # transformers-style code assigns a torch.dtype to dtype
    assert config.to_dict()["dtype"] == "bfloat16" and config.torch_dtype == torch.bfloat16
    for bad in ("float99", 3, "Tensor"):
        with pytest.raises(errors.ArgumentError):
            config.torch_dtype = bad
    config.torch_dtype = None
    assert config.dtype is None and config.torch_dtype is None

    # an older config.json spells it torch_dtype only
    raw = json.loads((ckpts["llama"] / "config.json").read_text())
    raw.pop("dtype", None)
    raw["torch_dtype"] = "bfloat16"
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(raw))
    legacy = lmport.AutoConfig.from_pretrained(tmp_path / "legacy")
    assert legacy.torch_dtype == transformers.AutoConfig.from_pretrained(tmp_path / "legacy").dtype == torch.bfloat16
    assert "torch_dtype" not in legacy.to_dict() and legacy.to_dict()["dtype"] == "bfloat16"


# --- save_pretrained takes transformers' arguments --------------------------------------------------


def test_save_function_writes_bin_shards(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """``save_function`` replaces torch.save for .bin weights (accelerate scripts pass accelerator.save)."""
    import transformers

    ours = load_lmport(ckpts["gpt2"])
    calls: list[tuple[list[str], str]] = []

    def save_function(obj: dict[str, torch.Tensor], path: str) -> None:
        calls.append((sorted(obj), path))
        torch.save(obj, path)

    folder = ours.save_pretrained(tmp_path / "bin", safe_serialization=False, save_function=save_function,
                                  max_shard_size="150KB")  # fmt: skip
    shards = sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    assert len(calls) == len(shards) >= 2 and (folder / "pytorch_model.bin.index.json").is_file()
    assert all("transformer.h.0.attn.c_attn.weight" in names for names, _ in calls[:1])  # checkpoint names
    ref = load_clean(transformers.AutoModelForCausalLM, folder)
    assert_logits_close(logits(ref), logits(ours))

    calls.clear()
    with pytest.warns(UserWarning, match="save_function is used for .bin weights only"):
        ours.save_pretrained(tmp_path / "st", save_function=save_function)
    assert calls == [] and (tmp_path / "st" / "model.safetensors").is_file()
    with pytest.raises(errors.ArgumentError, match="save_function"):
        ours.save_pretrained(tmp_path / "x", safe_serialization=False, save_function="torch.save")


def test_save_pretrained_main_process_state_dict_and_errors(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    ours = load_lmport(ckpts["gpt2"])
    ours.save_pretrained(tmp_path / "other-rank", False)  # is_main_process, positionally as transformers takes it
    assert not (tmp_path / "other-rank").exists() or not any((tmp_path / "other-rank").iterdir())

    # Trainer passes state_dict=model.state_dict() (module names); a changed tensor is what gets saved
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    ours.save_pretrained(tmp_path / "sd", state_dict=state)
    saved = tensors_of(tmp_path / "sd")
    assert torch.equal(saved["transformer.ln_f.weight"], ours.model.norm.weight.detach() * 2)
    ref = load_clean(transformers.AutoModelForCausalLM, tmp_path / "sd")
    with torch.no_grad():
        ours.model.norm.weight.mul_(2)
    assert_logits_close(logits(ref), logits(ours))

    ours.save_pretrained(tmp_path / "flags", save_peft_format=False, token=None, save_original_format=True)
    assert (tmp_path / "flags" / "model.safetensors").is_file()
    with pytest.raises(errors.ArgumentError, match="no_such_arg"):
        ours.save_pretrained(tmp_path / "bad", no_such_arg=1)
    with pytest.raises(errors.ArgumentError, match="push_to_hub=True"):
        ours.save_pretrained(tmp_path / "bad", repo_id="me/model")
    with pytest.raises(errors.ArgumentError, match="exist_ok"):
        ours.save_pretrained(tmp_path / "bad", push_to_hub=True, exist_ok=True)
    with pytest.raises(errors.UnsupportedFeatureError, match="save_original_format"):
        ours.save_pretrained(tmp_path / "bad", save_original_format=False)
    with pytest.raises(errors.UnsupportedFeatureError, match="distributed_checkpoint"):
        ours.save_pretrained(tmp_path / "bad", distributed_checkpoint=True)
    assert not (tmp_path / "bad").exists()
