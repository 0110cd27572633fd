"""The causal-LM loss: next-token cross entropy with -100 ignored, as transformers computes it.

Two ways to the same number. :func:`causal_lm_loss` takes full logits (transformers' own
``ForCausalLMLoss``); :mod:`lmport.modeling.chunked_loss` never holds them. :func:`head_and_loss`
chooses between them for a model's forward (:func:`wants_chunked_loss`: by default, a training
forward with labels).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError
from .chunked_loss import linear_cross_entropy, module_cross_entropy

#: The default of ``model.chunked_loss``; ``LMPORT_CHUNKED_LOSS=0`` (read at import) turns it off.
CHUNKED_LOSS_DEFAULT = os.environ.get("LMPORT_CHUNKED_LOSS", "1").strip().lower() not in ("0", "false", "no", "off")


def shift_targets(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """The target of each position: ``labels`` moved one to the left (``ignore_index`` last), or ``shift_labels``."""
    if shift_labels is not None:
        return shift_labels
    assert labels is not None
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross entropy of ``logits[t]`` against ``labels[t + 1]``.

    With ``num_items_in_batch`` the summed loss is divided by it instead (gradient
    accumulation over micro-batches); ``shift_labels`` gives pre-shifted targets.
    """
    logits = logits.float()
    shift_labels = shift_targets(labels, shift_labels, ignore_index)
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# --- the choice a model's forward makes -------------------------------------------------------


def wants_chunked_loss(
    model: nn.Module, labels: torch.Tensor | None, skip_logits: bool | None, return_dict: bool | None
) -> bool:
    """Whether a forward computes its loss chunk by chunk and returns no logits.

    ``skip_logits`` (the name Liger Kernel and transformers' Trainer use) decides when given;
    otherwise: a training forward (``model.training``, gradients on) with ``labels`` and a
    ``ModelOutput`` result, unless ``model.chunked_loss`` is ``False``. Evaluation, ``torch.no_grad``,
    no labels and tuple outputs (``return_dict=False``, read by position) keep the logits.
    """
    if skip_logits is not None:
        if not isinstance(skip_logits, bool):
            raise ArgumentError(f"skip_logits must be a bool or None, got {skip_logits!r}")
        if skip_logits and labels is None:
            raise ArgumentError("skip_logits=True needs labels: without logits the forward returns only the loss")
        return skip_logits
    if labels is None or return_dict is False or not (model.training and torch.is_grad_enabled()):
        return False
    enabled = getattr(model, "chunked_loss", None)
    return CHUNKED_LOSS_DEFAULT if enabled is None else bool(enabled)


def _plain_tensor(t: Any) -> bool:
    """A dense tensor of its own (not sharded, quantized or otherwise wrapped); fake tensors (shapes only) count."""
    kind = type(t.data if isinstance(t, nn.Parameter) else t)
    return kind is torch.Tensor or (kind.__name__ == "FakeTensor" and kind.__module__.startswith("torch._subclasses"))


def _route(head: nn.Module) -> str:
    """``"linear"`` (the head's weight directly), ``"module"`` (call the head per chunk) or ``"plain"`` (full logits)."""
    params = list(head.parameters())
    if not params or not all(_plain_tensor(p) for p in params) or hasattr(head, "_hf_hook"):
        return "plain"  # sharded (DTensor), quantized or offloaded (accelerate hooks) heads
    if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return "linear"
    return "plain" if torch.compiler.is_compiling() else "module"


def head_and_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunked: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(logits, loss)`` of ``head`` on ``hidden``; with ``chunked``, ``(None, loss)`` without full logits.

    The loss is transformers' ``ForCausalLMLoss`` (see :func:`causal_lm_loss`), ``None`` without
    ``labels``. A head the chunked path cannot read (sharded, quantized or offloaded weights; a
    module other than ``nn.Linear`` under ``torch.compile``) gets the plain path, logits dropped.
    """
    if not chunked or labels is None:
        logits = head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        return logits, loss
    targets = shift_targets(labels, shift_labels, ignore_index)
    route = _route(head)
    if route == "linear":
        weight, bias = head.weight, head.bias
        loss = linear_cross_entropy(
            hidden.to(weight.device), weight, targets, bias,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, chunk_size=chunk_size,
        )  # fmt: skip
    elif route == "module":
        loss = module_cross_entropy(
            head, hidden, targets, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, chunk_size=chunk_size
        )
    else:
        loss = causal_lm_loss(head(hidden), labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
    return None, loss
