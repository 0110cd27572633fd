"""Numerical parity of lmport's Mistral with transformers' MistralForCausalLM on checkpoints transformers saved.

The oracle is transformers itself, loading the very folder lmport loads. Checked:

- fp32 logits (max abs diff <= 1e-5), loss (labels with -100) and every parameter's
  gradient (within 1e-5 of the reference gradient's largest entry; matched through the
  model's weight map, which for Mistral is the identity), for ``eager`` and ``sdpa``,
  over: ``sliding_window`` None / set / larger than the sequence, sequences longer than
  the window (window 4, 24 tokens), GQA (1 and 2 KV heads) and MHA, a ``head_dim`` apart
  from ``hidden_size // heads``; right-padded batches (real positions only).
- The window itself, independently of transformers: with one layer, perturbing a token
  more than ``window - 1`` positions behind a query leaves that query's logits exactly
  unchanged while a token inside the window changes them; with two layers the reach is
  ``2 * (window - 1)``. transformers shows the same semantics.
- bf16 checkpoints with ``dtype="auto"``: logits and loss bit-identical to transformers'.
- ``save_pretrained``: transformers loads lmport's save with nothing missing or
  unexpected and the same logits, and the files hold what transformers itself writes.

Weights are random with std 0.2 and random norms (``conftest.save_hf``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf, tree_digest
from safetensors.torch import load_file

import lmport

LOGITS_ATOL = 1e-5  # fp32, absolute (DESIGN.md)
GRAD_RTOL = 1e-5  # fp32, relative to the reference gradient's largest magnitude, per parameter
LOSS_TOL = 1e-6  # fp32, absolute and relative
MOVED = 1e-3  # a setting "is in effect" when toggling it moves some logit by more than this
ATTENTION = ("eager", "sdpa")
VOCAB = 128
SEQ = 24  # six times the window of 4
WINDOW = 4

TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
)

#: id -> transformers.MistralConfig overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "window_none_gqa2": {"sliding_window": None},
    "window_4_gqa2": {"sliding_window": WINDOW},
    "window_4_mqa": {"sliding_window": WINDOW, "num_key_value_heads": 1},
    "window_4_mha": {"sliding_window": WINDOW, "num_key_value_heads": 4},
    "window_none_mha": {"sliding_window": None, "num_key_value_heads": 4},
    "window_7_head_dim_32": {"sliding_window": 7, "head_dim": 32},
    "window_none_head_dim_8_mqa": {"sliding_window": None, "head_dim": 8, "num_key_value_heads": 1},
    "window_longer_than_seq": {"sliding_window": 32},
}


def make_checkpoint(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Path:
    return save_hf(folder, transformers.MistralConfig(**{**TINY, **overrides}), seed=seed, dtype=dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variant id -> folder, saved once per module (both attention kernels read the same one)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = make_checkpoint(tmp_path_factory.mktemp(case), **VARIANTS[case])
        return made[case]

    return get


# --- loading and comparing ------------------------------------------------------------


def load_lmport(folder: Path, **kwargs: Any) -> Any:
    """lmport's model, asserting the load left every file of ``folder`` as it was."""
    before = tree_digest(folder)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert tree_digest(folder) == before, "loading changed the checkpoint folder"
    return model


def load_hf(folder: Path, **kwargs: Any) -> Any:
    return transformers.MistralForCausalLM.from_pretrained(folder, **{"dtype": torch.float32, **kwargs})


