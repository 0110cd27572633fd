"""Reading GGUF files (llama.cpp's format): metadata, the tensor table, and one tensor at a time.

The header is parsed here, with every count, length and offset checked against the file's
size before it is used, so a corrupt or hostile file fails fast with
:class:`~lmport.errors.CorruptWeightsError` naming the file and what is wrong, never with a
numpy error, a huge allocation or an endless loop. Tensor bytes stay in a read-only memory
map until :meth:`GGUFFile.read` dequantizes one of them (with the ``gguf`` package's
``gguf.quants.dequantize``, the optional extra ``lmport[gguf]``) into the dtype asked for.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CorruptWeightsError, UnsupportedFeatureError, UnsupportedTensorError, WeightsChangedError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (2023) counted in 32 bits; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 30
MAX_NESTING = 4  # arrays of arrays of ...
_CHUNK = 4 << 20  # bytes of a tensor read and dequantized at a time

#: Scalar metadata value types: struct format and size.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

#: ggml types stored as plain values: torch dtype (F64 and the integer types hold no model weights).
_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
#: ggml type id -> (name, elements per block, bytes per block), as in llama.cpp's ggml.h (and gguf.GGML_QUANT_SIZES).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
#: Types that hold no floating weights lmport can compute with.
NOT_WEIGHTS = {24, 25, 26, 27, 28}


class StringArray(Sequence[str]):
    """A metadata array of strings, decoded on first use (vocabularies hold ~10^5 of them)."""

    def __init__(self, file: GGUFFile, start: int, count: int) -> None:
        self._file, self._start, self._count = file, start, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        return self.decoded()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoded())

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings)"

    def decoded(self) -> list[str]:
        if self._items is None:
            pos, out = self._start, []
            for _ in range(self._count):
                value, pos = self._file._string(pos, "an array element")
                out.append(value)
            self._items = out
        return self._items


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table: ``shape`` in torch order (ggml lists dimensions fastest first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in _PLAIN


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> :class:`GGUFTensorInfo`).

    Raises:
        CorruptWeightsError: not a GGUF file, an unsupported version, or a header that does not fit the file.
        UnsupportedTensorError: a tensor of a ggml type lmport does not know.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CorruptWeightsError(f"{self.path}: cannot be opened: {exc}") from exc
        try:
            self.size = os.fstat(self._fd).st_size
            if self.size < 24:
                raise self._corrupt(f"is {self.size} bytes, shorter than a GGUF header")
            self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._map)
            self._local = threading.local()
            self.metadata: dict[str, Any] = {}
            self.tensors: dict[str, GGUFTensorInfo] = {}
            self._parse()
        except BaseException:
            self.close()
            raise

    # --- header ---------------------------------------------------------------------------

    def _corrupt(self, what: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{self.path}: {what}; the GGUF file is damaged or truncated")

    def _need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.size:
            raise self._corrupt(f"{what} at byte {pos} runs past the end of the file ({self.size} bytes)")

    def _unpack(self, fmt: str, pos: int, what: str) -> tuple[Any, int]:
        n = struct.calcsize(fmt)
        self._need(pos, n, what)
        return struct.unpack_from(fmt, self._buf, pos)[0], pos + n

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        length, pos = self._unpack("<Q", pos, what)
        if length > MAX_STRING:
            raise self._corrupt(f"{what} at byte {pos - 8} claims a {length}-byte string")
        self._need(pos, length, what)
        try:
            return str(self._buf[pos : pos + length], "utf-8"), pos + length
        except UnicodeDecodeError as exc:
            raise self._corrupt(f"{what} at byte {pos} is not UTF-8 ({exc.reason})") from None

    def _value(self, kind: int, pos: int, key: str, depth: int = 0) -> tuple[Any, int]:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind], pos, f"metadata {key!r}")
        if kind == _STRING:
            return self._string(pos, f"metadata {key!r}")
        if kind != _ARRAY or depth >= MAX_NESTING:
            raise self._corrupt(f"metadata {key!r} has value type {kind}, which GGUF does not define here")
        item, pos = self._unpack("<I", pos, f"metadata {key!r}")
        count, pos = self._unpack("<Q", pos, f"metadata {key!r}")
        if item in _SCALARS:
            width = struct.calcsize(_SCALARS[item])
            self._need(pos, count * width, f"metadata array {key!r} ({count} items)")
            values = np.frombuffer(self._buf, dtype=_NUMPY[item], count=count, offset=pos)
            return values.tolist(), pos + count * width
        if item == _STRING:
            self._need(pos, count * 8, f"metadata array {key!r} ({count} strings)")
            start = pos
            for _ in range(count):  # walk the lengths to find the end; decode lazily
                length, pos = self._unpack("<Q", pos, f"metadata array {key!r}")
                self._need(pos, length, f"metadata array {key!r}")
                pos += length
            return StringArray(self, start, count), pos
        if item == _ARRAY:
            self._need(pos, count * 12, f"metadata array {key!r} ({count} arrays)")
            out = []
            for _ in range(count):
                value, pos = self._value(_ARRAY, pos, key, depth + 1)
                out.append(value)
            return out, pos
        raise self._corrupt(f"metadata array {key!r} has item type {item}, which GGUF does not define")

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise CorruptWeightsError(f"{self.path}: does not start with the GGUF magic bytes; it is not a GGUF file")
        version = struct.unpack_from("<I", self._buf, 4)[0]
        if version & 0xFFFF == 0 and version:
            raise UnsupportedFeatureError(f"{self.path}: is a big-endian GGUF file; lmport reads little-endian ones")
        if version not in VERSIONS:
            raise CorruptWeightsError(f"{self.path}: is GGUF version {version}; lmport reads versions 2 and 3")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", self._buf, 8)
        pos = 24
        # Each key-value pair takes at least 8 + 4 + 1 bytes and each tensor entry 8 + 4 + 4 + 8.
        if n_kv * 13 > self.size - pos or n_tensors * 24 > self.size - pos:
            raise self._corrupt(f"claims {n_tensors} tensors and {n_kv} metadata entries, more than fit in it")
        for _ in range(n_kv):
            key, pos = self._string(pos, "a metadata key")
            kind, pos = self._unpack("<I", pos, f"metadata {key!r}")
            if key in self.metadata:
                raise self._corrupt(f"metadata key {key!r} appears twice")
            self.metadata[key], pos = self._value(kind, pos, key)
        entries = []
        for _ in range(n_tensors):
            name, pos = self._string(pos, "a tensor name")
            n_dims, pos = self._unpack("<I", pos, f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            self._need(pos, 8 * n_dims + 12, f"tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, pos)
            kind, offset = struct.unpack_from("<IQ", self._buf, pos + 8 * n_dims)
            pos += 8 * n_dims + 12
            entries.append((name, tuple(reversed(dims)), kind, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._corrupt(f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-pos // alignment) * alignment
        for name, shape, kind, offset in entries:
            self.tensors[name] = self._tensor_info(name, shape, kind, offset, data_start, alignment)

    def _tensor_info(
        self, name: str, shape: tuple[int, ...], kind: int, offset: int, data_start: int, alignment: int
    ) -> GGUFTensorInfo:
        if name in self.tensors:
            raise self._corrupt(f"tensor {name!r} appears twice in the tensor table")
        if kind not in GGML_TYPES:
            raise UnsupportedTensorError(
                f"{self.path}: tensor {name!r} has ggml type {kind}, which lmport does not know (known: "
                f"{', '.join(v[0] for v in GGML_TYPES.values())}); a newer gguf package or lmport may read it"
            )
        type_name, block, block_bytes = GGML_TYPES[kind]
        if any(d == 0 for d in shape) or math.prod(shape) > self.size * 8:
            raise self._corrupt(f"tensor {name!r} has shape {list(shape)}, which its bytes cannot hold")
        if shape[-1] % block:
            raise self._corrupt(f"tensor {name!r} ({type_name}) has rows of {shape[-1]}, not a multiple of {block}")
        nbytes = math.prod(shape) // block * block_bytes
        if offset % alignment:
            raise self._corrupt(f"tensor {name!r} starts at data offset {offset}, not aligned to {alignment}")
        start = data_start + offset
        if start + nbytes > self.size:
            raise self._corrupt(
                f"tensor {name!r} ({type_name}, shape {list(shape)}) needs bytes {start}..{start + nbytes} but the "
                f"file has {self.size}"
            )
        return GGUFTensorInfo(name, shape, kind, start, nbytes)

    # --- tensors --------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        value = self.metadata.get("general.architecture")
        if not isinstance(value, str) or not value:
            raise self._corrupt("has no 'general.architecture' string in its metadata")
        return value

    def read(self, info: GGUFTensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized (quantized types: float32 values) and cast to ``dtype``, in memory of its own.

        The bytes are read (``pread``, not through the mapping) and dequantized a few rows at a time
        straight into the result, so the working set beyond the result is a few megabytes.

        Raises:
            UnsupportedTensorError: a type that holds no float weights, or one ``gguf`` cannot dequantize.
            UnsupportedFeatureError: the ``gguf`` package is not installed and the tensor is quantized.
            WeightsChangedError: the file was truncated since it was opened.
        """
        if info.ggml_type in NOT_WEIGHTS:
            raise UnsupportedTensorError(
                f"{self.path}: tensor {info.name!r} is stored as {info.type_name}, which holds no floating weights"
            )
        stored = _PLAIN.get(info.ggml_type)
        out = torch.empty(info.shape, dtype=dtype or stored or torch.float32)
        cols = info.shape[-1]
        rows = out.numel() // cols
        out_rows = out.view(rows, cols)
        row_bytes = info.nbytes // rows
        per = max(1, _CHUNK // max(row_bytes, cols * 4))
        staging = getattr(self._local, "staging", None)
        if staging is None or len(staging) < min(per, rows) * row_bytes:
            staging = self._local.staging = np.empty(max(_CHUNK, min(per, rows) * row_bytes), dtype=np.uint8)
        for first in range(0, rows, per):
            n = min(per, rows - first)
            raw = staging[: n * row_bytes]
            self._pread(raw, info.offset + first * row_bytes, info)
            if stored is not None:
                chunk = torch.from_numpy(raw).view(stored).view(n, cols)
            else:
                chunk = torch.from_numpy(dequantize(raw.reshape(n, row_bytes), info, self.path))
            out_rows[first : first + n].copy_(chunk)
        return out

    def _pread(self, target: np.ndarray, offset: int, info: GGUFTensorInfo) -> None:
        done = 0
        while done < len(target):
            n = os.preadv(self._fd, [target[done:]], offset + done)
            if n <= 0:
                raise WeightsChangedError(f"{self.path}: was truncated while tensor {info.name!r} was being read")
            done += n

    def close(self) -> None:
        for attr in ("_buf", "_map"):
            held = getattr(self, attr, None)
            if held is not None:
                try:
                    held.release() if attr == "_buf" else held.close()
                except BufferError:  # a numpy view still alive: the mapping goes with it
                    pass
                setattr(self, attr, None)
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dequantize(raw: np.ndarray, info: GGUFTensorInfo, path: Path) -> np.ndarray:
    """``raw`` (rows of a tensor's blocks) as float32 values, through ``gguf.quants.dequantize``."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize
    except ImportError as exc:
        raise UnsupportedFeatureError(
            f"{path}: tensor {info.name!r} is stored as {info.type_name}; dequantizing it needs the gguf package: "
            "pip install 'lmport[gguf]'"
        ) from exc
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
        out = gguf_dequantize(raw, qtype)
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise UnsupportedTensorError(
            f"{path}: tensor {info.name!r} is stored as {info.type_name}, which the installed gguf package cannot "
            f"dequantize ({exc})"
        ) from exc
    return np.ascontiguousarray(out, dtype=np.float32)


__all__ = ["GGML_TYPES", "NOT_WEIGHTS", "GGUFFile", "GGUFTensorInfo", "StringArray", "dequantize"]
