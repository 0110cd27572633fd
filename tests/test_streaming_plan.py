"""The per-tensor load plan (``lmport.streaming.plan_load``): a pure function, checked without reading a tensor.

Every ``TensorInfo`` here names a file that does not exist, so a plan that tried to read would fail.
The last tests execute small plans with :class:`~lmport.streaming.Streamer` on an in-memory source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lmport.errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ShapeMismatchError,
    UnsupportedFeatureError,
    UnsupportedQuantizationError,
    UnsupportedTensorError,
)
from lmport.placement import SingleDevice
from lmport.streaming import (
    LoadPlan,
    Offloaded,
    OnDevice,
    Quantized,
    ReadMode,
    Streamer,
    Target,
    plan_load,
)
from lmport.weights import Rename, Split, TensorInfo, Transpose, WeightMap

NOWHERE = Path("/nonexistent/model.safetensors")
CPU = torch.device("cpu")
F32 = torch.float32
MAP = WeightMap(
    rename=(Rename("transformer.**", "model.**"),),
    split=(Split("model.qkv.weight", ("model.q.weight", "model.k.weight", "model.v.weight")),),
    transpose=(Transpose("model.proj.weight"),),
    ignore=("transformer.rotary.inv_freq",),
)
EXPECTED: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "model.embed.weight": ((10, 4), F32),
    "model.q.weight": ((4, 4), F32),
    "model.k.weight": ((4, 4), F32),
    "model.v.weight": ((4, 4), F32),
    "model.proj.weight": ((4, 6), F32),
    "lm_head.weight": ((10, 4), F32),
}


def info(name: str, shape: tuple[int, ...], dtype: torch.dtype = F32) -> TensorInfo:
    return TensorInfo(name, NOWHERE, shape, dtype)


INFOS = [
    info("transformer.embed.weight", (10, 4)),
    info("transformer.qkv.weight", (12, 4)),
    info("transformer.proj.weight", (6, 4)),
    info("transformer.rotary.inv_freq", (2,)),
]


class Map:
    """A placement from a dict (module name → device or "disk"); the rest on the CPU."""

    device_map = None
    main_device = CPU

    def __init__(self, where: dict[str, Any]) -> None:
        self.where = where

    def device_for(self, name: str) -> Any:
        return self.where.get(name, CPU)

    def offload(self, name: str, tensor: torch.Tensor) -> None:
        raise AssertionError

    def finalize(self, model: nn.Module) -> None:
        return None


class Claims:
    """A quantize-on-load quantizer claiming the names given."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def prepare(self, model: nn.Module) -> None: ...

    def claims(self, module_name: str) -> bool:
        return module_name in self.names

    def materialize(self, model: nn.Module, module_name: str, tensor: torch.Tensor, device: torch.device) -> None: ...

    def finalize(self, model: nn.Module) -> None: ...


class Stored(Claims):
    """A pre-quantized quantizer: ``<weight>.absmax`` belongs to ``<weight>``."""

    pre_quantized = True

    def stored_part(self, checkpoint_name: str) -> tuple[str, str] | None:
        if checkpoint_name.endswith(".absmax"):
            return checkpoint_name.removesuffix(".absmax"), "absmax"
        if checkpoint_name.removeprefix("transformer.") in ("qkv.weight", "embed.weight"):
            return checkpoint_name, "weight"
        return None

    def materialize_stored(self, *args: Any) -> None: ...


def plan(infos: list[TensorInfo] = INFOS, **kwargs: Any) -> LoadPlan:
    kwargs.setdefault("placement", SingleDevice(CPU))
    return plan_load(infos, MAP, EXPECTED, tied=kwargs.pop("tied", {"lm_head.weight"}), **kwargs)


def targets(result: LoadPlan) -> dict[str, list[Target]]:
    return {entry.info.name: list(entry.targets) for entry in result.tensors}


