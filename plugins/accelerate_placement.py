"""Builtin placement plugin: device maps across GPUs, CPU and disk, planned and dispatched by accelerate.

accelerate is imported only when a multi-device ``device_map`` is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmport.errors import ArgumentError, OffloadError, UnsupportedFeatureError
from lmport.hookspecs import hookimpl
from lmport.placement import PLANNED, PlacementOptions


def _device(value: Any) -> torch.device | str:
    if value == "disk":
        return "disk"
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device_map value {value!r} is not a device or 'disk': {exc}") from exc


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lmport-write-test-"):
            pass
    except OSError as exc:
        raise OffloadError(f"offload_folder {str(folder)!r} cannot be written: {exc}") from exc


class AcceleratePlacement:
    """A device map planned by accelerate (or given), with disk offload through its offload index."""

    def __init__(self, device_map: Any, model: nn.Module, dtype: torch.dtype, options: PlacementOptions) -> None:
        if importlib.util.find_spec("accelerate") is None:
            raise UnsupportedFeatureError(
                f"device_map={device_map!r} needs accelerate: pip install 'lmport[accelerate]'"
            )
        self.accelerate: Any = importlib.import_module("accelerate")
        utils: Any = importlib.import_module("accelerate.utils")
        self.utils = utils
        no_split = list(getattr(model, "no_split_modules", ()))
        if isinstance(device_map, str):
            max_memory = options.max_memory
            if device_map != "sequential" and torch.cuda.device_count() > 1:
                max_memory = utils.get_balanced_memory(
                    model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                    low_zero=device_map == "balanced_low_0",
                )  # fmt: skip
            plan = utils.infer_auto_device_map(
                model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                offload_buffers=options.offload_buffers,
            )  # fmt: skip
        else:
            plan = dict(device_map)
        self.device_map: dict[str, Any] = plan
        self._devices = {k: _device(v) for k, v in plan.items()}
        # Parameters and persistent buffers: non-persistent ones (rotary tables) are never loaded; they
        # are computed on their module's device, or the main device where the map does not name it.
        names = list(model.state_dict(keep_vars=True))
        uncovered = [n for n in names if self._lookup(n) is None]
        if uncovered:
            raise ArgumentError(f"device_map does not place {len(uncovered)} tensor(s), e.g. {uncovered[:4]}")
        used = set(self._devices.values())
        compute = [d for d in used if isinstance(d, torch.device) and d.type != "cpu"]
        self.main_device = compute[0] if compute else torch.device("cpu")
        if options.quantized and ("disk" in used or (compute and torch.device("cpu") in used)):
            raise UnsupportedFeatureError(
                f"quantized modules cannot be offloaded, but the device map places some on "
                f"{'disk' if 'disk' in used else 'cpu'}: {plan}. Give the devices more max_memory or load unquantized."
            )
        self.offload_folder: Path | None = None
        self.index: dict[str, Any] = {}
        # Tied parameters (GPT-2's head shares the embedding): the loader fills only the source.
        # accelerate's hooks fetch an offloaded module's weights by that module's own names, so a
        # tied target needs its own offload entry, or its own copy when only the source is offloaded.
        tied_names = model.tied_parameter_names() if hasattr(model, "tied_parameter_names") else set()
        self._tied: dict[str, list[str]] = {}  # source -> tied targets
        for target, source in getattr(model, "tied_weights", {}).items():
            if target in tied_names:
                self._tied.setdefault(source, []).append(target)
        self._tied_copies: dict[str, torch.Tensor] = {}  # in-memory targets of disk-offloaded sources
        if "disk" in used:
            if options.offload_folder is None:
                raise OffloadError(
                    f"the device map offloads some weights to disk ({plan}); pass offload_folder= to say where"
                )
            self.offload_folder = Path(options.offload_folder)
            _check_writable(self.offload_folder)

    def _lookup(self, name: str) -> torch.device | str | None:
        best, best_len = None, -1
        for key, device in self._devices.items():
            if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best_len:
                best, best_len = device, len(key)
        return best

    def device_for(self, name: str) -> torch.device | str:
        device = self._lookup(name)
        return self.main_device if device is None else device

    def offload(self, name: str, tensor: torch.Tensor) -> None:
        assert self.offload_folder is not None
        self.utils.offload_weight(tensor, name, str(self.offload_folder), index=self.index)
        for target in self._tied.get(name, ()):
            device = self.device_for(target)
            if device == "disk":
                self.utils.offload_weight(tensor, target, str(self.offload_folder), index=self.index)
            else:
                self._tied_copies[target] = tensor.to(device, copy=True)

    def finalize(self, model: nn.Module) -> None:
        for source, targets in self._tied.items():
            for target in targets:
                if target in self._tied_copies:  # tie_weights() gave it the offloaded source's meta placeholder
                    owner_name, _, attr = target.rpartition(".")
                    old = model.get_parameter(target)
                    setattr(model.get_submodule(owner_name), attr,
                            nn.Parameter(self._tied_copies.pop(target), requires_grad=old.requires_grad))  # fmt: skip
                elif self.device_for(target) == "disk" and target not in self.index:  # source kept in memory
                    assert self.offload_folder is not None
                    weight = model.get_parameter(source).detach()
                    self.utils.offload_weight(weight, target, str(self.offload_folder), index=self.index)
        if self.offload_folder is not None:
            self.utils.save_offload_index(self.index, str(self.offload_folder))
        model.hf_device_map = self.device_map
        if len(set(self._devices.values())) > 1 or self.offload_folder is not None:
            self.accelerate.dispatch_model(
                model,
                device_map=self.device_map,
                # accelerate compares main_device with the string "cpu": given torch.device("cpu") it
                # would treat every cpu-placed module as offloaded (weights on meta, copied in per call).
                main_device="cpu" if self.main_device.type == "cpu" else self.main_device,
                offload_dir=os.fspath(self.offload_folder) if self.offload_folder else None,
                offload_index=self.index or None,
                offload_buffers=False,
            )


@hookimpl(trylast=True)
def lmport_placement(
    device_map: Any, model: nn.Module, dtype: torch.dtype, options: PlacementOptions
) -> AcceleratePlacement | None:
    if isinstance(device_map, dict) or (isinstance(device_map, str) and device_map in PLANNED):
        return AcceleratePlacement(device_map, model, dtype, options)
    return None
