"""Numerical parity of lmport's GPT-2 with transformers' GPT2LMHeadModel on checkpoints transformers saved.

The oracle is transformers itself, loading the very folder lmport loads. The checks every
architecture shares come from the conformance kit (:mod:`lmport.testing`). Checked:

- ``check_fp32``: fp32 logits (max abs diff <= 1e-5; unpadded, ``inputs_embeds``, left- and
  right-padded rows with and without ``generate``'s ``position_ids``), loss (labels with -100)
  and every parameter's gradient (within 1e-5 of the reference gradient's largest entry).
  lmport's modules are named differently (separate q/k/v ``nn.Linear`` instead of the fused
  Conv1D ``c_attn``), so lmport's gradients go through the model's weight map backwards
  (``weight_map.to_checkpoint``) and are compared with transformers' by checkpoint name.
  Both ``eager`` and ``sdpa``, over config variants: every supported
  ``activation_function``, ``n_inner``, ``scale_attn_weights=False``,
  ``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``, untied head,
  another ``layer_norm_epsilon``; each variant is also shown to be in effect.
- Dropout: with pdrops > 0 eval mode equals transformers, train mode is stochastic
  (each of resid/embd/attn dropout on its own); with all pdrops 0 train == eval.
- Checkpoints without the ``transformer.`` prefix (original OpenAI layout) and with the
  old ``attn.bias`` / ``attn.masked_bias`` buffers (safetensors and .bin) load cleanly.
- ``check_bf16``: bf16 checkpoints with ``dtype="auto"``: logits and loss bit-identical to transformers'.
- ``check_save_round_trip``: transformers loads lmport's save with nothing missing or
  unexpected, the same config and the same logits; the files hold exactly the names, shapes,
  dtypes and values transformers itself writes for that model (spelled out here: Conv1D
  (in, out), fused c_attn); lmport loads transformers' save and its own to the same logits.

Weights are random with std 0.2 and random norms/biases (``lmport.testing.save_reference_checkpoint``),
so attention is peaked and every parameter matters.
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
from conftest import TINY_GPT2
from helpers import (
    ATTENTION,
    MOVED,
    assert_logits_close,
    assert_same_training_step,
    batch_of_two,
    load_lmport,
    loss_and_grads,
    max_change,
    one_intraop_thread,
)
from safetensors.torch import load_file, save_file

import lmport
from lmport import testing

SEQ = 24

TINY: dict[str, Any] = {**TINY_GPT2, "bos_token_id": 0, "eos_token_id": 0}

#: id -> (transformers.GPT2Config overrides, lmport config overrides that undo the variant, or None
#: where the variant changes no number in fp32 / cannot be undone on the same weights)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "default_gelu_new": ({}, {"activation_function": "relu"}),
    "gelu": ({"activation_function": "gelu"}, {"activation_function": "relu"}),
    "relu": ({"activation_function": "relu"}, {"activation_function": "gelu_new"}),
    "gelu_fast": ({"activation_function": "gelu_fast"}, {"activation_function": "relu"}),
    "quick_gelu": ({"activation_function": "quick_gelu"}, {"activation_function": "gelu_new"}),
    "gelu_pytorch_tanh": ({"activation_function": "gelu_pytorch_tanh"}, {"activation_function": "relu"}),
    "n_inner_48": ({"n_inner": 48}, None),
    "no_scale_attn_weights": ({"scale_attn_weights": False}, {"scale_attn_weights": True}),
    "scale_by_inverse_layer_idx": ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_by_inverse_layer_idx": False}),
    "reorder_and_upcast_attn": ({"reorder_and_upcast_attn": True}, None),  # fp32: same math; see the bf16 test
    "untied": ({"tie_word_embeddings": False}, {"tie_word_embeddings": True}),
    "layer_norm_epsilon": ({"layer_norm_epsilon": 0.05}, {"layer_norm_epsilon": 1e-5}),
    "all_together": (
        {
            "activation_function": "quick_gelu",
            "n_inner": 80,
            "scale_attn_by_inverse_layer_idx": True,
            "reorder_and_upcast_attn": True,
            "tie_word_embeddings": False,
            "layer_norm_epsilon": 1e-3,
        },
        {"scale_attn_by_inverse_layer_idx": False},
    ),
}


def make_checkpoint(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Path:
    return testing.save_reference_checkpoint("gpt2", {**TINY, **overrides}, folder, seed=seed, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variant id -> folder, saved once per module (both attention kernels read the same one)."""
    return functools.cache(lambda case: make_checkpoint(tmp_path_factory.mktemp(case), **VARIANTS[case][0]))


# --- loading and comparing ------------------------------------------------------------


def load_hf(folder: Path, **kwargs: Any) -> Any:
    return transformers.GPT2LMHeadModel.from_pretrained(folder, **{"dtype": torch.float32, **kwargs})