def test_plain_plan_maps_every_tensor_and_reads_nothing() -> None:
    result = plan()
    assert targets(result) == {
        "transformer.embed.weight": [Target("model.embed.weight", OnDevice(CPU))],
        "transformer.qkv.weight": [Target(f"model.{p}.weight", OnDevice(CPU)) for p in "qkv"],
        "transformer.proj.weight": [Target("model.proj.weight", OnDevice(CPU))],
    }
    reads = {entry.info.name: entry.read for entry in result.tensors}
    assert reads["transformer.embed.weight"] is ReadMode.MAPPED  # kept as read: may stay a view of the file
    assert reads["transformer.qkv.weight"] is ReadMode.TRANSIENT  # split: only copies are kept
    assert reads["transformer.proj.weight"] is ReadMode.TRANSIENT  # transposed
    assert result.stored == [] and result.fresh == []
    assert result.report.as_dict() == dict(missing_keys=[], unexpected_keys=[], mismatched_keys=[], error_msgs=[])


def test_unexpected_tensor_is_reported_not_planned() -> None:
    result = plan([*INFOS, info("transformer.extra.weight", (3,))])
    assert result.report.unexpected_keys == ["transformer.extra.weight"]
    assert "transformer.extra.weight" not in targets(result)


def test_missing_tensor_fails_before_reading() -> None:
    with pytest.raises(MissingWeightsError, match=r"1 weight\(s\) of Tiny are not in the checkpoint: model\.proj"):
        plan(INFOS[:2], model_name="Tiny", files=[NOWHERE])


def test_tied_tensor_is_neither_missing_nor_loaded() -> None:
    result = plan([*INFOS, info("lm_head.weight", (10, 4))])
    assert "lm_head.weight" not in targets(result) and result.report.unexpected_keys == []
    with pytest.raises(MissingWeightsError, match="lm_head.weight"):
        plan(tied=set())


def test_shape_mismatch_fails_or_plans_a_fresh_tensor() -> None:
    wrong = [info("transformer.embed.weight", (11, 4)), *INFOS[1:]]
    with pytest.raises(ShapeMismatchError, match=r"'transformer.embed.weight' has shape \(11, 4\).*needs \(10, 4\)"):
        plan(wrong)
    result = plan(wrong, ignore_mismatched_sizes=True)
    assert "transformer.embed.weight" not in targets(result)
    assert [(f.module_name, f.shape, f.device) for f in result.fresh] == [("model.embed.weight", (10, 4), CPU)]
    assert result.report.missing_keys == ["model.embed.weight"]
    assert result.report.mismatched_keys == [("model.embed.weight", (11, 4), (10, 4))]


def test_fresh_tensor_cannot_be_offloaded() -> None:
    wrong = [info("transformer.embed.weight", (11, 4)), *INFOS[1:]]
    with pytest.raises(UnsupportedFeatureError, match="cannot re-initialise 'model.embed.weight'"):
        plan(wrong, ignore_mismatched_sizes=True, placement=Map({"model.embed.weight": "disk"}))


def test_the_last_tensor_for_a_module_wins() -> None:
    again = info("transformer.embed.weight", (10, 4), torch.bfloat16)
    result = plan([*INFOS, again])
    entries = [e for e in result.tensors if e.info.name == "transformer.embed.weight"]
    assert len(entries) == 1 and entries[0].info is again


def test_unloadable_dtype_is_refused_unless_quantized() -> None:
    packed = [info("transformer.embed.weight", (10, 4), torch.uint8), *INFOS[1:]]
    with pytest.raises(UnsupportedTensorError, match="stored as uint8"):
        plan(packed)
    result = plan(packed, quantizer=Claims("model.embed.weight"))
    assert targets(result)["transformer.embed.weight"] == [Target("model.embed.weight", Quantized(CPU))]


