"""Checks against transformers, the reference implementation, on checkpoints transformers itself saved.

transformers is imported here lazily, inside the functions, and only by tests: it is a test
dependency of lmport, never a run-time one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedFeatureError
from .compare import (
    GRAD_RTOL,
    LOGITS_ATOL,
    LOSS_TOL,
    assert_bf16_parity,
    assert_grads_close,
    assert_logits_close,
    assert_loss_equal,
    assert_padded_logits_close,
    assert_same_outputs,
    batch_of_two,
    checkpoint_weight_map,
    eval_mode,
    generation_positions,
    left_padded_prompts,
    load_clean,
    load_lmport,
    loss_and_grads,
    perturb_parameters,
    require,
    tensors_of,
)

#: Config keys that name where a config was read from or by which version, not what the model is.
PROVENANCE_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype"})


def transformers_module() -> Any | None:
    """transformers, imported on first use, or ``None`` when it is not installed (or hidden)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        return None


def reference_available(model_type: str) -> bool:
    """Whether transformers is installed and implements ``model_type`` (so reference checks can run)."""
    transformers = transformers_module()
    return transformers is not None and model_type in transformers.CONFIG_MAPPING


def require_reference(model_type: str) -> Any:
    """transformers, when it implements ``model_type``.

    Raises:
        UnsupportedFeatureError: transformers is not installed, or knows no ``model_type``.
    """
    transformers = transformers_module()
    if transformers is None:
        raise UnsupportedFeatureError(
            "reference checks compare with transformers, which is not installed: pip install transformers, "
            "or run the contract checks alone (reference=False)"
        )
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedFeatureError(
            f"transformers {transformers.__version__} has no model_type {model_type!r}: nothing to compare with; "
            "run the contract checks alone (reference=False)"
        )
    return transformers


# --- checkpoints -------------------------------------------------------------------------------


def randomize_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter of ``model`` with values large enough to matter, in place.

    transformers initialises with std 0.02, unit norms and zero biases: attention is then
    nearly uniform and biases and norms contribute nothing, so a wrong RoPE, bias or norm
    would hardly move the logits. Here weights of norm modules (class name containing
    ``Norm``) get normal(1, 0.1), biases normal(0, 0.1) and every other weight normal(0, ``std``).

    Returns:
        ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for attr, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if is_norm and attr == "weight":
                    param.copy_(1.0 + 0.1 * noise)
                elif attr == "bias":
                    param.copy_(0.1 * noise)
                else:
                    param.copy_(std * noise)
    return model


