"""The :class:`Architecture` plugin object: one ``model_type``, its config class and its model class."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .config import PretrainedConfig
from .gguf_spec import GGUFArchitecture
from .hookspecs import hookimpl


class Architecture:
    """Implements config parsing and class resolution for one ``model_type``.

    An architecture distribution exposes one of these as its
    ``lmport.architectures`` entry point (``llama = "lmport_llama:plugin"``), or
    passes it to :func:`lmport.register`. Its hooks are ``trylast``, so any
    capability plugin implementing the same hook takes precedence. A subclass may
    implement further hooks (``lmport_weight_mapping``...): the registry loads the
    architecture before a hook is asked about a model of its ``model_type`` (building
    with ``from_config``, loading, saving, ``load_state_dict``), so they answer
    however the model was made, ``Model(config)`` included.

    Args:
        model_type: the ``model_type`` value of ``config.json`` this serves.
        config_class: a :class:`~lmport.config.PretrainedConfig` subclass.
        model_class: the model class (its ``weight_map_for(config)`` is the default map).
        tiny_config: ``config.json`` values for a tiny instance (used by ``lmport demo``
            and by plugin authors' tests); ``None`` if the plugin offers none.
        gguf: how GGUF files of each llama.cpp architecture name it reads load
            (:class:`~lmport.gguf_spec.GGUFArchitecture`); their ``model_type`` is this one's.
    """

    def __init__(
        self,
        model_type: str,
        config_class: type[PretrainedConfig],
        model_class: type,
        *,
        tiny_config: dict[str, Any] | None = None,
        gguf: Sequence[GGUFArchitecture] = (),
    ) -> None:
        self.model_type = model_type
        self.config_class = config_class
        self.model_class = model_class
        self.tiny_config = tiny_config
        self.gguf = tuple(g if g.model_type else dataclasses.replace(g, model_type=model_type) for g in gguf)

    def __repr__(self) -> str:
        return f"Architecture({self.model_type!r}, {self.config_class.__name__}, {self.model_class.__name__})"

    @hookimpl(trylast=True)
    def lmport_parse_config(self, raw: dict[str, Any], model_type: str) -> PretrainedConfig | None:
        if model_type != self.model_type:
            return None
        return self.config_class.from_dict(raw)

    @hookimpl(trylast=True)
    def lmport_resolve_model_class(self, config: PretrainedConfig) -> type | None:
        # A config class subclassing another plugin's (a Llama variant) must not be claimed by it.
        if not isinstance(config, self.config_class) or config.model_type != self.model_type:
            return None
        return self.model_class

    @hookimpl(trylast=True)
    def lmport_gguf_architecture(self, name: str) -> GGUFArchitecture | None:
        return next((g for g in self.gguf if g.name == name), None)
