"""Defaults live in each architecture's config, and equal transformers' own.

The core's configs (``PretrainedConfig``, ``RopeDecoderConfig``) carry no architecture's sizes: a
``config.json`` that omits a key must read as transformers reads it, so each first-party plugin's
config class declares transformers' defaults for its architecture.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

import lmport
from lmport.errors import ArgumentError, ConfigError
from lmport.modeling import RMSNorm, RopeDecoderConfig

from conftest import TINY_GPT2, TINY_LLAMA, WINDOW

transformers = pytest.importorskip("transformers")

# Values unlike transformers' defaults, so that a key dropped from config.json shows which default is read.
ROPE_OFF_DEFAULT = dict(
    bos_token_id=5,
    eos_token_id=6,
    hidden_act="gelu",
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_dropout=0.1,
    initializer_range=0.01,
    use_cache=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
)
TINY = {
    "llama": lambda: transformers.LlamaConfig(
        **TINY_LLAMA, **ROPE_OFF_DEFAULT, head_dim=32, pretraining_tp=2, attention_bias=True, mlp_bias=True
    ),
    "mistral": lambda: transformers.MistralConfig(**TINY_LLAMA, **ROPE_OFF_DEFAULT, head_dim=32, sliding_window=WINDOW),
    "gpt2": lambda: transformers.GPT2Config(
        **TINY_GPT2,
        bos_token_id=5,
        eos_token_id=6,
        tie_word_embeddings=False,
        n_inner=32,
        activation_function="relu",
        layer_norm_epsilon=1e-6,
        initializer_range=0.01,
        scale_attn_weights=False,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
        use_cache=False,
    ),
}

FITS_DEFAULT: dict[tuple[str, str], dict[str, Any]] = {
    ("mistral", "num_key_value_heads"): {"num_attention_heads": 16},  # 8 key/value heads
    ("gpt2", "n_head"): {"n_embd": 96},  # 12 heads
}


def _lmport_class(model_type: str) -> type[lmport.PretrainedConfig]:
    from lmport_gpt2.config import GPT2Config
    from lmport_llama.config import LlamaConfig
    from lmport_mistral.config import MistralConfig

    return {"llama": LlamaConfig, "mistral": MistralConfig, "gpt2": GPT2Config}[model_type]


def _full_tiny(model_type: str) -> dict[str, Any]:
    return {k: v for k, v in TINY[model_type]().to_dict().items() if k != "transformers_version"}


def _json_keys(cls: type[lmport.PretrainedConfig]) -> list[str]:
    """The config.json keys of ``cls``'s defaulted fields."""
    return sorted(
        cls.json_names.get(f.name, f.name)
        for f in dataclasses.fields(cls)
        if f.name != "extra" and f.name not in cls.required_fields()
    )


