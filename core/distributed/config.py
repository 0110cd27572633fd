"""``DistributedConfig``: how a load is laid out over ``torch.distributed`` ranks, and its resolution into sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ArgumentError, DistributedError, UnsupportedFeatureError

#: Fields of transformers' ``DistributedConfig`` that lmport does not serve, with the value meaning "off".
_OFF = {
    "pp_size": (None, 1),
    "ep_size": (None, 1),
    "ep_plan": (None,),
    "enable_sequence_parallel": (False,),
    "enable_expert_parallel": (False,),
}
_FIELDS = ("tp_size", "tp_plan", "fsdp_size", "dp_replicate_size", "fsdp_plan", "fsdp_cpu_offload",
           "fsdp_mixed_precision")  # fmt: skip


@dataclass
class DistributedConfig:
    """How ``from_pretrained`` shards a model over the ranks of a ``torchrun`` / ``accelerate launch`` job.

    The world is a ``dp_replicate_size × fsdp_size × tp_size`` device mesh (dims named ``dp_replicate``,
    ``fsdp``, ``tp``). transformers' ``DistributedConfig`` is accepted in its place (same fields).

    Attributes:
        tp_size: ranks a tensor-parallel group spans (``parallelize_module`` with the model's ``tp_plan``).
            ``None``: the rest of the world when ``tp_plan`` is set, else 1.
        tp_plan: ``"auto"`` for the model class's :attr:`tp_plan`, or a dict of rules (module pattern → style)
            merged over it; ``{}`` applies none.
        fsdp_size: ranks each FSDP2 group shards parameters over. ``None``: the rest of the world.
        dp_replicate_size: FSDP replicas (HSDP): gradients are reduce-scattered within a replica and
            all-reduced across replicas. ``None``: 1.
        fsdp_plan: rules (module pattern → ``"free_full_weight"`` / ``"keep_full_weight"``) merged over the
            model class's :attr:`fsdp_plan`; each matched module is its own ``fully_shard`` unit.
        fsdp_cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory
            (``CPUOffloadPolicy``).
        fsdp_mixed_precision: compute in bfloat16, reduce gradients in float32 (``MixedPrecisionPolicy``).
    """

    tp_size: int | None = None
    tp_plan: dict[str, str] | Literal["auto"] | None = None
    fsdp_size: int | None = None
    dp_replicate_size: int | None = None
    fsdp_plan: dict[str, str] | None = None
    fsdp_cpu_offload: bool = False
    fsdp_mixed_precision: bool = False

    def __post_init__(self) -> None:
        for name in ("tp_size", "fsdp_size", "dp_replicate_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ArgumentError(f"DistributedConfig: {name} must be a positive int or None, got {value!r}")
        if self.tp_plan is not None and self.tp_plan != "auto" and not _is_str_map(self.tp_plan):
            raise ArgumentError(f"DistributedConfig: tp_plan must be 'auto', a dict of str → str or None, got "
                                f"{self.tp_plan!r}"[:300])  # fmt: skip
        if self.fsdp_plan is not None and not _is_str_map(self.fsdp_plan):
            raise ArgumentError(f"DistributedConfig: fsdp_plan must be a dict of str → str or None, got "
                                f"{self.fsdp_plan!r}"[:300])  # fmt: skip
        for name in ("fsdp_cpu_offload", "fsdp_mixed_precision"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"DistributedConfig: {name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_any(cls, value: Any) -> DistributedConfig:
        """lmport's config as is; a dict, or transformers' ``DistributedConfig`` (duck-typed), converted.

        Raises:
            UnsupportedFeatureError: a transformers setting lmport does not serve (pipeline or expert
                parallelism, sequence parallelism) is switched on.
            ArgumentError: anything else, or a field of the wrong type.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            fields = dict(value)
        elif all(hasattr(value, name) for name in ("tp_size", "fsdp_size", "dp_replicate_size")):
            fields = {name: getattr(value, name) for name in (*_FIELDS, *_OFF) if hasattr(value, name)}
        else:
            raise ArgumentError(
                "from_pretrained: distributed_config must be an lmport.DistributedConfig, transformers' "
                f"DistributedConfig or a dict, got {type(value).__name__}"
            )
        for name, off in _OFF.items():
            setting = fields.pop(name, off[0])
            if setting not in off:
                raise UnsupportedFeatureError(
                    f"distributed_config: {name}={setting!r} is not supported by lmport (it serves FSDP2, HSDP and "
                    "tensor parallelism: fsdp_size, dp_replicate_size, tp_size/tp_plan)"
                )
        fields.pop("ep_implementation", None)
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ArgumentError(f"distributed_config: unknown field(s) {unknown}; lmport's fields are {list(_FIELDS)}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    """A resolved :class:`DistributedConfig`: every size known and their product the world size."""

    dp_replicate: int
    fsdp: int
    tp: int
    config: DistributedConfig

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.fsdp * self.tp

    @property
    def dp_size(self) -> int:
        """Ranks that see distinct batches: ``dp_replicate × fsdp``."""
        return self.dp_replicate * self.fsdp

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 wraps the model (any data-parallel degree > 1)."""
        return self.dp_size > 1


def resolve_layout(config: DistributedConfig, world_size: int) -> Layout:
    """Fill in the sizes ``config`` leaves open from ``world_size`` and check they multiply to it.

    Raises:
        DistributedError: the sizes do not divide or multiply to the world size; the message shows
            the product and what to change.
    """
    replicate = config.dp_replicate_size or 1
    tp = config.tp_size
    if tp is None:
        tp = 1
        if config.tp_plan is not None:
            rest = replicate * (config.fsdp_size or 1)
            if world_size % rest:
                raise DistributedError(
                    f"distributed_config: tp_size is derived as WORLD_SIZE / (dp_replicate_size × fsdp_size), but "
                    f"{world_size} is not a multiple of {rest}"
                )
            tp = world_size // rest
    fsdp = config.fsdp_size
    if fsdp is None:
        if world_size % (replicate * tp):
            raise DistributedError(
                f"distributed_config: fsdp_size is derived as WORLD_SIZE / (dp_replicate_size × tp_size), but "
                f"{world_size} is not a multiple of {replicate} × {tp}"
            )
        fsdp = world_size // (replicate * tp)
    if replicate * fsdp * tp != world_size:
        raise DistributedError(
            f"distributed_config: dp_replicate_size × fsdp_size × tp_size = {replicate} × {fsdp} × {tp} = "
            f"{replicate * fsdp * tp}, but the job has {world_size} process(es) (WORLD_SIZE); make the product "
            "equal the number of processes torchrun / accelerate launch starts"
        )
    return Layout(replicate, fsdp, tp, config)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
