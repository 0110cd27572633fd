"""Weight format plugin: GGUF files (llama.cpp), read-only, config included.

A GGUF file holds the config (as metadata) and the weights (often quantized). The architecture
plugin that declares the file's ``general.architecture`` (a :class:`~lmport.GGUFArchitecture`,
through the ``lmport_gguf_architecture`` hook) says which metadata keys are which
``config.json`` keys and which GGUF tensor names are which checkpoint names; this module
builds the config from that and streams the tensors under their checkpoint names, each
dequantized (``gguf.quants.dequantize``) and cast to the load's dtype one at a time, so the
architecture's ordinary weight map places them and ``save_pretrained`` writes the Hugging
Face format. Quantized tensors need ``pip install 'lmport[gguf]'``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmport.errors import (
    ArgumentError,
    ConfigError,
    DuplicateTensorError,
    UnsupportedFeatureError,
    UnsupportedTensorError,
    UnsafePathError,
    WeightsNotFoundError,
)
from lmport.formats import FileNames, WeightFiles, WeightFormat
from lmport.gguf_reader import GGML_TYPES, NOT_WEIGHTS, GGUFFile, GGUFTensorInfo
from lmport.gguf_spec import GGUFArchitecture
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions
from lmport.shards import checked_file
from lmport.weights import TensorInfo

logger = logging.getLogger("lmport")

EXTENSION = ".gguf"
_PLAIN_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


# --- which plugin reads a file ------------------------------------------------------------


def gguf_architecture(name: str, path: Path | str) -> GGUFArchitecture:
    """The declaration of the installed plugin that reads GGUF architecture ``name`` (see
    :func:`lmport.hooks.gguf_architecture`)."""
    from lmport import hooks

    return hooks.gguf_architecture(name, path)


def config_dict(file: GGUFFile, architecture: GGUFArchitecture | None = None) -> dict[str, Any]:
    """The ``config.json`` equivalent of ``file``'s metadata (``model_type`` and ``dtype`` included).

    ``dtype`` is the file's own float type when it holds only float tensors (bfloat16 or
    float16 where present), else float32, the type quantized tensors are dequantized to.
    """
    architecture = architecture or gguf_architecture(file.architecture, file.path)
    raw = architecture.config_dict(file.metadata, file.tensors.keys(), str(file.path))
    types = {t.ggml_type for t in file.tensors.values()}
    raw["dtype"] = "float32"
    if types <= {0, 1, 30}:  # F32, F16, BF16 only: the half type is the model's (norms are F32 beside it)
        raw["dtype"] = "bfloat16" if 30 in types else "float16" if 1 in types else "float32"
    return raw


# --- reading tensors --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def dequantizable(ggml_type: int) -> bool:
    """Whether the installed ``gguf`` package dequantizes ``ggml_type`` (tried on one zero block)."""
    if ggml_type in (0, 1, 30):
        return True
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        return False
    try:
        dequantize(np.zeros((1, GGML_TYPES[ggml_type][2]), dtype=np.uint8), GGMLQuantizationType(ggml_type))
    except Exception:
        return False
    return True


class GGUFSource:
    """A GGUF file as a :class:`~lmport.weights.WeightSource`: checkpoint names, tensors dequantized on demand.

    Raises (on open):
        CorruptWeightsError: a damaged or truncated file.
        UnknownModelTypeError: no installed plugin reads its architecture.
        UnsupportedTensorError: a tensor type the installed ``gguf`` cannot dequantize.
        UnsupportedFeatureError: quantized tensors and no ``gguf`` package.
        DuplicateTensorError: two GGUF tensors that map to one checkpoint name.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.files = [self.path]
        self.file = GGUFFile(self.path)
        try:
            self.architecture = gguf_architecture(self.file.architecture, self.path)
            self._gguf: dict[str, GGUFTensorInfo] = {}
            self._infos: list[TensorInfo] = []
            self._check_types()
            self._plan()
        except BaseException:
            self.file.close()
            raise

    def _check_types(self) -> None:
        quantized = sorted({t.ggml_type for t in self.file.tensors.values() if t.quantized})
        if quantized and not dequantizable(quantized[0]):
            try:
                import gguf  # noqa: F401
            except ImportError:
                raise UnsupportedFeatureError(
                    f"{self.path}: holds {GGML_TYPES[quantized[0]][0]} tensors; dequantizing them needs the gguf "
                    "package: pip install 'lmport[gguf]'"
                ) from None
        for t in self.file.tensors.values():
            if t.ggml_type in NOT_WEIGHTS:
                raise UnsupportedTensorError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.type_name}, which holds no floating weights"
                )
            if not dequantizable(t.ggml_type):
                raise UnsupportedTensorError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.type_name}, which the installed gguf package "
                    "cannot dequantize (and lmport cannot load otherwise)"
                )

    def _plan(self) -> None:
        arch = self.architecture
        dropped = []
        for t in self.file.tensors.values():
            if arch.ignored(t.name):
                dropped.append(t.name)
                continue
            name = arch.checkpoint_name(t.name)
            if name in self._gguf:
                raise DuplicateTensorError(
                    f"{self.path}: tensors {self._gguf[name].name!r} and {t.name!r} are both checkpoint tensor {name!r}"
                )
            self._gguf[name] = t
            shape = t.shape
            if arch.transposed(t.name) and len(shape) >= 2:
                shape = (*shape[:-2], shape[-1], shape[-2])
            dtype = torch.float32 if t.quantized else _PLAIN_DTYPES[t.ggml_type]
            try:  # a permuted tensor without its head count fails here, not mid-load
                arch.heads(t.name, self.file.metadata)
            except ConfigError as exc:
                raise ConfigError(f"{self.path}: {exc}") from exc
            self._infos.append(TensorInfo(name, self.path, shape, dtype))
        if dropped:
            warnings.warn(
                f"{self.path}: {', '.join(dropped)} not loaded: {arch.model_type} checkpoints have no such tensor",
                UserWarning,
                stacklevel=2,
            )

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_as(info, None)

    def read_as(self, info: TensorInfo, dtype: torch.dtype | None, *, transient: bool = False) -> torch.Tensor:
        """``info``'s tensor: dequantized, cast to ``dtype`` (``None``: float32 for quantized tensors), in the
        checkpoint's layout. Always memory of its own (never a view of the file mapping)."""
        stored = self._gguf[info.name]
        tensor = self.file.read(stored, dtype)
        return self.architecture.to_checkpoint(stored.name, tensor, self.file.metadata)

    def close(self) -> None:
        self.file.close()


