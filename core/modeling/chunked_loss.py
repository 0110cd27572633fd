"""Cross entropy of a linear head's output, chunk by chunk over tokens, without all the logits.

:func:`linear_cross_entropy` runs the head and the cross entropy over a chunk of tokens at a
time and computes the gradients of the head's input and weight in the same pass (as Liger
Kernel's fused linear cross entropy does, in plain PyTorch), so peak memory holds one chunk's
logits. :func:`module_cross_entropy` does the same through any head module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import is_tracing

#: Tokens per chunk are chosen so that one chunk's fp32 logits take about this many bytes.
CHUNK_BYTES = 1 << 27


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: a power of two whose fp32 logits fit ``chunk_bytes`` (at least 16, at most 4096)."""
    fit = max(1, chunk_bytes // (4 * max(1, vocab_size)))
    return min(4096, max(16, 1 << (fit.bit_length() - 1)))


_SUM = 2  # aten's Reduction::Sum


def _accumulate_mm(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    total.addmm_(a, b)


def _accumulate_mm_meta(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


# ``total += a @ b`` in place, as an op of its own: compiled code then updates the buffer in place
# too (``Tensor.addmm_`` would become an out-of-place ``addmm`` and a copy of the whole gradient).
if not hasattr(torch.ops.lmport, "accumulate_mm_"):  # defined once per process; the library must stay alive
    _LIBRARY = torch.library.Library("lmport", "FRAGMENT")
    _LIBRARY.define("accumulate_mm_(Tensor(a!) total, Tensor a, Tensor b) -> ()")
    _LIBRARY.impl("accumulate_mm_", _accumulate_mm, "CompositeExplicitAutograd")
    _LIBRARY.impl("accumulate_mm_", _accumulate_mm_meta, "Meta")


def _chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross entropy of one chunk's ``logits`` (upcast to fp32), and its gradient times ``grad_scale``.

    The gradient is made by the aten kernels autograd runs for ``F.cross_entropy``, so a batch that
    fits one chunk gets the plain path's numbers bit for bit (same logits in, same values out).
    """
    log_probs = torch.log_softmax(logits.float(), 1)
    del logits
    total, total_weight = torch.ops.aten.nll_loss_forward(log_probs, targets, None, _SUM, ignore_index)
    if grad_scale is None:
        return total, None
    grad = torch.ops.aten.nll_loss_backward(grad_scale, log_probs, targets, None, _SUM, ignore_index, total_weight)
    return total, torch.ops.aten._log_softmax_backward_data(grad, log_probs, 1, torch.float32)


def _chunk_loss_by_columns(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_chunk_loss` with the logits laid out ``(vocab, rows)``: a chunk of few rows multiplies
    faster this way round; the gradient (same layout) is made in place in the one fp32 buffer."""
    logits = torch.mm(weight, hidden.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, hidden.t())
    logits = logits.float()
    valid = targets != ignore_index
    picked = targets.where(valid, 0).unsqueeze(0)
    target = logits.gather(0, picked).squeeze(0)
    top = logits.amax(0)
    exp = logits.sub_(top).exp_()
    norm = exp.sum(0)
    total = (top + norm.log() - target).where(valid, 0).sum()
    scale = valid.to(torch.float32) * grad_scale
    grad = exp.mul_(scale / norm).scatter_add_(0, picked, -scale.unsqueeze(0))  # softmax - one_hot, scaled
    return total, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T + bias, targets)``, summed and divided by ``denominator``, chunk by chunk.

    Forward computes the gradients too (they need the logits, which are dropped chunk by chunk);
    backward only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        denominator: torch.Tensor,
        ignore_index: int,
        chunk: int,
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        need_any = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None if hidden.shape[0] or not need_weight else torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if need_bias else None
        scale = 1.0 / denominator if need_any else None
        single = hidden.shape[0] <= chunk  # then computed exactly as the plain path computes it
        parts = []
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            if single or scale is None:
                total, grad_logits = _chunk_loss(F.linear(h, weight, bias), y, ignore_index, scale)
                by_columns = grad_logits.t() if grad_logits is not None else None
            else:
                total, by_columns = _chunk_loss_by_columns(h, weight, bias, y, ignore_index, scale)
            parts.append(total)
            if by_columns is None:
                continue
            grad = by_columns.to(weight.dtype)  # (vocab, rows); the plain path's gradient of ``logits.float()``
            if grad_hidden is not None:
                torch.mm(grad.t(), weight, out=grad_hidden[start : start + chunk])
            if need_weight:
                if grad_weight is None:
                    grad_weight = torch.mm(grad, h)
                else:
                    torch.ops.lmport.accumulate_mm_(grad_weight, grad, h)
            if grad_bias is not None:
                grad_bias += grad.sum(1)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return _total(parts, hidden) / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None


class _ModuleCrossEntropy(torch.autograd.Function):
    """As :class:`_LinearCrossEntropy` for any head module (peft's LoRA ``Linear``...): each chunk goes
    through ``head``, and the gradients of its input and of ``params`` come from ``torch.autograd.grad``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        denominator: torch.Tensor,
        ignore_index: int,
        chunk: int,
        head: nn.Module,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        need_hidden = ctx.needs_input_grad[0]
        need = [ctx.needs_input_grad[6 + i] for i in range(len(params))]
        wanted = [p for p, n in zip(params, need) if n]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_params: list[torch.Tensor | None] = [torch.zeros_like(p) if n else None for p, n in zip(params, need)]
        parts = []
        with torch.enable_grad():
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].detach().requires_grad_(need_hidden)
                y = targets[start : start + chunk]
                loss = F.cross_entropy(head(h).float(), y, ignore_index=ignore_index, reduction="sum")
                parts.append(loss.detach())
                inputs = ([h] if need_hidden else []) + wanted
                if not inputs:
                    continue
                found = list(torch.autograd.grad(loss, inputs, allow_unused=True))
                if need_hidden:
                    grad_hidden[start : start + chunk] = found.pop(0)  # type: ignore[index]
                for i, g in zip([i for i, n in enumerate(need) if n], found):
                    if g is not None:
                        grad_params[i].add_(g)  # type: ignore[union-attr]
        ctx.save_for_backward(grad_hidden, *grad_params)
        ctx.denominator = denominator
        return _total(parts, hidden) / denominator

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        scale = grad_output / ctx.denominator
        grads = [None if g is None else g.mul_(scale.to(g.dtype)) for g in ctx.saved_tensors]
        return (grads[0], None, None, None, None, None, *grads[1:])


def _total(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The fp32 sum of the chunks' summed losses (zero for no chunk)."""
    if not parts:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return torch.stack(parts).sum()


def _loss_only(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor, ignore_index: int, chunk: int
) -> torch.Tensor:
    """The loss alone (no gradient wanted), ``head`` applied to a chunk of rows at a time."""
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        parts.append(_chunk_loss(head(hidden[start : start + chunk]), targets[start : start + chunk], ignore_index, None)[0])
    return _total(parts, hidden) / denominator


def _denominator(
    targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, ignore_index: int
) -> torch.Tensor:
    """What the summed loss is divided by: ``num_items_in_batch``, else the count of targets taking a loss."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(targets.device, torch.float32)
    return torch.tensor(float(num_items_in_batch), device=targets.device)


def _flatten(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, hidden_size)`` inputs and ``(rows,)`` targets on their device, rows checked to match."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"Expected input batch_size ({hidden.shape[0]}) to match target batch_size ({targets.shape[0]})")
    return hidden, targets


def _compact(
    hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the rows that take no loss when they fill more than one chunk (eager, real tensors only: the
    row count depends on the values); a single chunk stays whole, computed as the plain path computes it."""
    if hidden.shape[0] <= chunk or is_tracing(targets) or type(targets) is not torch.Tensor:
        return hidden, targets
    if not bool((targets == ignore_index).any()):
        return hidden, targets
    keep = (targets != ignore_index).nonzero().squeeze(1)
    return hidden.index_select(0, keep), targets.index_select(0, keep)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross entropy of ``hidden @ weight.T + bias`` against ``targets``, never holding all the logits.

    Args:
        hidden: ``(..., hidden_size)`` inputs of the head.
        weight: ``(vocab, hidden_size)`` the head's weight (``bias``: its ``(vocab,)`` bias, or ``None``).
        targets: ``(...)`` one target per input row, ``ignore_index`` where no loss is taken.
        num_items_in_batch: divide the summed loss by this instead of the count of targets.
        chunk_size: tokens per chunk (default: :func:`chunk_tokens` of the vocabulary).

    Returns:
        The fp32 loss ``F.cross_entropy`` gives on the logits upcast to fp32 (within float rounding),
        with the same gradients for ``hidden``, ``weight`` and ``bias``. Logits are computed in the
        inputs' dtype, or autocast's when it is on, as ``nn.Linear`` computes them.
    """
    hidden, targets = _flatten(hidden, targets)
    denominator = _denominator(targets, num_items_in_batch, ignore_index)
    chunk = chunk_size or chunk_tokens(weight.shape[0])
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        hidden, targets = _compact(hidden, targets, ignore_index, chunk)
        if not torch.is_grad_enabled():
            return _loss_only(lambda h: F.linear(h, weight, bias), hidden, targets, denominator, ignore_index, chunk)
        function: Any = _LinearCrossEntropy
        return function.apply(hidden, weight, bias, targets, denominator, ignore_index, chunk)


def module_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`linear_cross_entropy` through any head module (called on one chunk of rows at a time).

    Gradients reach ``hidden`` and every parameter of ``head`` that requires grad. Eager only
    (``torch.autograd.grad`` runs inside the forward); the head's out features size the chunks.
    """
    hidden, targets = _flatten(hidden, targets)
    denominator = _denominator(targets, num_items_in_batch, ignore_index)
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [0])[0]
    chunk = chunk_size or chunk_tokens(int(vocab or 0))
    hidden, targets = _compact(hidden, targets, ignore_index, chunk)
    if not torch.is_grad_enabled():
        return _loss_only(head, hidden, targets, denominator, ignore_index, chunk)
    params = [p for p in head.parameters() if p.requires_grad]
    function: Any = _ModuleCrossEntropy
    return function.apply(hidden, targets, denominator, ignore_index, chunk, head, *params)