#: ``inputs(seed=0, padded=False)``: a batch of two, labels with -100 entries; ``padded`` right-pads the second row.
inputs = functools.partial(batch_of_two, SEQ)


# --- 1. fp32 parity over config variants -------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", list(VARIANTS))
def test_fp32_parity_logits_loss_grads(checkpoints: Any, case: str, attn: str) -> None:
    folder = checkpoints(case)
    overrides, undo = VARIANTS[case]
    ours, ref = testing.load_pair(folder, attn)
    assert ours.dtype == torch.float32  # lmport's default for an fp32 checkpoint
    for key, value in overrides.items():
        assert getattr(ours.config, key) == value == getattr(ref.config, key)
    inner = overrides.get("n_inner") or 4 * TINY["n_embd"]
    assert ours.model.layers[0].mlp.up_proj.weight.shape == (inner, TINY["n_embd"])

    # The kit: logits unpadded, padded and from inputs_embeds; in training mode (all pdrops 0) the
    # loss and every gradient, compared by checkpoint name through the weight map; tied head.
    testing.check_fp32(ours, ref, seq=SEQ)
    tied = overrides.get("tie_word_embeddings", True)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied

    # The variant is in effect: undoing it on the same weights moves the logits.
    if undo is not None:
        ids = inputs(seed=1)["input_ids"]
        undone = load_lmport(folder, attn_implementation=attn, **undo)
        with torch.no_grad():
            moved = max_change(undone(ids).logits, ours(ids).logits)
        assert moved > MOVED, f"{case}: {undo} changes nothing (max logit change {moved:.3g})"


def test_activation_variants_really_differ(checkpoints: Any) -> None:
    """The six activations give six different models on one set of weights (none silently aliased)."""
    folder = checkpoints("default_gelu_new")
    ids = inputs(seed=1)["input_ids"]
    names = ("gelu_new", "gelu", "relu", "gelu_fast", "quick_gelu", "gelu_pytorch_tanh")
    with torch.no_grad():
        logits = {n: load_lmport(folder, activation_function=n)(ids).logits for n in names}
    # gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh approximation and agree closely
    # (they differ by float rounding only); each of the others must stand apart.
    for a in ("gelu", "relu", "quick_gelu"):
        for b in names:
            if a != b:
                assert max_change(logits[a], logits[b]) > MOVED, f"{a} and {b} give the same logits"


# --- 2. dropout --------------------------------------------------------------------------

