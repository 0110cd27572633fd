"""config.json is validated before anything is allocated: every value an architecture uses is
type-, range- and finiteness-checked at parse time, the model it describes is weighed against
the checkpoint's tensors on the meta device, and the JSON itself is bounded.

Every refused case asserts the exact error class, a message naming ``config.json`` and the
key, that it failed fast (well under a second or two), and that the checkpoint folder is
byte-for-byte unchanged. The cases that used to allocate gigabytes (or build for minutes)
also run in a subprocess that measures its peak RSS. Configs saved by transformers for every
architecture, RoPE variant and legacy spelling still parse, unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import transformers
from conftest import save_hf, save_hf_llama, tiny_configs, tree_digest
from test_llama_parity import LEGACY_FORM, NEW_FORM, write_legacy_rope

import lmport
from lmport import errors
from lmport.config import MAX_HEAD_DIM, MAX_LAYERS, Integer, PretrainedConfig, Probability, Real, Size

FAST_S = 1.5  # a refused load must fail within this (the good tiny load takes ~0.1 s warm)

Edit = dict[str, Any] | Callable[[dict[str, Any]], Any]


# --- checkpoints and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny transformers-saved checkpoints, one per architecture; tests break copies."""
    root = tmp_path_factory.mktemp("config_validation")
    configs = tiny_configs()
    return {
        "llama": save_hf_llama(root / "llama", seed=1),
        "gpt2": save_hf(root / "gpt2", configs["gpt2"](), seed=2, std=None),
        "mistral": save_hf(root / "mistral", configs["mistral"](), seed=3, std=None),
    }


def broken(bases: dict[str, Path], tmp_path: Path, arch: str, edit: Edit | str) -> Path:
    """A copy of the ``arch`` checkpoint whose config.json is edited (a dict of keys to set, a function
    mutating the decoded dict, or the whole new text)."""
    folder = tmp_path / arch
    shutil.copytree(bases[arch], folder)
    path = folder / "config.json"
    if isinstance(edit, str):
        path.write_text(edit)
        return folder
    raw = json.loads(path.read_text())
    if callable(edit):
        edit(raw)
    else:
        raw.update(edit)
    path.write_text(json.dumps(raw, indent=2))  # NaN and Infinity are written as JSON's extensions
    return folder


def refused(folder: Path, error: type[Exception], *fragments: str, **kwargs: Any) -> str:
    """Load ``folder``: exactly ``error``, fast, naming config.json and every fragment, nothing written."""
    before = tree_digest(folder)
    start = time.perf_counter()
    with pytest.raises(lmport.LmportError) as info:
        lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {message}"
    assert str(folder / "config.json") in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert elapsed < FAST_S, f"took {elapsed:.2f} s to refuse"
    assert tree_digest(folder) == before, "the checkpoint folder changed during a failed load"
    return message


@pytest.fixture(scope="module", autouse=True)
def warm(bases: dict[str, Path]) -> None:
    """Import everything a load needs once, so the timings measure the refusal only."""
    for folder in bases.values():
        lmport.AutoModelForCausalLM.from_pretrained(folder)


# --- findings 4-6: values checked only when the model was built ------------------------------------

NAN, INF = float("nan"), float("inf")


