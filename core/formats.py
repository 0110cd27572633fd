"""Weight formats: their file names, the order a load prefers them in, their readers and writers.

Every question about weight files is answered here: which names a load looks for in a
local folder (the builtin ``lmport_open_weights``), which files the hub source downloads,
what the "no weight files" error lists, and which writer, file names and index
``save_pretrained`` uses (and which old files a save replaces).

A :class:`WeightFormat` is declared by a plugin through the ``lmport_weight_formats``
hook. The builtins declare safetensors (preferred) and PyTorch ``.bin``, as transformers
prefers them; a third-party plugin adds its own format the same way.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PluginError, UnsupportedFeatureError, WeightsNotFoundError
from .hookspecs import hookimpl
from .options import LoadOptions
from .shards import add_variant, checked_file, read_index

if TYPE_CHECKING:
    import torch

    from .weights import WeightSource

#: Weight-file endings of formats lmport has no reader for, named in messages about what a repository holds.
FOREIGN_EXTENSIONS = ("pt", "h5", "msgpack", "gguf")
_SHARD = r"(?:-\d{5}-of-\d{5})?"


@dataclass(frozen=True)
class WeightFiles:
    """One format's files in a checkpoint folder."""

    #: The files in reading order (shards sorted by name).
    files: list[Path]
    #: The index file, for a sharded checkpoint.
    index: Path | None = None
    #: Tensor name → shard, as the index lists them (sharded checkpoints only).
    weight_map: dict[str, Path] | None = None


@dataclass(frozen=True)
class FileNames:
    """The files one format looks for in a checkpoint under a load's options (variant applied)."""

    format: WeightFormat
    #: The one-file checkpoint (``model.safetensors``), or ``None``.
    single: str | None
    #: The index of a sharded checkpoint (``model.safetensors.index.json``), or ``None``.
    index: str | None

    def names(self) -> list[str]:
        """The names in the order they are looked for: the single file wins over an index."""
        return [n for n in (self.single, self.index) if n is not None]


