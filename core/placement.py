"""Where each tensor lands while loading: one device, or a device map (a ``lmport_placement`` plugin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ArgumentError, UnsupportedFeatureError

#: ``device_map`` strings that ask a placement plugin to plan across devices.
PLANNED = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class PlacementOptions:
    """The placement arguments of ``from_pretrained``."""

    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None
    offload_buffers: bool = False
    quantized: bool = False


@runtime_checkable
class Placement(Protocol):
    """A plan saying where every tensor goes, applied while loading."""

    #: Where inputs go and where non-offloaded computation runs.
    main_device: torch.device
    #: The module-name → device map (``None`` for a single device), set on the model as ``hf_device_map``.
    device_map: dict[str, Any] | None

    def device_for(self, name: str) -> torch.device | str:
        """The device for tensor (or module) ``name``, or ``"disk"`` to offload it."""
        ...

    def offload(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` to the offload folder (only for names placed on ``"disk"``)."""
        ...

    def finalize(self, model: nn.Module) -> None:
        """Attach whatever moves weights at run time (accelerate's hooks); no-op for one device."""
        ...


class SingleDevice:
    """Everything on one device."""

    device_map = None

    def __init__(self, device: torch.device) -> None:
        self.main_device = device

    def device_for(self, name: str) -> torch.device:
        return self.main_device

    def offload(self, name: str, tensor: torch.Tensor) -> None:  # pragma: no cover - never placed on disk
        raise AssertionError("single-device placement offloads nothing")

    def finalize(self, model: nn.Module) -> None:
        return None


def is_single_device(device_map: Any) -> bool:
    """Whether ``device_map`` names one device (None, "cpu", "cuda:0", 0, torch.device, {"": dev})."""
    if isinstance(device_map, dict):
        return set(device_map) == {""} and device_map[""] != "disk"
    return not (isinstance(device_map, str) and device_map in PLANNED)


def resolve_device(device_map: Any) -> torch.device:
    """The single device of ``device_map`` (None, "cpu", "cuda:0", an int, a torch.device or {"": dev}).

    Raises:
        ArgumentError: not a device, or the meta device.
        UnsupportedFeatureError: CUDA asked for where none is available.
    """
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device_map {device_map!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedFeatureError(f"device_map={device_map!r} asks for CUDA, but no CUDA device is available")
    if device.type == "meta":
        raise ArgumentError("device_map='meta' would load no weights; build with torch.device('meta') instead")
    return device