def rope(params: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Set ``rope_parameters`` (the current spelling)."""
    return lambda raw: raw.update(rope_parameters=params)


def legacy_rope(rope_scaling: Any, **more: Any) -> Callable[[dict[str, Any]], None]:
    """The pre-``rope_parameters`` spelling: ``rope_scaling`` (+ ``rope_theta``)."""

    def edit(raw: dict[str, Any]) -> None:
        raw.pop("rope_parameters", None)
        raw["rope_scaling"] = rope_scaling
        raw.update(more)

    return edit


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}

#: id -> (architecture, edit of config.json, the key the message must name, more fragments)
CONFIG_CASES: dict[str, tuple[str, Edit, str, tuple[str, ...]]] = {
    # token ids
    "pad_token_id_is_vocab_size": ("llama", {"pad_token_id": 128}, "'pad_token_id'", ("vocab_size (128)",)),
    "pad_token_id_far_past_vocab": ("mistral", {"pad_token_id": 10**9}, "'pad_token_id'", ()),
    "pad_token_id_negative_beyond_vocab": ("llama", {"pad_token_id": -200}, "'pad_token_id'", ()),
    "eos_list_with_negative_id": ("llama", {"eos_token_id": [2, -1]}, "'eos_token_id'", ()),
    "bos_token_id_float": ("gpt2", {"bos_token_id": 1.5}, "'bos_token_id'", ()),
    # sizes
    "negative_intermediate_size": ("llama", {"intermediate_size": -96}, "'intermediate_size'", ("positive",)),
    "negative_n_inner": ("gpt2", {"n_inner": -1}, "'n_inner'", ("positive",)),
    "zero_head_dim": ("llama", {"head_dim": 0}, "'head_dim'", ()),
    "zero_n_head": ("gpt2", {"n_head": 0}, "'n_head'", ()),
    "zero_num_key_value_heads": ("mistral", {"num_key_value_heads": 0}, "'num_key_value_heads'", ()),
    "kv_heads_not_dividing_heads": ("llama", {"num_key_value_heads": 3}, "num_key_value_heads (3)", ()),
    "odd_head_dim": ("llama", {"head_dim": 15}, "head_dim (15)", ("even",)),
    "zero_sliding_window": ("mistral", {"sliding_window": 0}, "'sliding_window'", ()),
    "vocab_size_2_63": ("llama", {"vocab_size": 2**63}, "'vocab_size'", ("16,777,216",)),
    "head_dim_1e9": ("llama", {"head_dim": 10**9}, "'head_dim'", (f"{MAX_HEAD_DIM:,}",)),
    "num_hidden_layers_1e6": ("llama", {"num_hidden_layers": 10**6}, "'num_hidden_layers'", (f"{MAX_LAYERS:,}",)),
    "n_layer_1e6": ("gpt2", {"n_layer": 10**6}, "'n_layer'", ()),
    "n_positions_2_40": ("gpt2", {"n_positions": 2**40}, "'n_positions'", ()),
    "max_position_embeddings_zero": ("llama", {"max_position_embeddings": 0}, "'max_position_embeddings'", ()),
    # activations, dropouts, epsilons
    "unknown_hidden_act": ("llama", {"hidden_act": "swishy"}, "'hidden_act'", ("silu", "'swishy'")),
    "unknown_activation_function": ("gpt2", {"activation_function": "gelu_99"}, "'activation_function'", ()),
    "resid_pdrop_2": ("gpt2", {"resid_pdrop": 2.0}, "'resid_pdrop'", ("< 1",)),
    "attn_pdrop_negative": ("gpt2", {"attn_pdrop": -0.1}, "'attn_pdrop'", ()),
    "attention_dropout_1": ("llama", {"attention_dropout": 1.0}, "'attention_dropout'", ()),
    "rms_norm_eps_nan": ("llama", {"rms_norm_eps": NAN}, "'rms_norm_eps'", ("finite",)),
    "rms_norm_eps_inf": ("mistral", {"rms_norm_eps": INF}, "'rms_norm_eps'", ("finite",)),
    "rms_norm_eps_zero": ("llama", {"rms_norm_eps": 0.0}, "'rms_norm_eps'", ()),
    "layer_norm_epsilon_nan": ("gpt2", {"layer_norm_epsilon": NAN}, "'layer_norm_epsilon'", ()),
    "layer_norm_epsilon_minus_inf": ("gpt2", {"layer_norm_epsilon": -INF}, "'layer_norm_epsilon'", ()),
    "initializer_range_nan": ("llama", {"initializer_range": NAN}, "'initializer_range'", ()),
    # dtype and kernel
    "dtype_float4": ("llama", {"dtype": "float4_e2m1fn_x2"}, "'dtype'", ("float32",)),
    "dtype_float8": ("gpt2", {"dtype": "float8_e4m3fn"}, "'dtype'", ()),
    "dtype_int8": ("llama", {"dtype": "int8"}, "'dtype'", ()),
    "torch_dtype_float8": ("llama", lambda raw: raw.update(dtype=None, torch_dtype="float8_e5m2"), "'torch_dtype'", ()),
    "dtype_list": ("mistral", {"dtype": ["float32"]}, "'dtype'", ()),
    "attn_implementation_list": ("llama", {"attn_implementation": ["sdpa"]}, "'attn_implementation'", ()),
    "attn_implementation_number": ("gpt2", {"attn_implementation": 3}, "'attn_implementation'", ()),
    # RoPE
    "rope_scaling_string": ("llama", legacy_rope("junk"), "'rope_scaling'", ()),
    "rope_scaling_list": ("llama", legacy_rope([["type", "linear"], ["factor", 2.0]]), "'rope_scaling'", ()),
    "rope_scaling_number": ("mistral", legacy_rope(7), "'rope_scaling'", ()),
    "rope_scaling_unknown_type": ("llama", legacy_rope({"type": "su", "factor": 2.0}), "rope_scaling", ("'su'",)),
    "rope_scaling_type_is_a_list": ("llama", legacy_rope({"rope_type": ["linear"], "factor": 2.0}), "rope_scaling", ()),
    "rope_scaling_without_factor": ("llama", legacy_rope({"type": "linear"}), "rope_scaling['factor']", ()),
    "rope_scaling_factor_string": ("llama", legacy_rope({"type": "linear", "factor": "2"}), "['factor']", ()),
    "rope_scaling_truncate_string": ("llama", legacy_rope({**YARN, "truncate": "no"}), "rope_scaling['truncate']", ()),
    "rope_theta_string": ("llama", legacy_rope(None, rope_theta="big"), "'rope_theta'", ()),
    "rope_theta_nan": ("llama", rope({"rope_type": "default", "rope_theta": NAN}), "rope_parameters['rope_theta']", ()),
    "rope_theta_negative": ("mistral", rope({"rope_type": "default", "rope_theta": -1e4}), "['rope_theta']", ()),
    "rope_factor_nan": ("llama", rope({"rope_type": "linear", "factor": NAN}), "rope_parameters['factor']", ()),
    "rope_factor_negative": ("llama", rope({**YARN, "factor": -4.0}), "rope_parameters['factor']", ()),
    "rope_factor_inf": ("llama", rope({"rope_type": "dynamic", "factor": INF}), "rope_parameters['factor']", ()),
    "rope_zero_low_freq_factor": ("llama", rope({**LLAMA3, "low_freq_factor": 0.0}), "['low_freq_factor']", ()),
    "rope_nan_high_freq_factor": ("llama", rope({**LLAMA3, "high_freq_factor": NAN}), "['high_freq_factor']", ()),
    "rope_high_below_low": ("llama", rope({**LLAMA3, "high_freq_factor": 0.5}), "['high_freq_factor']", ()),
    "rope_zero_original_max": ("llama", rope({**YARN, "original_max_position_embeddings": 0}),
                               "['original_max_position_embeddings']", ()),  # fmt: skip
    "rope_llama3_zero_original_max": ("llama", legacy_rope({**LLAMA3, "original_max_position_embeddings": 0}),
                                      "rope_scaling['original_max_position_embeddings']", ()),  # fmt: skip
    "rope_negative_attention_factor": ("llama", rope({**YARN, "attention_factor": -1.0}), "['attention_factor']", ()),
    "rope_negative_beta_fast": ("llama", rope({**YARN, "beta_fast": -32}), "['beta_fast']", ()),
    "rope_partial_rotary_factor": ("llama", rope({**YARN, "partial_rotary_factor": 0.5}), "partial_rotary", ()),
    "rope_parameters_string": ("mistral", {"rope_parameters": "default"}, "'rope_parameters'", ()),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_value_is_refused_at_parse_time(bases: dict[str, Path], tmp_path: Path, case: str) -> None:
    arch, edit, key, fragments = CONFIG_CASES[case]
    refused(broken(bases, tmp_path, arch, edit), errors.ConfigError, key, *fragments)


def test_the_same_values_refused_by_autoconfig(bases: dict[str, Path], tmp_path: Path) -> None:
    folder = broken(bases, tmp_path, "gpt2", {"resid_pdrop": 2.0})
    with pytest.raises(errors.ConfigError, match="'resid_pdrop'"):
        lmport.AutoConfig.from_pretrained(folder)


def test_kernel_named_by_config_json_names_it(bases: dict[str, Path], tmp_path: Path) -> None:
    """Finding 8: an unknown kernel chosen by config.json says so (an argument's own error does not)."""
    folder = broken(bases, tmp_path, "llama", {"attn_implementation": "no_such_kernel"})
    message = refused(folder, errors.AttentionKernelError, "'attn_implementation'", "'no_such_kernel'", "sdpa")
    assert "config.json" in message
    with pytest.raises(errors.AttentionKernelError) as info:
        lmport.AutoModelForCausalLM.from_pretrained(bases["llama"], attn_implementation="no_such_kernel")
    assert "config.json" not in str(info.value)


def test_int8_dtype_in_config_json_names_it(bases: dict[str, Path], tmp_path: Path) -> None:
    """Finding 8: ``"dtype": "int8"`` was an ArgumentError not naming config.json."""
    message = refused(broken(bases, tmp_path, "llama", {"dtype": "int8"}), errors.ConfigError, "'dtype'", "'int8'")
    assert "bfloat16" in message


def test_dtype_spellings_transformers_writes_are_accepted(bases: dict[str, Path], tmp_path: Path) -> None:
    for value in ("float32", "torch.float32", "bfloat16", "float16", "float64", "auto", None):
        folder = broken(bases, tmp_path / str(value), "llama", {"dtype": value})
        lmport.AutoConfig.from_pretrained(folder)


# --- the JSON itself --------------------------------------------------------------------------------


def test_nesting_100000_deep(bases: dict[str, Path], tmp_path: Path) -> None:
    text = '{"model_type": "llama", "vocab_size": 128, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(broken(bases, tmp_path, "llama", text), errors.ConfigError, "nested more than 64")


def test_nesting_limit_is_exact(bases: dict[str, Path], tmp_path: Path) -> None:
    """64 levels (the outer object included) parse; 65 do not, whatever mix of arrays and objects."""

    def nested(levels: int) -> str:
        inner = "".join("[" if i % 2 else '{"k": ' for i in range(levels - 1))
        closing = "".join("]" if i % 2 else "}" for i in reversed(range(levels - 1)))
        return '{"model_type": "llama", "vocab_size": 128, "x": ' + inner + "1" + closing + "}"

    folder = broken(bases, tmp_path / "ok", "llama", nested(64))
    assert "x" in lmport.AutoConfig.from_pretrained(folder).extra
    refused(broken(bases, tmp_path / "deep", "llama", nested(65)), errors.ConfigError, "nested more than 64")


def test_config_json_larger_than_16_mib(bases: dict[str, Path], tmp_path: Path) -> None:
    text = '{"model_type": "llama", "pad": "' + "x" * (16 << 20) + '"}'
    refused(broken(bases, tmp_path, "llama", text), errors.ConfigError, "16 MiB")


def test_deep_nesting_inside_strings_is_not_nesting(bases: dict[str, Path], tmp_path: Path) -> None:
    folder = broken(bases, tmp_path, "llama", {"note": "[" * 1000 + '"{' * 10})
    assert lmport.AutoConfig.from_pretrained(folder).extra["note"].startswith("[[[")


def test_5000_digit_integer(bases: dict[str, Path], tmp_path: Path) -> None:
    text = (bases["llama"] / "config.json").read_text().replace('"vocab_size": 128', '"vocab_size": 1' + "0" * 5000)
    assert "0" * 5000 in text
    refused(broken(bases, tmp_path, "llama", text), errors.ConfigError, "'vocab_size'", "5001 digits")


def test_5000_digit_integer_in_an_unused_key(bases: dict[str, Path], tmp_path: Path) -> None:
    text = (bases["gpt2"] / "config.json").read_text().replace("{", '{\n  "my_seed": -' + "9" * 5000 + ",", 1)
    refused(broken(bases, tmp_path, "gpt2", text), errors.ConfigError, "'my_seed'", "line 2")


def test_huge_float_literal_is_infinite_and_refused_where_used(bases: dict[str, Path], tmp_path: Path) -> None:
    text = (bases["llama"] / "config.json").read_text()
    text = text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e99999')
    assert "1e99999" in text
    refused(broken(bases, tmp_path, "llama", text), errors.ConfigError, "'rms_norm_eps'", "inf")


# --- the model's size against the checkpoint's -------------------------------------------------------

#: Llama-2-70B's shape with 120 layers instead of 80: about 100B parameters.
HUNDRED_B = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 120,
             "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": None}  # fmt: skip


@pytest.mark.parametrize("ignore", [True, False], ids=["ignore_mismatched_sizes", "strict"])
def test_100b_config_over_a_tiny_checkpoint(bases: dict[str, Path], tmp_path: Path, ignore: bool) -> None:
    folder = broken(bases, tmp_path, "llama", HUNDRED_B)
    message = refused(folder, errors.ModelSizeError, "model.embed_tokens.weight", "GiB", ignore_mismatched_sizes=ignore)
    assert isinstance(errors.ModelSizeError("x"), errors.ShapeMismatchError)  # what a plain mismatch raised
    parameters = int(message.split("a model of ")[1].split(" parameters")[0].replace(",", ""))
    assert 95e9 < parameters < 110e9


def test_huge_vocab_with_ignore_mismatched_sizes(bases: dict[str, Path], tmp_path: Path) -> None:
    """Within the bounds, but 2**24 x 64 embeddings twice over a 128 x 64 checkpoint."""
    folder = broken(bases, tmp_path, "gpt2", {"vocab_size": 1 << 24, "tie_word_embeddings": False})
    refused(folder, errors.ModelSizeError, "lm_head.weight", ignore_mismatched_sizes=True)


def test_size_check_blames_overrides(bases: dict[str, Path]) -> None:
    with pytest.raises(errors.ModelSizeError, match=r"with overrides \['intermediate_size'\]"):
        lmport.AutoModelForCausalLM.from_pretrained(
            bases["llama"], intermediate_size=1 << 19, ignore_mismatched_sizes=True
        )


def test_small_honest_resize_still_loads(bases: dict[str, Path], tmp_path: Path) -> None:
    """The control: a grown vocabulary with ignore_mismatched_sizes is re-initialised, not refused."""
    folder = broken(bases, tmp_path, "llama", {"vocab_size": 256})
    model, info = lmport.AutoModelForCausalLM.from_pretrained(
        folder, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert model.get_input_embeddings().weight.shape == (256, 64)
    assert "model.embed_tokens.weight" in info["missing_keys"]


MEMORY_SCRIPT = """
import json, resource, shutil, sys, time
from pathlib import Path
import lmport

base, work = Path(sys.argv[1]), Path(sys.argv[2])
cases = json.loads(Path(sys.argv[3]).read_text())
lmport.AutoModelForCausalLM.from_pretrained(base)  # warm: imports and a first load
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MiB
results = {}
for name, (edit, text, kwargs) in cases.items():
    folder = work / name
    shutil.copytree(base, folder)
    if text is not None:
        (folder / "config.json").write_text(text)
    else:
        raw = json.loads((folder / "config.json").read_text())
        raw.update(edit)
        (folder / "config.json").write_text(json.dumps(raw))
    before, start = peak(), time.perf_counter()
    try:
        lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        outcome = "loaded"
    except lmport.LmportError as exc:
        outcome = type(exc).__name__
    results[name] = [outcome, peak() - before, time.perf_counter() - start]
print(json.dumps(results))
"""


def test_memory_cases_cost_no_memory(bases: dict[str, Path], tmp_path: Path) -> None:
    """Finding 6, measured: each used to allocate gigabytes (or build for a minute); now each is refused
    with a small, bounded peak-RSS growth, in a fresh process."""
    cases = {
        "head_dim_1e9": ({"head_dim": 10**9}, None, {}),
        "num_hidden_layers_1e6": ({"num_hidden_layers": 10**6}, None, {}),
        "vocab_size_2_63": ({"vocab_size": 2**63}, None, {}),
        "100b_ignore_mismatched_sizes": (HUNDRED_B, None, {"ignore_mismatched_sizes": True}),
        "nesting_100000": ({}, '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", {}),
        "integer_5000_digits": ({}, '{"model_type": "llama", "vocab_size": ' + "7" * 5000 + "}", {}),
    }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    process = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(bases["llama"]), str(tmp_path), str(tmp_path / "cases.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    results = json.loads(process.stdout.strip().splitlines()[-1])
    expected = {name: "ModelSizeError" if "100b" in name else "ConfigError" for name in cases}
    assert {name: r[0] for name, r in results.items()} == expected
    for name, (_, grown_mib, seconds) in results.items():
        assert grown_mib < 64, f"{name}: peak RSS grew by {grown_mib} MiB"
        assert seconds < FAST_S, f"{name}: took {seconds:.2f} s"


# --- overrides and direct construction ----------------------------------------------------------------


def test_override_out_of_range_is_an_argument_error(bases: dict[str, Path]) -> None:
    with pytest.raises(errors.ArgumentError, match="'rms_norm_eps'"):
        lmport.AutoModelForCausalLM.from_pretrained(bases["llama"], rms_norm_eps=float("nan"))
    with pytest.raises(errors.ArgumentError, match="'hidden_act'"):
        lmport.AutoModelForCausalLM.from_pretrained(bases["mistral"], hidden_act="nope")


def test_direct_construction_is_checked_too() -> None:
    from lmport_gpt2 import GPT2Config
    from lmport_llama import LlamaConfig

    with pytest.raises(ValueError, match="'num_hidden_layers'"):
        LlamaConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match=r"'n_embd' \(hidden_size\)"):
        GPT2Config(hidden_size=-64)


def test_token_ids_outside_the_vocabulary_warn_as_transformers_does(
    bases: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """transformers' GPT-2 keeps bos/eos 50256 when the vocabulary is shrunk; they are never indexed."""
    from lmport_gpt2 import GPT2Config

    raw = json.loads((bases["gpt2"] / "config.json").read_text())
    assert raw["vocab_size"] == 128 and raw["eos_token_id"] == 50256
    with caplog.at_level(logging.WARNING, logger="lmport"):
        GPT2Config.from_dict({**raw, "bos_token_id": 50255})
    assert "'bos_token_id'" in caplog.text and "vocab_size 128" in caplog.text


# --- plugin authors: declarative checks plus a validate() hook ----------------------------------------


@dataclass
class BaseToyConfig(PretrainedConfig):
    model_type: ClassVar[str] = "toy"
    field_checks = {"num_experts": Size(64), "router_jitter": Probability, "temperature": Real(0.0, min_open=True)}

    vocab_size: int = 128
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    router_jitter: float = 0.0
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most num_experts ({self.num_experts})")


@dataclass
class DerivedToyConfig(BaseToyConfig):
    """Adds a check, replaces one and removes another, without touching validate()."""

    field_checks = {"top_k": Integer(1, 8), "num_experts": Size(4096), "temperature": None}


@pytest.mark.parametrize(
    ("cls", "raw", "fragment"),
    [
        (BaseToyConfig, {"num_experts": 65}, "'num_experts' must be a positive integer of at most 64"),
        (BaseToyConfig, {"router_jitter": 1.5}, "'router_jitter' must be a finite number >= 0 and < 1"),
        (BaseToyConfig, {"temperature": 0}, "'temperature'"),
        (BaseToyConfig, {"top_k": 9}, "top_k (9) must be at most num_experts (8)"),
        (BaseToyConfig, {"vocab_size": 0}, "'vocab_size'"),  # the base class's checks still run
        (DerivedToyConfig, {"top_k": 0}, "'top_k'"),
        (DerivedToyConfig, {"router_jitter": -1.0}, "'router_jitter'"),  # inherited
        (DerivedToyConfig, {"num_experts": 1, "top_k": 2}, "top_k (2)"),  # field checks pass, validate() runs
    ],
)
def test_plugin_config_checks(cls: type[PretrainedConfig], raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        cls.from_dict(raw)
    assert str(info.value).startswith("config.json: ") and fragment in str(info.value), str(info.value)


def test_plugin_config_checks_merge_over_bases() -> None:
    DerivedToyConfig.from_dict({"num_experts": 1000, "top_k": 2, "temperature": -1.0})  # replaced and removed
    assert set(DerivedToyConfig.all_field_checks()) >= {"vocab_size", "top_k", "router_jitter"}
    assert "temperature" not in DerivedToyConfig.all_field_checks()


# --- what transformers saves still parses, unchanged ------------------------------------------------------


def _parses_unchanged(folder: Path) -> Any:
    raw = json.loads((folder / "config.json").read_text())
    config = lmport.AutoConfig.from_pretrained(folder)
    ours = config.to_dict()
    changed = {k: (v, ours.get(k)) for k, v in raw.items() if k != "architectures" and ours.get(k) != v}
    assert not changed, changed
    return config


REAL_SHAPES: dict[str, Callable[[], Any]] = {
    "llama_defaults": lambda: transformers.LlamaConfig(),
    "gpt2_defaults": lambda: transformers.GPT2Config(),
    "mistral_defaults": lambda: transformers.MistralConfig(),
    "llama_3_1_8b": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    ),
    "llama_3_1_405b": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, max_position_embeddings=131072,
    ),
    "mistral_nemo_head_dim": lambda: transformers.MistralConfig(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "gpt2_xl": lambda: transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REAL_SHAPES))
def test_transformers_configs_of_released_shapes_parse(tmp_path: Path, case: str) -> None:
    REAL_SHAPES[case]().save_pretrained(tmp_path)
    _parses_unchanged(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_tiny_transformers_configs_parse(bases: dict[str, Path], arch: str) -> None:
    _parses_unchanged(bases[arch])


@pytest.mark.parametrize("case", list(NEW_FORM))
def test_llama_parity_rope_variants_parse(tmp_path: Path, case: str) -> None:
    from conftest import TINY_LLAMA

    overrides, _ = NEW_FORM[case]
    transformers.LlamaConfig(**{**TINY_LLAMA, **overrides}).save_pretrained(tmp_path)
    config = _parses_unchanged(tmp_path)
    assert config.rope_parameters["rope_type"] == overrides.get("rope_parameters", {}).get("rope_type", "default")


@pytest.mark.parametrize("case", list(LEGACY_FORM))
def test_llama_parity_legacy_rope_variants_parse(tmp_path: Path, case: str) -> None:
    from conftest import TINY_LLAMA

    overrides, rope_scaling, rope_theta = LEGACY_FORM[case]
    transformers.LlamaConfig(**{**TINY_LLAMA, **overrides}).save_pretrained(tmp_path)
    write_legacy_rope(tmp_path, rope_scaling, rope_theta)
    config = lmport.AutoConfig.from_pretrained(tmp_path)
    reference = transformers.AutoConfig.from_pretrained(tmp_path)
    for key, value in reference.rope_parameters.items():
        if key != "type":  # transformers keeps the legacy spelling beside rope_type
            assert config.rope_parameters[key] == value, key


def test_tinymix_fixture_parses() -> None:
    """The third-party fixture package's config (docs/plugins.md's shape) still validates as before."""
    # Loaded under a private name: test_third_party checks that lmport_tinymix is imported lazily.
    path = Path(__file__).parent / "fixtures" / "tinymix" / "lmport_tinymix" / "config.py"
    spec = importlib.util.spec_from_file_location("_tinymix_config_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and type hints resolve annotations through it
    try:
        spec.loader.exec_module(module)
        config = module.TinyMixConfig.from_dict({"d_model": 64, "n_blocks": 2, "n_heads": 4, "vocab_size": 100})
        assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
        with pytest.raises(errors.ConfigError, match="d_model"):
            module.TinyMixConfig.from_dict({"d_model": 64, "n_heads": 5})
        with pytest.raises(errors.ConfigError, match=r"'n_blocks' \(num_hidden_layers\)"):
            module.TinyMixConfig.from_dict({"n_blocks": 10**6})
    finally:
        del sys.modules[spec.name]


def test_negative_pad_token_id_loads_as_transformers_does(tmp_path: Path) -> None:
    """Some hub configs carry ``pad_token_id: -1``; transformers' embedding then pads its last row, and so does lmport's."""
    import torch

    folder = save_hf_llama(tmp_path / "neg", pad_token_id=-1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = lmport.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert ours.model.embed_tokens.padding_idx == ref.model.embed_tokens.padding_idx == 127
    ids = torch.tensor([[1, 5, 127, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "pad_token_id": -129}))  # beyond the embedding
    with pytest.raises(errors.ConfigError, match="pad_token_id"):
        lmport.AutoConfig.from_pretrained(folder)
