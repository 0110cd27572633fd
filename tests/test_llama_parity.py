"""Numerical parity of lmport's Llama with transformers' LlamaForCausalLM on checkpoints transformers saved.

The oracle is transformers itself, loading the very folder lmport loads. The checks every
architecture shares come from the conformance kit (:mod:`lmport.testing`): ``check_fp32``
(fp32 logits within 1e-5 at 24, 8 and again 24 tokens, ``inputs_embeds``, a batch with a
left-padded row -- whose first real token is predicted from a query that sees no key -- and a
right-padded one, with and without ``generate``'s ``position_ids``; loss and every parameter's
gradient within 1e-5 of the reference gradient's largest entry, unpadded and padded; tied
embeddings) and ``check_bf16`` (bf16 checkpoints with ``dtype="auto"``: logits, loss and every
gradient bit-identical). They run for the ``eager`` and ``sdpa`` kernels over Llama's config
variants: every RoPE type in both the new ``rope_parameters`` and the legacy ``rope_scaling`` +
``rope_theta`` spelling, GQA/MQA/MHA, tied embeddings, biases, a ``head_dim`` apart from
``hidden_size // heads``. Llama's own: the RoPE settings are shown in effect, dynamic RoPE
grows past its positions, legacy/missing dtype keys; ``num_items_in_batch``, ``logits_to_keep``
and the output object; gradient checkpointing. Every lmport load also proves the checkpoint
folder unchanged.

Weights are random with std 0.2 and random norms/biases (``lmport.testing.save_reference_checkpoint``)
so that attention is peaked and every parameter matters: with transformers' own
std-0.02 init, attention is near uniform and a wrong RoPE barely moves the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
import transformers
from conftest import TINY_LLAMA
from helpers import (
    ATTENTION,
    LOGITS_ATOL,
    assert_logits_close,
    assert_loss_equal,
    assert_same_training_step,
    batch_of_two,
    load_lmport,
    loss_and_grads,
    one_intraop_thread,
)

from lmport import testing

SEQ = 24  # > max_position_embeddings=16 of the dynamic cases, so dynamic NTK scaling kicks in
SHORT = 8  # < 16: dynamic RoPE must fall back to its original frequencies


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    yield from one_intraop_thread()


# --- checkpoints -----------------------------------------------------------------------

DYNAMIC = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
YARN_TUNED = {
    **YARN,
    "beta_fast": 16.0,
    "beta_slow": 2.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.5,
    "truncate": False,
}

#: id -> (config overrides for transformers.LlamaConfig, whether RoPE differs from default/10000)
NEW_FORM: dict[str, tuple[dict[str, Any], bool]] = {
    "gqa": ({}, False),
    "mha": ({"num_key_value_heads": 4}, False),
    "mqa": ({"num_key_value_heads": 1}, False),
    "tied": ({"tie_word_embeddings": True}, False),
    "attention_bias": ({"attention_bias": True}, False),
    "mlp_bias": ({"mlp_bias": True}, False),
    "head_dim_32": ({"head_dim": 32}, False),
    "head_dim_8_mha_tied_biases": (
        {"head_dim": 8, "num_key_value_heads": 4, "tie_word_embeddings": True,
         "attention_bias": True, "mlp_bias": True},  # fmt: skip
        False,
    ),
    "rope_default_theta": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}, True),
    "rope_linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, True),
    "rope_dynamic": ({"max_position_embeddings": 16, "rope_parameters": DYNAMIC}, True),
    "rope_llama3": ({"rope_parameters": LLAMA3}, True),
    "rope_yarn": ({"rope_parameters": YARN}, True),
    "rope_yarn_tuned": ({"rope_parameters": YARN_TUNED}, True),
    "rope_yarn_head_dim_32_tied": ({"rope_parameters": YARN, "head_dim": 32, "tie_word_embeddings": True}, True),
}

#: id -> (config overrides, legacy rope_scaling written into config.json, legacy rope_theta or None)
LEGACY_FORM: dict[str, tuple[dict[str, Any], dict[str, Any] | None, float | None]] = {
    "legacy_theta_only": ({}, None, 5000.0),
    "legacy_linear_type_key": ({}, {"type": "linear", "factor": 2.0}, 5000.0),
    "legacy_dynamic_type_key": ({"max_position_embeddings": 16}, {"type": "dynamic", "factor": 3.0}, 10000.0),
    "legacy_dynamic_no_theta": ({"max_position_embeddings": 16}, {"rope_type": "dynamic", "factor": 2.0}, None),
    "legacy_llama3": ({}, {k: v for k, v in LLAMA3.items() if k != "rope_theta"}, 500000.0),
    "legacy_yarn": ({}, {k: v for k, v in YARN_TUNED.items() if k != "rope_theta"}, 20000.0),
    "legacy_yarn_implicit_original": ({"max_position_embeddings": 16}, {"type": "yarn", "factor": 4.0}, 10000.0),
}


def write_legacy_rope(folder: Path, rope_scaling: dict[str, Any] | None, rope_theta: float | None) -> None:
    """Rewrite ``config.json`` in the pre-``rope_parameters`` spelling (transformers <= 4.x)."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("rope_parameters", None)
    raw["rope_scaling"] = rope_scaling
    if rope_theta is not None:
        raw["rope_theta"] = rope_theta
    path.write_text(json.dumps(raw, indent=2))


