"""Token embeddings whose output is scaled (Gemma and relatives multiply by ``sqrt(hidden_size)``)."""

from __future__ import annotations

import torch
from torch import nn


class ScaledEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose output is multiplied by ``scale``, rounded to the weight's dtype first.

    The product is taken in the model's dtype, as transformers' ``GemmaTextScaledWordEmbedding``
    takes it (in bf16, ``sqrt(3072)`` is ``55.5``). The scale is a non-persistent buffer: it is in
    no checkpoint, and :meth:`init_buffers` recomputes it after a build on the meta device.

    Args:
        num_embeddings: rows (the vocabulary size).
        embedding_dim: the width of each row.
        padding_idx: the row kept at zero and given no gradient, or ``None``.
        scale: the factor applied to every looked-up row.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, scale: float = 1.0
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = float(scale)
        self.register_buffer("embed_scale", torch.tensor(self.scale, dtype=torch.float32), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        """(Re)compute the scale buffer on ``device`` (after building on the meta device)."""
        self.embed_scale = torch.tensor(self.scale, dtype=torch.float32, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"