class WeightFormat(ABC):
    """A weight file format: what its files are called, how they are read and (maybe) written.

    Subclasses set the class attributes and implement :meth:`open`; a format that
    ``save_pretrained`` can produce sets :attr:`writable` and implements :meth:`write`.
    A format whose files are not fixed names (one chosen by an argument) overrides
    :meth:`file_names` and :meth:`requested`.
    """

    #: Short name for messages ("safetensors").
    name: str
    #: The ending of its weight files, shards included, without the dot ("safetensors").
    extension: str
    #: The one-file checkpoint's name without a variant ("model.safetensors"); ``None`` if it has none.
    single: str | None = None
    #: The index file of a sharded checkpoint ("model.safetensors.index.json"); ``None`` if it has none.
    index: str | None = None
    #: Whether ``use_safetensors=True`` selects this format (and ``use_safetensors=False`` rules it out);
    #: ``False`` for the others, which ``use_safetensors=True`` rules out.
    safetensors: bool = False
    #: Higher is preferred when a folder holds several formats (safetensors 200, ``.bin`` 100).
    preference: int = 0
    #: Whether :meth:`write` writes this format (``save_pretrained``); read-only formats leave it false.
    writable: bool = False

    def requested(self, options: LoadOptions) -> bool:
        """Whether ``options`` ask for this format by name; when any format is asked for so, only those are
        looked for. No builtin format is (``use_safetensors`` is handled by :meth:`file_names`)."""
        return False

    def file_names(self, options: LoadOptions) -> FileNames | None:
        """The names this format looks for under ``options`` (variant applied), or ``None`` when they rule it out."""
        if options.use_safetensors is not None and options.use_safetensors is not self.safetensors:
            return None
        if self.single is None and self.index is None:
            return None
        variant = options.variant
        return FileNames(
            self,
            add_variant(self.single, variant) if self.single else None,
            add_variant(self.index, variant) if self.index else None,
        )

    def find(self, folder: Path, names: FileNames) -> WeightFiles | None:
        """This format's files in ``folder`` (the single file wins over an index), symlink policy applied;
        ``None`` when it has none there."""
        if names.single is not None and checked_file(folder, folder / names.single) is not None:
            return WeightFiles([folder / names.single])
        if names.index is not None:
            index_path = folder / names.index
            if checked_file(folder, index_path) is not None:
                shards = read_index(index_path)
                return WeightFiles(sorted(set(shards.values())), index_path, shards)
        return None

    @abstractmethod
    def open(self, found: WeightFiles, options: LoadOptions) -> WeightSource:
        """A lazy :class:`~lmport.weights.WeightSource` over ``found`` (what :meth:`find` returned)."""

    def read_config(self, found: WeightFiles) -> dict[str, Any] | None:
        """The ``config.json`` equivalent that ``found`` carries itself (a GGUF file's metadata), ``model_type``
        included; ``None`` (the default) when the checkpoint's ``config.json`` holds the config."""
        return None

    def write(
        self,
        tensors: dict[str, torch.Tensor],
        path: Path,
        *,
        save_function: Callable[[Any, str], Any] | None = None,
    ) -> None:
        """Write one file of contiguous CPU tensors (a whole checkpoint or one shard).

        ``save_function`` is ``save_pretrained``'s replacement for ``torch.save``; formats
        that do not pickle ignore it.
        """
        raise UnsupportedFeatureError(f"weight format {self.name!r} is read-only: it has no writer")

    # --- names a save writes ------------------------------------------------------------

    def shard_name(self, variant: str | None, number: int, count: int) -> str:
        """``model-00001-of-00003.safetensors`` (``model.fp16-00001-of-00003.safetensors`` with a variant)."""
        stem, ext = self._single(variant).rsplit(".", 1)
        return f"{stem}-{number:05d}-of-{count:05d}.{ext}"

    def save(
        self,
        shards: list[dict[str, torch.Tensor]],
        folder: Path,
        variant: str | None,
        *,
        save_function: Callable[[Any, str], Any] | None = None,
    ) -> None:
        """Write ``shards`` into ``folder``: one file named :attr:`single`, or numbered shards and the index."""
        if not self.writable:
            raise UnsupportedFeatureError(f"weight format {self.name!r} is read-only: it has no writer")
        if len(shards) == 1:
            self.write(shards[0], folder / self._single(variant), save_function=save_function)
            return
        if self.index is None:
            raise UnsupportedFeatureError(f"weight format {self.name!r} has no index file: it cannot be sharded")
        weight_index: dict[str, str] = {}
        for number, shard in enumerate(shards, 1):
            name = self.shard_name(variant, number, len(shards))
            self.write(shard, folder / name, save_function=save_function)
            weight_index.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_index.items()))}
        (folder / add_variant(self.index, variant)).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def file_pattern(self, variant: str | None) -> str:
        """A regular expression of every file name a checkpoint of this format and ``variant`` may hold."""
        parts = []
        if self.single is not None:
            stem, ext = self._single(variant).rsplit(".", 1)
            parts.append(f"{re.escape(stem)}{_SHARD}{re.escape('.' + ext)}")
        if self.index is not None:
            parts.append(re.escape(add_variant(self.index, variant)))
        return "|".join(parts)

    def _single(self, variant: str | None) -> str:
        if self.single is None:
            raise UnsupportedFeatureError(f"weight format {self.name!r} has no fixed file name to save under")
        return add_variant(self.single, variant)

    def __repr__(self) -> str:
        return f"<weight format {self.name!r}>"


# --- the formats the installed plugins declare ------------------------------------------------


def registered_formats() -> list[WeightFormat]:
    """Every format the installed plugins declare, most preferred first (ties: the plugin asked first).

    Raises:
        PluginError: a plugin's ``lmport_weight_formats`` returned something other than a
            list of :class:`WeightFormat` instances (the message names the plugin).
    """
    from .registry import get_registry

    hook = get_registry().hook.lmport_weight_formats
    found: list[WeightFormat] = []
    for impl in reversed(hook.get_hookimpls()):  # pluggy's calling order
        declared = impl.function()
        if not isinstance(declared, (list, tuple)) or not all(_valid(f) for f in declared):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: lmport_weight_formats must return a list of lmport.formats."
                f"WeightFormat instances with a non-empty name and extension, got {declared!r}"[:400]
            )
        found.extend(declared)
    return sorted(found, key=lambda f: -f.preference)


