"""``lmport.estimate`` / ``lmport estimate``: training memory without running a step.

1. Against a real step. The estimate runs one training step on fake tensors (shapes only);
   here the same step runs for real (real weights, peft's LoRA, bitsandbytes' 4-bit layers)
   under the same storage counter. Activations (kept from forward for backward) and the
   forward/backward peak must be equal to the byte, and the weights within 1%: full
   fine-tuning, gradient checkpointing, LoRA, LoRA with checkpointing, QLoRA, the plain loss.
   (The resident-size comparison at the issue's shapes is benchmarks/train_step.py's.)
2. What the settings change: checkpointing shrinks activations, LoRA the gradients and AdamW
   state, 4-bit the weights; the chunked loss removes the logits from the peak.
3. The command: a table or JSON of the six scenarios; bad arguments exit 2 with a typed error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_intraop_thread

import lmport
from lmport.cli import main
from lmport.estimate import MemoryEstimate, _LiveStorages, _nbytes, _unique, estimate_checkpoint, estimate_memory
from lmport.errors import ArgumentError

BATCH, SEQ, VOCAB = 2, 32, 1024
TINY = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip

one_thread = pytest.fixture(autouse=True)(one_intraop_thread)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    lmport.AutoModelForCausalLM.from_config(config_of(), seed=0).save_pretrained(out)
    return out


def config_of() -> Any:
    from lmport.registry import get_registry

    registry = get_registry()
    registry.ensure("llama")
    return registry.architecture("llama").config_class.from_dict(TINY)


def model_class() -> type:
    from lmport.registry import get_registry

    return get_registry().hook.lmport_resolve_model_class(config=config_of())


def real_step(model: Any, extra_state: list[torch.Tensor] = ()) -> tuple[int, int, int]:  # type: ignore[assignment]
    """``(weights, bytes live at the end of forward, forward/backward peak)`` of one real training step,
    counted as the estimate counts (storages made during the step, beyond weights and buffers)."""
    state = _unique([*model.parameters(), *model.buffers(), *extra_state])
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model.train()
    tracker = _LiveStorages(state)
    with tracker:
        loss = model(input_ids=ids, labels=ids).loss
        forward_end = tracker.current
        loss.backward()
    return _nbytes(state), forward_end, tracker.peak


def head_grad_bytes(chunked: bool, trains_head: bool) -> int:
    """The chunked loss makes the head's gradient in forward: the estimate counts it as a gradient."""
    return VOCAB * 64 * 4 if chunked and trains_head else 0


def check(estimate: MemoryEstimate, weights: int, forward_end: int, peak: int, head_grad: int) -> None:
    assert estimate.activations == forward_end - head_grad
    step_peak = estimate.peak - estimate.weights - estimate.optimizer
    update = estimate.gradients + 2 * VOCAB * 64 * 4  # per-parameter AdamW: two temporaries of the largest
    assert step_peak == max(peak, update), (step_peak, peak, update)
    assert abs(estimate.weights - weights) <= 0.01 * weights


# --- 1. against a real step ---------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [0, 8])
def test_equals_a_real_step(folder: Path, lora: int, checkpointing: bool) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, target_modules="all-linear", lora_dropout=0.0))
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = real_step(model)
    estimate = estimate_memory(
        model_class(), config_of(), batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=checkpointing, lora_r=lora
    )
    check(estimate, *measured, head_grad_bytes(True, trains_head=not lora))


def test_equals_a_real_step_with_full_logits(folder: Path) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    model.chunked_loss = False
    estimate = estimate_memory(model_class(), config_of(), batch_size=BATCH, seq_len=SEQ, chunked_loss=False)
    check(estimate, *real_step(model), 0)
    assert estimate.activations > BATCH * SEQ * VOCAB * 4  # the logits' log-softmax is kept


def test_equals_a_real_qlora_step(folder: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    model = lmport.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    absmax = [m.weight.quant_state.absmax for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert absmax, "no 4-bit layer"
    estimate = estimate_memory(model_class(), config_of(), batch_size=BATCH, seq_len=SEQ, lora_r=8, load_in_4bit=True)
    check(estimate, *real_step(model, absmax), 0)


# --- 2. what the settings change ----------------------------------------------------------------------


def test_settings_move_the_right_columns(folder: Path) -> None:
    rows = {r.scenario: r for r in estimate_checkpoint(folder, batch_size=BATCH, seq_len=SEQ, lora_r=8)}
    assert list(rows) == [
        "full", "full + checkpointing", "LoRA r=8", "LoRA r=8 + checkpointing",
        "4-bit LoRA r=8", "4-bit LoRA r=8 + checkpointing",
    ]  # fmt: skip
    full, lora, qlora = rows["full"], rows["LoRA r=8"], rows["4-bit LoRA r=8"]
    assert rows["full + checkpointing"].activations < full.activations / 2
    assert full.gradients == sum(p.numel() * 4 for p in _unique(lmport.AutoModelForCausalLM.from_pretrained(folder).parameters()))
    assert full.optimizer == 2 * full.gradients
    assert lora.gradients < full.gradients / 10 and lora.optimizer == 2 * lora.gradients
    assert qlora.weights < lora.weights and qlora.gradients == lora.gradients
    bf16 = estimate_checkpoint(folder, batch_size=BATCH, seq_len=SEQ, dtype="bfloat16")[0]
    assert bf16.gradients == full.gradients // 2 and bf16.weights < 0.51 * full.weights  # rotary buffers stay fp32


def test_chunked_loss_leaves_the_logits_out(folder: Path) -> None:
    """16,384 rows: four chunks of this vocabulary (a chunk is at most 4,096 rows)."""
    chunked = estimate_checkpoint(folder, batch_size=4, seq_len=4096)[0]
    plain = estimate_checkpoint(folder, batch_size=4, seq_len=4096, chunked_loss=False)[0]
    logits = 4 * 4096 * VOCAB * 4
    assert plain.peak - chunked.peak > logits


def test_bad_arguments(folder: Path) -> None:
    with pytest.raises(ArgumentError, match="batch_size"):
        estimate_checkpoint(folder, batch_size=0, seq_len=8)
    with pytest.raises(ArgumentError, match="dtype"):
        estimate_checkpoint(folder, batch_size=1, seq_len=8, dtype="int8")


# --- 3. the command ------------------------------------------------------------------------------------


def test_command(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(folder), "--batch-size", "2", "--seq-len", "16", "--lora-r", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scenario"] for r in rows][2] == "LoRA r=4"
    assert set(rows[0]) == {"scenario", "weights", "gradients", "optimizer", "activations", "peak"}
    assert main(["estimate", str(folder), "--batch-size", "2", "--seq-len", "16"]) == 0
    text = capsys.readouterr().out
    assert "float32" in text and "chunked loss" in text and "4-bit LoRA r=16 + checkpointing" in text
    assert main(["estimate", str(folder), "--batch-size", "0", "--seq-len", "16"]) == 2
    assert "ArgumentError" in capsys.readouterr().err
