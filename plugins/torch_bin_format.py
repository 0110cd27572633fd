"""Weight format plugin: ``pytorch_model.bin`` files, read with ``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import pickle
import zipfile
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


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` state dict safely: tensors only, memory-mapped where the format allows."""
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"{path}: refused to unpickle non-tensor objects (lmport only loads .bin files with "
            f"torch.load(weights_only=True)); convert the checkpoint to safetensors. Detail: {str(exc)[:300]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CorruptWeightsError(f"{path}: not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise UnsafePickleError(f"{path}: holds {type(data).__name__}, not a mapping of names to tensors")
    return data


class TorchBinSource:
    """A ``.bin`` checkpoint; one shard's state dict is held (memory-mapped) at a time."""

    def __init__(self, files: list[Path], index: Path | None) -> None:
        self.files = files
        self.index = index
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._expected = read_index(index) if index is not None else None

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
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
