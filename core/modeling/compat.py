"""The part of transformers' ``PreTrainedModel`` interface that fine-tuning libraries call.

Trainer, TRL, peft, accelerate and ``pipeline`` call these on any model they are handed;
docs/compat.md lists each item with the library that needs it. Duck-typed: nothing
here imports transformers.
"""

from __future__ import annotations

from typing import Any


class TransformersCompat:
    """Mixed into :class:`~lmport.modeling.base.PreTrainedCausalLM`."""

    config: Any
