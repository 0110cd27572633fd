"""The conformance kit, ``lmport.testing``, run as a plugin's own tests would run it.

- Llama, GPT-2 and Mistral, a few variants each (tied/untied heads, GQA/MQA/MHA, RoPE
  scaling, windows), through ``conformance_cases`` + ``check_case``: the plugin contract,
  and against transformers fp32 logits/loss/gradients, padding, greedy generation, bf16
  bit for bit (gradients too where the weight map fuses nothing) and the save round trip.
- The TinyMix fixture (pip-installed; transformers has no ``tinymix``): ``check_architecture``
  falls back to the contract checks.
- Without transformers (a process where ``import transformers`` fails): the contract checks
  run alone for every plugin, ``reference=True`` is refused with a typed error, and neither
  ``import lmport`` nor ``import lmport.testing`` imports the kit or transformers.
- The checks have teeth: a perturbed model, an irreversible weight map and an unknown
  ``model_type`` fail them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_intraop_thread, pip_installed

import lmport
from lmport import testing
from lmport.errors import ArgumentError, UnsupportedFeatureError

FIXTURE = Path(__file__).parent / "fixtures" / "tinymix"

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

#: model_type -> variant -> config.json values laid over the plugin's tiny_config.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        "gqa_untied": {},
        "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
        "mqa_llama3_rope": {"num_key_value_heads": 1, "rope_parameters": LLAMA3},
    },
    "gpt2": {
        "tied": {},
        "untied_quick_gelu": {"tie_word_embeddings": False, "activation_function": "quick_gelu"},
    },
    "mistral": {
        "window_4": {"sliding_window": 4},
        "no_window_mqa_yarn": {"sliding_window": None, "num_key_value_heads": 1, "rope_parameters": YARN},
    },
}
TINYMIX_VARIANTS = {"tiny": {}, "wide_ffn_8_heads": {"ffn_size": 192, "n_heads": 8}}

#: Bit-identical bf16 gradients need lmport to run transformers' ops on the same shapes; GPT-2's
#: fused c_attn is one matmul in transformers and three in lmport.
BF16_GRADS = {"llama": True, "mistral": True, "gpt2": False}

CASES = [case for model_type, variants in VARIANTS.items() for case in testing.conformance_cases(model_type, variants)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def tinymix_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The TinyMix fixture package pip-installed into a folder on sys.path (as in test_third_party)."""
    with pip_installed(FIXTURE, tmp_path_factory.mktemp("tinymix"), "lmport_tinymix") as target:
        yield target


# --- first-party plugins, one pytest case per conformance case ---------------------------------


def test_cases_cover_every_variant_and_kernel() -> None:
    ids = [str(c) for c in CASES]
    assert len(ids) == len(set(ids))
    for model_type, variants in VARIANTS.items():
        assert f"{model_type}-plugin" in ids
        for variant in variants:
            assert f"{model_type}-{variant}-contract" in ids
            assert {f"{model_type}-{variant}-eager", f"{model_type}-{variant}-sdpa"} <= set(ids)
    only_contract = testing.conformance_cases("llama", {"a": {}}, reference=False)
    assert [(c.kind, c.variant, c.attn) for c in only_contract] == [("plugin", None, None), ("contract", "a", None)]
    with pytest.raises(ArgumentError):
        testing.conformance_cases("llama", {})


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conformance(case: testing.ConformanceCase, tmp_path: Path) -> None:
    figures = testing.check_case(case, tmp_path, bf16_grads=BF16_GRADS[case.model_type])
    if case.kind == "reference":
        assert figures["logits_max_abs_diff"] <= testing.LOGITS_ATOL
        assert figures["grad_max_rel_diff"] <= testing.GRAD_RTOL
        assert figures["generation_equal"] and figures["bf16_bit_identical"] and figures["save_round_trip"]
    else:
        assert figures["checked"]


# --- a third-party plugin transformers does not know ---------------------------------------------


def test_tinymix_falls_back_to_the_contract(tinymix_site: Path, tmp_path: Path) -> None:
    assert not testing.reference_available("tinymix")
    report = testing.check_architecture("tinymix", TINYMIX_VARIANTS, tmp_path)
    assert report.mode == "contract"
    assert sorted(report.cases) == ["tinymix-plugin", "tinymix-tiny-contract", "tinymix-wide_ffn_8_heads-contract"]
    with pytest.raises(UnsupportedFeatureError, match="no model_type 'tinymix'"):
        testing.check_architecture("tinymix", TINYMIX_VARIANTS, tmp_path, reference=True)


