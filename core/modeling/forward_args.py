"""Extra keyword arguments that trainers and tokenizers pass to a causal LM's forward, read as transformers reads them.

TRL's padding-free collator adds flash-attention's varlen arguments (``cu_seq_lens_q/k``,
``max_length_q/k``, ``seq_idx``); peft and generation code pass ``output_attentions``,
``return_dict`` and ``cache_position``. lmport honours each with transformers' meaning or
raises a typed error; unknown names raise :class:`~lmport.errors.ArgumentError`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import is_tracing
from ..errors import ArgumentError, UnsupportedFeatureError

#: Flash-attention varlen arguments describing packed documents (TRL ``padding_free``).
VARLEN_ARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
#: Every extra keyword :func:`check_forward_kwargs` understands.
KNOWN_ARGS = frozenset(
    {"return_dict", "output_attentions", "output_router_logits", "is_causal", "cache_position", *VARLEN_ARGS}
)


def check_forward_kwargs(
    owner: str,
    kwargs: dict[str, Any],
    *,
    position_ids: torch.Tensor,
    segments: torch.Tensor | None,
    past_length: int,
    has_padding: bool,
) -> bool | None:
    """Validate a decoder forward's extra ``kwargs``; returns ``return_dict`` (``None`` when not given).

    Args:
        owner: the class name used in error messages.
        kwargs: the extra keyword arguments, as received.
        position_ids: ``(batch, seq)`` positions of the new tokens.
        segments: the document index of each position the forward keeps apart (packed rows),
            or ``None`` for one document per row.
        past_length: positions already in the KV cache.
        has_padding: whether an ``attention_mask`` masks some position.

    Raises:
        ArgumentError: an unknown argument, or one whose value contradicts the batch
            (``cu_seq_lens_*``/``seq_idx`` naming other documents than ``position_ids``,
            a ``cache_position`` other than the cache's next positions).
        UnsupportedFeatureError: a request lmport never serves (``output_attentions=True``,
            ``is_causal=False``, router logits).
    """
    unknown = set(kwargs) - KNOWN_ARGS
    if unknown:
        raise ArgumentError(f"{owner}.forward got unexpected arguments {sorted(unknown)}")
    if kwargs.get("output_attentions"):
        raise UnsupportedFeatureError(
            f"{owner}: output_attentions=True is not supported; attention weights are never materialised"
        )
    if kwargs.get("output_router_logits"):
        raise UnsupportedFeatureError(f"{owner}: output_router_logits=True: this model has no mixture of experts")
    if kwargs.get("is_causal", True) is False:
        raise UnsupportedFeatureError(f"{owner}: is_causal=False (bidirectional attention) is not supported")
    if is_tracing(position_ids):
        return kwargs.get("return_dict")  # the value checks below read tensors: not while compiling
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        _check_cache_position(owner, cache_position, position_ids.shape[-1], past_length)
    if any(kwargs.get(name) is not None for name in VARLEN_ARGS):
        _check_varlen(owner, kwargs, position_ids, segments, past_length, has_padding)
    return kwargs.get("return_dict")


def _check_cache_position(owner: str, cache_position: Any, seq: int, past: int) -> None:
    """``cache_position`` must be the positions the new tokens take in the cache: ``past .. past + seq - 1``."""
    expected = torch.arange(past, past + seq)
    given = torch.as_tensor(cache_position).detach().to("cpu", torch.long)
    if given.dim() == 2:  # (batch, seq): every row alike
        given = given.unique(dim=0)
    if given.reshape(-1).shape != expected.shape or not torch.equal(given.reshape(-1), expected):
        raise ArgumentError(
            f"{owner}: cache_position {given.tolist()} is not the cache's next positions {past}..{past + seq - 1}"
        )


def _check_varlen(
    owner: str,
    kwargs: dict[str, Any],
    position_ids: torch.Tensor,
    segments: torch.Tensor | None,
    past: int,
    has_padding: bool,
) -> None:
    """The varlen arguments must describe the documents the forward keeps apart (from ``position_ids``)."""
    if past or has_padding:
        raise UnsupportedFeatureError(
            f"{owner}: cu_seq_lens_*/max_length_*/seq_idx describe a padding-free batch; they cannot be combined "
            "with a KV cache or a padding attention_mask"
        )
    batch, seq = position_ids.shape
    if segments is None:
        starts = torch.zeros(batch, seq, dtype=torch.bool)
    else:
        seg = segments.detach().to("cpu")
        starts = torch.diff(seg, dim=-1, prepend=seg[:, :1] - 1) != 0
    starts[:, 0] = True  # every row starts a document in the flattened stream
    flat = starts.reshape(-1)
    cu = torch.cat([flat.nonzero().reshape(-1), torch.tensor([batch * seq])])
    lengths = cu.diff()
    hint = "; position_ids must restart at 0 where each document starts (and no attention_mask)"
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        value = kwargs.get(name)
        if value is None:
            continue
        given = torch.as_tensor(value).detach().to("cpu", torch.long).reshape(-1)
        if not torch.equal(given, cu):
            raise ArgumentError(
                f"{owner}: {name}={given.tolist()} disagrees with the documents of position_ids "
                f"(boundaries {cu.tolist()}){hint}"
            )
    for name in ("max_length_q", "max_length_k"):
        value = kwargs.get(name)
        if value is None:
            continue
        given_max = int(torch.as_tensor(value).max())
        if given_max < int(lengths.max()):
            raise ArgumentError(
                f"{owner}: {name}={given_max} is shorter than the longest document ({int(lengths.max())} tokens)"
            )
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None:
        given = torch.as_tensor(seq_idx).detach().to("cpu", torch.long).reshape(-1)
        expected = flat.long().cumsum(0) - 1
        if not torch.equal(given, expected):
            raise ArgumentError(f"{owner}: seq_idx disagrees with the documents of position_ids{hint}")
