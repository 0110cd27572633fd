"""``LoadRequest.parse``: every argument of ``from_pretrained`` parsed once, and shared by ``AutoConfig``."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf_llama

import lmport
from lmport.errors import ArgumentError, UnsupportedFeatureError
from lmport.quantization import BitsAndBytesConfig
from lmport.request import DISTRIBUTED_ARGUMENTS, LoadRequest


def parse(caller: Any = "from_pretrained", **kwargs: Any) -> LoadRequest:
    return LoadRequest.parse("some/model", kwargs, caller=caller)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("request") / "ckpt", seed=3)


# --- the parser, without a checkpoint -----------------------------------------------------------


def test_defaults() -> None:
    request = parse()
    assert request.name_or_path == "some/model" and request.caller == "from_pretrained"
    assert request.dtype is None and request.device == torch.device("cpu") and request.quantization is None
    assert request.source == lmport.options.SourceOptions()
    assert request.weights == lmport.options.LoadOptions() and request.gguf_file is None
    assert dict(request.config_overrides) == {} and not request.output_loading_info
    assert all(getattr(request, name) is None for name in DISTRIBUTED_ARGUMENTS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.dtype = torch.float16  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.config_overrides["x"] = 1  # type: ignore[index]


def test_every_option_lands_in_its_field(tmp_path: Path) -> None:
    request = parse(
        dtype="bfloat16", attn_implementation="eager", revision="v1", cache_dir=tmp_path, token="t",
        local_files_only=True, subfolder="sub", variant="fp16", use_safetensors=True, device_map={"": "cpu"},
        output_loading_info=True, ignore_mismatched_sizes=True, plugin="lmport-llama", trust_remote_code=False,
        rms_norm_eps=1e-3, generation_config={"max_new_tokens": 3},
    )  # fmt: skip
    assert request.dtype == torch.bfloat16 and request.attn_implementation == "eager"
    assert request.source.revision == "v1" and request.source.cache_dir == str(tmp_path)
    assert request.source.token == "t" and request.source.local_files_only and request.source.subfolder == "sub"
    assert request.source.variant == request.weights.variant == "fp16"
    assert request.source.use_safetensors is request.weights.use_safetensors is True
    assert not request.source.config_only and request.device == torch.device("cpu")
    assert request.output_loading_info and request.ignore_mismatched_sizes and request.plugin == "lmport-llama"
    assert dict(request.config_overrides) == {"rms_norm_eps": 1e-3}
    assert request.generation_config == {"max_new_tokens": 3}


def test_aliases() -> None:
    assert parse(torch_dtype="float16").dtype == torch.float16
    assert parse(dtype="bfloat16", torch_dtype=torch.bfloat16).dtype == torch.bfloat16  # same dtype, two spellings
    with pytest.raises(ArgumentError, match="disagree"):
        parse(dtype=torch.float16, torch_dtype=torch.bfloat16)
    assert parse(dtype="auto").dtype is None
    assert parse(use_flash_attention_2=True).attn_implementation == "flash_attention_2"
    with pytest.raises(ArgumentError, match="contradicts"):
        parse(use_flash_attention_2=True, attn_implementation="eager")
    with pytest.warns(FutureWarning, match="use_auth_token is deprecated") as record:
        request = parse(use_auth_token="secret")
    assert request.source.token == "secret" and record[0].filename == __file__


@pytest.mark.parametrize("value", ["int8", torch.int8, torch.float8_e4m3fn, "no_such_dtype", 3])
def test_bad_dtype(value: Any) -> None:
    with pytest.raises(ArgumentError, match="dtype"):
        parse(dtype=value)


@pytest.mark.parametrize("caller", ["from_pretrained", "AutoConfig"])
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"local_files_only": "yes"}, "local_files_only must be True or False"),
        ({"variant": "a/b"}, "variant must be a short name"),
        ({"subfolder": "x\x00y"}, "NUL"),
        ({"plugin": ""}, "plugin must name a distribution"),
        ({"gguf_file": 3}, "gguf_file must be"),
    ],
)
def test_types_are_checked_alike_for_both_callers(caller: str, kwargs: dict[str, Any], fragment: str) -> None:
    label = "from_pretrained" if caller == "from_pretrained" else "AutoConfig.from_pretrained"
    with pytest.raises(ArgumentError, match=f"^{label}: .*{fragment}"):
        parse(caller, **kwargs)


def test_ignored_arguments_warn_at_the_callers_line() -> None:
    with pytest.warns(UserWarning, match="low_cpu_mem_usage has no effect") as record:
        request = parse(low_cpu_mem_usage=True)
    assert record[0].filename == __file__ and "low_cpu_mem_usage" not in request.config_overrides


def test_not_yet_supported_arguments_are_refused() -> None:
    with pytest.raises(UnsupportedFeatureError, match="state_dict is not supported"):
        parse(state_dict={"a": torch.zeros(1)})
    assert "key_mapping" not in parse(key_mapping=None).config_overrides


def test_quantization_settings_are_normalised() -> None:
    assert parse(quantization_config={"load_in_4bit": True}).quantization == BitsAndBytesConfig(load_in_4bit=True)
    with pytest.warns(FutureWarning, match="deprecated shortcuts"):
        assert parse(load_in_8bit=True).quantization == BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ArgumentError, match="not both"):
        parse(load_in_4bit=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def test_config_argument() -> None:
    with pytest.raises(ArgumentError, match="config must be an lmport config object"):
        parse(config={"model_type": "llama"})
    config = lmport.PretrainedConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1)
    assert parse(config=config).config is config
    with pytest.raises(ArgumentError, match=r"unknown arguments \['rms_norm_eps'\] \(config= was given\)"):
        parse(config=config, rms_norm_eps=1e-3)


def test_device_map() -> None:
    assert parse(device_map="auto").device is None  # planned by a placement plugin
    assert parse(device_map=torch.device("cpu")).device == torch.device("cpu")
    with pytest.raises(ArgumentError, match="device_map='meta'"):
        parse(device_map="meta")
    with pytest.warns(UserWarning, match="only apply with a device map"):
        parse(device_map="cpu", max_memory={"cpu": "1GB"})


@pytest.mark.parametrize("name", DISTRIBUTED_ARGUMENTS)
def test_distributed_arguments_are_fields_of_the_request(name: str) -> None:
    value = 2 if name == "tp_size" else "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no longer "ignored with a warning": lmport.distributed serves them
        request = parse(**{name: value})
    assert getattr(request, name) == value and name not in request.config_overrides


def test_gguf_file_is_carried_to_the_weight_options() -> None:
    request = parse(gguf_file=Path("model-q4.gguf"))
    assert request.weights.gguf_file == request.gguf_file == "model-q4.gguf"
    assert "gguf_file" not in request.config_overrides


# --- AutoConfig: the same parser, what a config can carry ---------------------------------------


def test_auto_config_refuses_what_a_config_cannot_carry() -> None:
    for kwargs in ({"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}, {"load_in_8bit": True}):
        with pytest.raises(ArgumentError, match="is an argument of AutoModelForCausalLM.from_pretrained"):
            parse("AutoConfig", **kwargs)
    with pytest.raises(ArgumentError, match="config= is an argument"):
        parse("AutoConfig", config=lmport.PretrainedConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1))
    request = parse("AutoConfig", load_in_4bit=False, quantization_config=None)
    assert request.quantization is None and request.source.config_only


def test_auto_config_loading_arguments_have_no_effect() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as in transformers: no warning, nothing refused
        request = parse(
            "AutoConfig", device_map="cuda:7", low_cpu_mem_usage=True, state_dict={}, tp_plan="auto",
            output_loading_info=True, max_memory={0: "1GB"},
        )  # fmt: skip
    assert request.device is None and request.tp_plan is None and dict(request.config_overrides) == {}
    assert set(request.unused) == {"device_map", "low_cpu_mem_usage", "state_dict", "tp_plan", "output_loading_info",
                                   "max_memory"}  # fmt: skip


def test_auto_config_records_dtype_and_attention(ckpt: Path) -> None:
    plain = lmport.AutoConfig.from_pretrained(ckpt)
    assert plain.dtype == "float32" and "attn_implementation" not in plain.extra
    assert lmport.AutoConfig.from_pretrained(ckpt, torch_dtype=torch.bfloat16).dtype == "bfloat16"
    assert lmport.AutoConfig.from_pretrained(ckpt, dtype="auto").dtype == "float32"
    config = lmport.AutoConfig.from_pretrained(ckpt, attn_implementation="eager", rms_norm_eps=1e-3)
    assert config.rms_norm_eps == 1e-3
    model = lmport.AutoModelForCausalLM.from_pretrained(ckpt, config=config)
    assert model.attn_implementation == "eager"


def test_auto_config_unknown_arguments(ckpt: Path) -> None:
    with pytest.raises(ArgumentError, match=r"AutoConfig.from_pretrained got unknown arguments \['not_a_field'\]"):
        lmport.AutoConfig.from_pretrained(ckpt, not_a_field=1, device_map="cpu")
    config, unused = lmport.AutoConfig.from_pretrained(
        ckpt, not_a_field=1, device_map="cpu", rms_norm_eps=1e-4, return_unused_kwargs=True
    )
    assert config.rms_norm_eps == 1e-4 and unused == {"not_a_field": 1, "device_map": "cpu"}


def test_auto_config_trust_remote_code_warning_names_the_caller(ckpt: Path) -> None:
    with pytest.warns(UserWarning, match="trust_remote_code=True is ignored") as record:
        lmport.AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    assert [w.filename for w in record] == [__file__]
