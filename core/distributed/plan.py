"""Tensor-parallel and FSDP2 plans: plain data on the model class, resolved against a model and applied.

A plan maps module-name patterns (``*`` matches one dotted segment, as in ``model.layers.*.mlp.up_proj``)
to a style. The model class declares its defaults (:attr:`~lmport.modeling.PreTrainedCausalLM.tp_plan`,
:attr:`~lmport.modeling.PreTrainedCausalLM.fsdp_plan`); a ``distributed_config`` merges its own rules over
them. Applying them is torch's job: ``parallelize_module`` for tensor parallelism, then ``fully_shard`` for
each FSDP unit and the root.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import DistributedError, UnsupportedFeatureError
from ..weights import match

if TYPE_CHECKING:
    from .mesh import Mesh

#: Tensor-parallel styles (transformers' names) and what each builds; see :func:`parallel_style`.
TP_STYLES = ("colwise", "rowwise", "colwise_gather_output", "colwise_rep", "rowwise_rep", "embedding_rowwise")
FSDP_STYLES = ("free_full_weight", "keep_full_weight")


def parallel_style(style: str) -> Any:
    """The ``torch.distributed.tensor.parallel`` style for a plan's style name.

    ``colwise``: weight (and bias) sharded on the output dim, output left sharded; ``rowwise``: weight
    sharded on the input dim, input taken sharded, output all-reduced; ``colwise_gather_output`` (alias
    ``colwise_rep``): colwise with the output gathered; ``rowwise_rep``: rowwise taking a replicated input;
    ``embedding_rowwise``: an embedding sharded on the vocabulary, output all-reduced.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style in ("colwise_gather_output", "colwise_rep"):
        return ColwiseParallel(output_layouts=Replicate())
    if style in ("rowwise_rep", "embedding_rowwise"):
        return RowwiseParallel(input_layouts=Replicate())
    raise DistributedError(f"unknown tensor-parallel style {style!r}; known styles: {', '.join(TP_STYLES)}")


def merged_plan(default: Mapping[str, str], override: Any, kind: str) -> dict[str, str]:
    """``default`` with ``override`` (``None``/``"auto"``: none; a dict: merged over it) applied."""
    if override is None or override == "auto":
        return dict(default)
    if not isinstance(override, Mapping):
        raise DistributedError(f"distributed_config: {kind} must be 'auto', a dict or None, got {override!r}"[:300])
    if kind == "tp_plan" and not override:
        return {}
    return {**default, **override}


def expand(
    model: nn.Module, plan: Mapping[str, str], kind: str, styles: tuple[str, ...], strict: Any = ()
) -> dict[str, str]:
    """Each module of ``model`` a rule of ``plan`` matches → its style (first matching rule wins).

    Rules of the model class that match nothing are skipped (one shared default serves gated and plain
    MLPs); the rules named in ``strict`` (the caller's overrides) must match.

    Raises:
        DistributedError: a style that is not one of ``styles``, or a ``strict`` rule matching no module.
    """
    bad = {pattern: style for pattern, style in plan.items() if style not in styles}
    if bad:
        raise DistributedError(f"{kind}: unknown style(s) {bad}; {type(model).__name__} takes {', '.join(styles)}")
    out: dict[str, str] = {}
    used: set[str] = set()
    for name, _ in model.named_modules():
        for pattern, style in plan.items():
            if name and match(pattern, name) is not None:
                out[name] = style
                used.add(pattern)
                break
    unused = sorted(set(strict) - used)
    if unused:
        raise DistributedError(
            f"distributed_config.{kind}: rule(s) {unused} match no module of {type(model).__name__}"
        )
    return out


def check_tp(model: nn.Module, plan: Mapping[str, str], tp: int) -> None:
    """Refuse a tensor-parallel degree that does not divide an attention module's head counts, and rules on
    modules the styles cannot shard.

    Raises:
        DistributedError: naming the module and what does not fit.
    """
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        kv_heads = getattr(module, "num_kv_heads", getattr(module, "num_key_value_heads", None))
        if isinstance(heads, int) and any(n.startswith(name + ".") for n in plan):
            for label, count in (("attention heads", heads), ("key/value heads", kv_heads)):
                if isinstance(count, int) and count % tp:
                    raise DistributedError(
                        f"tp_size={tp} does not divide the {count} {label} of {name} ({type(module).__name__}): "
                        "each rank must hold whole heads; choose a tp_size that divides both head counts"
                    )
    for name in plan:  # other dims may split unevenly: DTensor shards them as torch.chunk does
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise DistributedError(
                f"tp_plan: {name} is a {type(module).__name__}; the styles shard nn.Linear and nn.Embedding modules"
            )


