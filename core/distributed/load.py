"""The distributed stage of a load: the request's settings → mesh → plans applied on meta → shards read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, UnsupportedFeatureError
from ..weights import TensorInfo, WeightMap, WeightSource
from .config import DistributedConfig
from .mesh import Mesh, build_mesh
from .plan import apply_fsdp, apply_tensor_parallel, resolve_plans
from .shard_read import ShardReadReport, load_shards


@dataclass(frozen=True)
class DistributedRequest:
    """What ``from_pretrained``'s distributed arguments ask for, before any process group exists."""

    config: DistributedConfig
    device_mesh: Any = None

    @property
    def trivial(self) -> bool:
        """Every size given as 1 and no mesh: a plain load, no process group needed."""
        c = self.config
        return self.device_mesh is None and c.tp_plan is None and (c.tp_size, c.fsdp_size, c.dp_replicate_size) in {
            (1, 1, 1), (None, 1, 1), (1, 1, None), (None, 1, None)
        }  # fmt: skip


def distributed_request(
    distributed_config: Any = None, tp_plan: Any = None, tp_size: Any = None, device_mesh: Any = None
) -> DistributedRequest | None:
    """Parse ``from_pretrained``'s ``distributed_config``, ``tp_plan``, ``tp_size`` and ``device_mesh``.

    ``tp_plan``/``tp_size`` are transformers' older spelling of ``DistributedConfig(tp_plan=, tp_size=)``;
    ``device_mesh`` alone shards over its dims (named ``dp_replicate``, ``fsdp``/``dp_shard``, ``tp``).

    Raises:
        ArgumentError: both spellings given, or a value of the wrong type.
        UnsupportedFeatureError: a transformers setting lmport does not serve.
    """
    if distributed_config is None and tp_plan is None and tp_size is None and device_mesh is None:
        return None
    if distributed_config is not None and (tp_plan is not None or tp_size is not None):
        raise ArgumentError(
            "from_pretrained: pass either distributed_config or the standalone tp_plan/tp_size, not both (set "
            "tensor-parallel options on the DistributedConfig)"
        )
    if distributed_config is None:
        if tp_size is not None and (isinstance(tp_size, bool) or not isinstance(tp_size, int)):
            raise ArgumentError(f"from_pretrained: tp_size must be a positive int or None, got {tp_size!r}")
        config = DistributedConfig(tp_plan=tp_plan, tp_size=tp_size)
    else:
        config = DistributedConfig.from_any(distributed_config)
    return DistributedRequest(config, device_mesh)


def from_request(request: Any) -> DistributedRequest | None:
    """The distributed part of a ``from_pretrained`` request (its ``distributed_config``, ``tp_plan``, ``tp_size``,
    ``device_mesh``), checked against the rest of it; ``None`` for a plain load.

    Raises:
        ArgumentError, UnsupportedFeatureError: see :func:`distributed_request` and :func:`check_compatible`.
    """
    parsed = distributed_request(request.distributed_config, request.tp_plan, request.tp_size, request.device_mesh)
    if parsed is None or parsed.trivial:
        return None
    check_compatible(parsed, device_map=request.device_map, quantization=request.quantization)
    return parsed


def check_compatible(request: DistributedRequest, *, device_map: Any, quantization: Any) -> None:
    """Refuse what a distributed load cannot combine with.

    Raises:
        ArgumentError: ``device_map`` (the mesh places the model).
        UnsupportedFeatureError: quantization.
    """
    if device_map is not None:
        raise ArgumentError(
            f"from_pretrained: device_map={device_map!r} and distributed loading are mutually exclusive; each rank's "
            "device comes from the mesh (LOCAL_RANK)"
        )
    if quantization is not None:
        raise UnsupportedFeatureError(
            "from_pretrained: quantization (quantization_config, load_in_4bit/8bit) cannot be combined with "
            "distributed_config / tp_plan / device_mesh in this lmport version"
        )


def shard_model(model: nn.Module, request: DistributedRequest, dtype: torch.dtype) -> Mesh:
    """Lay ``model`` (on the meta device) out over the mesh: cast to ``dtype``, apply the tensor-parallel plan
    (``parallelize_module``) and the FSDP2 plan (``fully_shard``), then allocate each rank's shards, uninitialised.

    Raises:
        DistributedError: no process group, sizes that do not fit the world, or plans that do not fit the model.
    """
    mesh = build_mesh(request.config, request.device_mesh)
    model.to(dtype)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    tp_plan, fsdp_plan = resolve_plans(model, mesh)
    if tp_plan:
        apply_tensor_parallel(model, mesh.tp_mesh, tp_plan)
    if mesh.layout.sharded:
        apply_fsdp(model, mesh, fsdp_plan)
    device = torch.device("cpu") if mesh.layout.config.fsdp_cpu_offload else mesh.device
    model.to_empty(device=device)
    model.distributed_config = mesh.layout.config
    model.device_mesh = mesh.mesh
    model.tp_size = mesh.layout.tp  # accelerate reads it (get_model_tp_size)
    model.is_distributed_loading_by_transformers = True  # Trainer: no DDP wrap, no re-sharding
    return mesh


def load_sharded(
    model: nn.Module,
    source: WeightSource,
    weight_map: WeightMap,
    infos: list[TensorInfo],
    dtype: torch.dtype,
    *,
    ignore_mismatched_sizes: bool = False,
) -> ShardReadReport:
    """Read this rank's shards of every weight (see :func:`load_shards`)."""
    names = getattr(model, "tied_parameter_names", None)
    tied = names() if callable(names) else set()
    return load_shards(
        model, source, weight_map, infos, dtype=dtype, tied=tied, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