def save_reference_checkpoint(
    model_type: str,
    config: Mapping[str, Any] | Any,
    folder: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float | None = 0.2,
) -> Path:
    """Save a transformers causal LM of ``model_type`` with transformers' own ``save_pretrained``.

    Args:
        model_type: the architecture (transformers must implement it).
        config: ``config.json`` values (given to ``transformers.AutoConfig.for_model``), or a
            transformers config object of that ``model_type``.
        folder: where to save (created).
        seed: seeds the weights.
        dtype: the dtype the weights are saved in.
        std: randomise the weights with :func:`randomize_parameters` (so the checks have
            teeth); ``None`` keeps transformers' own initialisation.

    Returns:
        ``folder``.
    """
    transformers = require_reference(model_type)
    if isinstance(config, Mapping):
        config = transformers.AutoConfig.for_model(model_type, **config)
    require(config.model_type == model_type, f"config is a {config.model_type!r} config, not {model_type!r}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if std is not None:
        randomize_parameters(model, seed=seed, std=std)
    folder = Path(folder)
    model.to(dtype).save_pretrained(folder)
    return folder


# --- loading -----------------------------------------------------------------------------------


def load_pair(folder: str | Path, attn: str = "sdpa", *, dtype: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """lmport's and transformers' model of one checkpoint, with attention kernel ``attn``.

    Args:
        folder: the checkpoint.
        attn: ``attn_implementation`` for both.
        dtype: passed to both as ``dtype`` (``None``: neither gets one, each uses its default).
        **kwargs: more ``from_pretrained`` arguments for both.

    Returns:
        ``(ours, ref)``, both in eval mode and of one dtype; lmport's runs ``attn``.
    """
    transformers = require_reference(json.loads((Path(folder) / "config.json").read_text())["model_type"])
    if dtype is not None:
        kwargs["dtype"] = dtype
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, **kwargs)
    ours = load_lmport(folder, attn_implementation=attn, **kwargs)
    require(ours.attn_implementation == attn, f"lmport runs {ours.attn_implementation!r}, not {attn!r}")
    require(not ours.training, "from_pretrained must return the model in eval mode")
    require(ours.dtype == ref.dtype, f"lmport loaded {ours.dtype}, transformers {ref.dtype}")
    return ours, ref.eval()


# --- numerical checks ----------------------------------------------------------------------------


def check_tied(ours: Any, ref: Any) -> None:
    """lmport ties input and output embeddings exactly when transformers does, and counts parameters alike."""
    ref_tied = ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    out, inp = ours.get_output_embeddings().weight, ours.get_input_embeddings().weight
    require((out is inp) == ref_tied, f"transformers {'ties' if ref_tied else 'unties'} the embeddings, lmport not")
    if not ref_tied:
        require(out.data_ptr() != inp.data_ptr(), "untied embeddings share storage")
    require(
        ours.num_parameters() == ref.num_parameters(),
        f"{ours.num_parameters()} parameters, transformers has {ref.num_parameters()}",
    )


def check_fp32(
    ours: Any,
    ref: Any,
    *,
    seq: int = 24,
    short: int = 8,
    atol: float = LOGITS_ATOL,
    grad_rtol: float = GRAD_RTOL,
    loss_tol: float = LOSS_TOL,
) -> dict[str, float]:
    """fp32 parity of two models of one checkpoint: logits, padding, loss and gradients, tied embeddings.

    Logits: batches of ``seq``, then ``short``, then ``seq`` tokens again (a position cache
    that grows, or a dynamic RoPE, must come back); ``inputs_embeds``; a batch whose first row
    is left-padded (its first real token is predicted from a query that sees no earlier key)
    and whose second is right-padded, with and without the ``position_ids`` that ``generate``
    passes. Training: the loss and every parameter's gradient (in checkpoint names, through
    lmport's weight map) on the unpadded and the padded batch. Both models end in eval mode.

    Args:
        ours, ref: lmport's and transformers' model, fp32.
        atol: logits' largest absolute difference.
        grad_rtol: gradients' largest difference relative to each reference gradient's largest entry.
        loss_tol: the loss's absolute and relative tolerance.

    Returns:
        ``{"logits_max_abs_diff", "loss_max_abs_diff", "grad_max_rel_diff"}``: the worst figures seen.
    """
    require(ours.dtype == ref.dtype == torch.float32, f"fp32 checks on {ours.dtype} / {ref.dtype} models")
    vocab = min(ours.config.vocab_size, ref.config.vocab_size)
    long, brief = batch_of_two(seq, seed=1, vocab=vocab), batch_of_two(short, seed=2, vocab=vocab)
    padded = batch_of_two(seq, seed=3, padded=True, left_pad=3, vocab=vocab)
    figures = {"logits_max_abs_diff": 0.0, "loss_max_abs_diff": 0.0, "grad_max_rel_diff": 0.0}

    def logits(diff: float) -> None:
        figures["logits_max_abs_diff"] = max(figures["logits_max_abs_diff"], diff)

    with eval_mode(ours, ref):
        for batch in (long, brief, long):
            ids = batch["input_ids"]
            logits(assert_logits_close(ours(ids).logits, ref(ids).logits, finite=True, atol=atol))
        logits(assert_padded_logits_close(ours, ref, padded, finite=True, atol=atol))
        positions = generation_positions(padded["attention_mask"])
        logits(assert_padded_logits_close(ours, ref, padded, finite=True, atol=atol, position_ids=positions))
        embeds = ref.get_input_embeddings()(long["input_ids"])
        logits(assert_logits_close(ours(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits, atol=atol))

    ours.train()
    ref.train()
    try:
        for batch in (long, padded):
            loss_ours, grads_ours = loss_and_grads(ours, batch)
            loss_ref, grads_ref = loss_and_grads(ref, batch)
            figures["loss_max_abs_diff"] = max(
                figures["loss_max_abs_diff"], assert_loss_equal(loss_ours, loss_ref, tol=loss_tol)
            )
            grads_ours = checkpoint_weight_map(ours).to_checkpoint(grads_ours)
            figures["grad_max_rel_diff"] = max(
                figures["grad_max_rel_diff"], assert_grads_close(grads_ours, grads_ref, rtol=grad_rtol)
            )
    finally:
        ours.eval()
        ref.eval()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    check_tied(ours, ref)
    return figures


def check_generation(ours: Any, ref: Any, *, max_new_tokens: int = 8, seed: int = 5) -> None:
    """Greedy ``generate`` gives transformers' tokens: one prompt, and a left-padded batch of three.

    Prompt ids avoid 0-2 (pad/bos/eos in most vocabularies); the eos id is ``vocab_size``,
    which is never produced, so every row runs ``max_new_tokens``.
    """
    vocab = ours.config.vocab_size
    never = vocab
    with eval_mode(ours, ref):
        for lengths in ((7,), (9, 6, 2)):
            ids, mask = left_padded_prompts(lengths, seed=seed, vocab=vocab)
            settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=never, pad_token_id=0)
            mine = ours.generate(ids, attention_mask=mask, **settings)
            theirs = ref.generate(input_ids=ids, attention_mask=mask, **settings)
            require(mine.shape == (len(lengths), max(lengths) + max_new_tokens), f"generated shape {tuple(mine.shape)}")
            require(
                torch.equal(mine, theirs),
                f"greedy generation differs from transformers' (prompts of {lengths}):\n"
                f"lmport:       {mine[:, max(lengths):].tolist()}\ntransformers: {theirs[:, max(lengths):].tolist()}",
            )


def check_bf16(ours: Any, ref: Any, *, seq: int = 24, grads: bool = False) -> None:
    """bf16 parity of two models of a bf16 checkpoint: bit-identical logits and loss, unpadded and padded.

    Args:
        ours, ref: lmport's and transformers' model, loaded in bf16.
        grads: also require the loss and every gradient of a training step to be bit-identical
            (met when lmport runs each of transformers' ops on tensors of the same shapes; a weight
            map that fuses or splits tensors changes matmul shapes and so the rounding of gradients).
    """
    vocab = min(ours.config.vocab_size, ref.config.vocab_size)
    padded = batch_of_two(seq, seed=3, padded=True, left_pad=3, vocab=vocab)
    with eval_mode(ours, ref):
        assert_bf16_parity(ours, ref, (batch_of_two(seq, seed=1, vocab=vocab), padded))
    if not grads:
        return
    ours.train()
    ref.train()
    try:
        loss_ours, grads_ours = loss_and_grads(ours, padded)
        loss_ref, grads_ref = loss_and_grads(ref, padded)
    finally:
        ours.eval()
        ref.eval()
    require(torch.equal(loss_ours, loss_ref), f"bf16 loss {loss_ours.item()} != {loss_ref.item()} (bitwise)")
    grads_ours = checkpoint_weight_map(ours).to_checkpoint(grads_ours)
    differ = sorted(grads_ours.keys() ^ grads_ref.keys())
    require(not differ, f"parameter names differ: {differ}")
    for name, g in grads_ref.items():
        require(grads_ours[name].dtype == torch.bfloat16, f"{name}: gradient is {grads_ours[name].dtype}")
        require(torch.equal(grads_ours[name], g), f"{name}: bf16 gradient not bit-identical")


# --- save round trips ----------------------------------------------------------------------------


def reference_config(folder: str | Path) -> dict[str, Any]:
    """transformers' reading of ``folder``'s config, without :data:`PROVENANCE_KEYS`."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    transformers = require_reference(raw["model_type"])
    config = transformers.AutoConfig.from_pretrained(folder).to_dict()
    return {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}


def assert_saved_like_transformers(
    ours: str | Path, ref: Any, theirs: str | Path, original: str | Path
) -> dict[str, torch.Tensor]:
    """transformers' ``ref`` saved to ``theirs`` holds exactly the names, shapes, dtypes and values of
    lmport's save in ``ours`` (and the names of the ``original`` checkpoint).

    Returns:
        lmport's saved tensors, by checkpoint name.
    """
    ref.save_pretrained(theirs)
    mine, theirs_tensors = tensors_of(Path(ours)), tensors_of(Path(theirs))
    original_names = tensors_of(Path(original)).keys()
    require(
        mine.keys() == theirs_tensors.keys() == original_names,
        f"saved names differ: lmport-only {sorted(mine.keys() - theirs_tensors.keys())}, transformers-only "
        f"{sorted(theirs_tensors.keys() - mine.keys())}, original {sorted(original_names ^ mine.keys())}",
    )
    for name, t in theirs_tensors.items():
        require(mine[name].shape == t.shape, f"{name}: saved shape {tuple(mine[name].shape)} != {tuple(t.shape)}")
        require(mine[name].dtype == t.dtype, f"{name}: saved dtype {mine[name].dtype} != {t.dtype}")
        require(torch.equal(mine[name], t), f"{name}: saved values differ from transformers' save")
    return mine


def check_save_round_trip(
    ours: Any, original: str | Path, work_dir: str | Path, *, perturb: bool = True
) -> dict[str, torch.Tensor]:
    """lmport's save loads in transformers, transformers' save loads in lmport, numbers unchanged.

    1. ``ours`` (first moved by :func:`perturb_parameters` with ``perturb``, as a fine-tune would:
       the save must carry the model's own state) is saved to ``work_dir/lmport``.
    2. transformers loads it with nothing missing, unexpected or mismatched, reads the same
       config as from ``original`` (save for provenance keys), and gives bit-identical logits and loss.
    3. transformers saves what it loaded to ``work_dir/transformers``: the same tensor names,
       shapes, dtypes and values as lmport's save, and the names of ``original``.
    4. lmport loads transformers' save and its own, cleanly, to bit-identical logits.

    Args:
        ours: lmport's model, loaded from ``original`` (a checkpoint transformers saved).
        original: that checkpoint.
        work_dir: where the saves go (created).

    Returns:
        lmport's saved tensors, by checkpoint name (for layout assertions).
    """
    import lmport

    work = Path(work_dir)
    ours_dir, theirs_dir = work / "lmport", work / "transformers"
    if perturb:
        perturb_parameters(ours)
    ours.save_pretrained(ours_dir)
    transformers = require_reference(ours.config.model_type)
    attn = {"attn_implementation": ours.attn_implementation}  # bit-identical needs the same kernel
    ref = load_clean(transformers.AutoModelForCausalLM, ours_dir, **attn)
    require(ref.dtype == ours.dtype, f"transformers read lmport's {ours.dtype} save as {ref.dtype}")
    got, want = reference_config(ours_dir), reference_config(original)
    changed = sorted(k for k in got.keys() | want.keys() if got.get(k, "<absent>") != want.get(k, "<absent>"))
    diffs = [(k, want.get(k), got.get(k)) for k in changed]
    require(not changed, f"config did not round-trip through lmport's save (key, original, saved): {diffs}")
    vocab = ours.config.vocab_size
    batch = batch_of_two(24, seed=1, padded=True, left_pad=3, vocab=vocab)
    with eval_mode(ours, ref):
        assert_same_outputs(ours, ref, batch)
    mine = assert_saved_like_transformers(ours_dir, ref, theirs_dir, original)
    for folder in (theirs_dir, ours_dir):
        again = load_clean(lmport.AutoModelForCausalLM, folder, **attn)
        require(type(again) is type(ours), f"{folder} loaded as {type(again).__name__}, not {type(ours).__name__}")
        with eval_mode(ours, again):
            assert_same_outputs(again, ours, batch)
    return mine


__all__ = [
    "PROVENANCE_KEYS",
    "assert_saved_like_transformers",
    "check_bf16",
    "check_fp32",
    "check_generation",
    "check_save_round_trip",
    "check_tied",
    "load_pair",
    "randomize_parameters",
    "reference_available",
    "reference_config",
    "require_reference",
    "save_reference_checkpoint",
    "transformers_module",
]
