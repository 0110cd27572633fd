"""Shard on read: each rank reads from the checkpoint only the elements of the shards it owns.

For every module tensor, the rank's local piece is a box of the full tensor (a ``DTensor``'s local shard,
or all of a plain tensor). The weight map's rules (renames, transposes, splits of fused tensors) are views,
so the box maps back to a box of the checkpoint tensor: the map is run once on a ``meta`` tensor of the
checkpoint's shape, and each part's strides and storage offset say which checkpoint dim (and offset)
each module dim comes from. That box is read with :meth:`~lmport.weights.SlicingWeightSource.read_slice`
(only its bytes), cast on the way, and copied into the local shard. A source that cannot slice (``.bin``
pickles) is read whole, once per tensor, and sliced; so is a weight map rule that is not a view.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedFeatureError
from ..placement import SingleDevice
from ..load_plan import LoadReport, PlannedTensor, plan_load
from ..weights import SlicingWeightSource, TensorInfo, WeightMap, WeightSource, check_unique


@dataclass(frozen=True)
class BoxMap:
    """Where a module tensor sits in the checkpoint tensor it comes from.

    Attributes:
        start: the checkpoint coordinates of the module tensor's element 0.
        dims: for each module dim, the checkpoint dim it runs along (``None`` for a dim of size 1).
        ndim: the checkpoint tensor's number of dims.
    """

    start: tuple[int, ...]
    dims: tuple[int | None, ...]
    ndim: int

    def checkpoint_box(self, box: tuple[slice, ...]) -> tuple[slice, ...]:
        """The checkpoint box holding the module box ``box``."""
        out = [slice(s, s + 1) for s in self.start]
        for k, j in enumerate(self.dims):
            if j is not None:
                out[j] = slice(self.start[j] + box[k].start, self.start[j] + box[k].stop)
        return tuple(out)

    def to_module(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A checkpoint box read as :meth:`checkpoint_box` gave it, in the module tensor's dim order."""
        mapped = [j for j in self.dims if j is not None]
        order = mapped + [j for j in range(self.ndim) if j not in mapped]
        return data.permute(order).reshape(shape)

    @property
    def identity(self) -> bool:
        """Whether the module box is laid out as the checkpoint box (read straight into the destination)."""
        mapped = [j for j in self.dims if j is not None]
        return mapped == sorted(mapped)


def box_maps(weight_map: WeightMap, info: TensorInfo) -> dict[str, BoxMap | None]:
    """Module name → its :class:`BoxMap` in ``info``'s tensor, or ``None`` where the rule is not a box view."""
    base = torch.empty(info.shape, dtype=info.dtype, device="meta")
    strides = base.stride()
    out: dict[str, BoxMap | None] = {}
    for name, part in weight_map.to_module(info.name, base):
        out[name] = _box_map(part, info.shape, strides)
    return out


