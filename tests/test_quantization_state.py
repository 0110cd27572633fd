"""The quantization state protocol: a quantizer's ``finalize`` returns a ``QuantizationState``; the model
keeps it as ``model.quantization_state`` and derives transformers' names from it, read-only.

- a third-party quantizer's state gives ``is_quantized``, ``quantization_method``,
  ``quantization_config``, ``hf_quantizer``; ``is_loaded_in_4bit/8bit`` stay false (bitsandbytes
  only, as in transformers); ``save_pretrained`` is refused naming the method; a ``finalize``
  returning anything else is a ``PluginError``; the attributes cannot be set;
- bitsandbytes 4-bit: transformers' own ``validate_quantization_for_training`` refuses the bare
  model and accepts it under peft, and ``Trainer`` trains the adapters (it reads ``hf_quantizer``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lmport
from lmport import errors
from lmport.quantization import QuantizationState

from conftest import save_hf_llama_random

ATTRIBUTES = ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method", "quantization_config",
              "hf_quantizer")  # fmt: skip


class Marker:
    """Settings of a made-up quantization method that a test plugin serves."""

    quant_method = "marker"


class MarkingQuantizer:
    """Quantizes nothing; says the model is quantized with ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def prepare(self, model: nn.Module) -> None:
        pass

    def claims(self, module_name: str) -> bool:
        return False

    def materialize(self, model: nn.Module, module_name: str, tensor: torch.Tensor, device: torch.device) -> None:
        raise AssertionError("claims nothing")

    def finalize(self, model: nn.Module) -> Any:
        return self.answer


class MarkerPlugin:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @lmport.hookimpl(tryfirst=True)
    def lmport_quantizer(self, quantization_config: Any) -> Any:
        return MarkingQuantizer(self.answer) if isinstance(quantization_config, Marker) else None


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Projection widths are multiples of 64, as bitsandbytes' CPU 4-bit kernel needs.
    return save_hf_llama_random(tmp_path_factory.mktemp("qstate") / "llama", seed=21, std=0.05,
                                intermediate_size=128, num_hidden_layers=1)  # fmt: skip


def load_with(answer: Any, folder: Path) -> Any:
    plugin = MarkerPlugin(answer)
    lmport.register(plugin, name="marker-quantizer")
    try:
        return lmport.AutoModelForCausalLM.from_pretrained(folder, quantization_config=Marker())
    finally:
        lmport.unregister(plugin)


def test_unquantized_model(llama: Path) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(llama)
    assert model.quantization_state is None
    assert [getattr(model, a) for a in ATTRIBUTES] == [False, False, False, None, None, None]


def test_a_plugins_state_is_what_the_model_says(llama: Path, tmp_path: Path) -> None:
    settings = Marker()
    state = QuantizationState(method="marker", settings=settings, bits=4)
    model = load_with(state, llama)
    assert model.quantization_state is state
    assert model.is_quantized and model.quantization_method == "marker" and model.quantization_config is settings
    assert not model.is_loaded_in_4bit and not model.is_loaded_in_8bit  # bitsandbytes' flags only
    assert model.hf_quantizer.quantization_config is settings and model.hf_quantizer.is_trainable
    for name in ATTRIBUTES:
        with pytest.raises(AttributeError, match="quantization_state"):
            setattr(model, name, False)
    with pytest.raises(errors.UnsupportedFeatureError, match="quantized \\(marker\\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_finalize_answers_none_or_a_state(llama: Path) -> None:
    assert load_with(None, llama).quantization_state is None  # e.g. a plugin that dequantizes
    with pytest.raises(errors.PluginError, match="finalize\\(\\) returned dict, not an lmport.quantization"):
        load_with({"is_quantized": True}, llama)


# --- bitsandbytes under transformers' own checks -------------------------------------------------


@pytest.fixture
def in_4bit(llama: Path) -> Iterator[Any]:
    yield lmport.AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )


def test_bitsandbytes_state(in_4bit: Any) -> None:
    state = in_4bit.quantization_state
    assert (state.method, state.bits, state.pre_quantized) == ("bitsandbytes", 4, False)
    assert in_4bit.is_loaded_in_4bit and not in_4bit.is_loaded_in_8bit
    assert in_4bit.quantization_config == lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def test_trainer_accepts_qlora_and_refuses_the_bare_model(in_4bit: Any, tmp_path: Path) -> None:
    import peft
    import transformers
    from transformers.trainer_utils import validate_quantization_for_training

    with pytest.raises(ValueError, match="purely quantized models"):
        validate_quantization_for_training(in_4bit)
    model = peft.get_peft_model(
        peft.prepare_model_for_kbit_training(in_4bit),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    validate_quantization_for_training(model)  # reads model.hf_quantizer.is_trainable
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        tmp_path / "run", max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
