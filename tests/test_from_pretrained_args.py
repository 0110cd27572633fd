"""The arguments of ``from_pretrained`` (and ``AutoConfig`` / ``from_config``), as transformers accepts them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf_llama, tree_digest
from safetensors.torch import load_file, save_file

import lmport
from lmport import errors
from lmport.modeling import Attention, RMSNorm

ST = "model.safetensors"
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 1, 120]])


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 tiny Llama saved by transformers, shared read-only by the module."""
    return save_hf_llama(tmp_path_factory.mktemp("args_fp32") / "ckpt", seed=11)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same saved in bfloat16 (config.json records ``"dtype": "bfloat16"``)."""
    return save_hf_llama(tmp_path_factory.mktemp("args_bf16") / "ckpt", seed=11, dtype=torch.bfloat16)


@pytest.fixture
def ckpt(base_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the float32 checkpoint, free to edit."""
    return Path(shutil.copytree(base_checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def bf16_ckpt(bf16_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bf16_checkpoint, tmp_path / "ckpt_bf16"))


def load(path: Path, **kwargs: Any) -> Any:
    return lmport.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def edit_config(folder: Path, **changes: Any) -> None:
    """Set (value) or delete (``...``) keys of ``folder/config.json``."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw, indent=2))


def float_dtypes(model: Any) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def raises(error: type[Exception], *fragments: str) -> Any:
    """``pytest.raises`` for exactly ``error`` with every fragment in the message (checked on exit)."""

    class _Check:
        def __enter__(self) -> None:
            self._ctx = pytest.raises(lmport.LmportError)
            self._info = self._ctx.__enter__()

        def __exit__(self, *exc: Any) -> bool:
            suppressed = self._ctx.__exit__(*exc)
            value = self._info.value
            assert type(value) is error, f"expected {error.__name__}, got {type(value).__name__}: {value}"
            for fragment in fragments:
                assert fragment in str(value), f"{fragment!r} not in error message: {value}"
            return bool(suppressed)

    return _Check()


# --- the loaded model ------------------------------------------------------------------------


def test_loaded_model_is_real_trainable_in_eval_mode_and_matches_transformers(ckpt: Path) -> None:
    import transformers

    before = tree_digest(ckpt)
    model = load(ckpt)
    assert tree_digest(ckpt) == before
    assert not model.training
    assert not any(m.training for m in model.modules())
    for name, param in model.named_parameters():
        assert not param.is_meta, name
        assert param.device.type == "cpu", name
        assert param.requires_grad, name
    for name, buf in model.named_buffers():
        assert not buf.is_meta, name
    state = model.state_dict()
    for name, tensor in load_file(str(ckpt / ST)).items():
        assert torch.equal(state[name], tensor), name
    assert model.config.dtype == "float32" and float_dtypes(model) == {torch.float32}

    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)
    # A loaded model trains: gradients reach every parameter.
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_plain_load_emits_no_warning(ckpt: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(ckpt)


# --- dtype -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_dtype(ckpt: Path, dtype: Any, expected: torch.dtype) -> None:
    model = load(ckpt, dtype=dtype)
    assert float_dtypes(model) == {expected}
    assert model.dtype == expected
    assert model.config.dtype == str(expected).removeprefix("torch.")
    state = model.state_dict()
    for name, tensor in load_file(str(ckpt / ST)).items():
        assert torch.equal(state[name], tensor.to(expected)), name
    logits = model(IDS).logits
    assert logits.dtype == expected and torch.isfinite(logits).all()


@pytest.mark.parametrize("spelling", ["dtype", "torch_dtype"])
def test_auto_uses_config_dtype(bf16_ckpt: Path, spelling: str) -> None:
    assert json.loads((bf16_ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    model = load(bf16_ckpt, **{spelling: "auto"})
    assert float_dtypes(model) == {torch.bfloat16}


def test_auto_prefers_legacy_torch_dtype_key_over_tensor_dtype(ckpt: Path) -> None:
    edit_config(ckpt, dtype=..., torch_dtype="float16")  # the weights themselves are float32
    model = load(ckpt, dtype="auto")
    assert float_dtypes(model) == {torch.float16}
    assert model.config.dtype == "float16"


def test_auto_prefers_config_dtype_over_tensor_dtype(ckpt: Path) -> None:
    edit_config(ckpt, dtype="bfloat16")  # the weights are float32
    assert float_dtypes(load(ckpt, dtype="auto")) == {torch.bfloat16}


def test_auto_without_config_dtype_uses_first_floating_tensor(bf16_ckpt: Path) -> None:
    edit_config(bf16_ckpt, dtype=..., torch_dtype=...)
    model = load(bf16_ckpt, dtype="auto")
    assert float_dtypes(model) == {torch.bfloat16}
    assert model.config.dtype == "bfloat16"


def test_default_dtype_is_what_transformers_chooses(bf16_ckpt: Path) -> None:
    import transformers

    edit_config(bf16_ckpt, dtype=...)
    expected = transformers.AutoModelForCausalLM.from_pretrained(bf16_ckpt).dtype
    assert expected == torch.bfloat16
    assert load(bf16_ckpt).dtype == expected


@pytest.mark.parametrize("value", [torch.float16, "float16"])
def test_torch_dtype_alias(ckpt: Path, value: Any) -> None:
    assert float_dtypes(load(ckpt, torch_dtype=value)) == {torch.float16}


def test_dtype_and_torch_dtype_agreeing_is_fine(ckpt: Path) -> None:
    assert float_dtypes(load(ckpt, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)) == {torch.bfloat16}


def test_dtype_and_torch_dtype_disagreeing(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "dtype=torch.float16", "torch_dtype=torch.bfloat16"):
        load(ckpt, dtype=torch.float16, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("value", ["float17", "int8", torch.int64, 16, "bf16x"])
def test_invalid_dtype(ckpt: Path, value: Any) -> None:
    with raises(errors.ArgumentError, "dtype", str(value)):
        load(ckpt, dtype=value)


# --- device_map -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_map", [None, "cpu", torch.device("cpu"), {"": "cpu"}, {"": torch.device("cpu")}],
    ids=["none", "str", "device", "dict", "dict-device"],
)  # fmt: skip
def test_device_map_cpu(ckpt: Path, device_map: Any) -> None:
    model = load(ckpt, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", torch.device("cuda"), {"": "cuda:0"}])
def test_device_map_cuda_without_cuda(ckpt: Path, device_map: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with raises(errors.UnsupportedFeatureError, "device_map=", "cuda", "no CUDA device is available"):
        load(ckpt, device_map=device_map)


def test_device_map_that_is_no_device(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "device_map", "'toaster'"):
        load(ckpt, device_map="toaster")


# --- attention ------------------------------------------------------------------------------


def test_attn_implementation_recorded_and_equivalent(ckpt: Path) -> None:
    logits = {}
    for name in ("eager", "sdpa"):
        model = load(ckpt, attn_implementation=name)
        assert model.attn_implementation == name
        kernels = {m.kernel.name for m in model.modules() if isinstance(m, Attention)}
        assert kernels == {name}
        with torch.no_grad():
            logits[name] = model(IDS).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=0, atol=1e-5)


def test_attn_implementation_default_is_sdpa(ckpt: Path) -> None:
    assert load(ckpt).attn_implementation == "sdpa"


def test_unknown_attn_implementation_lists_installed_kernels(ckpt: Path) -> None:
    with raises(errors.AttentionKernelError, "'paged_turbo'", "installed kernels:", "eager", "sdpa"):
        load(ckpt, attn_implementation="paged_turbo")


def _flash_missing_fragment() -> str:
    # On a machine without flash-attn the package is what is missing; with it, on CPU, CUDA is.
    return "pip install" if importlib.util.find_spec("flash_attn") is None else "CUDA"


def test_flash_attention_2_on_cpu(ckpt: Path) -> None:
    with raises(errors.AttentionKernelError, "'flash_attention_2'", _flash_missing_fragment()):
        load(ckpt, attn_implementation="flash_attention_2")


def test_use_flash_attention_2_on_cpu(ckpt: Path) -> None:
    with raises(errors.AttentionKernelError, "'flash_attention_2'", _flash_missing_fragment()):
        load(ckpt, use_flash_attention_2=True)


def test_use_flash_attention_2_contradicting_attn_implementation(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "use_flash_attention_2", "attn_implementation"):
        load(ckpt, use_flash_attention_2=True, attn_implementation="eager")


# --- output_loading_info ------------------------------------------------------------------------


def test_output_loading_info_clean(ckpt: Path) -> None:
    result = load(ckpt, output_loading_info=True)
    assert isinstance(result, tuple) and len(result) == 2
    model, info = result
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def test_output_loading_info_reports_unused_tensor(ckpt: Path) -> None:
    clean = load(ckpt)
    state = load_file(str(ckpt / ST))
    state["model.unused_projection.weight"] = torch.ones(3, 3)
    save_file(state, str(ckpt / ST), metadata={"format": "pt"})
    model, info = load(ckpt, output_loading_info=True)
    assert info["unexpected_keys"] == ["model.unused_projection.weight"]
    assert info["missing_keys"] == [] and info["mismatched_keys"] == [] and info["error_msgs"] == []
    assert "model.unused_projection.weight" not in model.state_dict()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, clean(IDS).logits)


# --- trust_remote_code ------------------------------------------------------------------------


def test_trust_remote_code_with_installed_plugin_warns_and_loads(ckpt: Path) -> None:
    with pytest.warns(UserWarning, match=r"trust_remote_code=True is ignored") as record:
        model = load(ckpt, trust_remote_code=True)
    (warning,) = [w for w in record if "trust_remote_code" in str(w.message)]
    assert "'llama'" in str(warning.message) and "lmport-llama" in str(warning.message)
    assert warning.filename == __file__  # attributed to the caller's line
    assert model.attn_implementation == "sdpa" and not model.training


def test_trust_remote_code_false_is_silent(ckpt: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(ckpt, trust_remote_code=False)


# --- config overrides and unknown arguments ---------------------------------------------------


def test_config_override_changes_config_and_outputs(ckpt: Path) -> None:
    import transformers

    default = load(ckpt)
    model = load(ckpt, rms_norm_eps=1e-3)
    assert model.config.rms_norm_eps == 1e-3
    assert {m.variance_epsilon for m in model.modules() if isinstance(m, RMSNorm)} == {1e-3}
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, rms_norm_eps=1e-3).eval()
    with torch.no_grad():
        ours, theirs, before = model(IDS).logits, reference(IDS).logits, default(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - before).abs().max() > 1e-3
    assert json.loads((ckpt / "config.json").read_text())["rms_norm_eps"] == 1e-6  # the file is untouched


def test_config_override_of_the_wrong_type(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "rms_norm_eps", "'small'", "float"):
        load(ckpt, rms_norm_eps="small")


def test_config_override_that_makes_it_inconsistent(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "num_attention_heads", "hidden_size (64)"):
        load(ckpt, num_attention_heads=6, num_key_value_heads=6, head_dim=None)


def test_unknown_argument_is_named(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "'not_a_real_option'", "LlamaConfig"):
        load(ckpt, not_a_real_option=3)


def test_unknown_argument_with_config_given(ckpt: Path) -> None:
    config = lmport.AutoConfig.from_pretrained(ckpt)
    with raises(errors.ArgumentError, "'not_a_real_option'"):
        load(ckpt, config=config, not_a_real_option=3)


def test_positional_model_args_refused(ckpt: Path) -> None:
    with raises(errors.ArgumentError, "positional"):
        lmport.AutoModelForCausalLM.from_pretrained(ckpt, "extra")


def test_ignored_transformers_argument_warns_and_loads(ckpt: Path) -> None:
    with pytest.warns(UserWarning, match=r"low_cpu_mem_usage has no effect") as record:
        model = load(ckpt, low_cpu_mem_usage=True)
    assert any(w.filename == __file__ for w in record)
    state = model.state_dict()
    for name, tensor in load_file(str(ckpt / ST)).items():
        assert torch.equal(state[name], tensor), name


def test_quantization_flags_set_false_are_accepted(ckpt: Path) -> None:
    model = load(ckpt, load_in_4bit=False, load_in_8bit=False, quantization_config=None)
    assert float_dtypes(model) == {torch.float32}


# --- subfolder ---------------------------------------------------------------------------------


def test_subfolder(base_checkpoint: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(base_checkpoint, repo / "llm")
    model = load(repo, subfolder="llm")
    state = model.state_dict()
    for name, tensor in load_file(str(repo / "llm" / ST)).items():
        assert torch.equal(state[name], tensor), name
    config = lmport.AutoConfig.from_pretrained(repo, subfolder="llm")
    assert config.hidden_size == 64
    with raises(errors.SourceError, str(repo), "'missing'"):
        load(repo, subfolder="missing")
    with raises(errors.SourceError, "'../escape'"):
        load(repo / "llm", subfolder="../escape")


# --- AutoConfig and from_config ----------------------------------------------------------------


def test_auto_config_returns_typed_config_with_overrides(ckpt: Path) -> None:
    from lmport_llama import LlamaConfig

    raw = json.loads((ckpt / "config.json").read_text())
    config = lmport.AutoConfig.from_pretrained(ckpt, rms_norm_eps=1e-3, num_hidden_layers=1)
    assert type(config) is LlamaConfig
    assert config.model_type == "llama"
    assert config.rms_norm_eps == 1e-3 and config.num_hidden_layers == 1
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(config, key) == raw[key], key
    assert config.rope_parameters is not None
    assert config.rope_parameters["rope_theta"] == raw["rope_parameters"]["rope_theta"]
    with raises(errors.ArgumentError, "'not_a_field'"):
        lmport.AutoConfig.from_pretrained(ckpt, not_a_field=1)
    with raises(errors.ArgumentError, "rms_norm_eps"):
        lmport.AutoConfig.from_pretrained(ckpt, rms_norm_eps="tiny")


def test_from_config_builds_a_working_model(ckpt: Path) -> None:
    config = lmport.AutoConfig.from_pretrained(ckpt)
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    again = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    other = lmport.AutoModelForCausalLM.from_config(config, seed=1)
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, param in model.named_parameters():
        assert not param.is_meta and param.device.type == "cpu" and param.dtype == torch.float32, name
        assert param.requires_grad, name
        assert torch.isfinite(param).all(), name
        assert torch.equal(param, again.get_parameter(name)), name
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert 0.015 < model.lm_head.weight.std().item() < 0.025  # normal(0, initializer_range=0.02)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    out = model(IDS, labels=IDS)
    assert model.training and out.logits is None and not out.logits_materialized  # chunked loss: no full logits
    with torch.no_grad():
        assert model(IDS).logits.shape == (1, IDS.shape[1], 128)
    # an untrained model predicts roughly uniformly: loss near log(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