def apply_tensor_parallel(model: nn.Module, mesh: Any, plan: Mapping[str, str]) -> None:
    """``parallelize_module`` every planned module over ``mesh``, then re-share tied parameters."""
    from torch.distributed.tensor.parallel import parallelize_module

    tied = _tied_pairs(model)
    parallelize_module(model, mesh, {name: parallel_style(style) for name, style in plan.items()})
    for target, source in tied:
        owner, _, attr = target.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    # A tied pair sharded two ways would silently stop being tied.
    for target, source in tied:
        a, b = model.get_parameter(target), model.get_parameter(source)
        if getattr(a, "placements", None) != getattr(b, "placements", None):  # pragma: no cover - plans agree
            raise DistributedError(f"tp_plan shards {target} and its tied {source} differently")


def apply_fsdp(model: nn.Module, mesh: Mesh, plan: Mapping[str, str]) -> None:
    """``fully_shard`` each planned unit (deepest first), then the root (resharded after forward as well),
    with the config's policies.

    Tied parameters are shared by one unit: a plan naming modules that hold one tied parameter wraps
    them together (torch refuses a parameter seen by two units).
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    config = mesh.layout.config
    if config.fsdp_cpu_offload and mesh.device.type == "cpu":
        raise UnsupportedFeatureError(
            "distributed_config.fsdp_cpu_offload=True offloads parameters from an accelerator to CPU memory, but this "
            "rank computes on the CPU (no accelerator): the parameters are in CPU memory already; drop the option"
        )
    kwargs: dict[str, Any] = {"mesh": mesh.fsdp_mesh}
    kwargs["offload_policy"] = CPUOffloadPolicy() if config.fsdp_cpu_offload else OffloadPolicy()
    if config.fsdp_mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    groups = _unit_groups(model, plan)
    for names in sorted(groups, key=lambda g: -min(n.count(".") for n in g)):
        modules = [model.get_submodule(n) for n in names]
        keep = any(plan[n] == "keep_full_weight" for n in names)
        fully_shard(modules if len(modules) > 1 else modules[0], reshard_after_forward=not keep, **kwargs)
    # The root reshards after forward too: outside a forward, the model's parameters are always the sharded
    # DTensors, so an optimizer made after an evaluation pass steps the real parameters, not gathered copies.
    fully_shard(model, reshard_after_forward=True, **kwargs)


def _unit_groups(model: nn.Module, plan: Mapping[str, str]) -> list[tuple[str, ...]]:
    """The planned modules, those sharing a tied parameter grouped (in module order)."""
    tied = _tied_pairs(model)
    owner = {t: t.rpartition(".")[0] for pair in tied for t in pair}
    groups: list[list[str]] = [[n] for n in plan]
    for target, source in tied:
        a = next((g for g in groups if any(owner[target] == n or owner[target].startswith(n + ".") for n in g)), None)
        b = next((g for g in groups if any(owner[source] == n or owner[source].startswith(n + ".") for n in g)), None)
        if a is not None and b is not None and a is not b:
            a.extend(b)
            groups.remove(b)
        elif (a is None) != (b is None):
            raise DistributedError(
                f"fsdp_plan wraps {(a or b)[0]} on its own, but it holds a parameter tied to one the root holds "
                f"({target} = {source}); wrap both holders or neither"
            )
    return [tuple(g) for g in groups]


def _tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    names = getattr(model, "tied_parameter_names", None)
    tied = names() if callable(names) else set()
    return [(t, model.tied_weights[t]) for t in sorted(tied)]


def resolve_plans(model: nn.Module, mesh: Mesh) -> tuple[dict[str, str], dict[str, str]]:
    """The concrete (module name → style) tensor-parallel and FSDP plans for ``model`` on ``mesh``.

    Empty when the layout has no tensor-parallel (or data-parallel) degree.

    Raises:
        DistributedError: the model declares no plan for a degree > 1, or a plan does not fit it.
    """
    layout = mesh.layout
    tp_plan: dict[str, str] = {}
    fsdp_plan: dict[str, str] = {}
    if layout.tp > 1:
        plan = merged_plan(getattr(type(model), "tp_plan", None) or {}, layout.config.tp_plan, "tp_plan")
        if not plan:
            raise DistributedError(
                f"tp_size={layout.tp} was asked for, but {type(model).__name__} has no tp_plan: declare one on the "
                "model class, pass distributed_config.tp_plan, or set tp_size=1"
            )
        tp_plan = expand(model, plan, "tp_plan", TP_STYLES, _keys(layout.config.tp_plan))
        if not tp_plan:
            raise DistributedError(f"tp_plan: no rule matches a module of {type(model).__name__}")
        check_tp(model, tp_plan, layout.tp)
    if layout.sharded:
        plan = merged_plan(getattr(type(model), "fsdp_plan", None) or {}, layout.config.fsdp_plan, "fsdp_plan")
        fsdp_plan = expand(model, plan, "fsdp_plan", FSDP_STYLES, _keys(layout.config.fsdp_plan))
    return tp_plan, fsdp_plan


def _keys(override: Any) -> tuple[str, ...]:
    return tuple(override) if isinstance(override, Mapping) else ()
