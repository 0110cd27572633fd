"""The load plan: for every checkpoint tensor, the module tensors it supplies and where each lands.

:func:`plan_load` is a pure function of the checkpoint's tensor list, the weight map and the
model's expected state; it reads no tensor. It returns, for each tensor, its targets (module
name and :data:`Destination`) and how to read it, the stored quantized weights grouped, the
tensors to initialise afresh, and the report (missing, unexpected, mismatched).
:mod:`lmport.streaming` executes it.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ShapeMismatchError,
    UnsupportedFeatureError,
    UnsupportedQuantizationError,
)
from .placement import Placement
from .quantization import Quantizer, StoredQuantizer
from .weights import TensorInfo, WeightMap, check_loadable

_CPU = torch.device("cpu")


# --- destinations: where one module tensor lands ----------------------------------------------


@dataclass(frozen=True, slots=True)
class OnDevice:
    """Assigned as the module's parameter or buffer, on ``device``."""

    device: torch.device

    @property
    def staging(self) -> torch.device:
        """Where the reading thread puts the mapped, cast tensor."""
        return self.device

    @property
    def consumes(self) -> bool:
        """Whether only a copy of the read tensor is kept (so it need not stay mapped)."""
        return self.device.type != "cpu"


@dataclass(frozen=True, slots=True)
class Offloaded:
    """Written to the offload folder by the placement (``device_map`` naming ``"disk"``)."""

    staging: ClassVar[torch.device] = _CPU
    consumes: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Quantized:
    """Quantized onto ``device`` by the quantizer, which claims the module tensor."""

    device: torch.device
    staging: ClassVar[torch.device] = _CPU
    consumes: ClassVar[bool] = True


#: Where a module tensor lands. A new kind is one more class here, with ``staging`` and ``consumes``, and
#: one more case in :meth:`Streamer.land_tensors`. (A distributed load executes the same plan with its own
#: reader, :mod:`lmport.distributed.shard_read`, which reads each target's local shard instead.)
Destination = OnDevice | Offloaded | Quantized


class ReadMode(enum.Enum):
    """How a casting source reads a tensor (see :class:`~lmport.weights.CastingWeightSource`)."""

    #: Possibly a zero-copy view of the mapped file: the model keeps the tensor itself.
    MAPPED = "mapped"
    #: Into memory of its own, released once dropped: only copies are kept (split, moved, quantized...).
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class Target:
    """One module tensor a checkpoint tensor supplies, and where it lands."""

    module_name: str
    destination: Destination


@dataclass(slots=True)
class PlannedTensor:
    """One checkpoint tensor to read, and the module tensors it supplies (those it wins, in map order)."""

    info: TensorInfo
    targets: tuple[Target, ...]
    read: ReadMode


@dataclass
class StoredWeight:
    """The checkpoint tensors of one weight stored quantized: its data and statistics, by key."""

    name: str  # the weight's checkpoint name
    module_names: list[str]  # one, or several fused in the checkpoint
    parts: dict[str, TensorInfo] = field(default_factory=dict)
    device: torch.device = _CPU  # set once every part is known

    @property
    def where(self) -> str:
        """The file and weight, for messages."""
        return f"{self.parts.get('weight', next(iter(self.parts.values()))).file}: {self.name!r}"


@dataclass(frozen=True, slots=True)
class Fresh:
    """A module tensor initialised afresh (its checkpoint shape differs, ``ignore_mismatched_sizes``)."""

    module_name: str
    shape: tuple[int, ...]
    device: torch.device


