"""The RoPE building blocks plugins extend: the RoPE type registry (its keys feed config validation),
per-forward frequency updates, partial rotary, the overridable rotation step of ``Attention``, and
config-dependent weight maps (``PreTrainedCausalLM.weight_map_for``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA

import lmport
from lmport.config import Real
from lmport.modeling import (
    ROPE_TYPES,
    Attention,
    PreTrainedCausalLM,
    RotaryEmbedding,
    apply_rotary,
    build_rope_decoder,
    register_rope,
    rotary_dim,
    standardize_rope_parameters,
)
from lmport.registry import get_registry


def _halved(params: dict[str, Any], dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """A RoPE type of a plugin: default frequencies times ``scale``, cos/sin scaled by ``gain``."""
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv * params["scale"], params.get("gain", 1.0)


def _check_gain(params: dict[str, Any], dim: int | None, key: str) -> None:
    if params.get("gain", 1.0) > params["scale"] * 10:
        raise ValueError(f"{key}['gain'] must be at most 10 * scale")


@pytest.fixture
def halved() -> Iterator[None]:
    register_rope(
        "halved", _halved, required=("scale",), optional=("gain",),
        checks={"scale": Real(0.0, 1.0, min_open=True)}, validate=_check_gain,
    )  # fmt: skip
    try:
        yield
    finally:
        del ROPE_TYPES["halved"]


def llama_config(tmp_path: Path, rope: dict[str, Any] | None = None, **more: Any) -> Any:
    raw = {**TINY_LLAMA, "model_type": "llama", **more}
    if rope is not None:
        raw["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return lmport.AutoConfig.from_pretrained(tmp_path)


def test_registered_rope_type_is_validated_and_computed(halved: None, tmp_path: Path) -> None:
    config = llama_config(tmp_path, {"rope_type": "halved", "rope_theta": 100.0, "scale": 0.5, "gain": 2.0})
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == "halved" and rotary.attention_scaling == 2.0
    expected = 0.5 / (100.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert torch.equal(rotary.inv_freq, expected)
    cos, _ = rotary(torch.zeros(1, 3, 64), torch.arange(3)[None])
    assert torch.equal(cos[0, 0], torch.full((16,), 2.0))  # position 0, times the gain

    for rope, message in [
        ({"rope_type": "halved"}, r"\['scale'\] is required for rope_type 'halved'"),
        ({"rope_type": "halved", "scale": 1.5}, r"\['scale'\] must be a finite number > 0 and <= 1, got 1.5"),
        ({"rope_type": "halved", "scale": 0.1, "gain": 2.0}, r"\['gain'\] must be at most 10 \* scale"),
        ({"rope_type": "halves", "scale": 0.5}, r"'halves' is not supported; supported: .*longrope, halved"),
    ]:
        with pytest.raises(lmport.ConfigError, match=message):
            llama_config(tmp_path, rope)


def test_registration_conflicts(halved: None) -> None:
    with pytest.raises(lmport.PluginConflictError, match="'longrope' is already registered"):
        register_rope("longrope", _halved)
    register_rope("halved", _halved, required=("scale",))  # the same function again: a re-imported module
    original = ROPE_TYPES["halved"]
    register_rope("halved", lambda *a: _halved(*a), override=True)
    assert ROPE_TYPES["halved"] is not original


def test_frequency_update_runs_before_each_forward(tmp_path: Path) -> None:
    seen: list[int] = []

    def record(rotary: RotaryEmbedding, position_ids: torch.Tensor, device: torch.device) -> None:
        seen.append(int(position_ids.max()) + 1)
        rotary.inv_freq = rotary.original_inv_freq * (2.0 if seen[-1] > 8 else 1.0)

    register_rope("recorded", lambda p, d, m, s: (torch.ones(d // 2), 1.0), update=record)
    try:
        model = lmport.AutoModelForCausalLM.from_config(llama_config(tmp_path, {"rope_type": "recorded"}), seed=0)
        ids = torch.randint(0, 128, (1, 12))
        with torch.no_grad():
            model(ids[:, :4]), model(ids)
        assert seen == [4, 12]
        assert torch.equal(model.model.rotary_emb.inv_freq, torch.full((8,), 2.0))
    finally:
        del ROPE_TYPES["recorded"]


def test_longrope_by_sequence_length() -> None:
    params = standardize_rope_parameters(
        {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [4.0, 8.0]}, None, 10_000.0, 64,
        original_max_position_embeddings=16,
    )  # fmt: skip
    assert params["original_max_position_embeddings"] == 16
    rotary = RotaryEmbedding(4, 64, params)
    base = 1.0 / (10_000.0 ** (torch.arange(0, 4, 2).float() / 4))
    scaling = math.sqrt(1 + math.log(64 / 16) / math.log(16))
    assert rotary.attention_scaling == pytest.approx(scaling)
    x = torch.zeros(1, 1, 4)
    rotary(x, torch.arange(16)[None])
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor([1.0, 2.0]))
    rotary(x, torch.tensor([[16]]))  # a 17th position: the long factors
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor([4.0, 8.0]))
    rotary(x, torch.arange(3)[None])
    torch.testing.assert_close(rotary.inv_freq, base / torch.tensor([1.0, 2.0]))


def test_partial_rotation_rotates_the_leading_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    q_ref, k_ref = apply_rotary(q[..., :12], k[..., :12], cos, sin)
    assert torch.equal(q_out[..., :12], q_ref) and torch.equal(k_out[..., :12], k_ref)
    assert torch.equal(q_out[..., 12:], q[..., 12:]) and torch.equal(k_out[..., 12:], k[..., 12:])
    assert rotary_dim(16, {"partial_rotary_factor": 0.75}) == 12 and rotary_dim(16, {}) == 16


def test_partial_rotary_factor_needs_an_architecture_that_supports_it(tmp_path: Path) -> None:
    with pytest.raises(lmport.ConfigError, match="partial rotation is not supported"):
        llama_config(tmp_path, {"rope_type": "default", "partial_rotary_factor": 0.5})


class NoRotation(Attention):
    """An attention that overrides the rotation step only (here: no rotation at all)."""

    calls = 0

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        NoRotation.calls += 1
        return q, k


def test_attention_rotation_step_is_overridable(tmp_path: Path) -> None:
    config = llama_config(tmp_path)
    llama = lmport.AutoModelForCausalLM.from_config(config, seed=0).eval()

    class NoPE(type(llama)):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            PreTrainedCausalLM.__init__(self, config, build_rope_decoder(config, attention=NoRotation))

    nope = NoPE(config).eval()
    nope.load_state_dict(llama.state_dict())
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        moved = (nope(ids).logits - llama(ids).logits).abs().max().item()
        assert NoRotation.calls == config.num_hidden_layers and moved > 1e-3


def test_config_dependent_weight_map(tmp_path: Path) -> None:
    config = llama_config(tmp_path)
    base = type(lmport.AutoModelForCausalLM.from_config(config, seed=0))
    rows = config.num_key_value_heads * config.head_dim

    class Fused(base):  # type: ignore[misc,valid-type]
        @classmethod
        def weight_map_for(cls, config: Any) -> lmport.WeightMap:
            names = tuple(f"model.layers.*.self_attn.{p}_proj.weight" for p in "qkv")
            q_rows = config.num_attention_heads * config.head_dim
            split = lmport.Split("model.layers.*.self_attn.qkv.weight", names, sizes=(q_rows, rows, rows))
            return lmport.WeightMap(split=(split,))

    assert base.weight_map_for(config) is base.weight_map
    weight_map = get_registry().hook.lmport_weight_mapping(config=config, model_class=Fused)
    plan = weight_map.plan("model.layers.0.self_attn.qkv.weight", (64 + 2 * rows, 64))
    assert plan == [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64)),
        ("model.layers.0.self_attn.k_proj.weight", (rows, 64)),
        ("model.layers.0.self_attn.v_proj.weight", (rows, 64)),
    ]
