"""Numerical parity of lmport's GPT-2 with transformers' GPT2LMHeadModel on checkpoints transformers saved.

The oracle is transformers itself, loading the very folder lmport loads. Checked:

- fp32 logits (max abs diff <= 1e-5), loss (labels with -100) and every parameter's
  gradient (within 1e-5 of the reference gradient's largest entry). lmport's modules
  are named differently (separate q/k/v ``nn.Linear`` instead of the fused Conv1D
  ``c_attn``), so lmport's gradients go through the model's weight map backwards
  (``weight_map.to_checkpoint``) and are compared with transformers' by checkpoint name.
  Both ``eager`` and ``sdpa``, over config variants: every supported
  ``activation_function``, ``n_inner``, ``scale_attn_weights=False``,
  ``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``, untied head,
  another ``layer_norm_epsilon``; each variant is also shown to be in effect.
- Dropout: with pdrops > 0 eval mode equals transformers, train mode is stochastic
  (each of resid/embd/attn dropout on its own); with all pdrops 0 train == eval.
- Checkpoints without the ``transformer.`` prefix (original OpenAI layout) and with the
  old ``attn.bias`` / ``attn.masked_bias`` buffers (safetensors and .bin) load cleanly.
- bf16 checkpoints with ``dtype="auto"``: logits and loss bit-identical to transformers'.
- ``save_pretrained``: transformers loads lmport's save with nothing missing or
  unexpected and the same logits; the files hold exactly the names, shapes, dtypes and
  values transformers itself writes for that model (Conv1D (in, out), fused c_attn).

Weights are random with std 0.2 and random norms/biases (``conftest.save_hf``), so
attention is peaked and every parameter matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf, tree_digest
from safetensors.torch import load_file, save_file

import lmport

LOGITS_ATOL = 1e-5  # fp32, absolute (DESIGN.md)
GRAD_RTOL = 1e-5  # fp32, relative to the reference gradient's largest magnitude, per parameter
LOSS_TOL = 1e-6  # fp32, absolute and relative
MOVED = 1e-3  # a setting "is in effect" when toggling it moves some logit by more than this
ATTENTION = ("eager", "sdpa")
VOCAB = 128
SEQ = 24

TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
)

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
    return save_hf(folder, transformers.GPT2Config(**{**TINY, **overrides}), seed=seed, dtype=dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variant id -> folder, saved once per module (both attention kernels read the same one)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = make_checkpoint(tmp_path_factory.mktemp(case), **VARIANTS[case][0])
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
    return transformers.GPT2LMHeadModel.from_pretrained(folder, **{"dtype": torch.float32, **kwargs})


def inputs(seq: int = SEQ, seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    """A batch of two: labels with -100 entries; ``padded`` right-pads the second row."""
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


def as_checkpoint_names(model: Any, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmport's module-named gradients in checkpoint names and layouts (q/k/v fused back into c_attn)."""
    return type(model).weight_map.to_checkpoint(grads)


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
    overrides, undo = VARIANTS[case]
    ref = load_hf(folder, attn_implementation=attn)
    ours = load_lmport(folder, attn_implementation=attn)
    assert ours.dtype == torch.float32 and ours.attn_implementation == attn
    assert not ours.training
    for key, value in overrides.items():
        assert getattr(ours.config, key) == value == getattr(ref.config, key)
    inner = overrides.get("n_inner") or 4 * TINY["n_embd"]
    assert ours.model.layers[0].mlp.up_proj.weight.shape == (inner, TINY["n_embd"])

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
        # The variant is in effect: undoing it on the same weights moves the logits.
        if undo is not None:
            undone = load_lmport(folder, attn_implementation=attn, **undo)
            moved = max_change(undone(plain["input_ids"]).logits, logits)
            assert moved > MOVED, f"{case}: {undo} changes nothing (max logit change {moved:.3g})"

    # Training mode (all pdrops 0): loss and every gradient, unpadded and padded.
    ours.train()
    ref.train()
    for batch in (plain, padded):
        loss_ours, grads_ours = loss_and_grads(ours, batch)
        loss_ref, grads_ref = loss_and_grads(ref, batch)
        assert_loss_equal(loss_ours, loss_ref)
        assert_grads_close(as_checkpoint_names(ours, grads_ours), grads_ref)
    tied = overrides.get("tie_word_embeddings", True)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


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
    loss_ours, grads_ours = loss_and_grads(ours, batch)
    loss_ref, grads_ref = loss_and_grads(ref, batch)
    assert_loss_equal(loss_ours, loss_ref)
    assert_grads_close(as_checkpoint_names(ours, grads_ours), grads_ref)


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
    if attn == "eager" and VARIANTS[case][0].get("reorder_and_upcast_attn"):
        # The float32 scores are what makes this exact: the plain bf16 eager kernel is not.
        plain = load_lmport(folder, attn_implementation=attn, dtype="auto", reorder_and_upcast_attn=False)
        ids = inputs(seed=1)["input_ids"]
        with torch.no_grad():
            assert not torch.equal(plain(ids).logits, ref(ids).logits)


# --- 5. save_pretrained round trip through transformers -----------------------------------


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", ["default_gelu_new", "all_together"])
def test_save_pretrained_round_trip_through_transformers(tmp_path: Path, case: str) -> None:
    overrides = VARIANTS[case][0]
    folder = make_checkpoint(tmp_path / "hf", **overrides)
    ours = load_lmport(folder)
    # A "fine-tuned" model: every parameter moved, so the save must carry lmport's own state.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours.save_pretrained(tmp_path / "ours")

    ref, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ref.dtype == torch.float32
    for key, value in overrides.items():
        assert getattr(ref.config, key) == value, f"config {key} did not round-trip"
    for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
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
    # The GPT-2 layout, spelled out: Conv1D (in, out), q/k/v fused in c_attn.
    e, inner = TINY["n_embd"], overrides.get("n_inner") or 4 * TINY["n_embd"]
    assert mine["transformer.h.0.attn.c_attn.weight"].shape == (e, 3 * e)
    assert mine["transformer.h.0.attn.c_attn.bias"].shape == (3 * e,)
    assert mine["transformer.h.0.mlp.c_fc.weight"].shape == (e, inner)
    assert mine["transformer.h.0.mlp.c_proj.weight"].shape == (inner, e)
    assert ("lm_head.weight" in mine) == (not overrides.get("tie_word_embeddings", True))
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(mine["transformer.h.0.attn.c_attn.weight"][:, :e], q.detach().T)
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert raw["model_type"] == "gpt2" and raw["n_embd"] == e

    # And lmport reads its own save back to the same numbers.
    again = load_lmport(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(batch["input_ids"]).logits, ours(batch["input_ids"]).logits)
