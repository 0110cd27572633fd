"""Weight format plugin: ``pytorch_model.bin`` files, read with ``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import io
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmport.errors import CorruptWeightsError, UnsafePickleError, UnsupportedTensorError, WeightsChangedError
from lmport.formats import WeightFiles, WeightFormat
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions
from lmport.weights import TensorInfo


#: Substrings of ``torch.load(weights_only=True)`` refusals of objects that are not plain tensors,
#: as opposed to a file that is simply damaged.
_REFUSAL_MARKERS = (
    "Unsupported global", "unsupported GLOBAL", "unrecognized function", "Can only create new object",
    "must be imported",
)  # fmt: skip


def _format_of(path: Path) -> str:
    """``"zip"`` (torch.save's default), ``"legacy"`` (a bare pickle) or ``""`` (neither)."""
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode, what legacy torch.save writes first
        return "legacy"
    return ""


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` state dict safely: tensors only, memory-mapped where the format allows."""
    try:
        kind = _format_of(path)
    except FileNotFoundError as exc:
        raise WeightsChangedError(f"{path}: vanished after the checkpoint's files were listed") from exc
    except OSError as exc:
        raise CorruptWeightsError(f"{path}: cannot be read: {exc}") from exc
    if not kind:
        raise CorruptWeightsError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:
        # torch wraps the unpickler's own reason in advice about weights_only=False; keep only the reason.
        detail = " ".join(str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        if not any(marker in detail for marker in _REFUSAL_MARKERS):
            raise CorruptWeightsError(f"{path}: not a readable PyTorch checkpoint: {detail[:300]}") from exc
        raise UnsafePickleError(
            f"{path}: refused to unpickle non-tensor objects (lmport only loads .bin files with "
            f"torch.load(weights_only=True)); convert the checkpoint to safetensors. Detail: {detail[:300]}"
        ) from exc
    except MemoryError:
        raise
    except FileNotFoundError as exc:
        raise WeightsChangedError(f"{path}: vanished after the checkpoint's files were listed") from exc
    except Exception as exc:  # a damaged file fails in many ways (EOFError, KeyError, IndexError, ...)
        raise CorruptWeightsError(
            f"{path}: not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if kind == "zip":
        _check_storage_records(path)
    if not isinstance(data, dict):
        raise UnsafePickleError(f"{path}: holds {type(data).__name__}, not a mapping of names to tensors")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UnsafePickleError(
                f"{path}: entry {key!r} holds {type(value).__name__}, not a tensor; a .bin checkpoint must be a "
                "mapping of names to tensors"
            )
        _check_plain(path, key, value)
    return data


class _Stub:
    """Stands for every object a pickle names or builds: nothing is imported, constructed or called."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __call__(self, *args: object, **kwargs: object) -> _Stub:
        return _Stub()

    def __getattr__(self, name: str) -> _Stub:
        return _Stub()

    def __setitem__(self, key: object, value: object) -> None:
        pass


class _StorageIds(pickle.Unpickler):
    """Walks a torch.save ``data.pkl`` for its storage ids (``('storage', type, key, location, numel)``) only."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.ids: list[object] = []

    def find_class(self, module: str, name: str) -> _Stub:
        return _Stub(module, name)

    def persistent_load(self, pid: object) -> _Stub:
        self.ids.append(pid)
        return _Stub()


def _check_storage_records(path: Path) -> None:
    """Refuse a zip ``.bin`` whose pickle needs more bytes of a storage than its archive record holds.

    ``torch.load(mmap=True)`` reads a storage's bytes from its record's offset without
    checking the record's length, so a short record silently yields the bytes of whatever
    follows it in the file (a wrong model, no error).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if len(pickles) != 1:
                return
            prefix = pickles[0].filename.removesuffix("data.pkl")
            sizes = {i.filename: i.file_size for i in archive.infolist()}
            walker = _StorageIds(archive.read(pickles[0]))
        walker.load()
    except Exception:  # noqa: BLE001 - torch.load read it; a walk this strict cannot judge it
        return
    for pid in walker.ids:
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[1], _Stub) and isinstance(pid[4], int)):
            continue
        module, name = (pid[1].names + ("", ""))[:2]
        storage = getattr(torch, name, None) if module == "torch" else None
        dtype = getattr(storage, "dtype", torch.uint8) if name != "UntypedStorage" else torch.uint8
        needed = pid[4] * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1)
        record = f"{prefix}data/{pid[2]}"
        if record in sizes and sizes[record] < needed:
            raise CorruptWeightsError(
                f"{path}: storage record {record!r} holds {sizes[record]} bytes, but the tensors stored in it need "
                f"{needed}; the file is damaged (re-save or re-download it)"
            )


def _check_plain(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor lmport cannot load as it is: torch-quantized, sparse or other non-strided layouts."""
    if tensor.is_quantized:
        kind = f"torch-quantized ({str(tensor.dtype).removeprefix('torch.')})"
    elif tensor.is_nested:  # its layout reads as strided, but it has no single shape
        kind = "a nested tensor"
    elif tensor.layout != torch.strided:
        kind = f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    elif tensor.device.type != "cpu":
        kind = f"a tensor on the {tensor.device.type} device"
    else:
        return
    raise UnsupportedTensorError(
        f"{path}: tensor {key!r} is {kind}; lmport loads only dense, unquantized tensors. Save the state dict "
        "again from dense floating tensors (or as safetensors)"
    )


def _identity(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1, -1)  # deleted: a mapping of it stays valid
    except OSError as exc:
        raise CorruptWeightsError(f"{path}: cannot be examined: {exc}") from exc
    return (st.st_dev, st.st_ino, st.st_size)


class TorchBinSource:
    """A ``.bin`` checkpoint; one shard's state dict is held (memory-mapped) at a time."""

    def __init__(self, files: list[Path], index: Path | None, weight_map: dict[str, Path] | None = None) -> None:
        self.files = files
        self.index = index
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._stat: tuple[int, int, int] | None = None  # (device, inode, size) of the current shard when loaded
        self._lock = threading.Lock()
        if index is not None and weight_map is None:
            from lmport.shards import read_index

            weight_map = read_index(index)
        self._expected = weight_map
        self._listed: dict[Path, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._current is None or self._current[0] != path:
                self._current = None  # drop the previous shard's mapping first
                self._stat = _identity(path)
                state = load_bin(path)
                listed = self._listed.get(path)
                if listed is not None and listed != {k: (tuple(t.shape), t.dtype) for k, t in state.items()}:
                    raise WeightsChangedError(f"{path}: its tensors changed during the load; load again")
                self._listed[path] = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
                self._current = (path, state)
            current = _identity(path)
            if self._stat is not None and current[:2] == self._stat[:2] and current[2] < self._stat[2]:
                # its mapped pages past the new end would kill the process when touched
                raise WeightsChangedError(f"{path}: was truncated during the load")
            return self._current[1]

    def infos(self) -> Iterator[TensorInfo]:
        for path in self.files:
            state = self._state(path)
            if self._expected is not None:
                for name, shard in self._expected.items():
                    if shard == path and name not in state:
                        raise CorruptWeightsError(f"{self.index}: lists {name!r} in {path.name}, which does not hold it")
            for name, tensor in state.items():
                yield TensorInfo(name, path, tuple(tensor.shape), tensor.dtype)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self._state(info.file)[info.name]

    def close(self) -> None:
        self._current = None


class TorchBinFormat(WeightFormat):
    """``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` and its shards; written with
    ``save_pretrained(safe_serialization=False)``."""

    name = "pytorch-bin"
    extension = "bin"
    single = "pytorch_model.bin"
    index = "pytorch_model.bin.index.json"
    preference = 100
    writable = True

    def open(self, found: WeightFiles, options: LoadOptions) -> TorchBinSource:
        return TorchBinSource(found.files, found.index, found.weight_map)

    def write(
        self,
        tensors: dict[str, torch.Tensor],
        path: Path,
        *,
        save_function: Callable[[Any, str], Any] | None = None,
    ) -> None:
        (save_function or torch.save)(tensors, str(path))


@hookimpl
def lmport_weight_formats() -> list[WeightFormat]:
    return [TorchBinFormat()]