# --- without transformers --------------------------------------------------------------------------

HIDDEN = """
import json, sys
from pathlib import Path

import lmport
assert "lmport.testing" not in sys.modules, "import lmport imported the conformance kit"
import lmport.testing as testing
assert "transformers" not in sys.modules, "the conformance kit imported transformers"

sys.modules["transformers"] = None  # from here on `import transformers` fails, as if it were not installed
from lmport.errors import UnsupportedFeatureError

root, variants = Path(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for model_type, cases in variants.items():
    assert not testing.reference_available(model_type)
    report = testing.check_architecture(model_type, cases, root / model_type)
    out[model_type] = [report.mode, sorted(report.cases)]
try:
    testing.check_architecture("llama", {"a": {}}, root / "refused", reference=True)
except UnsupportedFeatureError as exc:
    out["refused"] = str(exc)
print(json.dumps(out))
"""


def test_contract_mode_without_transformers(tinymix_site: Path, tmp_path: Path) -> None:
    variants = {**{m: dict(list(v.items())[:1]) for m, v in VARIANTS.items()}, "tinymix": TINYMIX_VARIANTS}
    path = os.pathsep.join([str(tinymix_site), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # tiny matmuls: one thread is fastest
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN, str(tmp_path), json.dumps(variants)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for model_type, cases in variants.items():
        mode, ids = out[model_type]
        assert mode == "contract"
        assert ids == sorted([f"{model_type}-plugin", *(f"{model_type}-{v}-contract" for v in cases)])
    assert "transformers" in out["refused"] and "not installed" in out["refused"]


# --- the checks have teeth -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = testing.architecture_of("llama").tiny_config
    return testing.save_reference_checkpoint("llama", tiny, tmp_path_factory.mktemp("llama"))


def test_a_model_that_computes_differently_fails(llama_checkpoint: Path) -> None:
    ours, ref = testing.load_pair(llama_checkpoint, "sdpa")
    testing.check_fp32(ours, ref)
    with torch.no_grad():
        ours.model.layers[1].post_attention_layernorm.weight[0] += 1e-3  # one weight of one norm, barely moved
    with pytest.raises(testing.ConformanceError, match="logits differ"):
        testing.check_fp32(ours, ref)
    with pytest.raises(testing.ConformanceError, match="greedy generation differs"):
        with torch.no_grad():
            ours.lm_head.weight.mul_(-1.0)
        testing.check_generation(ours, ref)


def test_an_irreversible_weight_map_fails() -> None:
    arch = testing.architecture_of("llama")
    config = arch.config_class.from_dict({**arch.tiny_config, "model_type": "llama"})
    testing.check_weight_map(config)  # the plugin's own map is reversible
    colliding = lmport.WeightMap(
        rename=(
            lmport.Rename("model.layers.*.ffn.weight", "model.layers.*.mlp.up_proj.weight"),
            lmport.Rename("model.layers.*.ffn.weight", "model.layers.*.mlp.down_proj.weight"),
        )
    )
    with pytest.raises(testing.ConformanceError, match="loses"):
        testing.check_weight_map(config, weight_map=colliding)
    with pytest.raises(testing.ConformanceError, match="ignores on load"):
        testing.check_weight_map(config, weight_map=lmport.WeightMap(ignore=("model.norm.weight",)))


def test_an_unknown_model_type_has_no_entry_point() -> None:
    with pytest.raises(testing.ConformanceError, match="no installed distribution"):
        testing.check_entry_point("no-such-model")
    assert isinstance(testing.check_entry_point("llama"), lmport.Architecture)


def test_one_call_against_transformers(tmp_path: Path) -> None:
    report = testing.check_architecture("mistral", {"window_4": {"sliding_window": 4}}, tmp_path, attn=("sdpa",))
    assert report.mode == "reference"
    assert sorted(report.cases) == ["mistral-plugin", "mistral-window_4-contract", "mistral-window_4-sdpa"]
    assert report.worst("logits_max_abs_diff") <= testing.LOGITS_ATOL
    assert report.cases["mistral-window_4-sdpa"]["bf16_bit_identical"] is True
