"""The plugin manager: builtins, entry points (architectures loaded lazily), run-time registration."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import importlib_metadata
import pluggy

from . import hookspecs
from .errors import ArgumentError, PluginConflictError, PluginError, PluginImportError, UnknownModelTypeError
from .hookspecs import PROJECT_NAME, hookimpl

logger = logging.getLogger("lmport")

ARCHITECTURES_GROUP = "lmport.architectures"
PLUGINS_GROUP = "lmport.plugins"
#: Environment setting that picks a distribution per model_type: ``llama=lmport-llama,gpt2=my-gpt2``.
CHOICE_ENV = "LMPORT_ARCHITECTURES"
#: First-party distributions, named in "no plugin for model_type" errors.
KNOWN_DISTRIBUTIONS = {"llama": "lmport-llama", "gpt2": "lmport-gpt2", "mistral": "lmport-mistral"}


@dataclass(frozen=True)
class EntryPointInfo:
    """An entry point as installed metadata describes it, without importing it."""

    group: str
    name: str
    value: str
    distribution: str
    version: str

    @classmethod
    def from_entry_point(cls, ep: importlib_metadata.EntryPoint) -> EntryPointInfo:
        dist = ep.dist
        name = dist.metadata["Name"] if dist is not None else "<unknown>"
        version = dist.version if dist is not None else "?"
        return cls(ep.group, ep.name, ep.value, name, version)

    def load(self) -> Any:
        """Import the object the entry point names; failures become :class:`PluginImportError`."""
        ep = importlib_metadata.EntryPoint(name=self.name, value=self.value, group=self.group)
        try:
            return ep.load()
        except Exception as exc:
            raise PluginImportError(self.distribution, f"{self.name} = {self.value}", exc) from exc


class _CoreDefaults:
    """Core's own fallbacks, asked after every plugin."""

    @hookimpl(trylast=True)
    def lmport_weight_mapping(self, config: Any, model_class: type) -> Any:
        return getattr(model_class, "weight_map", None)