PDROPS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("which", [*PDROPS, "all"])
def test_dropout_eval_parity_and_train_stochastic(tmp_path: Path, attn: str, which: str) -> None:
    rates = {p: (0.1 if which in (p, "all") else 0.0) for p in PDROPS}
    folder = make_checkpoint(tmp_path / "ckpt", **rates)
    ref = load_hf(folder, attn_implementation=attn)
    ours = load_lmport(folder, attn_implementation=attn)
    for key, rate in rates.items():
        assert getattr(ours.config, key) == rate
    layer = ours.model.layers[0]
    assert ours.model.embed_dropout.p == rates["embd_pdrop"]
    assert layer.self_attn.dropout == rates["attn_pdrop"]
    assert layer.self_attn.resid_dropout.p == layer.mlp.dropout.p == rates["resid_pdrop"]

    batch = inputs(seed=1)
    ids = batch["input_ids"]
    with torch.no_grad():
        evaluated = ours(ids).logits
        assert_logits_close(evaluated, ref(ids).logits)
        ours.train()
        torch.manual_seed(0)
        first = ours(ids).logits
        second = ours(ids).logits
        assert max_change(first, second) > MOVED, f"{which}={rates}: two training forwards are equal"
        assert max_change(first, evaluated) > MOVED
        ours.eval()
        assert torch.equal(ours(ids).logits, evaluated), "eval mode after training mode is not deterministic"
    # Dropout in training mode still back-propagates to every parameter.
    ours.train()
    loss, grads = loss_and_grads(ours, batch)
    assert torch.isfinite(loss)
    assert all(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("attn", ATTENTION)
def test_no_dropout_train_equals_eval(checkpoints: Any, attn: str) -> None:
    ours = load_lmport(checkpoints("default_gelu_new"), attn_implementation=attn)
    ids = inputs(seed=1)["input_ids"]
    with torch.no_grad():
        evaluated = ours(ids).logits
        ours.train()
        assert torch.equal(ours(ids).logits, evaluated)
        assert torch.equal(ours(ids).logits, evaluated)


# --- 3. checkpoint spellings: no "transformer." prefix, old attention buffers ------------


def rewrite(folder: Path, strip_prefix: bool, old_buffers: bool, fmt: str = "safetensors") -> None:
    """Rewrite transformers' save in older layouts: unprefixed names, causal-mask buffers, .bin."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    if old_buffers:
        n = TINY["n_positions"]
        for i in range(TINY["n_layer"]):
            tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if strip_prefix:
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        assert not any(k.startswith("transformer.") for k in tensors)
    path.unlink()
    if fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "strip_prefix,old_buffers,fmt",
    [
        (True, False, "safetensors"),
        (False, True, "safetensors"),
        (True, True, "safetensors"),
        (True, True, "bin"),  # what the original openai-community/gpt2 repository ships
    ],
    ids=["no_prefix", "old_buffers", "no_prefix_old_buffers", "no_prefix_old_buffers_bin"],
)
def test_legacy_checkpoint_layouts(tmp_path: Path, strip_prefix: bool, old_buffers: bool, fmt: str) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    ref = load_hf(folder)  # the oracle reads the untouched transformers save
    rewrite(folder, strip_prefix, old_buffers, fmt)
    ours, info = lmport.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    batch = inputs(seed=1)
    with torch.no_grad():
        assert_logits_close(ours(batch["input_ids"]).logits, ref(batch["input_ids"]).logits)
    ours.train()
    ref.train()
    assert_same_training_step(ours, ref, batch)


def test_truly_unexpected_keys_are_still_reported(tmp_path: Path) -> None:
    """The old buffers are ignored by name, not because unexpected keys go unreported."""
    folder = make_checkpoint(tmp_path / "ckpt")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["transformer.h.0.attn.extra"] = torch.zeros(3)
    tensors["h.1.attn.bias_typo"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    _, info = lmport.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["h.1.attn.bias_typo", "transformer.h.0.attn.extra"]
    assert info["missing_keys"] == []


# --- 4. bf16 -----------------------------------------------------------------------------

# bf16 tolerance: 0 (bit-identical logits and loss). lmport runs the same bf16 ops in the
# same order as transformers (LayerNorm, Conv1D-as-Linear, softmax computed in float then
# rounded once, torch's SDPA; for reorder_and_upcast_attn + eager, q @ k in float32 as
# transformers' _upcast_and_reordered_attn), so any difference at all means a different
# computation.


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", ["default_gelu_new", "all_together"])
def test_bf16_checkpoint_auto_dtype(tmp_path: Path, case: str, attn: str) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16, **VARIANTS[case][0])
    ours, ref = testing.load_pair(folder, attn, dtype="auto")
    # Logits and loss bit-identical (gradients are not: the fused c_attn is one matmul in transformers,
    # three here, and bf16 rounds the two differently).
    testing.check_bf16(ours, ref, seq=SEQ)
    if attn == "eager" and VARIANTS[case][0].get("reorder_and_upcast_attn"):
        # The float32 scores are what makes this exact: the plain bf16 eager kernel is not.
        plain = load_lmport(folder, attn_implementation=attn, dtype="auto", reorder_and_upcast_attn=False)
        ids = inputs(seed=1)["input_ids"]
        with torch.no_grad():
            assert not torch.equal(plain(ids).logits, ref(ids).logits)


# --- 5. save_pretrained round trip through transformers -----------------------------------


@pytest.mark.parametrize("case", ["default_gelu_new", "all_together"])
def test_save_pretrained_round_trip_through_transformers(tmp_path: Path, case: str) -> None:
    overrides = VARIANTS[case][0]
    folder = make_checkpoint(tmp_path / "hf", **overrides)
    ours = load_lmport(folder)
    # The kit: lmport's save of the model, perturbed ("fine-tuned"), loads cleanly in transformers with
    # the original's config and bit-identical logits and loss; its files are what transformers itself
    # writes for this model (names, shapes, dtypes, values); lmport reads both saves to the same numbers.
    mine = testing.check_save_round_trip(ours, folder, tmp_path)
    for key, value in overrides.items():
        assert getattr(transformers.AutoConfig.from_pretrained(tmp_path / "lmport"), key) == value

    # The GPT-2 layout, spelled out: Conv1D (in, out), q/k/v fused in c_attn.
    e, inner = TINY["n_embd"], overrides.get("n_inner") or 4 * TINY["n_embd"]
    assert mine["transformer.h.0.attn.c_attn.weight"].shape == (e, 3 * e)
    assert mine["transformer.h.0.attn.c_attn.bias"].shape == (3 * e,)
    assert mine["transformer.h.0.mlp.c_fc.weight"].shape == (e, inner)
    assert mine["transformer.h.0.mlp.c_proj.weight"].shape == (inner, e)
    assert ("lm_head.weight" in mine) == (not overrides.get("tie_word_embeddings", True))
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(mine["transformer.h.0.attn.c_attn.weight"][:, :e], q.detach().T)
    raw = json.loads((tmp_path / "lmport" / "config.json").read_text())
    assert raw["model_type"] == "gpt2" and raw["n_embd"] == e
