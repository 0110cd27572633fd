"""Weight format plugin: safetensors files, single or sharded, read lazily through ``safe_open``."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
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


_CHUNK = 8 << 20  # bytes staged per read when casting


def _transient_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in an anonymous mapping of its own, unmapped as soon as it is dropped.

    For tensors the loader consumes at once (quantized, offloaded): from malloc, these
    short-lived buffers of many sizes would interleave with the long-lived results in
    glibc's heaps, which then keep the freed memory (hundreds of MB over a 1B-parameter
    4-bit load) instead of returning it.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # pragma: no cover - not POSIX
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute file offset of every tensor's bytes (the header is validated by ``safe_open`` first)."""
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    return {k: base + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


class SafetensorsSource:
    """A safetensors checkpoint; headers are read on open, tensors on demand.

    A tensor that keeps its dtype is memory-mapped (zero-copy, as transformers does).
    One that will be cast is read in small chunks through a per-thread staging buffer
    and converted into its final tensor, so neither the original bytes nor a full-size
    temporary ever stay resident: a load's memory is the loaded model's size.
    """

    def __init__(self, files: list[Path], index: Path | None) -> None:
        self.files = files
        self.index = index
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        self._offsets: dict[Path, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        for path in files:
            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
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
            for name in handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys():
                try:
                    sl = handle.get_slice(name)
                    dtype = _DTYPES[sl.get_dtype()]
                    shape = tuple(sl.get_shape())
                except KeyError as exc:
                    raise CorruptWeightsError(f"{path}: tensor {name!r} has unsupported dtype {exc}") from exc
                yield TensorInfo(name, path, shape, dtype)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_as(info, None)

    def read_as(self, info: TensorInfo, dtype: torch.dtype | None, *, transient: bool = False) -> torch.Tensor:
        """Read ``info``: cast to ``dtype`` (staged) if it is floating and differs, else memory-mapped.

        A ``transient`` tensor (quantized or offloaded, then dropped) is read with ``pread``
        into a buffer of its own even without a cast, so none of the file's pages are mapped
        into the process for it.
        """
        try:
            target = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            if target != info.dtype or transient:
                return self._read_cast(info, target, transient=transient)
            return self._handles[info.file].get_tensor(info.name)
        except (SafetensorError, OSError) as exc:
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc

    def _read_cast(self, info: TensorInfo, dtype: torch.dtype, *, transient: bool = False) -> torch.Tensor:
        with self._lock:
            if info.file not in self._fds:
                self._offsets[info.file] = _data_offsets(info.file)
                self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        fd, start = self._fds[info.file], self._offsets[info.file][info.name]
        out = _transient_tensor(info.shape, dtype) if transient else torch.empty(info.shape, dtype=dtype)
        flat = out.view(-1)
        itemsize = info.dtype.itemsize
        nbytes = flat.numel() * itemsize
        if dtype == info.dtype:  # no cast: read straight into the tensor
            target = flat.view(torch.uint8).numpy()
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [target[done:]], start + done)
                if n <= 0:
                    raise CorruptWeightsError(f"{info.file}: tensor {info.name!r} ends past the end of the file")
                done += n
            return out
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = torch.empty(_CHUNK, dtype=torch.uint8)
        done = 0
        while done < nbytes:
            n = min(_CHUNK, nbytes - done)
            if os.preadv(fd, [staging[:n].numpy()], start + done) != n:
                raise CorruptWeightsError(f"{info.file}: tensor {info.name!r} ends past the end of the file")
            flat[done // itemsize : (done + n) // itemsize].copy_(staging[:n].view(info.dtype))
            done += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._stack.close()


@hookimpl
def lmport_open_weights(folder: Path, options: LoadOptions) -> SafetensorsSource | None:
    if options.use_safetensors is False:
        return None
    files, index = find_weight_files(folder, SINGLE, INDEX, options.variant)
    if not files:
        return None
    return SafetensorsSource(files, index)