@dataclass
class LoadReport:
    """What a load found: returned as a dict with ``output_loading_info=True``."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    error_msgs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "missing_keys": self.missing_keys,
            "unexpected_keys": self.unexpected_keys,
            "mismatched_keys": self.mismatched_keys,
            "error_msgs": self.error_msgs,
        }


@dataclass
class LoadPlan:
    """Every tensor of a load and where it goes, decided before anything is read."""

    tensors: list[PlannedTensor]
    stored: list[StoredWeight]
    fresh: list[Fresh]
    report: LoadReport


# --- the plan ------------------------------------------------------------------------------------


def destination_for(name: str, placement: Placement, quantizer: Quantizer | None) -> Destination:
    """Where module tensor ``name`` lands: offloaded, quantized or on a device."""
    device = placement.device_for(name)
    if isinstance(device, str) and device == "disk":
        return Offloaded()
    device = torch.device(device)
    if quantizer is not None and quantizer.claims(name):
        return Quantized(device)
    return OnDevice(device)


def plan_load(
    infos: Sequence[TensorInfo],
    weight_map: WeightMap,
    expected: Mapping[str, tuple[Sequence[int], torch.dtype]],
    *,
    tied: Collection[str],
    placement: Placement,
    quantizer: Quantizer | None = None,
    ignore_mismatched_sizes: bool = False,
    model_name: str = "the model",
    files: Sequence[Path] = (),
) -> LoadPlan:
    """Decide, for every checkpoint tensor, which module tensors it supplies and where each lands.

    Args:
        infos: the checkpoint's tensors, in reading order.
        weight_map: the architecture's rules between checkpoint and module tensors.
        expected: the model's state: module tensor name → (shape, dtype).
        tied: module tensor names tied to another (never loaded).
        placement: the device (or disk) of each module tensor.
        quantizer: claims the module tensors it quantizes; a pre-quantized one groups stored parts.
        ignore_mismatched_sizes: plan a fresh tensor where the checkpoint's shape differs, instead of failing.
        model_name, files: for messages.

    Raises:
        ShapeMismatchError: a tensor's shape differs from its module tensor's (unless ignored).
        MissingWeightsError: module tensors that no checkpoint tensor supplies.
        UnsupportedTensorError: a tensor whose dtype cannot serve its module tensor.
        UnsupportedFeatureError: a stored quantized weight, or a fresh one, placed on disk or quantized.
    """
    report = LoadReport()
    stored_quantizer = quantizer if isinstance(quantizer, StoredQuantizer) and quantizer.pre_quantized else None
    wanted: dict[str, TensorInfo] = {}  # module name -> the tensor it comes from (the last one wins)
    supplies: list[tuple[TensorInfo, list[str]]] = []
    skip: dict[str, tuple[int, ...]] = {}
    stored: dict[str, StoredWeight] = {}  # checkpoint weight name -> its stored quantized parts
    for info in infos:
        if stored_quantizer is not None and _group_stored(stored_quantizer, weight_map, info, tied, stored):
            continue
        names = []
        for module_name, shape in weight_map.plan(info.name, info.shape):
            if module_name in tied:
                continue
            if module_name not in expected:
                report.unexpected_keys.append(info.name)
                continue
            model_shape = tuple(expected[module_name][0])
            if tuple(shape) != model_shape:
                if not ignore_mismatched_sizes:
                    raise ShapeMismatchError(
                        f"{info.file}: tensor {info.name!r} has shape {tuple(info.shape)}, but {module_name!r} in "
                        f"{model_name} needs {model_shape}. Fix config.json or pass "
                        "ignore_mismatched_sizes=True to initialise it afresh."
                    )
                report.mismatched_keys.append((module_name, tuple(shape), model_shape))
                skip[module_name] = model_shape
                continue
            if quantizer is None or not quantizer.claims(module_name):
                check_loadable(info, module_name, expected[module_name][1])
            wanted[module_name] = info
            names.append(module_name)
        if names:
            supplies.append((info, names))

    grouped = {n for group in stored.values() for n in group.module_names}
    missing = [n for n in expected if n not in wanted and n not in tied and n not in skip and n not in grouped]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise MissingWeightsError(
            f"{', '.join(str(f) for f in files)}: {len(missing)} weight(s) of {model_name} are not in the "
            f"checkpoint: {shown}"
        )

    tensors = []
    for info, names in supplies:
        targets = tuple(Target(n, destination_for(n, placement, quantizer)) for n in names if wanted[n] is info)
        if not targets:
            continue
        consumed = all(t.destination.consumes for t in targets)
        read = ReadMode.TRANSIENT if consumed or weight_map.rewrites_layout(info.name) else ReadMode.MAPPED
        tensors.append(PlannedTensor(info, targets, read))
    for group in stored.values():
        destination = destination_for(group.module_names[0], placement, quantizer)
        if isinstance(destination, Offloaded):
            raise UnsupportedFeatureError(f"{group.where}: quantized modules cannot be offloaded to disk")
        group.device = destination.device
    fresh = []
    for module_name, shape in skip.items():
        destination = destination_for(module_name, placement, quantizer)
        if not isinstance(destination, OnDevice):
            raise UnsupportedFeatureError(
                f"ignore_mismatched_sizes cannot re-initialise {module_name!r}: it is offloaded or quantized"
            )
        fresh.append(Fresh(module_name, shape, destination.device))
    report.missing_keys.extend(sorted(skip))
    return LoadPlan(tensors, list(stored.values()), fresh, report)


def _group_stored(
    quantizer: StoredQuantizer, weight_map: WeightMap, info: TensorInfo, tied: Collection[str],
    stored: dict[str, StoredWeight],
) -> bool:  # fmt: skip
    """File ``info`` under the stored quantized weight it belongs to; False when it belongs to none."""
    found = quantizer.stored_part(info.name)
    if found is None:
        return False
    name, key = found
    module_names = [n for n, _ in weight_map.plan(name, (0, 0)) if n not in tied]  # names only: shapes are packed
    claimed = [n for n in module_names if quantizer.claims(n)]
    if not claimed:
        return False
    if claimed != module_names:
        raise UnsupportedQuantizationError(
            f"{info.file}: {name!r} holds {module_names} together, but only {claimed} are quantized layers; "
            "check llm_int8_skip_modules in config.json's quantization_config"
        )
    group = stored.setdefault(name, StoredWeight(name, module_names))
    if key in group.parts:
        raise CorruptWeightsError(
            f"{info.file}: tensor {info.name!r} is stored twice (also in {group.parts[key].file})"
        )
    group.parts[key] = info
    return True
