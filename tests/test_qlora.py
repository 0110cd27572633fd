"""LoRA and QLoRA with peft on lmport models (CPU).

- QLoRA: a 4-bit nf4 model, ``peft.prepare_model_for_kbit_training`` and
  ``get_peft_model(LoraConfig(target_modules=...))`` trains with AdamW: the loss falls,
  only ``lora_`` parameters are trainable and receive gradients, and every base tensor
  (packed 4-bit codes, quantization statistics, embeddings, norms, head) is bit-for-bit
  unchanged afterwards. Llama, GPT-2 and Mistral.
- LoRA on full-precision models with each architecture's ``target_modules`` (lmport's
  module names: GPT-2's fused ``c_attn`` is split into q/k/v projections): exactly the
  targeted projections get adapters; ``save_pretrained`` writes an adapter that
  ``PeftModel.from_pretrained`` restores onto a freshly loaded base with identical
  logits; ``merge_and_unload`` gives a plain lmport model whose ``save_pretrained``
  output transformers loads (nothing missing or unexpected) with the same logits.
- Gradient checkpointing under peft (reentrant and not) gives the adapters exactly the
  gradients of a run without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from conftest import save_hf, save_hf_llama_random
from safetensors import safe_open

import lmport

LOGITS_ATOL = 1e-5  # lmport vs transformers, fp32 (DESIGN.md)
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(11))

# What the README documents: lmport's projection names per architecture.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LAYERS = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    # Projection widths are multiples of 64, as bitsandbytes' CPU 4-bit kernel needs.
    return {
        "llama": save_hf_llama_random(
            root / "llama", seed=21, std=0.05, intermediate_size=128, num_hidden_layers=LAYERS
        ),
        "gpt2": save_hf(
            root / "gpt2",
            transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64,
                                    bos_token_id=0, eos_token_id=0),  # fmt: skip
            seed=22,
            std=0.05,
        ),
        "mistral": save_hf(
            root / "mistral",
            transformers.MistralConfig(
                vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=6,
            ),  # fmt: skip
            seed=23,
            std=0.05,
        ),
    }


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_config(arch: str, **kwargs: Any) -> peft.LoraConfig:
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[arch], task_type="CAUSAL_LM",
                           **kwargs)  # fmt: skip


def adapted_modules(model: Any) -> set[str]:
    """Names (relative to the lmport model) of the modules peft gave an adapter."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix).removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}


def expected_adapted(arch: str, model: Any) -> set[str]:
    names = {n for n, _ in model.named_modules()}
    out = {n for n in names if n.rsplit(".", 1)[-1] in TARGETS[arch]}
    assert len(out) == LAYERS * len(TARGETS[arch])  # every target name exists in every layer
    return out


def train(model: Any, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert with_grad == trainable
            assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
            assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor, in its saved form (bitsandbytes' packed codes and statistics)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --- QLoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_qlora_trains_only_the_adapters(arch: str, checkpoints: dict[str, Path]) -> None:
    import bitsandbytes as bnb

    model = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints[arch],
        quantization_config=lmport.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
    )
    model = peft.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing  # prepare_model_for_kbit_training turns it on
    model = peft.get_peft_model(model, lora_config(arch))
    assert adapted_modules(model) == expected_adapted(arch, model.base_model.model)
    for name in adapted_modules(model):  # adapters wrap the 4-bit layers
        assert isinstance(model.base_model.model.get_submodule(name).base_layer, bnb.nn.Linear4bit)
    before = base_state(model)

    losses = train(model, steps=6)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

    after = base_state(model)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


# --- LoRA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_lora_save_reload_merge(arch: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = checkpoints[arch]
    base_logits = logits(lmport.AutoModelForCausalLM.from_pretrained(folder))
    model = peft.get_peft_model(lmport.AutoModelForCausalLM.from_pretrained(folder), lora_config(arch))
    assert adapted_modules(model) == expected_adapted(arch, model.base_model.model)
    before = base_state(model)
    losses = train(model, steps=3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    model.eval()
    trained = logits(model)
    assert not torch.allclose(trained, base_logits)

    # The adapter: its config names the targets; its tensors are exactly the adapters.
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS[arch])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == {f"base_model.model.{m}.lora_{ab}.weight" for m in adapted_modules(model) for ab in "AB"}
    restored = peft.PeftModel.from_pretrained(lmport.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter")
    assert torch.equal(logits(restored), trained)

    # Merged: a plain lmport model again, which transformers reads back.
    merged = model.merge_and_unload()
    assert type(merged) is type(restored.base_model.model)
    assert not any("lora" in n for n, _ in merged.named_modules())
    merged_logits = logits(merged)
    # W x + s B (A x) becomes (W + s B A) x: the same product in another fp32 rounding order.
    torch.testing.assert_close(merged_logits, trained, rtol=0, atol=LOGITS_ATOL)
    merged.save_pretrained(tmp_path / "merged")
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(reference), merged_logits, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_with_peft(reentrant: bool, checkpoints: dict[str, Path]) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation both times
        model = peft.get_peft_model(
            lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"]),
            lora_config("llama", init_lora_weights=False),  # non-zero B: every adapter gets a gradient
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.base_model.model.is_gradient_checkpointing
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * LAYERS * len(TARGETS["llama"])
    for name, grad in plain.items():
        assert grad is not None and checkpointed[name] is not None, name
        assert grad.abs().sum() > 0, name
        assert torch.equal(checkpointed[name], grad), name