def _both(folder: Path, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    ours = lmport.AutoConfig.from_pretrained(folder).to_dict()
    theirs = transformers.AutoConfig.from_pretrained(folder).to_dict()
    return ours, theirs


def _compare(ours: dict[str, Any], theirs: dict[str, Any], keys: list[str]) -> None:
    for key in keys:
        if key == "dtype" and theirs.get(key) is None:
            assert ours.get(key) is None
            continue
        assert ours[key] == theirs[key], f"{key}: lmport {ours[key]!r}, transformers {theirs[key]!r}"


CASES = [
    (model_type, key)
    for model_type in TINY
    for key in _json_keys(_lmport_class(model_type))
    if key in _full_tiny(model_type) or key == "rope_parameters"
]


@pytest.mark.parametrize(("model_type", "key"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_missing_key_reads_as_transformers(tmp_path: Path, model_type: str, key: str) -> None:
    # where the dropped key's default would not fit the tiny sizes, the sizes it constrains are widened
    raw = {**_full_tiny(model_type), **FITS_DEFAULT.get((model_type, key), {})}
    raw.pop(key, None)
    if key == "rope_parameters":
        raw.pop("rope_theta", None)
    ours, theirs = _both(tmp_path, raw)
    cls = _lmport_class(model_type)
    fields = {cls.json_names.get(f.name, f.name) for f in dataclasses.fields(cls)}
    _compare(ours, theirs, sorted(fields & set(theirs)))


@pytest.mark.parametrize("model_type", list(TINY))
def test_empty_config_reads_as_transformers(tmp_path: Path, model_type: str) -> None:
    """Only ``model_type``: every field takes its default, and each equals transformers'."""
    ours, theirs = _both(tmp_path, {"model_type": model_type})
    keys = [k for k in _json_keys(_lmport_class(model_type)) if k in theirs]
    assert {"vocab_size", "num_attention_heads" if model_type != "gpt2" else "n_head"} <= set(keys)
    _compare(ours, theirs, keys)


def test_core_configs_have_no_architecture_defaults() -> None:
    assert {"vocab_size", "hidden_size", "num_hidden_layers"} <= lmport.PretrainedConfig.required_fields()
    assert {
        "intermediate_size",
        "num_attention_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
    } <= RopeDecoderConfig.required_fields()
    with pytest.raises(ConfigError, match="'hidden_size'.*required"):
        lmport.PretrainedConfig.from_dict({"vocab_size": 8, "num_hidden_layers": 1})
    with pytest.raises(ConfigError, match="'intermediate_size'.*required"):
        RopeDecoderConfig.from_dict(
            {
                "vocab_size": 8,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "hidden_act": "silu",
                "max_position_embeddings": 16,
                "rms_norm_eps": 1e-6,
            }
        )


def test_core_building_blocks_have_no_architecture_defaults() -> None:
    """No RoPE base and no norm epsilon in the core: a config.json without rope_theta needs the class's default."""
    assert RopeDecoderConfig.default_theta is None
    assert inspect.signature(RMSNorm).parameters["eps"].default is inspect.Parameter.empty
    raw = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 16,
        "rms_norm_eps": 1e-6,
    }
    with pytest.raises(ConfigError, match="'rope_theta' required"):
        RopeDecoderConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="'rope_theta' required"):
        RopeDecoderConfig.from_dict({**raw, "rope_parameters": {"rope_type": "default"}})
    given = RopeDecoderConfig.from_dict({**raw, "rope_theta": 500.0})
    assert given.rope_parameters == {"rope_theta": 500.0, "rope_type": "default"}
    assert _lmport_class("llama").default_theta == _lmport_class("mistral").default_theta == 10_000.0


MISTRAL_WITH_LLAMA_KEYS = {"model_type": "mistral", "attention_bias": True, "pretraining_tp": 0, "mlp_bias": "no"}


def test_mistral_config_derives_from_llama_config(tmp_path: Path) -> None:
    """MistralConfig is a LlamaConfig with Mistral's defaults and keys: Llama's own keys are not Mistral's."""
    llama, mistral = _lmport_class("llama"), _lmport_class("mistral")
    assert issubclass(mistral, llama) and mistral.model_type == "mistral"
    assert mistral.required_fields() == llama.required_fields() == frozenset()
    for key in ("pretraining_tp", "attention_bias", "mlp_bias"):
        assert llama.has_field(key) and not mistral.has_field(key)
    # defaults: Mistral's where they differ from Llama's, Llama's (= transformers' Mistral's) elsewhere
    ours, theirs = _both(tmp_path / "empty", {"model_type": "mistral"})
    _compare(ours, theirs, sorted(set(ours) - {"architectures"}))
    assert not {"pretraining_tp", "attention_bias", "mlp_bias"} & (set(ours) | set(theirs))
    assert (ours["intermediate_size"], ours["num_key_value_heads"], ours["sliding_window"]) == (14336, 8, 4096)
    # Llama's keys in a Mistral config.json are unknown keys there, as for transformers: kept, written back as they
    # are, never checked (pretraining_tp 0 would fail Llama's check), and read as attributes
    ours, theirs = _both(tmp_path / "llama_keys", MISTRAL_WITH_LLAMA_KEYS)
    _compare(ours, theirs, sorted(set(ours) - {"architectures"}))
    assert {k: ours[k] for k in MISTRAL_WITH_LLAMA_KEYS} == MISTRAL_WITH_LLAMA_KEYS
    config = lmport.AutoConfig.from_pretrained(tmp_path / "llama_keys")
    assert isinstance(config, mistral) and config.extra == {"attention_bias": True, "pretraining_tp": 0, "mlp_bias": "no"}
    assert (config.attention_bias, config.pretraining_tp, config.mlp_bias) == (True, 0, "no")
    with pytest.raises(ArgumentError, match="no field 'attention_bias'"):
        config.update({"attention_bias": False})
    with pytest.raises(TypeError, match="no field 'mlp_bias'"):
        mistral(mlp_bias=True)
    # a class's from_pretrained takes only its own model_type, a derived one's included
    with pytest.raises(ConfigError, match="not a LlamaConfig"):
        llama.from_pretrained(tmp_path / "empty")
    assert type(mistral.from_pretrained(tmp_path / "empty")) is mistral