def _parse_choices(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        model_type, sep, dist = item.partition("=")
        if not sep or not dist.strip():
            raise PluginError(f"{CHOICE_ENV}: expected 'model_type=distribution', got {item!r}")
        out[model_type.strip()] = dist.strip()
    return out


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


class Registry:
    """Owns the pluggy ``PluginManager`` and knows which plugin serves which ``model_type``."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(_CoreDefaults(), name="core-defaults")
        from lmport.plugins import builtin_modules

        for module in builtin_modules():
            self.pm.register(module, name=f"builtin:{module.__name__.rsplit('.', 1)[-1]}")
        self.failures: list[PluginImportError] = []
        self._entry_points: dict[str, list[EntryPointInfo]] = {}
        self._architectures: dict[str, tuple[str, Any]] = {}  # model_type -> (provider label, plugin)
        self._runtime: dict[str, Any] = {}
        self._capabilities_loaded = False
        self._lock = threading.RLock()

    @property
    def hook(self) -> Any:
        self.load_capability_plugins()
        return self.pm.hook

    # --- entry points ------------------------------------------------------------

    def entry_points(self, group: str) -> list[EntryPointInfo]:
        """Installed entry points of ``group``, read from metadata (nothing is imported)."""
        if group not in self._entry_points:
            eps = importlib_metadata.entry_points(group=group)
            self._entry_points[group] = sorted(
                (EntryPointInfo.from_entry_point(ep) for ep in eps), key=lambda e: (e.name, e.distribution)
            )
        return self._entry_points[group]

    def load_capability_plugins(self) -> None:
        """Register every ``lmport.plugins`` entry point once; a broken one is logged and skipped."""
        with self._lock:
            if self._capabilities_loaded:
                return
            self._capabilities_loaded = True
            for info in self.entry_points(PLUGINS_GROUP):
                try:
                    plugin = info.load()
                    self.pm.register(plugin, name=f"{info.distribution}:{info.name}")
                except PluginImportError as exc:
                    self.failures.append(exc)
                    logger.warning("%s", exc)
                except (ValueError, pluggy.PluginValidationError) as exc:  # already registered / invalid hookimpl
                    err = PluginImportError(info.distribution, f"{info.name} = {info.value}", exc)
                    self.failures.append(err)
                    logger.warning("%s", err)

    # --- architectures -------------------------------------------------------------

    def model_types(self) -> list[str]:
        """Every ``model_type`` an installed or registered plugin provides."""
        return sorted({e.name for e in self.entry_points(ARCHITECTURES_GROUP)} | set(self._runtime))

    def architecture(self, model_type: str, choose: str | None = None) -> Any:
        """Load (once) and return the plugin serving ``model_type``.

        Args:
            model_type: the config's ``model_type``.
            choose: a distribution name to pick when several claim ``model_type``;
                defaults to the :data:`CHOICE_ENV` setting.
        """
        with self._lock:
            if model_type in self._architectures and choose is None:
                return self._architectures[model_type][1]
            if model_type in self._runtime and choose is None:
                return self._runtime[model_type]
            candidates = [e for e in self.entry_points(ARCHITECTURES_GROUP) if e.name == model_type]
            choose = self.choice(model_type, choose)
            if choose is not None:
                picked = [e for e in candidates if _normalize(e.distribution) == _normalize(choose)]
                if not picked:
                    offered = ", ".join(e.distribution for e in candidates) or "none"
                    raise UnknownModelTypeError(
                        f"model_type {model_type!r}: distribution {choose!r} was chosen but does not provide it "
                        f"(installed providers: {offered})"
                    )
                candidates = picked
            if not candidates:
                raise self._unknown(model_type)
            if len(candidates) > 1:
                names = " and ".join(repr(e.distribution) for e in candidates)
                raise PluginConflictError(
                    f"model_type {model_type!r} is provided by {names}. Choose one with "
                    f"from_pretrained(..., plugin={candidates[0].distribution!r}) or "
                    f"{CHOICE_ENV}='{model_type}={candidates[0].distribution}', or uninstall one."
                )
            info = candidates[0]
            plugin = info.load()
            label = f"{info.distribution}:{model_type}"
            if self._architectures.get(model_type, (None,))[0] != label:
                self._register_architecture(model_type, label, plugin)
            return plugin

    def choice(self, model_type: str, choose: str | None = None) -> str | None:
        """The distribution explicitly chosen for ``model_type``: ``choose``, else the :data:`CHOICE_ENV` setting."""
        if choose is not None:
            if not isinstance(choose, str) or not choose.strip():
                raise ArgumentError(f"plugin must be a distribution name (a non-empty string), got {choose!r}"[:300])
            return choose
        return _parse_choices(os.environ.get(CHOICE_ENV, "")).get(model_type)

    def provider(self, model_type: str) -> str | None:
        """The label (``distribution:model_type`` or ``runtime:...``) of the loaded provider, if any."""
        entry = self._architectures.get(model_type)
        return entry[0] if entry else None

    def _register_architecture(self, model_type: str, label: str, plugin: Any) -> None:
        old = self._architectures.pop(model_type, None)
        if old is not None and self.pm.is_registered(old[1]):
            self.pm.unregister(old[1])
        if not self.pm.is_registered(plugin):
            self.pm.register(plugin, name=label)
        self._architectures[model_type] = (label, plugin)

    def _unknown(self, model_type: str) -> UnknownModelTypeError:
        installed = ", ".join(self.model_types()) or "none"
        hint = ""
        if model_type in KNOWN_DISTRIBUTIONS:
            hint = f" Install it with: pip install {KNOWN_DISTRIBUTIONS[model_type]}."
        else:
            hint = (
                " Write an architecture plugin for it (see docs/plugins.md) or register one at run time "
                "with lmport.register(...)."
            )
        return UnknownModelTypeError(
            f"no installed lmport plugin provides model_type {model_type!r} (installed: {installed}).{hint}"
        )

    # --- run-time registration --------------------------------------------------------

    def register(self, plugin: Any, *, name: str | None = None, override: bool = False) -> Any:
        """Register an :class:`~lmport.Architecture` or a capability plugin object/module."""
        with self._lock:
            model_type = getattr(plugin, "model_type", None)
            if isinstance(model_type, str) and not isinstance(plugin, ModuleType | type):
                installed = [e for e in self.entry_points(ARCHITECTURES_GROUP) if e.name == model_type]
                if (installed or model_type in self._runtime) and not override:
                    others = ", ".join(repr(e.distribution) for e in installed) or "an earlier lmport.register call"
                    raise PluginConflictError(
                        f"model_type {model_type!r} is already provided by {others}; "
                        f"pass lmport.register(..., override=True) to use {plugin!r} instead"
                    )
                self._runtime[model_type] = plugin
                self._register_architecture(model_type, name or f"runtime:{model_type}", plugin)
                return plugin
            self.pm.register(plugin, name=name)
            return plugin

    def unregister(self, plugin: Any) -> None:
        """Undo :meth:`register`."""
        with self._lock:
            for model_type, (label, obj) in list(self._architectures.items()):
                if obj is plugin:
                    del self._architectures[model_type]
                    self._runtime.pop(model_type, None)
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)

    def kernel_names(self) -> list[str]:
        names: list[str] = []
        for group in self.hook.lmport_attention_kernels():
            names.extend(n for n in group if n not in names)
        return names


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, created on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry() -> None:
    """Forget every loaded plugin and cached entry point (tests, or after ``pip install``)."""
    global _registry
    with _registry_lock:
        _registry = None
    importlib.invalidate_caches()
