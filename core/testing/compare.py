"""Tolerances, test inputs and the comparisons every conformance check is made of.

Nothing here needs transformers (a reference model is only called, duck-typed). Failures
raise :class:`ConformanceError`, an ``AssertionError`` that test runners report as a failed
test (and that ``python -O`` does not strip).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

#: fp32 logits: largest absolute difference allowed (DESIGN.md).
LOGITS_ATOL = 1e-5
#: fp32 gradients: largest difference allowed, relative to the reference gradient's largest entry, per tensor.
GRAD_RTOL = 1e-5
#: fp32 losses: absolute and relative tolerance.
LOSS_TOL = 1e-6
#: A setting "is in effect" when toggling it moves some logit by more than this.
MOVED = 1e-3
#: Token ids of the default test inputs stay below this (the tiny test vocabularies' size).
VOCAB = 128


class ConformanceError(AssertionError):
    """A conformance check failed: the message says which check, on what, by how much."""


def require(condition: object, message: str) -> None:
    """Raise :class:`ConformanceError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConformanceError(message)


# --- files and loading -----------------------------------------------------------------------


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder`` (to prove a load changed nothing)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder`` (there must be some), by name."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    require(files, f"no safetensors in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def load_clean(model_class: Any, folder: str | Path, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder, **kwargs)`` (transformers' or lmport's), asserting it found
    every weight and nothing else."""
    model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        require(not info[key], f"{getattr(model_class, '__name__', model_class)} loading {folder}: {key} {info[key]}")
    return model


def load_lmport(folder: str | Path, **kwargs: Any) -> Any:
    """lmport's model of ``folder`` (``from_pretrained(folder, **kwargs)``), asserting the load changed no file."""
    import lmport

    before = folder_digest(Path(folder))
    result = lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    require(folder_digest(Path(folder)) == before, f"loading changed the checkpoint folder {folder}")
    return result


# --- inputs ---------------------------------------------------------------------------------


def batch_of_two(
    seq: int, seed: int = 0, padded: bool = False, *, left_pad: int = 0, right_pad: int = 5, vocab: int = VOCAB
) -> dict[str, torch.Tensor]:
    """A batch of two rows of ``seq`` random ids below ``vocab``, with labels that hold -100 entries.

    Args:
        seq: the row length.
        seed: seeds the ids.
        padded: add an ``attention_mask`` that right-pads the second row by ``right_pad``
            and left-pads the first by ``left_pad``; padded positions get label -100.

    Returns:
        ``{"input_ids", "labels"}`` (and ``"attention_mask"`` when ``padded``).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, seq // 2 : seq // 2 + 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[0, :left_pad] = 0
        mask[1, seq - right_pad :] = 0
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
    return batch


def left_padded_prompts(
    lengths: Iterable[int], seed: int = 0, *, vocab: int = VOCAB, pad: int = 0, low: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of ``lengths`` random ids in ``[low, vocab)``, left-padded with ``pad``: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(low, vocab, (n,), generator=g) for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The ``position_ids`` that ``generate`` passes for a left-padded ``attention_mask``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# --- comparisons ------------------------------------------------------------------------------


def max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference of two tensors, in float32."""
    return (a.float() - b.float()).abs().max().item()


def assert_logits_close(
    ours: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    finite: bool = False,
    atol: float = LOGITS_ATOL,
) -> float:
    """Same shape and dtype, within ``atol`` at the real positions of ``mask`` (all when ``None``).

    Args:
        finite: also require no inf/NaN at those positions.

    Returns:
        The largest absolute difference.
    """
    require(ours.shape == ref.shape, f"logits shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    require(ours.dtype == ref.dtype, f"logits dtype {ours.dtype} != reference {ref.dtype}")
    if mask is not None:  # padded positions are don't-care in both libraries
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    if finite:
        require(torch.isfinite(ours).all(), "non-finite logits at real positions")
    diff = max_change(ours, ref)
    require(diff <= atol, f"logits differ by {diff:.3g} (> {atol})")
    return diff


def assert_padded_logits_close(
    ours: Any, ref: Any, batch: Mapping[str, torch.Tensor], *, finite: bool = False, atol: float = LOGITS_ATOL,
    **kwargs: Any,
) -> float:  # fmt: skip
    """Both models on ``batch``'s ids and attention mask (and ``kwargs``): logits close at the real positions.

    Returns:
        The largest absolute difference there.
    """
    mask = batch["attention_mask"]
    return assert_logits_close(
        ours(batch["input_ids"], attention_mask=mask, **kwargs).logits,
        ref(batch["input_ids"], attention_mask=mask, **kwargs).logits,
        mask,
        finite=finite,
        atol=atol,
    )


def assert_loss_equal(ours: torch.Tensor, ref: torch.Tensor, *, tol: float = LOSS_TOL) -> float:
    """Losses equal within ``tol`` (absolute and relative); returns their absolute difference."""
    diff = abs(ours.detach().double().item() - ref.detach().double().item())
    bound = tol + tol * abs(ref.detach().double().item())
    require(diff <= bound, f"loss {ours.item():.8g} != reference {ref.item():.8g} (differs by {diff:.3g})")
    return diff


def loss_and_grads(
    model: Any, batch: Mapping[str, torch.Tensor], **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one forward/backward on ``batch`` (and ``kwargs``) and every parameter's gradient, by name."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        require(p.grad is not None, f"{name} got no gradient")
        grads[name] = p.grad.detach().clone()
    return out.loss.detach(), grads


def assert_grads_close(
    ours: Mapping[str, torch.Tensor],
    ref: Mapping[str, torch.Tensor],
    *,
    check_shapes: bool = True,
    rtol: float = GRAD_RTOL,
) -> float:
    """Same names; each gradient within ``rtol`` of the reference's largest entry.

    Args:
        check_shapes: require equal shapes first.

    Returns:
        The largest difference seen, relative to its tensor's scale.
    """
    require(ours.keys() == ref.keys(), f"parameter names differ: {sorted(ours.keys() ^ ref.keys())}")
    worst = 0.0
    for name, g_ref in ref.items():
        if check_shapes:
            require(ours[name].shape == g_ref.shape, f"{name}: gradient shape {ours[name].shape} != {g_ref.shape}")
        scale = g_ref.abs().max().item()
        require(scale > 0, f"reference gradient of {name} is all zero: the check would be vacuous")
        diff = (ours[name] - g_ref).abs().max().item()
        require(diff <= rtol * scale, f"{name}: gradient differs by {diff:.3g} (scale {scale:.3g})")
        worst = max(worst, diff / scale)
    return worst


def checkpoint_weight_map(model: Any) -> Any:
    """The :class:`~lmport.WeightMap` that ``model``'s architecture saves it with."""
    from ..hooks import weight_map_for

    return weight_map_for(model.config, type(model))


def assert_same_training_step(
    ours: Any,
    ref: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    checkpoint_names: bool = True,
    check_shapes: bool = True,
    grad_rtol: float = GRAD_RTOL,
    loss_tol: float = LOSS_TOL,
    **kwargs: Any,
) -> torch.Tensor:
    """One forward/backward of each model on ``batch`` (and ``kwargs``): equal losses, close gradients.

    Args:
        checkpoint_names: first put lmport's module-named gradients in checkpoint names and
            layouts through its weight map (``to_checkpoint``), the names the reference uses.
        check_shapes: require equal gradient shapes.

    Returns:
        lmport's loss.
    """
    loss_ours, grads_ours = loss_and_grads(ours, batch, **kwargs)
    loss_ref, grads_ref = loss_and_grads(ref, batch, **kwargs)
    assert_loss_equal(loss_ours, loss_ref, tol=loss_tol)
    if checkpoint_names:
        grads_ours = checkpoint_weight_map(ours).to_checkpoint(grads_ours)
    assert_grads_close(grads_ours, grads_ref, check_shapes=check_shapes, rtol=grad_rtol)
    return loss_ours


def assert_same_outputs(
    ours: Any, ref: Any, batch: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> None:
    """Both models on ``batch`` (ids, mask if any, labels): bit-identical logits at real positions and loss.

    Args:
        dtype: lmport's logits must also be of it.
    """
    mask = batch.get("attention_mask")
    with torch.no_grad():
        out_ours = ours(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        out_ref = ref(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    if dtype is not None:
        require(out_ours.logits.dtype == dtype, f"logits are {out_ours.logits.dtype}, expected {dtype}")
    keep = mask.bool() if mask is not None else torch.ones(out_ref.logits.shape[:2], dtype=torch.bool)
    diff = max_change(out_ours.logits[keep], out_ref.logits[keep])
    require(torch.equal(out_ours.logits[keep], out_ref.logits[keep]), f"logits not bit-identical (max diff {diff:.3g})")
    require(torch.equal(out_ours.loss, out_ref.loss), f"loss {out_ours.loss.item()} != {out_ref.loss.item()} (bitwise)")


def assert_bf16_parity(ours: Any, ref: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
    """Both models loaded bf16 (lmport's config says so too) and bit-identical on every batch."""
    require(ref.dtype == torch.bfloat16, f"the reference loaded as {ref.dtype}, not bfloat16")
    require(ours.dtype == torch.bfloat16, f"lmport loaded as {ours.dtype}, not bfloat16")
    require(ours.config.dtype == "bfloat16", f"lmport's config.dtype is {ours.config.dtype!r}, not 'bfloat16'")
    require(all(p.dtype == torch.bfloat16 for p in ours.parameters()), "some parameter is not bfloat16")
    for batch in batches:
        assert_same_outputs(ours, ref, batch, dtype=torch.bfloat16)


def perturb_parameters(model: Any, seed: int = 7, scale: float = 0.05) -> None:
    """A "fine-tuned" model: every parameter moved in place, so a save must carry the model's own state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Put ``models`` in eval mode and autograd off while it lasts; their modes are restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
