"""The process group and the ``dp_replicate × fsdp × tp`` device mesh a distributed load runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArgumentError, DistributedError
from .config import DistributedConfig, Layout, resolve_layout

#: The mesh dims lmport builds, outermost first. ``dp_shard`` (torchtitan, accelerate) is read as ``fsdp``.
DIMS = ("dp_replicate", "fsdp", "tp")
_ALIASES = {"dp_shard": "fsdp", "dp": "dp_replicate"}


@dataclass(frozen=True)
class Mesh:
    """A resolved layout and the device mesh realising it.

    Attributes:
        layout: the sizes.
        mesh: the device mesh; its dims are named by :data:`DIMS` (those of size 1 included) unless the
            caller passed a mesh of their own.
        names: the caller's dim name for each of ``dp_replicate``, ``fsdp``, ``tp`` that the mesh has.
        device: this rank's device.
    """

    layout: Layout
    mesh: Any
    names: dict[str, str]
    device: torch.device

    def sub(self, *dims: str) -> Any:
        """The sub-mesh over ``dims`` (lmport's names), or ``None`` when the mesh lacks all of them."""
        present = tuple(self.names[d] for d in dims if d in self.names)
        if not present:
            return None
        return self.mesh[present if len(present) > 1 else present[0]]

    @property
    def fsdp_mesh(self) -> Any:
        """The mesh ``fully_shard`` takes: 2-D ``(dp_replicate, fsdp)`` for HSDP, else 1-D ``fsdp``."""
        if self.layout.dp_replicate > 1:
            return self.sub("dp_replicate", "fsdp")
        return self.sub("fsdp")

    @property
    def tp_mesh(self) -> Any:
        return self.sub("tp")


def device_type() -> str:
    """``cuda`` (or another accelerator) when present, else ``cpu``."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator()
        if kind is not None and kind.type != "mps":
            return kind.type
    return "cpu"


def local_device(kind: str) -> torch.device:
    """This rank's device: ``kind:LOCAL_RANK`` for accelerators (and made current), ``cpu`` otherwise."""
    if kind == "cpu":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.accelerator.set_device_index(index)
    return torch.device(kind, index)


def ensure_process_group(kind: str) -> None:
    """Initialise the default process group from torchrun's environment if it is not yet.

    Raises:
        DistributedError: not launched by torchrun / accelerate launch (no ``RANK``/``WORLD_SIZE``), or the
            rendezvous failed.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("distributed loading needs torch.distributed, which this torch build lacks")
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"distributed loading needs a process group: launch with torchrun or accelerate launch (the environment "
            f"lacks {', '.join(missing)}), or call torch.distributed.init_process_group first"
        )
    backend = "gloo" if kind == "cpu" else dist.get_default_backend_for_device(kind)
    try:
        dist.init_process_group(backend=backend)
    except Exception as exc:  # the rendezvous' own errors are many and untyped
        raise DistributedError(f"torch.distributed.init_process_group(backend={backend!r}) failed: {exc}") from exc


def build_mesh(config: DistributedConfig, device_mesh: Any = None) -> Mesh:
    """The mesh for ``config``: ``device_mesh`` when given (checked against ``config``), else a new one.

    A given 1-D mesh without known dim names is the tensor-parallel mesh when ``config`` asks for tensor
    parallelism (transformers' ``device_mesh=`` with ``tp_plan``), else the FSDP mesh.

    Raises:
        DistributedError: no process group can be made, or the sizes do not fit the world or the mesh.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if device_mesh is not None:
        if not isinstance(device_mesh, DeviceMesh):
            raise ArgumentError(f"from_pretrained: device_mesh must be a torch DeviceMesh, got {type(device_mesh).__name__}")
        return _given_mesh(config, device_mesh)
    kind = device_type()
    ensure_process_group(kind)
    layout = resolve_layout(config, dist.get_world_size())
    device = local_device(kind)
    mesh = init_device_mesh(kind, (layout.dp_replicate, layout.fsdp, layout.tp), mesh_dim_names=DIMS)
    return Mesh(layout, mesh, {d: d for d in DIMS}, device)


def _given_mesh(config: DistributedConfig, mesh: Any) -> Mesh:
    names = list(mesh.mesh_dim_names or ())
    sizes = list(mesh.mesh.shape)
    if not names or len(names) != len(sizes):
        if len(sizes) != 1:
            raise DistributedError(
                f"device_mesh: a {len(sizes)}-D mesh needs dim names among {DIMS} (or dp_shard / dp), got {names}"
            )
        names = ["tp" if config.tp_plan is not None or config.tp_size not in (None, 1) else "fsdp"]
    ours: dict[str, str] = {}
    for name in names:
        dim = _ALIASES.get(name, name)
        if dim not in DIMS or dim in ours:
            raise DistributedError(
                f"device_mesh: dim {name!r} is not one lmport shards over (dims {list(DIMS)}, or dp_shard for fsdp, "
                f"each once); its dims are {list(mesh.mesh_dim_names or ())}"
            )
        ours[dim] = name
    size = {dim: sizes[names.index(given)] for dim, given in ours.items()}
    for dim, field in (("dp_replicate", "dp_replicate_size"), ("fsdp", "fsdp_size"), ("tp", "tp_size")):
        wanted = getattr(config, field)
        if wanted is not None and wanted != size.get(dim, 1):
            raise DistributedError(
                f"distributed_config: {field}={wanted}, but device_mesh's {ours.get(dim, dim)!r} dim has size "
                f"{size.get(dim, 1)}"
            )
    filled = DistributedConfig(
        tp_size=size.get("tp", 1),
        tp_plan=config.tp_plan if config.tp_plan is not None or size.get("tp", 1) == 1 else "auto",
        fsdp_size=size.get("fsdp", 1),
        dp_replicate_size=size.get("dp_replicate", 1),
        fsdp_plan=config.fsdp_plan,
        fsdp_cpu_offload=config.fsdp_cpu_offload,
        fsdp_mixed_precision=config.fsdp_mixed_precision,
    )
    layout = resolve_layout(filled, mesh.size())
    return Mesh(layout, mesh, ours, local_device(mesh.device_type))