def _box_map(part: torch.Tensor, shape: tuple[int, ...], strides: tuple[int, ...]) -> BoxMap | None:
    offset = part.storage_offset()
    start = tuple((offset // s) % n if n else 0 for s, n in zip(strides, shape))
    dims: list[int | None] = []
    for size, stride in zip(part.shape, part.stride()):
        if size == 1:
            dims.append(None)
            continue
        found = [j for j in range(len(shape)) if shape[j] > 1 and strides[j] == stride and j not in dims]
        if len(found) != 1 or start[found[0]] + size > shape[found[0]]:
            return None
        dims.append(found[0])
    return BoxMap(start, tuple(dims), len(shape))


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's local tensor of ``tensor`` (a ``DTensor``'s shard, or the tensor) and its box in the full one."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return tensor, tuple(slice(0, n) for n in tensor.shape)


@dataclass
class ShardReadReport:
    """What a sharded read found (the load report) and this rank's bytes read from files, as stored."""

    report: LoadReport
    bytes_read: int = 0


def load_shards(
    model: nn.Module,
    source: WeightSource,
    weight_map: WeightMap,
    infos: list[TensorInfo],
    *,
    dtype: torch.dtype,
    tied: Collection[str] = (),
    ignore_mismatched_sizes: bool = False,
) -> ShardReadReport:
    """Fill every parameter and persistent buffer of ``model`` (materialised, possibly as ``DTensor`` shards)
    with this rank's part of the checkpoint; floating tensors are cast to ``dtype``.

    What each checkpoint tensor supplies is planned by :func:`lmport.load_plan.plan_load` (the checks and
    the report of a single-process load); reading runs on a few threads, each writing into its own shards.

    Raises:
        ShapeMismatchError: a checkpoint tensor's shape differs from its module tensor's (full) shape.
        MissingWeightsError: module tensors that no checkpoint tensor provides.
        UnsupportedFeatureError: ``ignore_mismatched_sizes`` would re-initialise a tensor.
    """
    check_unique(infos, getattr(source, "index", None))
    state = model.state_dict(keep_vars=True)
    device = next((t.device for t in state.values()), torch.device("cpu"))
    plan = plan_load(
        infos,
        weight_map,
        {name: (t.shape, t.dtype) for name, t in state.items()},
        tied=tied,
        placement=SingleDevice(device),
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        model_name=type(model).__name__,
        files=source.files,
    )
    if plan.fresh:
        raise UnsupportedFeatureError(
            f"ignore_mismatched_sizes cannot re-initialise {plan.fresh[0].module_name!r} in a distributed load; load "
            "it with matching sizes, or resize it after loading"
        )
    slicing = isinstance(source, SlicingWeightSource)

    @torch.no_grad()  # grad mode is per thread
    def fill(entry: PlannedTensor) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        maps = box_maps(weight_map, entry.info) if slicing else {}
        whole: torch.Tensor | None = None
        nbytes = 0
        adopted = []
        for target in entry.targets:
            tensor = state[target.module_name]
            local, box = local_box(tensor)
            if local.numel() == 0:
                continue
            cast = dtype if local.is_floating_point() and dtype != entry.info.dtype else None
            boxmap = maps.get(target.module_name)
            if boxmap is not None:
                index = boxmap.checkpoint_box(box)
                nbytes += _numel(index) * entry.info.dtype.itemsize
                if cast is None and boxmap.identity and local.device.type == "cpu" and _is_dtensor(tensor):
                    # The shard becomes the parameter's storage: a view of the mapped file where the source can
                    # (zero-copy, pages read when first touched), else a fresh tensor; nothing is copied twice.
                    data = source.read_slice(entry.info, index, None, mapped=True)
                    adopted.append((target.module_name, data.view(local.shape)))
                else:
                    _read_box(source, entry.info, boxmap, index, local, cast)
                continue
            if whole is None:  # read whole once, then sliced for each target
                whole = source.read(entry.info)
                nbytes += whole.numel() * whole.element_size()
            part = dict(weight_map.to_module(entry.info.name, whole))[target.module_name]
            local.copy_(part[box])
        return nbytes, adopted

    workers = max(1, min(4, os.cpu_count() or 1))
    total, adopted = 0, {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmport-shard") as pool:
        for nbytes, pairs in pool.map(fill, plan.tensors):
            total += nbytes
            adopted.update(pairs)
    if adopted:
        adopt(model, state, adopted)
    return ShardReadReport(plan.report, total)


def adopt(model: nn.Module, state: dict[str, Any], locals_: dict[str, torch.Tensor]) -> None:
    """Make each tensor of ``locals_`` the local shard of the ``DTensor`` parameter of that name.

    Through ``load_state_dict(assign=True)``, which FSDP2 supports for exactly this (its post-load hook
    re-registers the new local tensor as the sharded parameter's storage, padding it where uneven).
    """
    from torch.distributed.tensor import DTensor

    new = {}
    for name, local in locals_.items():
        old = state[name]
        new[name] = DTensor.from_local(
            local, old.device_mesh, old.placements, run_check=False, shape=old.shape, stride=old.stride()
        )
    result = model.load_state_dict(new, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _numel(index: tuple[slice, ...]) -> int:
    n = 1
    for s in index:
        n *= s.stop - s.start
    return n


def _read_box(
    source: Any, info: TensorInfo, boxmap: BoxMap, index: tuple[slice, ...], local: torch.Tensor, cast: Any
) -> None:
    """Read the checkpoint box ``index`` into ``local`` (cast to ``cast`` unless ``None``)."""
    if boxmap.identity and local.is_contiguous() and local.device.type == "cpu" and (cast or info.dtype) == local.dtype:
        source.read_slice(info, index, cast, out=local.view(tuple(s.stop - s.start for s in index)))
    else:
        data = source.read_slice(info, index, cast)
        local.copy_(boxmap.to_module(data, tuple(local.shape)))