def make_checkpoint(folder: Path, case: str, dtype: torch.dtype = torch.float32) -> tuple[Path, bool]:
    """Save the checkpoint of ``case`` (a NEW_FORM or LEGACY_FORM id); returns (folder, rope_is_special)."""
    if case in NEW_FORM:
        overrides, special = NEW_FORM[case]
        testing.save_reference_checkpoint("llama", {**TINY_LLAMA, **overrides}, folder, dtype=dtype)
        raw = json.loads((folder / "config.json").read_text())
        assert "rope_scaling" not in raw and "rope_parameters" in raw  # really the new form
        return folder, special
    overrides, rope_scaling, rope_theta = LEGACY_FORM[case]
    testing.save_reference_checkpoint("llama", {**TINY_LLAMA, **overrides}, folder, dtype=dtype)
    write_legacy_rope(folder, rope_scaling, rope_theta)
    return folder, True


# --- loading and comparing ------------------------------------------------------------


def load_hf(folder: Path, **kwargs: Any) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)


def inputs(seq: int, seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    """A batch of two: labels with -100 entries; ``padded`` left-pads the first row, right-pads the second."""
    return batch_of_two(seq, seed, padded, left_pad=3)


# lmport's Llama names its parameters as the checkpoint does: gradients are matched by name as they are.


def assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    helpers.assert_grads_close(ours, ref, check_shapes=False)


def assert_same_step(ours: Any, ref: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Equal losses and close gradients of one training step; returns lmport's loss."""
    return assert_same_training_step(ours, ref, batch, checkpoint_names=False, check_shapes=False, **kwargs)


# --- 1. fp32 parity over config variants -------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", [*NEW_FORM, *LEGACY_FORM])
def test_fp32_parity_logits_loss_grads(tmp_path: Path, case: str, attn: str) -> None:
    folder, rope_special = make_checkpoint(tmp_path / "ckpt", case)
    ours, ref = testing.load_pair(folder, attn)
    assert ours.dtype == torch.float32  # lmport's default for an fp32 checkpoint
    assert ours.config.rope_parameters["rope_type"] == ref.config.rope_parameters["rope_type"]
    assert ours.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"]

    # The kit: logits at SEQ (dynamic RoPE grows), SHORT (falls back), SEQ again, inputs_embeds,
    # left- and right-padded rows with and without generate's position_ids; loss and every
    # gradient unpadded and padded; the head tied exactly when transformers ties it.
    testing.check_fp32(ours, ref, seq=SEQ, short=SHORT)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.config.tie_word_embeddings

    # The RoPE settings really are in effect (the parity above is not blind to them).
    if rope_special:
        ids = inputs(SEQ, seed=1)["input_ids"]
        plain = load_lmport(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        with torch.no_grad():
            moved = (plain(ids).logits - ours(ids).logits).abs().max().item()
        assert moved > 1e-3, f"RoPE settings of {case} change nothing (max logit change {moved:.3g})"


@pytest.mark.parametrize("case", ["rope_dynamic", "legacy_dynamic_type_key"])
def test_dynamic_rope_grows_past_max_positions(tmp_path: Path, case: str) -> None:
    """Dynamic NTK only differs from default past max_position_embeddings (16); then it must."""
    folder, _ = make_checkpoint(tmp_path / "ckpt", case)
    ours = load_lmport(folder)
    plain = load_lmport(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.no_grad():
        short = inputs(16)["input_ids"]
        torch.testing.assert_close(ours(short).logits, plain(short).logits, rtol=0, atol=LOGITS_ATOL)
        long = inputs(SEQ)["input_ids"]
        assert (ours(long).logits - plain(long).logits).abs().max().item() > 1e-3


# --- 2. bf16 -----------------------------------------------------------------------------

# bf16 tolerance: 0 (logits, loss and gradients). lmport runs the same bf16 ops in the
# same order as transformers (RMSNorm in fp32 then cast, rotary in the model dtype,
# softmax in fp32 for eager, torch's SDPA for sdpa), so the results are bit-identical;
# any difference at all would mean a different computation, which bf16 rounding
# (8 bits of mantissa, ~0.4% relative) would then amplify through a fine-tune.


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", ["gqa", "head_dim_8_mha_tied_biases", "rope_llama3", "legacy_yarn"])
@pytest.mark.parametrize("dtype_arg", ["auto", None], ids=["dtype_auto", "dtype_default"])
def test_bf16_checkpoint_auto_dtype(tmp_path: Path, case: str, attn: str, dtype_arg: str | None) -> None:
    folder, _ = make_checkpoint(tmp_path / "ckpt", case, dtype=torch.bfloat16)
    ours, ref = testing.load_pair(folder, attn, dtype=dtype_arg)  # None: neither gets a dtype argument
    # Logits and loss (unpadded and padded), then the loss and every gradient of a training step: the same bits.
    testing.check_bf16(ours, ref, seq=SEQ, grads=True)


@pytest.mark.parametrize("key", ["torch_dtype", "absent"])
def test_bf16_dtype_auto_from_legacy_or_missing_config_key(tmp_path: Path, key: str) -> None:
    """transformers 4 wrote ``torch_dtype``; with no key at all "auto" falls back to the tensors' dtype."""
    folder, _ = make_checkpoint(tmp_path / "ckpt", "gqa", dtype=torch.bfloat16)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    value = raw.pop("dtype")
    if key == "torch_dtype":
        raw["torch_dtype"] = value
    path.write_text(json.dumps(raw))
    ref = load_hf(folder, dtype="auto")
    ours = load_lmport(folder, dtype="auto")
    assert ref.dtype == ours.dtype == torch.bfloat16
    batch = inputs(SEQ)
    with torch.no_grad():
        assert torch.equal(ours(batch["input_ids"]).logits, ref(batch["input_ids"]).logits)


def test_bf16_checkpoint_loaded_as_fp32_matches(tmp_path: Path) -> None:
    """An explicit dtype wins over the checkpoint's: bf16 weights upcast exactly, fp32 parity holds."""
    folder, _ = make_checkpoint(tmp_path / "ckpt", "gqa", dtype=torch.bfloat16)
    ref = load_hf(folder, dtype=torch.float32)
    ours = load_lmport(folder, dtype=torch.float32)
    assert ours.dtype == torch.float32
    batch = inputs(SEQ)
    with torch.no_grad():
        assert_logits_close(ours(batch["input_ids"]).logits, ref(batch["input_ids"]).logits)


# --- 3. loss options, logits_to_keep, the output object -----------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Any, Any]:
    folder, _ = make_checkpoint(tmp_path / "ckpt", "gqa")
    return load_lmport(folder), load_hf(folder, dtype=torch.float32)


@pytest.mark.parametrize("n", [7, 100, "tensor"])
def test_num_items_in_batch(pair: tuple[Any, Any], n: int | str) -> None:
    ours, ref = pair
    batch = inputs(SEQ)
    items: int | torch.Tensor = torch.tensor(13) if n == "tensor" else n
    count = int((batch["labels"][:, 1:] != -100).sum())  # targets the mean loss averages over
    ours.train()
    ref.train()
    loss_ours = assert_same_step(ours, ref, batch, num_items_in_batch=items)
    # It was honoured: sum / n, not the mean.
    with torch.no_grad():
        mean = ours(**batch).loss
    torch.testing.assert_close(loss_ours, mean * count / int(items), rtol=1e-5, atol=0)
    assert abs(loss_ours.item() - mean.item()) > 1e-3


@pytest.mark.parametrize("keep", [1, 5, "indices"])
def test_logits_to_keep(pair: tuple[Any, Any], keep: int | str) -> None:
    ours, ref = pair
    ids = inputs(SEQ)["input_ids"]
    to_keep: int | torch.Tensor = torch.tensor([0, 7, SEQ - 1]) if keep == "indices" else keep
    with torch.no_grad():
        full = ours(ids).logits
        kept = ours(ids, logits_to_keep=to_keep).logits
        kept_ref = ref(ids, logits_to_keep=to_keep).logits
    assert_logits_close(kept, kept_ref)
    expected = full[:, to_keep, :] if isinstance(to_keep, torch.Tensor) else full[:, -to_keep:, :]
    assert kept.shape == (2, 3 if keep == "indices" else keep, 128)
    assert_logits_close(kept, expected)
    with torch.no_grad():
        assert ours(ids, logits_to_keep=0).logits.shape == full.shape  # 0 keeps all, as in transformers


def test_output_access(pair: tuple[Any, Any]) -> None:
    ours, ref = pair
    batch = inputs(SEQ)
    with torch.no_grad():
        out = ours(batch["input_ids"])
        out_ref = ref(batch["input_ids"])
    # No labels: no loss, and logits are the first field every way they can be read.
    assert out.loss is None and "loss" not in out
    assert out.logits is out["logits"] is out[0]
    assert out.to_tuple()[0] is out.logits
    assert_logits_close(out[0], out_ref[0])
    with pytest.raises(KeyError):
        out["loss"]
    with pytest.raises(AttributeError):
        out.not_a_field  # noqa: B018
    # With labels the loss comes first, as in transformers.
    with torch.no_grad():
        out = ours(**batch)
        out_ref = ref(**batch)
    assert out.loss is out["loss"] is out[0]
    assert out.logits is out["logits"] is out[1]
    assert list(out.keys())[:2] == ["loss", "logits"]
    assert_loss_equal(out[0], out_ref[0])
    assert_logits_close(out[1], out_ref[1])
    # Hidden states: embeddings plus one per layer (the last one normed), as transformers gives them.
    with torch.no_grad():
        out = ours(batch["input_ids"], output_hidden_states=True)
        out_ref = ref(batch["input_ids"], output_hidden_states=True)
    assert len(out.hidden_states) == len(out_ref.hidden_states) == 3
    for h_ours, h_ref in zip(out.hidden_states, out_ref.hidden_states):
        assert_logits_close(h_ours, h_ref)


# --- 4. gradient checkpointing ----------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("attn", ATTENTION)
def test_gradient_checkpointing_same_loss_and_grads(tmp_path: Path, attn: str, reentrant: bool) -> None:
    folder, _ = make_checkpoint(tmp_path / "ckpt", "head_dim_8_mha_tied_biases")
    ours = load_lmport(folder, attn_implementation=attn)
    ref = load_hf(folder, attn_implementation=attn, dtype=torch.float32)
    batch = inputs(SEQ, padded=True)
    ours.train()
    ref.train()
    # Count the layer's forward runs (forward hooks do not fire on checkpoint recomputation).
    layer = ours.model.layers[0]
    calls: list[int] = []
    layer_forward = layer.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return layer_forward(*args, **kwargs)

    layer.forward = counting_forward

    loss_plain, grads_plain = loss_and_grads(ours, batch)
    assert len(calls) == 1
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ours.is_gradient_checkpointing
    calls.clear()
    loss_ckpt, grads_ckpt = loss_and_grads(ours, batch)
    assert len(calls) == 2, "the layer was not recomputed in backward: checkpointing is not active"

    assert_loss_equal(loss_ckpt, loss_plain)
    assert_grads_close(grads_ckpt, grads_plain)
    # And both agree with transformers' checkpointed model.
    ref.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    loss_ref, grads_ref = loss_and_grads(ref, batch)
    assert_loss_equal(loss_ckpt, loss_ref)
    assert_grads_close(grads_ckpt, grads_ref)

    # Disabling turns recomputation off again.
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    calls.clear()
    loss_again, _ = loss_and_grads(ours, batch)
    assert len(calls) == 1
    assert_loss_equal(loss_again, loss_plain)
    del layer.forward