def test_destinations_follow_placement_and_quantizer() -> None:
    meta = torch.device("meta")  # any device other than the CPU: the read tensor is copied there
    result = plan(
        placement=Map({"model.embed.weight": "disk", "model.q.weight": meta}), quantizer=Claims("model.k.weight")
    )
    found = targets(result)
    assert found["transformer.embed.weight"] == [Target("model.embed.weight", Offloaded())]
    assert [t.destination for t in found["transformer.qkv.weight"]] == [OnDevice(meta), Quantized(CPU), OnDevice(CPU)]
    assert {e.info.name: e.read for e in result.tensors}["transformer.embed.weight"] is ReadMode.TRANSIENT
    assert Offloaded().staging == CPU and Quantized(meta).staging == CPU and OnDevice(meta).staging == meta


def test_stored_quantized_parts_are_grouped() -> None:
    infos = [*INFOS, info("transformer.qkv.weight.absmax", (3,)), info("transformer.embed.weight.absmax", (1,))]
    quantizer = Stored("model.q.weight", "model.k.weight", "model.v.weight", "model.embed.weight")
    result = plan(infos, quantizer=quantizer)
    assert set(targets(result)) == {"transformer.proj.weight"}
    groups = {g.name: g for g in result.stored}
    assert groups["transformer.qkv.weight"].module_names == ["model.q.weight", "model.k.weight", "model.v.weight"]
    assert set(groups["transformer.qkv.weight"].parts) == {"weight", "absmax"}
    assert groups["transformer.embed.weight"].device == CPU
    with pytest.raises(UnsupportedFeatureError, match="cannot be offloaded to disk"):
        plan(infos, quantizer=quantizer, placement=Map({"model.embed.weight": "disk"}))
    with pytest.raises(UnsupportedQuantizationError, match=r"only \['model.q.weight'\] are quantized"):
        plan(infos, quantizer=Stored("model.q.weight", "model.embed.weight"))
    with pytest.raises(CorruptWeightsError, match="stored twice"):
        plan([*infos, info("transformer.qkv.weight.absmax", (3,))], quantizer=quantizer)


# --- executing a plan --------------------------------------------------------------------------


class Memory:
    """A weight source in memory (not a casting one): counts reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.files = [NOWHERE]
        self.reads: list[str] = []

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, NOWHERE, tuple(t.shape), t.dtype) for n, t in self.tensors.items()]

    def read(self, info: TensorInfo) -> torch.Tensor:
        self.reads.append(info.name)
        return self.tensors[info.name]

    def close(self) -> None: ...


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):
            self.model = nn.ModuleDict(
                {n: nn.Linear(4, 4, bias=False) for n in "qkv"} | {"embed": nn.Embedding(10, 4)}
            )
            self.model.proj = nn.Linear(6, 4, bias=False)


def test_streamer_executes_the_plan() -> None:
    torch.manual_seed(0)
    stored = {
        "transformer.embed.weight": torch.randn(10, 4, dtype=torch.float64),
        "transformer.qkv.weight": torch.randn(12, 4),
        "transformer.proj.weight": torch.randn(6, 4),
    }
    source = Memory(stored)
    model = Tiny()
    expected = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict(keep_vars=True).items()}
    assert set(expected) == {f"model.{n}.weight" for n in ("q", "k", "v", "embed", "proj")}
    result = plan_load(source.infos(), MAP, expected, tied=(), placement=SingleDevice(CPU))
    Streamer(model, source, MAP, dtype=torch.float32, placement=SingleDevice(CPU), quantizer=None).run(result)
    assert sorted(source.reads) == sorted(stored)  # each tensor read once
    q, k, v = stored["transformer.qkv.weight"].split(4)
    assert torch.equal(model.model.q.weight, q) and torch.equal(model.model.v.weight, v)
    assert torch.equal(model.model.proj.weight, stored["transformer.proj.weight"].T)
    assert model.model.proj.weight.is_contiguous() and model.model.k.weight.untyped_storage().nbytes() == 64
    assert model.model.embed.weight.dtype == torch.float32  # cast to the load's dtype
    assert isinstance(model.model.q.weight, nn.Parameter) and model.model.q.weight.requires_grad
