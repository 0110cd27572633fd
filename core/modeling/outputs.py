"""Model outputs readable as attributes (``out.logits``), keys (``out["logits"]``) and tuples (``out[0]``)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar


class ModelOutput(OrderedDict):
    """An ordered mapping of the fields that are not ``None``; absent fields read as ``None``."""

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, mapping: Any = None, /, **kwargs: Any) -> None:
        if mapping is not None:  # dict(...)-style construction, as accelerate's device hooks rebuild outputs
            kwargs = {**dict(mapping), **kwargs}
        unknown = set(kwargs) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        super().__init__((k, kwargs[k]) for k in self.fields if kwargs.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in type(self).fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).fields:
            if value is None:
                self.pop(name, None)
            else:
                self[name] = value
        else:
            super().__setattr__(name, value)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def __reduce__(self) -> Any:
        return (type(self), (), None, None, iter(self.items()))

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


class CausalLMOutput(ModelOutput):
    """What a causal LM's forward returns."""

    fields = ("loss", "logits", "past_key_values", "hidden_states", "attentions")

    @property
    def logits_materialized(self) -> bool:
        """Whether ``logits`` were computed: ``False`` when the loss was taken chunk by chunk without them."""
        return "logits" in self


class BaseModelOutput(ModelOutput):
    """What a decoder stack's forward returns."""

    fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")
