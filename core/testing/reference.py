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
    batch_of_two,
    checkpoint_weight_map,
    eval_mode,
    generation_positions,
    left_padded_prompts,
    load_lmport,
    loss_and_grads,
    require,
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


__all__ = [
    "PROVENANCE_KEYS",
    "check_bf16",
    "check_fp32",
    "check_generation",
    "check_tied",
    "load_pair",
    "randomize_parameters",
    "reference_available",
    "require_reference",
    "save_reference_checkpoint",
    "transformers_module",
]
