"""Weight format plugin: ``pytorch_model.bin`` files, read with ``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from lmport.errors import CorruptWeightsError, UnsafePickleError
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions
from lmport.shards import find_weight_files, read_index
from lmport.weights import TensorInfo

SINGLE = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"


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
    except Exception as exc:  # a damaged file fails in many ways (EOFError, KeyError, IndexError, ...)
        raise CorruptWeightsError(
            f"{path}: not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise UnsafePickleError(f"{path}: holds {type(data).__name__}, not a mapping of names to tensors")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UnsafePickleError(
                f"{path}: entry {key!r} holds {type(value).__name__}, not a tensor; a .bin checkpoint must be a "
                "mapping of names to tensors"
            )
    return data


class TorchBinSource:
    """A ``.bin`` checkpoint; one shard's state dict is held (memory-mapped) at a time."""

    def __init__(self, files: list[Path], index: Path | None) -> None:
        self.files = files
        self.index = index
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self._expected = read_index(index) if index is not None else None

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._current is None or self._current[0] != path:
                self._current = (path, load_bin(path))
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


@hookimpl
def lmport_open_weights(folder: Path, options: LoadOptions) -> TorchBinSource | None:
    if options.use_safetensors is True:
        return None
    files, index = find_weight_files(folder, SINGLE, INDEX, options.variant)
    if not files:
        return None
    return TorchBinSource(files, index)
