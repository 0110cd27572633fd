"""Weight format plugin: safetensors files, single or sharded, read lazily through ``safe_open``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmport.errors import CorruptWeightsError
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions
from lmport.shards import find_weight_files, read_index
from lmport.weights import TensorInfo

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _open(path: Path, backend: str) -> Any:
    try:
        return safe_open(str(path), framework="pt", backend=backend)
    except TypeError:  # safetensors < 0.8 has no backend choice
        return safe_open(str(path), framework="pt")


class SafetensorsSource:
    """A safetensors checkpoint; headers are read on open, tensors on demand.

    A tensor that keeps its dtype is memory-mapped (zero-copy, as transformers does);
    one that will be cast is read with ``pread`` into its own memory, so the pages of
    the original never stay resident and a load's memory stays at the model's size.
    """

    def __init__(self, files: list[Path], index: Path | None) -> None:
        self.files = files
        self.index = index
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}  # pread
        self._mapped: dict[Path, Any] = {}  # mmap, opened when first needed
        self._lock = threading.Lock()
        for path in files:
            try:
                self._handles[path] = self._stack.enter_context(_open(path, "pread"))
            except (SafetensorError, OSError) as exc:
                self._stack.close()
                raise CorruptWeightsError(f"{path}: not a readable safetensors file: {exc}") from exc
        if index is not None:
            self._check_index(index)

    def _check_index(self, index: Path) -> None:
        for name, shard in read_index(index).items():
            if name not in self._handles[shard].keys():
                raise CorruptWeightsError(f"{index}: lists {name!r} in {shard.name}, which does not hold it")

    def infos(self) -> Iterator[TensorInfo]:
        for path, handle in self._handles.items():
            for name in handle.keys():
                try:
                    sl = handle.get_slice(name)
                    dtype = _DTYPES[sl.get_dtype()]
                    shape = tuple(sl.get_shape())
                except KeyError as exc:
                    raise CorruptWeightsError(f"{path}: tensor {name!r} has unsupported dtype {exc}") from exc
                yield TensorInfo(name, path, shape, dtype)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_as(info, None)

    def read_as(self, info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
        """Read ``info``, cast to ``dtype`` through ``pread`` if it differs, else memory-mapped."""
        try:
            if dtype is not None and dtype != info.dtype and info.dtype.is_floating_point:
                return self._handles[info.file].get_tensor(info.name).to(dtype)
            with self._lock:
                if info.file not in self._mapped:
                    self._mapped[info.file] = self._stack.enter_context(_open(info.file, "mmap"))
            return self._mapped[info.file].get_tensor(info.name)
        except (SafetensorError, OSError) as exc:
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc

    def close(self) -> None:
        self._stack.close()


@hookimpl
def lmport_open_weights(folder: Path, options: LoadOptions) -> SafetensorsSource | None:
    if options.use_safetensors is False:
        return None
    files, index = find_weight_files(folder, SINGLE, INDEX, options.variant)
    if not files:
        return None
    return SafetensorsSource(files, index)