def inputs(seq: int = SEQ, seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    """A batch of two: labels with -100 entries; ``padded`` right-pads the second row by 5 (> window)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, seq // 2 : seq // 2 + 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 5 :] = 0
        labels[1, seq - 5 :] = -100
        batch["attention_mask"] = mask
    return batch


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if mask is not None:  # padded positions are don't-care in both libraries
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    assert torch.isfinite(ours).all(), "non-finite logits at real positions"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff:.3g} (> {LOGITS_ATOL})"


def max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_loss_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=LOSS_TOL, atol=LOSS_TOL)


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.detach().clone()
    return out.loss.detach(), grads


def assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys(), f"parameter names differ: {sorted(ours.keys() ^ ref.keys())}"
    for name, g_ref in ref.items():
        assert ours[name].shape == g_ref.shape, f"{name}: gradient shape {ours[name].shape} != {g_ref.shape}"
        scale = g_ref.abs().max().item()
        assert scale > 0, f"reference gradient of {name} is all zero: the check would be vacuous"
        diff = (ours[name] - g_ref).abs().max().item()
        assert diff <= GRAD_RTOL * scale, f"{name}: gradient differs by {diff:.3g} (scale {scale:.3g})"


# --- 1. fp32 parity over config variants -------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", list(VARIANTS))
def test_fp32_parity_logits_loss_grads(checkpoints: Any, case: str, attn: str) -> None:
    folder = checkpoints(case)
    overrides = VARIANTS[case]
    ref = load_hf(folder, attn_implementation=attn)
    ours = load_lmport(folder, attn_implementation=attn)
    assert ours.dtype == torch.float32 and ours.attn_implementation == attn
    assert not ours.training
    window = overrides["sliding_window"]
    assert ours.config.sliding_window == ref.config.sliding_window == window
    attn_module = ours.model.layers[0].self_attn
    kv_heads = overrides.get("num_key_value_heads", TINY["num_key_value_heads"])
    head_dim = overrides.get("head_dim") or TINY["hidden_size"] // TINY["num_attention_heads"]
    assert attn_module.q_proj.weight.shape == (TINY["num_attention_heads"] * head_dim, TINY["hidden_size"])
    assert attn_module.k_proj.weight.shape == (kv_heads * head_dim, TINY["hidden_size"])

    plain, padded = inputs(seed=1), inputs(seed=2, padded=True)
    with torch.no_grad():
        logits = ours(plain["input_ids"]).logits
        assert_logits_close(logits, ref(plain["input_ids"]).logits)
        mask = padded["attention_mask"]
        assert_logits_close(
            ours(padded["input_ids"], attention_mask=mask).logits,
            ref(padded["input_ids"], attention_mask=mask).logits,
            mask,
        )
        # The window is in effect exactly when it is shorter than the sequence.
        unwindowed = load_lmport(folder, attn_implementation=attn, sliding_window=None)
        moved = max_change(unwindowed(plain["input_ids"]).logits, logits)
        if window is not None and window < SEQ:
            assert moved > MOVED, f"sliding_window={window} changes nothing (max logit change {moved:.3g})"
        else:
            assert moved <= LOGITS_ATOL, f"sliding_window={window} >= {SEQ} tokens changed the logits by {moved:.3g}"

    # Training mode: loss and every gradient, unpadded and padded.
    ours.train()
    ref.train()
    for batch in (plain, padded):
        loss_ours, grads_ours = loss_and_grads(ours, batch)
        loss_ref, grads_ref = loss_and_grads(ref, batch)
        assert_loss_equal(loss_ours, loss_ref)
        assert_grads_close(type(ours).weight_map.to_checkpoint(grads_ours), grads_ref)


# --- 2. the sliding window, asserted on its own ------------------------------------------


def perturbed(ids: torch.Tensor, position: int) -> torch.Tensor:
    out = ids.clone()
    out[:, position] = (out[:, position] + 1 + VOCAB // 2) % VOCAB
    return out


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("layers", [1, 2])
def test_sliding_window_reach(tmp_path: Path, attn: str, layers: int) -> None:
    """A query at p sees keys p-(window-1)..p per layer: reach is layers * (window - 1) positions back."""
    folder = make_checkpoint(tmp_path / "ckpt", sliding_window=WINDOW, num_hidden_layers=layers)
    models = {
        "lmport": load_lmport(folder, attn_implementation=attn),
        "transformers": load_hf(folder, attn_implementation=attn),
    }
    reach = layers * (WINDOW - 1)
    ids = inputs(seed=3)["input_ids"]
    for who, model in models.items():
        with torch.no_grad():
            base = model(ids).logits
            for j in (2, 9):  # the perturbed token
                changed = model(perturbed(ids, j)).logits
                assert torch.equal(changed[:, :j], base[:, :j]), f"{who}: a token changed logits before it (causality)"
                for p in range(j, j + reach + 1):  # inside the reach: the query sees it
                    moved = max_change(changed[:, p], base[:, p])
                    assert moved > 1e-4, f"{who}: position {p} does not see token {j} ({p - j} back, reach {reach})"
                # Beyond the reach: exactly unchanged.
                assert torch.equal(changed[:, j + reach + 1 :], base[:, j + reach + 1 :]), (
                    f"{who}: a query more than {reach} positions after token {j} still sees it"
                )


# --- 3. bf16 -----------------------------------------------------------------------------

# bf16 tolerance: 0 (bit-identical logits and loss). lmport runs the same bf16 ops in the
# same order as transformers (RMSNorm in fp32 then cast, rotary in the model dtype,
# softmax in fp32 for eager, torch's SDPA with the same boolean mask for sdpa), so any
# difference at all means a different computation.


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", ["window_4_gqa2", "window_none_head_dim_8_mqa"])
def test_bf16_checkpoint_auto_dtype(tmp_path: Path, case: str, attn: str) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16, **VARIANTS[case])
    ref = load_hf(folder, attn_implementation=attn, dtype="auto")
    ours = load_lmport(folder, attn_implementation=attn, dtype="auto")
    assert ref.dtype == torch.bfloat16  # the oracle agrees the checkpoint is bf16
    assert ours.dtype == torch.bfloat16 and ours.config.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    for batch in (inputs(seed=1), inputs(seed=2, padded=True)):
        mask = batch.get("attention_mask")
        with torch.no_grad():
            out_ours = ours(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
            out_ref = ref(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        assert out_ours.logits.dtype == torch.bfloat16
        keep = mask.bool() if mask is not None else torch.ones(out_ref.logits.shape[:2], dtype=torch.bool)
        assert torch.equal(out_ours.logits[keep], out_ref.logits[keep])
        assert torch.equal(out_ours.loss, out_ref.loss)


# --- 4. save_pretrained round trip through transformers -----------------------------------


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", ["window_4_gqa2", "window_none_head_dim_8_mqa"])
def test_save_pretrained_round_trip_through_transformers(tmp_path: Path, case: str) -> None:
    overrides = VARIANTS[case]
    folder = make_checkpoint(tmp_path / "hf", **overrides)
    ours = load_lmport(folder)
    # A "fine-tuned" model: every parameter moved, so the save must carry lmport's own state.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours.save_pretrained(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert raw["model_type"] == "mistral"
    assert "sliding_window" in raw and raw["sliding_window"] == overrides["sliding_window"]

    ref, info = transformers.MistralForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ref.dtype == torch.float32
    for key, value in overrides.items():
        assert getattr(ref.config, key) == value, f"config {key} did not round-trip"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(ref.config, key) == TINY[key]
    batch = inputs(seed=1, padded=True)
    mask = batch["attention_mask"]
    with torch.no_grad():
        out_ours = ours(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        out_ref = ref(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    assert torch.equal(out_ours.logits[mask.bool()], out_ref.logits[mask.bool()])
    assert torch.equal(out_ours.loss, out_ref.loss)

    # The files are what transformers itself writes for this model: names, shapes, dtypes, values.
    ref.save_pretrained(tmp_path / "theirs")
    mine, theirs = tensors_of(tmp_path / "ours"), tensors_of(tmp_path / "theirs")
    assert mine.keys() == theirs.keys() == tensors_of(folder).keys()
    for name, t in theirs.items():
        assert mine[name].shape == t.shape and mine[name].dtype == t.dtype, name
        assert torch.equal(mine[name], t), f"{name}: saved values differ from transformers' save"

    # And lmport reads its own save back to the same numbers.
    again = load_lmport(tmp_path / "ours")
    assert again.config.sliding_window == overrides["sliding_window"]
    with torch.no_grad():
        assert torch.equal(again(batch["input_ids"]).logits, ours(batch["input_ids"]).logits)