def _valid(fmt: Any) -> bool:
    return isinstance(fmt, WeightFormat) and all(
        isinstance(getattr(fmt, a, None), str) and getattr(fmt, a) for a in ("name", "extension")
    )


def candidates(options: LoadOptions, formats: list[WeightFormat] | None = None) -> list[FileNames]:
    """What a load looks for, most preferred format first: each allowed format's file names under ``options``.

    When some format is :meth:`~WeightFormat.requested` by ``options``, only those are looked for.
    """
    formats = registered_formats() if formats is None else formats
    formats = [f for f in formats if f.requested(options)] or formats
    return [names for f in formats if (names := f.file_names(options)) is not None]


def looked_for(options: LoadOptions, formats: list[WeightFormat] | None = None) -> list[str]:
    """Every file name a load with ``options`` looks for, in order (for messages)."""
    return list(dict.fromkeys(n for names in candidates(options, formats) for n in names.names()))


def not_found(where: object, options: LoadOptions) -> WeightsNotFoundError:
    """The error for a checkpoint without any weight file a load with ``options`` can read."""
    looked = looked_for(options)
    what = ", ".join(looked) if looked else "nothing: no installed weight format serves these options"
    return WeightsNotFoundError(f"{where}: no weight files found (looked for {what})")


def weight_extensions() -> tuple[str, ...]:
    """File endings (with the dot) of weight files: every registered format's and common foreign ones."""
    names = dict.fromkeys([*(f.extension for f in registered_formats()), *FOREIGN_EXTENSIONS])
    return tuple(f".{e}" for e in names)


def requested_formats(options: LoadOptions) -> list[WeightFormat]:
    """The registered formats ``options`` ask for by name (``gguf_file=``); empty when none is."""
    return [f for f in registered_formats() if f.requested(options)]


def embedded_config(folder: Path, options: LoadOptions) -> tuple[dict[str, Any], Path] | None:
    """The config carried by the weight files a load of ``folder`` reads, and the file it comes from; ``None``
    when those files carry none (or there are none), and ``config.json`` is to be read."""
    for names in candidates(options):
        found = names.format.find(folder, names)
        if found is not None and found.files:
            raw = names.format.read_config(found)
            return None if raw is None else (raw, found.files[0])
    return None


def open_checkpoint(folder: Path, options: LoadOptions) -> WeightSource | None:
    """Open ``folder``'s weights in the most preferred format that has files there; ``None`` when none has."""
    for names in candidates(options):
        found = names.format.find(folder, names)
        if found is not None and found.files:
            return names.format.open(found, options)
    return None


def writer(safe_serialization: bool) -> WeightFormat:
    """The format ``save_pretrained`` writes: the most preferred writable safetensors format, or (with
    ``safe_serialization=False``) the most preferred writable other one (PyTorch ``.bin``)."""
    for fmt in registered_formats():
        if fmt.writable and fmt.safetensors is bool(safe_serialization):
            return fmt
    kind = "safetensors" if safe_serialization else "non-safetensors (safe_serialization=False)"
    raise UnsupportedFeatureError(f"save_pretrained: no installed weight format writes {kind} checkpoints")


def checkpoint_files(variant: str | None, also: Iterable[str] = ()) -> Callable[[str], bool]:
    """Whether a file name is weights of ``variant`` in any registered format (single, shards or index),
    or one of the names in ``also``."""
    parts = [p for f in registered_formats() if (p := f.file_pattern(variant))]
    parts += [re.escape(name) for name in also]
    pattern = re.compile("|".join(parts))
    return lambda name: pattern.fullmatch(name) is not None


@hookimpl(trylast=True)
def lmport_open_weights(folder: Path, options: LoadOptions) -> WeightSource | None:
    """The builtin reader of local checkpoints: the registered formats, most preferred first."""
    return open_checkpoint(folder, options)
