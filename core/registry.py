"""The plugin manager: builtins, entry points (architectures loaded lazily), run-time registration.

The registry owns lazy loading: whatever builds, loads or saves a model makes it load the
architecture of its ``model_type`` first (:meth:`Registry.ensure`; :mod:`lmport.hooks` does so
before asking any architecture hook), so the hooks of a lazily loaded architecture plugin always
take part, whichever way the model was made. Every plugin it registers is checked with pluggy's
``check_pending()`` (:meth:`Registry._register_checked`). Only :mod:`lmport.hooks` calls the hooks.
"""

from __future__ import annotations

import difflib
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

    def owns(self, model_class: type) -> bool:
        """Whether ``model_class`` is defined in the package this entry point names (read, not imported)."""
        package = self.value.partition(":")[0].strip()
        module = getattr(model_class, "__module__", "") or ""
        return bool(package) and (module == package or module.startswith(package + "."))


class _CoreDefaults:
    """Core's own fallbacks, asked after every plugin."""

    @hookimpl(trylast=True)
    def lmport_weight_mapping(self, config: Any, model_class: type) -> Any:
        weight_map_for = getattr(model_class, "weight_map_for", None)  # PreTrainedCausalLM's classmethod
        return weight_map_for(config) if callable(weight_map_for) else getattr(model_class, "weight_map", None)


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
            self._register_checked(module, f"builtin:{module.__name__.rsplit('.', 1)[-1]}")
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
                    self._register_checked(plugin, f"{info.distribution}:{info.name}")
                except PluginImportError as exc:
                    self.failures.append(exc)
                    logger.warning("%s", exc)
                except (ValueError, PluginError) as exc:  # already registered / invalid or unknown hookimpl
                    err = PluginImportError(info.distribution, f"{info.name} = {info.value}", exc)
                    self.failures.append(err)
                    logger.warning("%s", err)

    # --- architectures -------------------------------------------------------------

    def model_types(self) -> list[str]:
        """Every ``model_type`` an installed or registered plugin provides."""
        return sorted({e.name for e in self.entry_points(ARCHITECTURES_GROUP)} | set(self._runtime))

    def architecture(self, model_type: str, choose: str | None = None, *, model_class: type | None = None) -> Any:
        """Load (once), register and return the plugin serving ``model_type``.

        Args:
            model_type: the config's ``model_type``.
            choose: a distribution name to pick when several claim ``model_type``;
                defaults to the :data:`CHOICE_ENV` setting.
            model_class: the class of a model already built; when several distributions
                claim ``model_type`` and none is chosen, the one defining this class is used.

        Raises:
            UnknownModelTypeError: nothing provides ``model_type`` (or the chosen
                distribution does not).
            PluginConflictError: several distributions provide it and none is chosen.
            PluginImportError: the plugin fails to import.
            PluginError: the plugin implements a hook lmport does not specify.
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
            elif len(candidates) > 1 and model_class is not None:
                owners = [e for e in candidates if e.owns(model_class)]
                candidates = owners if len(owners) == 1 else candidates
            if not candidates:
                raise self.unknown(model_type)
            if len(candidates) > 1:
                names = " and ".join(repr(e.distribution) for e in candidates)
                raise PluginConflictError(
                    f"model_type {model_type!r} is provided by {names}. Choose one with "
                    f"from_pretrained(..., plugin={candidates[0].distribution!r}) (from_config takes it too) or "
                    f"{CHOICE_ENV}='{model_type}={candidates[0].distribution}', or uninstall one."
                )
            info = candidates[0]
            plugin = info.load()
            label = f"{info.distribution}:{model_type}"
            if self._architectures.get(model_type, (None,))[0] != label:
                self._register_architecture(model_type, label, plugin)
            return plugin

    def ensure(self, model_type: str, choose: str | None = None, *, model_class: type | None = None) -> Any | None:
        """Make sure the hooks of the plugin serving ``model_type`` take part; return that plugin.

        Every path that builds, loads or saves a model calls this (through :mod:`lmport.hooks`)
        before asking a hook about ``model_type``: the architecture's entry point is loaded
        lazily, so until then its hooks are not registered.

        Returns:
            The plugin, or ``None`` when no installed or registered plugin provides
            ``model_type`` and none was chosen (hooks of capability plugins may still answer).

        Raises:
            as :meth:`architecture`, except :class:`UnknownModelTypeError` when nothing
            was chosen explicitly.
        """
        try:
            return self.architecture(model_type, choose, model_class=model_class)
        except UnknownModelTypeError:
            if self.choice(model_type, choose) is not None:
                raise  # an explicit choice is honoured or refused, never silently replaced
            return None

    def load_all(self) -> None:
        """Load every installed architecture plugin (for questions no ``model_type`` answers, such as which
        plugin reads a GGUF name); one that fails to load is logged and skipped, never hiding the others."""
        for model_type in self.model_types():
            try:
                self.ensure(model_type)
            except PluginError as exc:
                logger.warning("%s", exc)

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
        old = self._architectures.get(model_type)
        if old is not None and old[1] is not plugin and self.pm.is_registered(old[1]):
            self.pm.unregister(old[1])
        try:
            if not self.pm.is_registered(plugin):
                self._register_checked(plugin, label)
        except Exception:
            if old is not None and not self.pm.is_registered(old[1]):  # a bad plugin leaves the previous one
                self.pm.register(old[1], name=old[0])
            raise
        self._architectures[model_type] = (label, plugin)

    def _register_checked(self, plugin: Any, name: str | None) -> None:
        """Register ``plugin``, then ``check_pending()``: a hook implementation matching no spec (a
        misspelling), or a spec's name left without ``@hookimpl``, unregisters it again and raises
        :class:`PluginError` naming the plugin and the method."""
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a spec's name with arguments the spec lacks
            raise PluginError(f"plugin {name or plugin!r}: {exc}") from exc
        label = self.pm.get_name(plugin) or repr(plugin)
        specs = sorted(n for n in dir(self.pm.hook) if n.startswith("lmport_") and getattr(self.pm.hook, n).has_spec())
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(
            c.name
            for c in callers
            if not c.has_spec() and any(i.plugin is plugin and not i.optionalhook for i in c.get_hookimpls())
        )
        marked = {c.name for c in callers}
        unmarked = [n for n in specs if n not in marked and callable(getattr(plugin, n, None))]
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if exc.plugin is not plugin:  # registered behind the registry's back
                self.pm.unregister(plugin)
                raise PluginError(f"plugin {self.pm.get_name(exc.plugin) or exc.plugin!r}: {exc}") from exc
        if not unknown and not unmarked:
            return
        self.pm.unregister(plugin)
        problems = []
        for method in unknown:
            close = difflib.get_close_matches(method, specs, n=1)
            problems.append(f"{method!r} matches no lmport hook" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems += [f"{m!r} is not marked with @lmport.hookimpl, so it would never be called" for m in unmarked]
        raise PluginError(f"plugin {label}: " + "; ".join(problems) + f". lmport's hooks: {', '.join(specs)}")

    def unknown(self, model_type: str) -> UnknownModelTypeError:
        """The error for a ``model_type`` no installed or registered plugin provides, naming the remedy."""
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
                self._register_architecture(model_type, name or f"runtime:{model_type}", plugin)
                self._runtime[model_type] = plugin
                return plugin
            self._register_checked(plugin, name)
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
