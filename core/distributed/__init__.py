"""Distributed loading and saving on torch.distributed: FSDP2, HSDP and tensor parallelism.

``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`` under ``torchrun`` (or
``accelerate launch``) builds the model on the meta device on every rank, applies the model class's
tensor-parallel plan (``parallelize_module``) and FSDP2 plan (``fully_shard``) over a
``dp_replicate × fsdp × tp`` :class:`~torch.distributed.device_mesh.DeviceMesh`, and each rank reads from
the checkpoint only the bytes of the shards it owns. ``save_pretrained`` on such a model writes the Hugging
Face format again, gathering one tensor at a time.
"""

from __future__ import annotations

from .config import DistributedConfig, Layout, resolve_layout
from .load import DistributedRequest, check_compatible, distributed_request, from_request, load_sharded, shard_model
from .mesh import DIMS, Mesh, build_mesh
from .plan import FSDP_STYLES, TP_STYLES, parallel_style, resolve_plans
from .save import is_sharded, save_sharded
from .shard_read import BoxMap, ShardReadReport, box_maps, load_shards, local_box

__all__ = [
    "DIMS",
    "FSDP_STYLES",
    "TP_STYLES",
    "BoxMap",
    "DistributedConfig",
    "DistributedRequest",
    "Layout",
    "Mesh",
    "ShardReadReport",
    "box_maps",
    "build_mesh",
    "check_compatible",
    "distributed_request",
    "from_request",
    "is_sharded",
    "load_sharded",
    "load_shards",
    "local_box",
    "parallel_style",
    "resolve_layout",
    "resolve_plans",
    "save_sharded",
    "shard_model",
]
