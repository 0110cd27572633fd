"""Phi-3 as a third-party plugin (tests/fixtures/phi3, lmport's public API only), at parity with transformers.

The fixture is pip-installed and found by its entry point. Against transformers' Phi3ForCausalLM on
checkpoints transformers saved (random weights, std 0.2, random norms), with ``eager`` and ``sdpa``:

- fp32 logits within 1e-5 (bit-identical as measured) below and past ``original_max_position_embeddings``
  (LongRoPE's short and long factors), on right-padded batches too; loss and every gradient (in
  checkpoint layout: fused ``qkv_proj`` / ``gate_up_proj``, split unequally under grouped KV heads)
  within the tolerances.
- Variants: LongRoPE with GQA; LongRoPE with partial rotary (top-level ``partial_rotary_factor``) and MQA;
  default RoPE with partial rotary in ``rope_parameters``, MHA and a sliding window.
- Greedy generation across the short/long switch: same tokens and logits at every step (the
  cache is dropped and the sequence recomputed at the switch, as transformers does; without that the
  logits after the switch differ).
- bf16 (``dtype="auto"``): bit-identical. ``save_pretrained`` (from a load and from ``from_config``):
  transformers loads it cleanly with the same logits; the tensors equal transformers' own save.
- Bad LongRoPE / partial rotary settings are refused; the plugin imports public names only; the
  conformance kit (``lmport.testing``) passes.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, save_hf
from helpers import (
    ATTENTION,
    LOGITS_ATOL,
    MOVED,
    assert_bf16_parity,
    assert_grads_close,
    assert_logits_close,
    assert_loss_equal,
    assert_padded_logits_close,
    assert_saved_like_transformers,
    batch_of_two,
    load_clean,
    load_lmport,
    loss_and_grads,
    max_change,
    one_intraop_thread,
    perturb_parameters,
    pip_installed,
)

import lmport
from lmport.registry import get_registry

FIXTURE = Path(__file__).parent / "fixtures" / "phi3"
ORIGINAL = 16  # original_max_position_embeddings: LongRoPE's switch
SHORT, LONG = 12, 40  # sequence lengths on either side of it

TINY: dict[str, Any] = dict(
    TINY_LLAMA, original_max_position_embeddings=ORIGINAL, pad_token_id=0, bos_token_id=1, eos_token_id=2
)


def factors(n: int, seed: int, high: float) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + (high - 1.0) * torch.rand(n, generator=g)).tolist()


def longrope(n: int) -> dict[str, Any]:
    return {"type": "longrope", "short_factor": factors(n, 1, 1.5), "long_factor": factors(n, 2, 12.0)}


#: id -> transformers.Phi3Config overrides (head_dim 16: 8 rotary frequencies, 6 at 0.75, 4 at 0.5)
VARIANTS: dict[str, dict[str, Any]] = {
    "longrope_gqa": {"rope_scaling": longrope(8)},
    "longrope_partial_mqa": {"rope_scaling": longrope(6), "partial_rotary_factor": 0.75, "num_key_value_heads": 1},
    "partial_window_mha": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
        "num_key_value_heads": 4,
        "sliding_window": 5,
    },
}


@pytest.fixture(scope="module", autouse=True)
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pip_installed(FIXTURE, tmp_path_factory.mktemp("phi3"), "lmport_phi3") as target:
        yield target


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_intraop_thread()


def hf_config(**overrides: Any) -> Any:
    return transformers.Phi3Config(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Variant id -> folder saved by transformers, once per module."""
    return functools.cache(lambda case: save_hf(tmp_path_factory.mktemp(case), hf_config(**VARIANTS[case])))


def load_pair(folder: Path, attn: str = "sdpa", **kwargs: Any) -> tuple[Any, Any]:
    settings = {"dtype": torch.float32, **kwargs}
    ref = transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation=attn, **settings)
    ours = load_lmport(folder, attn_implementation=attn, **kwargs)
    assert type(ours).__module__ == "lmport_phi3.model"
    return ours, ref


