"""Numerical parity of lmport's Mistral with transformers' MistralForCausalLM on checkpoints transformers saved.

The oracle is transformers itself, loading the very folder lmport loads. The checks every
architecture shares come from the conformance kit (:mod:`lmport.testing`). Checked:

- ``check_fp32``: fp32 logits (max abs diff <= 1e-5, finite), loss (labels with -100) and every
  parameter's gradient (within 1e-5 of the reference gradient's largest entry; matched through the
  model's weight map, which for Mistral is the identity), for ``eager`` and ``sdpa``,
  over: ``sliding_window`` None / set / larger than the sequence, sequences longer than
  the window (window 4, 24 tokens), GQA (1 and 2 KV heads) and MHA, a ``head_dim`` apart
  from ``hidden_size // heads``; left- and right-padded rows (padding longer than the window,
  real positions only), ``inputs_embeds``. The window is shown in effect exactly when shorter
  than the sequence.
- The window itself, independently of transformers: with one layer, perturbing a token
  more than ``window - 1`` positions behind a query leaves that query's logits exactly
  unchanged while a token inside the window changes them; with two layers the reach is
  ``2 * (window - 1)``. transformers shows the same semantics.
- ``check_bf16``: bf16 checkpoints with ``dtype="auto"``: logits, loss and every gradient
  bit-identical to transformers'.
- ``check_save_round_trip``: transformers loads lmport's save with nothing missing or
  unexpected, the same config (``sliding_window`` included) and the same logits, the files hold
  what transformers itself writes, and lmport reads both saves to the same numbers.

Weights are random with std 0.2 and random norms (``lmport.testing.save_reference_checkpoint``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import TINY_LLAMA
from helpers import (
    ATTENTION,
    LOGITS_ATOL,
    MOVED,
    VOCAB,
    batch_of_two,
    load_lmport,
    max_change,
    one_intraop_thread,
)

import lmport
from lmport import testing

SEQ = 24  # six times the window of 4
WINDOW = 4

TINY: dict[str, Any] = {**TINY_LLAMA, "bos_token_id": 0, "eos_token_id": 0}

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
    return testing.save_reference_checkpoint("mistral", {**TINY, **overrides}, folder, seed=seed, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variant id -> folder, saved once per module (both attention kernels read the same one)."""
    return functools.cache(lambda case: make_checkpoint(tmp_path_factory.mktemp(case), **VARIANTS[case]))


# --- loading and comparing ------------------------------------------------------------


def load_hf(folder: Path, **kwargs: Any) -> Any:
    return transformers.MistralForCausalLM.from_pretrained(folder, **{"dtype": torch.float32, **kwargs})


#: ``inputs(seed=0, padded=False)``: a batch of two, labels with -100 entries; ``padded`` right-pads the
#: second row by 5 (> window).
inputs = functools.partial(batch_of_two, SEQ)


# --- 1. fp32 parity over config variants -------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", list(VARIANTS))
def test_fp32_parity_logits_loss_grads(checkpoints: Any, case: str, attn: str) -> None:
    folder = checkpoints(case)
    overrides = VARIANTS[case]
    ours, ref = testing.load_pair(folder, attn)
    assert ours.dtype == torch.float32  # lmport's default for an fp32 checkpoint
    window = overrides["sliding_window"]
    assert ours.config.sliding_window == ref.config.sliding_window == window
    attn_module = ours.model.layers[0].self_attn
    kv_heads = overrides.get("num_key_value_heads", TINY["num_key_value_heads"])
    head_dim = overrides.get("head_dim") or TINY["hidden_size"] // TINY["num_attention_heads"]
    assert attn_module.q_proj.weight.shape == (TINY["num_attention_heads"] * head_dim, TINY["hidden_size"])
    assert attn_module.k_proj.weight.shape == (kv_heads * head_dim, TINY["hidden_size"])

    # The kit: finite logits unpadded, padded (by 3 on the left, 5 > window on the right) and from
    # inputs_embeds; loss and every gradient, unpadded and padded, through the weight map (the identity).
    testing.check_fp32(ours, ref, seq=SEQ)

    # The window is in effect exactly when it is shorter than the sequence.
    ids = inputs(seed=1)["input_ids"]
    unwindowed = load_lmport(folder, attn_implementation=attn, sliding_window=None)
    with torch.no_grad():
        moved = max_change(unwindowed(ids).logits, ours(ids).logits)
    if window is not None and window < SEQ:
        assert moved > MOVED, f"sliding_window={window} changes nothing (max logit change {moved:.3g})"
    else:
        assert moved <= LOGITS_ATOL, f"sliding_window={window} >= {SEQ} tokens changed the logits by {moved:.3g}"


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
    ours, ref = testing.load_pair(folder, attn, dtype="auto")
    testing.check_bf16(ours, ref, seq=SEQ, grads=True)  # logits, loss and every gradient: the same bits


# --- 4. save_pretrained round trip through transformers -----------------------------------


@pytest.mark.parametrize("case", ["window_4_gqa2", "window_none_head_dim_8_mqa"])
def test_save_pretrained_round_trip_through_transformers(tmp_path: Path, case: str) -> None:
    overrides = VARIANTS[case]
    folder = make_checkpoint(tmp_path / "hf", **overrides)
    ours = load_lmport(folder)
    # The kit: lmport's save of the model, perturbed ("fine-tuned"), loads cleanly in transformers with
    # the original's config and bit-identical logits and loss; its files are what transformers itself
    # writes for this model (names, shapes, dtypes, values); lmport reads both saves to the same numbers.
    testing.check_save_round_trip(ours, folder, tmp_path)
    raw = json.loads((tmp_path / "lmport" / "config.json").read_text())
    assert raw["model_type"] == "mistral"
    assert "sliding_window" in raw and raw["sliding_window"] == overrides["sliding_window"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "lmport").sliding_window == overrides["sliding_window"]
    assert lmport.AutoConfig.from_pretrained(tmp_path / "lmport").sliding_window == overrides["sliding_window"]
