"""Tensor streaming: executes a :class:`~lmport.load_plan.LoadPlan`, built before anything is read.

:class:`Streamer` reads, maps and casts tensors on a few threads and lands them, in plan order, on
the calling thread, with a bounded look-ahead so the working set stays small. :func:`load_weights`
plans (:func:`~lmport.load_plan.plan_load`) and streams one checkpoint into a model.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .errors import CorruptWeightsError, WeightsChangedError
from .load_plan import (
    Destination,
    Fresh,
    LoadPlan,
    LoadReport,
    Offloaded,
    OnDevice,
    PlannedTensor,
    Quantized,
    ReadMode,
    StoredWeight,
    Target,
    destination_for,
    plan_load,
)
from .placement import Placement
from .quantization import Quantizer, StoredQuantizer
from .weights import CastingWeightSource, TensorInfo, WeightMap, WeightSource, check_unique

__all__ = [
    "Destination", "Fresh", "LoadPlan", "LoadReport", "Offloaded", "OnDevice", "PlannedTensor", "Quantized",
    "ReadMode", "StoredWeight", "Streamer", "Target", "destination_for", "load_weights", "plan_load", "set_tensor",
]  # fmt: skip

logger = logging.getLogger("lmport")


# --- executing it --------------------------------------------------------------------------------


class Streamer:
    """Executes a :class:`LoadPlan`: reads, maps and casts on a few threads; lands on the calling one."""

    def __init__(
        self,
        model: Any,
        source: WeightSource,
        weight_map: WeightMap,
        *,
        dtype: torch.dtype,
        placement: Placement,
        quantizer: Quantizer | None,
    ) -> None:
        self.model = model
        self.source = source
        self.read_as = source.read_as if isinstance(source, CastingWeightSource) else None
        self.weight_map = weight_map
        self.dtype = dtype
        self.placement = placement
        self.quantizer = quantizer

    def run(self, plan: LoadPlan) -> None:
        """Land every planned tensor, then initialise the fresh ones."""
        # Page faults and copies release the GIL; at most `ahead` tensors are in flight.
        workers = max(1, min(4, os.cpu_count() or 1))
        ahead = 2 * workers
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmport-load") as pool:
            pending: deque[tuple[Callable[[Any], None], Future[Any]]] = deque()
            jobs: list[tuple[Callable[[Any], Any], Callable[[Any], None], Any]] = [
                *((self.materialise, self.land_tensors, entry) for entry in plan.tensors),
                *((self.read_stored, self.land_stored, group) for group in plan.stored),
            ]
            for work, land, item in jobs:
                pending.append((land, pool.submit(work, item)))
                if len(pending) >= ahead:
                    land_next, future = pending.popleft()
                    land_next(future.result())
            while pending:
                land_next, future = pending.popleft()
                land_next(future.result())
        for fresh in plan.fresh:
            self.initialise(fresh)

    def read(self, info: TensorInfo, mode: ReadMode) -> torch.Tensor:
        """Read one tensor (cast to the load's dtype where the source can), as ``mode`` says."""
        try:
            if self.read_as is None:
                return self.source.read(info)
            if mode is ReadMode.TRANSIENT:
                return self.read_as(info, self.dtype, transient=True)
            return self.read_as(info, self.dtype)
        except OSError as exc:  # a source that lets the file system's error through (file gone, I/O error)
            if not os.path.exists(info.file):
                raise WeightsChangedError(f"{info.file}: vanished during the load (reading {info.name!r})") from exc
            raise CorruptWeightsError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from exc

    def materialise(self, entry: PlannedTensor) -> list[tuple[str, Destination, torch.Tensor]]:
        """(reading thread) The module tensors of ``entry``, mapped, cast and on their staging device."""
        tensor = self.read(entry.info, entry.read)
        out = []
        for module_name, part in self.weight_map.to_module(entry.info.name, tensor):
            for target in entry.targets:
                if target.module_name == module_name:
                    break
            else:
                continue
            destination = target.destination
            part = part.to(device=destination.staging, dtype=self.dtype if part.is_floating_point() else part.dtype)
            if not part.is_contiguous() or part.untyped_storage().nbytes() != part.numel() * part.element_size():
                part = part.clone(memory_format=torch.contiguous_format)  # own storage, not a slice of a fused one
            out.append((module_name, destination, part))
        return out

    def land_tensors(self, parts: list[tuple[str, Destination, torch.Tensor]]) -> None:
        """(calling thread) Put each module tensor where its destination says."""
        for module_name, destination, part in parts:
            match destination:
                case OnDevice():
                    set_tensor(self.model, module_name, part)
                case Offloaded():
                    self.placement.offload(module_name, part)
                case Quantized(device=device):
                    assert self.quantizer is not None
                    self.quantizer.materialize(self.model, module_name, part, device)

    def read_stored(self, group: StoredWeight) -> tuple[StoredWeight, dict[str, torch.Tensor]]:
        """(reading thread) Every part of a stored quantized weight, as stored."""
        if self.read_as is None:
            return group, {key: self.source.read(info) for key, info in group.parts.items()}
        return group, {key: self.read_as(info, None) for key, info in group.parts.items()}

    def land_stored(self, result: tuple[StoredWeight, dict[str, torch.Tensor]]) -> None:
        group, parts = result
        assert isinstance(self.quantizer, StoredQuantizer)
        self.quantizer.materialize_stored(self.model, group.module_names, parts, group.device, group.where)

    def initialise(self, fresh: Fresh) -> None:
        """A module tensor initialised by the model's own rules, in place of a mismatched checkpoint tensor."""
        generator = torch.Generator(device=fresh.device)
        tensor = torch.empty(fresh.shape, dtype=self.dtype, device=fresh.device)
        owner_name, _, attr = fresh.module_name.rpartition(".")
        self.model.init_parameter(self.model.get_submodule(owner_name), attr, tensor, generator)
        set_tensor(self.model, fresh.module_name, tensor)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Assign ``tensor`` as parameter (keeping ``requires_grad``) or buffer ``name`` of ``model``."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[attr] = tensor


def load_weights(
    model: Any,
    source: WeightSource,
    weight_map: WeightMap,
    *,
    dtype: torch.dtype,
    placement: Placement,
    quantizer: Quantizer | None = None,
    ignore_mismatched_sizes: bool = False,
    infos: list[TensorInfo] | None = None,
) -> LoadReport:
    """Stream every checkpoint tensor into ``model`` (built on the meta device): plan, then execute.

    Each tensor is read once, mapped, cast to ``dtype`` (floating tensors only), and lands
    where ``placement`` says (a device, or the offload folder), quantized on the way when
    ``quantizer`` claims it; nothing is initialised first. ``infos`` is ``source.infos()``
    when the caller has listed them already.
    """
    infos = list(source.infos()) if infos is None else infos
    check_unique(infos, getattr(source, "index", None))  # `index`: an optional attribute of sharded sources
    plan = plan_load(
        infos,
        weight_map,
        {name: (t.shape, t.dtype) for name, t in model.state_dict(keep_vars=True).items()},
        tied=model.tied_parameter_names(),
        placement=placement,
        quantizer=quantizer,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        model_name=type(model).__name__,
        files=source.files,
    )
    Streamer(model, source, weight_map, dtype=dtype, placement=placement, quantizer=quantizer).run(plan)
    report = plan.report
    if report.unexpected_keys:
        logger.warning(
            "%d checkpoint tensor(s) not used by %s: %s",
            len(report.unexpected_keys),
            type(model).__name__,
            ", ".join(report.unexpected_keys[:8]),
        )
    return report