def ids_of(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def checkpoint_grads(model: Any, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module-named gradients in checkpoint names and layouts (fused), by the plugin's config-dependent map."""
    return type(model).weight_map_for(model.config).to_checkpoint(grads)


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case", list(VARIANTS))
def test_fp32_parity_logits_loss_grads(checkpoints: Any, case: str, attn: str) -> None:
    ours, ref = load_pair(checkpoints(case), attn)
    assert get_registry().provider("phi3") == "lmport-phi3:phi3"
    rotary = ours.model.rotary_emb
    assert rotary.rope_type == ref.config.rope_parameters["rope_type"]
    assert rotary.dim == int(16 * ref.config.rope_parameters.get("partial_rotary_factor", 1.0))
    assert ours.config.sliding_window == ref.config.sliding_window
    with torch.no_grad():
        for length in (SHORT, LONG):  # short factors, then long ones
            ids = ids_of(length, seed=length)
            assert_logits_close(ours(ids).logits, ref(ids).logits, finite=True)
        padded = batch_of_two(LONG, seed=3, padded=True)
        assert_padded_logits_close(ours, ref, padded, finite=True)

    batch = batch_of_two(LONG, seed=4)
    loss_ours, grads_ours = loss_and_grads(ours, batch)
    loss_ref, grads_ref = loss_and_grads(ref, batch)
    assert_loss_equal(loss_ours, loss_ref)
    fused = checkpoint_grads(ours, grads_ours)
    assert_grads_close(fused, grads_ref)  # same names and shapes (fused) first


def test_longrope_switch_is_in_effect_and_stateless(checkpoints: Any) -> None:
    """Past the pretrained length every position uses the long factors; a short sequence afterwards is
    computed exactly as before (the switch keeps no state)."""
    ours, _ = load_pair(checkpoints("longrope_gqa"))
    ids = ids_of(LONG)
    with torch.no_grad():
        short = ours(ids[:, :SHORT]).logits
        long = ours(ids).logits[:, :SHORT]
        assert max_change(short, long) > MOVED, "the long factors changed nothing"
        assert torch.equal(ours(ids[:, :SHORT]).logits, short)
    plain, _ = load_pair(checkpoints("partial_window_mha"))  # default RoPE: causal, no switch
    with torch.no_grad():
        assert max_change(plain(ids).logits[:, :SHORT], plain(ids[:, :SHORT]).logits) <= LOGITS_ATOL


@pytest.mark.parametrize("attn, padded", [("sdpa", False), ("eager", True)])
def test_greedy_generation_across_the_switch(checkpoints: Any, attn: str, padded: bool) -> None:
    ours, ref = load_pair(checkpoints("longrope_partial_mqa"), attn)
    ids = ids_of(10, seed=5)
    settings: dict[str, Any] = dict(
        max_new_tokens=20, min_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    if padded:
        settings["attention_mask"] = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    out_ours, out_ref = ours.generate(ids, **settings), ref.generate(ids, **settings)
    assert out_ours.sequences.shape[1] == 30 > ORIGINAL + 1
    assert torch.equal(out_ours.sequences, out_ref.sequences)
    for a, b in zip(out_ours.logits, out_ref.logits, strict=True):
        assert_logits_close(a, b)


def test_generation_without_the_cache_reset_would_differ(checkpoints: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reset matters: keeping keys cached with the short factors moves the logits after the switch."""
    ours, ref = load_pair(checkpoints("longrope_gqa"))
    base = lmport.modeling.PreTrainedCausalLM.prepare_inputs_for_generation
    monkeypatch.setattr(type(ours), "prepare_inputs_for_generation", base)
    settings: dict[str, Any] = dict(
        max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    ids = ids_of(10, seed=5)
    stale, right = ours.generate(ids, **settings).logits, ref.generate(ids, **settings).logits
    before = ORIGINAL - 10  # steps that never reach past the pretrained length
    assert max(max_change(a, b) for a, b in zip(stale[:before], right[:before])) <= LOGITS_ATOL
    assert max(max_change(a, b) for a, b in zip(stale[before:], right[before:])) > MOVED


def test_bf16_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    folder = save_hf(tmp_path / "bf16", hf_config(**VARIANTS["longrope_partial_mqa"]), dtype=torch.bfloat16)
    ref = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation="sdpa")
    ours = load_lmport(folder, dtype="auto", attn_implementation="sdpa")
    assert_bf16_parity(ours, ref, [batch_of_two(SHORT, seed=6), batch_of_two(LONG, seed=7, padded=True)])


# --- saving -------------------------------------------------------------------------------------


def test_save_round_trip_loads_in_transformers(checkpoints: Any, tmp_path: Path) -> None:
    folder = checkpoints("longrope_partial_mqa")
    ours = load_lmport(folder)
    perturb_parameters(ours)
    ours.save_pretrained(tmp_path / "ours")
    ref = load_clean(transformers.Phi3ForCausalLM, tmp_path / "ours", dtype=torch.float32)
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["original_max_position_embeddings"] == ORIGINAL and saved["partial_rotary_factor"] == 0.75
    assert ref.config.rope_parameters["long_factor"] == ours.config.rope_parameters["long_factor"]
    with torch.no_grad():
        for length in (SHORT, LONG):
            ids = ids_of(length, seed=8)
            assert_logits_close(ours(ids).logits, ref(ids).logits)
    tensors = assert_saved_like_transformers(tmp_path / "ours", ref, tmp_path / "theirs", folder)
    assert tensors["model.layers.0.self_attn.qkv_proj.weight"].shape == (4 * 16 + 2 * 16, 64)
    assert tensors["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)


def test_model_built_from_its_config_saves_for_transformers(tmp_path: Path) -> None:
    raw = json.loads(hf_config(**VARIANTS["longrope_gqa"]).to_json_string())
    config = get_registry().architecture("phi3").config_class.from_dict(raw)
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0).eval()
    model.save_pretrained(tmp_path / "fresh")
    ref = load_clean(transformers.Phi3ForCausalLM, tmp_path / "fresh", dtype=torch.float32)
    with torch.no_grad():
        ids = ids_of(LONG, seed=9)
        assert_logits_close(model(ids).logits, ref(ids).logits)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [2.0] * 8}, "'short_factor'"),
        ({"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [0.0] * 8}, "'long_factor'"),
        ({"type": "longrope", "short_factor": [1.0] * 8}, "'long_factor'"),
        ({"rope_type": "default", "partial_rotary_factor": 0.1}, "partial_rotary_factor"),  # 1.6 dimensions
        ({"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "'su'"),
    ],
)
def test_bad_rope_settings_are_refused(tmp_path: Path, rope: dict[str, Any], message: str) -> None:
    raw = json.loads(hf_config().to_json_string())
    raw.pop("rope_parameters", None)
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(lmport.ConfigError, match=message):
        lmport.AutoConfig.from_pretrained(tmp_path)


def test_plugin_uses_public_api_only() -> None:
    """Every name the plugin imports from lmport is public: no module or name starts with an underscore."""
    imported = []
    for path in sorted((FIXTURE / "lmport_phi3").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmport"):
                imported += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                raise AssertionError(f"{path.name}: private attribute {node.attr}")
    assert imported and not [name for name in imported if any(p.startswith("_") for p in name.split("."))]


def test_conformance_kit(tmp_path: Path) -> None:
    """lmport.testing's checks (entry point, contract, reference) pass for the plugin as installed."""
    import lmport.testing

    # rope_parameters (not the legacy rope_scaling, whose "type" transformers keeps beside "rope_type") and
    # head_dim (a field lmport writes, absent from transformers' Phi3Config): the kit compares configs key by key.
    rope = {"rope_type": "longrope", **{k: v for k, v in longrope(6).items() if k != "type"}}
    variant = {"rope_parameters": rope, "partial_rotary_factor": 0.75, "num_key_value_heads": 1, "head_dim": 16,
               "original_max_position_embeddings": ORIGINAL, "max_position_embeddings": 64}  # fmt: skip
    report = lmport.testing.check_architecture("phi3", {"longrope_partial": variant}, tmp_path, attn=("sdpa",))
    figures = report.cases["phi3-longrope_partial-sdpa"]
    assert figures["logits_max_abs_diff"] <= LOGITS_ATOL and figures["bf16_bit_identical"], figures
