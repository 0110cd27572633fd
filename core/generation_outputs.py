"""What ``generate(return_dict_in_generate=True)`` returns."""

from __future__ import annotations

from .modeling.outputs import ModelOutput


class GenerateDecoderOnlyOutput(ModelOutput):
    """transformers' ``GenerateDecoderOnlyOutput``: ``sequences`` (the token ids), ``scores`` (the
    processed scores of each step) and ``logits`` (the raw ones) when asked, ``hidden_states``
    (per step, per layer) when asked, and the KV ``cache``."""

    fields = ("sequences", "scores", "logits", "attentions", "hidden_states", "cache")
