"""The attention-kernel contract: what a kernel receives and returns, and the mask it honours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, described rather than materialised.

    Attributes:
        q_len: number of query positions.
        kv_len: number of key positions (``>= q_len``; the last ``q_len`` keys
            are the queries' own positions).
        padding: ``(batch, kv_len)`` with 1 for real tokens and 0 for padding,
            or ``None`` when every position is real.
        sliding_window: a query at position ``p`` sees keys at positions
            ``> p - sliding_window`` only; ``None`` for no window.
        segments: ``(batch, kv_len)`` document index of each position when several
            documents are packed in one row (keys of other documents are hidden),
            or ``None``.
    """

    q_len: int
    kv_len: int
    padding: torch.Tensor | None = None
    sliding_window: int | None = None
    segments: torch.Tensor | None = None

    @property
    def window_applies(self) -> bool:
        """Whether the sliding window hides any key from any query."""
        return self.sliding_window is not None and self.kv_len > self.sliding_window

    @property
    def is_plain_causal(self) -> bool:
        """True when the mask is exactly "causal, nothing padded, no effective window"."""
        return self.padding is None and self.segments is None and not self.window_applies

    def to_bool(self, device: torch.device) -> torch.Tensor:
        """``(batch or 1, 1, q_len, kv_len)`` boolean mask, True where attention is allowed."""
        offset = self.kv_len - self.q_len
        q = torch.arange(self.q_len, device=device)[:, None] + offset
        k = torch.arange(self.kv_len, device=device)[None, :]
        allowed = k <= q
        if self.window_applies:
            allowed = allowed & (k > q - self.sliding_window)
        allowed = allowed[None, None]
        if self.segments is not None:
            seg = self.segments.to(device)
            allowed = allowed & (seg[:, None, -self.q_len :, None] == seg[:, None, None, :])
        if self.padding is not None:
            allowed = allowed & self.padding.to(device=device, dtype=torch.bool)[:, None, None, :]
        return allowed


@runtime_checkable
class AttentionKernel(Protocol):
    """An attention implementation selected through ``select_attention``.

    Called with ``query`` ``(batch, heads, q_len, head_dim)`` and ``key``/``value``
    ``(batch, kv_heads, kv_len, head_dim)``; returns ``(batch, q_len, heads, head_dim)``.
    ``num_kv_groups`` is ``heads // kv_heads`` (grouped-query attention).
    """

    name: str

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: AttentionMask,
        scaling: float,
        dropout: float,
        num_kv_groups: int,
    ) -> torch.Tensor: ...


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of each position when ``position_ids`` restart (packed rows), else ``None``.

    ``[[0, 1, 0, 1, 2, 0]]`` → ``[[0, 0, 1, 1, 1, 2]]``: a new document starts wherever
    the position does not follow the previous one. While tracing (:func:`is_tracing`) the
    segments are returned even when there is one document per row.
    """
    first = position_ids[:, :1] - 1
    segments = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    # While tracing, the segments are always returned: "is anything packed?" is data-dependent
    # (a graph break under torch.compile); segments of one document mask nothing extra.
    if not is_tracing(segments) and bool((segments[:, -1] == 0).all()):
        return None
    return segments


def is_tracing(tensor: torch.Tensor | None = None) -> bool:
    """Whether the code runs under ``torch.compile``/``torch.export``, ``torch.jit.trace`` or an FX trace.

    Traced code must not branch on tensor values; callers then take the general path.
    """
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or (tensor is not None and isinstance(tensor, torch.fx.Proxy))
    )


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand ``(b, kv_heads, s, d)`` to ``(b, kv_heads * n_rep, s, d)``."""
    if n_rep == 1:
        return hidden
    b, h, s, d = hidden.shape
    return hidden[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
