"""Weight format plugin: safetensors files, single or sharded, read lazily through ``safe_open``."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmport.errors import CorruptWeightsError, UnsupportedTensorError, WeightsChangedError
from lmport.formats import WeightFiles, WeightFormat
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions
from lmport.weights import TensorInfo, box_runs

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E8M0": torch.float8_e8m0fnu,
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


def _data_offsets(fd: int, path: Path) -> dict[str, tuple[int, int]]:
    """Absolute file offsets (start, end) of every tensor's bytes (the header is validated by ``safe_open`` first,
    so a failure here means the file changed since)."""
    try:
        header_len = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
        header = json.loads(os.pread(fd, header_len, 8))
        base = 8 + header_len
        return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
                if k != "__metadata__"}  # fmt: skip
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        raise WeightsChangedError(f"{path}: its header changed while it was being loaded ({exc})") from exc


class SafetensorsSource:
    """A safetensors checkpoint; headers are read on open, tensors on demand.

    A tensor that keeps its dtype is memory-mapped (zero-copy, as transformers does).
    One that will be cast is read in small chunks through a per-thread staging buffer
    and converted into its final tensor, so neither the original bytes nor a full-size
    temporary ever stay resident: a load's memory is the loaded model's size.
    """

    def __init__(self, files: list[Path], index: Path | None, weight_map: dict[str, Path] | None = None) -> None:
        self.files = files
        self.index = index
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        #: One descriptor per file, opened with its mapping: every read comes from the file that was listed,
        #: even if it is deleted or replaced on disk meanwhile.
        self._fds: dict[Path, int] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        #: Private mappings that ``read_slice(mapped=True)`` views live in (closed with the last view).
        self._mappings: dict[Path, mmap.mmap] = {}
        try:
            for path in files:
                self._open(path)
            if index is not None:
                self._check_index(index, weight_map)
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise WeightsChangedError(f"{path}: vanished after the checkpoint's files were listed") from exc
        except OSError as exc:
            raise CorruptWeightsError(f"{path}: cannot be opened: {exc}") from exc
        self._fds[path] = fd
        try:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            now = os.stat(path)
        except (SafetensorError, OSError) as exc:
            raise CorruptWeightsError(f"{path}: not a readable safetensors file: {exc}") from exc
        opened = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise WeightsChangedError(f"{path}: was replaced while it was being opened; load again")

    def _check_index(self, index: Path, weight_map: dict[str, Path] | None) -> None:
        if weight_map is None:
            from lmport.shards import read_index

            weight_map = read_index(index)
        for name, shard in weight_map.items():
            if name not in self._handles[shard].keys():
                raise CorruptWeightsError(f"{index}: lists {name!r} in {shard.name}, which does not hold it")

    def infos(self) -> Iterator[TensorInfo]:
        for path, handle in self._handles.items():
            for name in handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys():
                sl = handle.get_slice(name)
                label = sl.get_dtype()
                if label not in _DTYPES:
                    raise UnsupportedTensorError(
                        f"{path}: tensor {name!r} has dtype {label}, which lmport cannot load; convert the "
                        "checkpoint to float32, float16 or bfloat16"
                    )
                yield TensorInfo(name, path, tuple(sl.get_shape()), _DTYPES[label])

    def _span(self, info: TensorInfo) -> tuple[int, int, int]:
        """(descriptor, start, end) of ``info``'s bytes in its file."""
        with self._lock:
            if info.file not in self._offsets:
                self._offsets[info.file] = _data_offsets(self._fds[info.file], info.file)
        span = self._offsets[info.file].get(info.name)
        if span is None:
            raise WeightsChangedError(f"{info.file}: tensor {info.name!r} is gone; the file changed during the load")
        return self._fds[info.file], *span

    def _check_size(self, info: TensorInfo, fd: int, end: int) -> None:
        size = os.fstat(fd).st_size
        if size < end:
            raise WeightsChangedError(
                f"{info.file}: was truncated during the load ({size} bytes; tensor {info.name!r} ends at byte {end})"
            )

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
            fd, _, end = self._span(info)
            self._check_size(info, fd, end)  # a mapped page past the end of a truncated file would kill the process
            return self._handles[info.file].get_tensor(info.name)
        except (SafetensorError, OSError) as exc:
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc

    def _read_cast(self, info: TensorInfo, dtype: torch.dtype, *, transient: bool = False) -> torch.Tensor:
        fd, start, end = self._span(info)
        self._check_size(info, fd, end)
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
                    raise WeightsChangedError(f"{info.file}: tensor {info.name!r} ends past the end of the file")
                done += n
            return out
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = torch.empty(_CHUNK, dtype=torch.uint8)
        done = 0
        while done < nbytes:
            n = min(_CHUNK, nbytes - done)
            if os.preadv(fd, [staging[:n].numpy()], start + done) != n:
                raise WeightsChangedError(f"{info.file}: tensor {info.name!r} ends past the end of the file")
            flat[done // itemsize : (done + n) // itemsize].copy_(staging[:n].view(info.dtype))
            done += n
        return out

    def read_slice(
        self,
        info: TensorInfo,
        index: tuple[slice, ...],
        dtype: torch.dtype | None,
        *,
        out: torch.Tensor | None = None,
        mapped: bool = False,
    ) -> torch.Tensor:
        """Read only the bytes of the box ``index`` of ``info`` (``pread`` per contiguous run), cast to ``dtype``
        on the way (see :class:`~lmport.weights.SlicingWeightSource`). ``mapped``: a box that is one run and
        needs no cast is returned as a view of a private (copy-on-write) mapping of the file instead."""
        target = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        shape = tuple((info.shape[d] if s.stop is None else s.stop) - (s.start or 0) for d, s in enumerate(index))
        if mapped and out is None and target == info.dtype:
            view = self._mapped_box(info, index, shape)
            if view is not None:
                return view
        if out is None:
            out = torch.empty(shape, dtype=target)
        elif tuple(out.shape) != shape or out.dtype != target or not out.is_contiguous():
            raise ValueError(f"read_slice: out must be a contiguous {target} tensor of shape {shape}")
        if out.numel() == 0:
            return out
        try:
            fd, start, end = self._span(info)
            self._check_size(info, fd, end)
            starts, run = box_runs(info.shape, index)
            itemsize = info.dtype.itemsize
            flat = out.view(-1)
            if target == info.dtype:  # straight into the result
                buffer = flat.view(torch.uint8).numpy()
                for i, first in enumerate(starts):
                    self._pread(fd, buffer[i * run * itemsize : (i + 1) * run * itemsize], start + first * itemsize, info)
                return out
            staging = getattr(self._local, "staging", None)
            if staging is None:
                staging = self._local.staging = torch.empty(_CHUNK, dtype=torch.uint8)
            per_chunk = max(1, _CHUNK // itemsize)
            done = 0  # elements of the box landed in ``out``
            filled = 0  # elements waiting in the staging buffer
            for first in starts:
                for offset in range(0, run, per_chunk):
                    n = min(per_chunk, run - offset)
                    if filled + n > per_chunk:
                        flat[done : done + filled].copy_(staging[: filled * itemsize].view(info.dtype))
                        done, filled = done + filled, 0
                    view = staging[filled * itemsize : (filled + n) * itemsize].numpy()
                    self._pread(fd, view, start + (first + offset) * itemsize, info)
                    filled += n
            flat[done : done + filled].copy_(staging[: filled * itemsize].view(info.dtype))
            return out
        except (SafetensorError, OSError) as exc:
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc

    def _mapped_box(self, info: TensorInfo, index: tuple[slice, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """``index`` of ``info`` as a view of the file's private mapping, if its bytes are one run."""
        starts, run = box_runs(info.shape, index)
        if len(starts) != 1 or run == 0:
            return None
        fd, start, end = self._span(info)
        self._check_size(info, fd, end)  # a mapped page past the end of a truncated file would kill the process
        with self._lock:
            mapping = self._mappings.get(info.file)
            if mapping is None:  # writable but private: in-place updates (an optimizer step) copy the page
                mapping = self._mappings[info.file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        offset = start + starts[0] * info.dtype.itemsize
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=run * info.dtype.itemsize, offset=offset)
        return raw.view(info.dtype).view(shape)

    @staticmethod
    def _pread(fd: int, buffer: Any, offset: int, info: TensorInfo) -> None:
        done, size = 0, len(buffer)
        while done < size:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise WeightsChangedError(f"{info.file}: tensor {info.name!r} ends past the end of the file")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._mappings.clear()  # each mapping lives on while a tensor views it
        self._stack.close()


class SafetensorsFormat(WeightFormat):
    """``model.safetensors`` or ``model.safetensors.index.json`` and its shards; preferred, and the default writer."""

    name = "safetensors"
    extension = "safetensors"
    single = "model.safetensors"
    index = "model.safetensors.index.json"
    safetensors = True
    preference = 200
    writable = True

    def open(self, found: WeightFiles, options: LoadOptions) -> SafetensorsSource:
        return SafetensorsSource(found.files, found.index, found.weight_map)

    def write(
        self,
        tensors: dict[str, torch.Tensor],
        path: Path,
        *,
        save_function: Callable[[Any, str], Any] | None = None,
    ) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})


@hookimpl
def lmport_weight_formats() -> list[WeightFormat]:
    return [SafetensorsFormat()]