# --- the format ---------------------------------------------------------------------------


class GGUFFormat(WeightFormat):
    """GGUF: ``gguf_file=`` names the file; without it, a folder whose only weights are one ``.gguf`` file."""

    name = "gguf"
    extension = "gguf"
    preference = 10  # below safetensors and .bin: a folder holding those too is read from them
    writable = False

    def requested(self, options: LoadOptions) -> bool:
        return getattr(options, "gguf_file", None) is not None

    def file_names(self, options: LoadOptions) -> FileNames | None:
        gguf_file = getattr(options, "gguf_file", None)
        if gguf_file is not None:
            return FileNames(self, str(gguf_file), None)
        if options.use_safetensors is True:
            return None
        return FileNames(self, None, None)  # whichever single .gguf file the folder holds (see find)

    def find(self, folder: Path, names: FileNames) -> WeightFiles | None:
        if names.single is None:
            return _only_gguf(folder)
        name = names.single
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise UnsafePathError(
                f"gguf_file={name!r}: must name a file inside the checkpoint folder {folder} (a relative name); pass "
                "the folder holding the file as the first argument"
            )
        path = folder / name
        if checked_file(folder, path) is None:
            present = sorted(p.name for p in folder.glob("*" + EXTENSION))
            raise WeightsNotFoundError(
                f"{folder}: gguf_file {name!r} is not there (GGUF files in the folder: {', '.join(present) or 'none'})"
            )
        return WeightFiles([path])

    def open(self, found: WeightFiles, options: LoadOptions) -> GGUFSource:
        return GGUFSource(found.files[0])

    def read_config(self, found: WeightFiles) -> dict[str, Any]:
        with GGUFFile(found.files[0]) as file:
            return config_dict(file)


def _only_gguf(folder: Path) -> WeightFiles | None:
    try:
        present = sorted(p for p in folder.iterdir() if p.name.endswith(EXTENSION))
    except OSError:
        return None
    present = [p for p in present if checked_file(folder, p) is not None]
    if len(present) > 1:
        raise ArgumentError(
            f"{folder}: holds several GGUF files ({', '.join(p.name for p in present)}); choose one with "
            "from_pretrained(..., gguf_file=NAME)"
        )
    return WeightFiles(present) if present else None


FORMAT = GGUFFormat()


@hookimpl
def lmport_weight_formats() -> list[WeightFormat]:
    return [FORMAT]


__all__ = ["FORMAT", "GGUFFormat", "GGUFSource", "config_dict", "gguf_architecture"]
