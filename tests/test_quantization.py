"""bitsandbytes quantization while loading: settings, parity with transformers, streaming memory, errors.

bitsandbytes' CPU backend runs here, and transformers loading the same checkpoint with
the same ``BitsAndBytesConfig`` is the oracle. Both hand each weight to the same
bitsandbytes code (``Params4bit`` / ``Int8Params``), so the quantized tensors must be
*bit-identical* and so must the logits. Checked:

- ``lmport.BitsAndBytesConfig`` has transformers' fields, defaults and ``to_dict``; a
  transformers ``BitsAndBytesConfig`` object and a plain dict are accepted as well.
- 4-bit nf4 / fp4, with and without double quantization, compute dtype float32 and
  bfloat16, and 8-bit: every tensor of the state dict (packed uint8 / int8 data,
  ``absmax``, nested statistics, ``quant_map``, ``SCB``) and the logits equal transformers'
  exactly, on Llama and Mistral (same module names on both sides) and GPT-2.
  One honest exception, GPT-2 with double quantization: transformers quantizes GPT-2's
  fused ``c_attn`` as one tensor, lmport its q/k/v projections as three (that is how
  lmport models GPT-2). First-level 4-bit codes are per 64-weight block of one output
  row, so they still match bit for bit (checked); but double quantization compresses
  each tensor's ``absmax`` list with an offset equal to its mean, and the mean of the
  fused list is not the mean of each third, so the stored statistics, and through them
  the logits, legitimately differ. There we check the codes, and every unfused layer
  exactly, rather than loosen a tolerance.
- Modules kept unquantized: ``lm_head`` by default; an ``llm_int8_skip_modules`` list
  replaces that default exactly as in transformers (same set of quantized modules).
- The legacy ``load_in_4bit=True`` / ``load_in_8bit=True`` flags map to the config with a
  FutureWarning.
- Streaming: a 78 MB bf16 checkpoint quantized to 4 bits (loaded in bf16 or fp32) peaks,
  in a fresh process, well below the unquantized model's size in RSS (see the test).
- Errors: bitsandbytes missing, quantizing modules a device map offloads to disk, both
  4- and 8-bit, a bad ``bnb_4bit_quant_type``, another quantization method.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import QUANT_GPT2, QUANT_LLAMA, QUANT_MISTRAL, save_hf, save_hf_llama, save_hf_llama_random
from safetensors import safe_open
from torch import nn

import lmport
from lmport import errors

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))

LLAMA, MISTRAL, GPT2 = QUANT_LLAMA, QUANT_MISTRAL, QUANT_GPT2

SETTINGS: dict[str, dict[str, Any]] = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-double-bf16": dict(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),  # fmt: skip
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantization")
    # std 0.05: outputs stay well scaled through 4-bit noise, and int8's outlier path is exercised
    # by a few large activations rather than all of them.
    return {
        "llama": save_hf_llama_random(root / "llama", seed=4, std=0.05, **LLAMA),
        "mistral": save_hf(root / "mistral", MISTRAL, seed=5, std=0.05),
        "gpt2": save_hf(root / "gpt2", GPT2, seed=6, std=0.05),
    }


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_both(folder: Path, settings: dict[str, Any], **kwargs: Any) -> tuple[Any, Any]:
    ours = lmport.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=lmport.BitsAndBytesConfig(**settings), **kwargs
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**settings), **kwargs
    )
    return ours, theirs


def quantized_modules(model: nn.Module) -> dict[str, str]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}


def assert_same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


# --- the settings object -----------------------------------------------------------------------


def test_config_fields_match_transformers() -> None:
    theirs = inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(lmport.BitsAndBytesConfig)}
    assert fields.keys() == set(theirs) - {"self", "kwargs"}
    for name, default in fields.items():
        assert default == theirs[name].default, name

    for settings in SETTINGS.values():
        settings = {**settings, "llm_int8_skip_modules": ["down_proj"], "llm_int8_threshold": 5.0}
        ours = lmport.BitsAndBytesConfig(**settings).to_dict()
        reference = transformers.BitsAndBytesConfig(**settings).to_dict()
        reference = {k: v for k, v in reference.items() if not k.startswith("_")}  # private mirrors of load_in_*
        reference["quant_method"] = reference["quant_method"].value
        assert ours == reference
        json.dumps(ours)  # what would go to config.json


@pytest.mark.parametrize("form", ["lmport", "transformers", "dict", "transformers-dict"])
def test_config_forms_accepted(form: str, checkpoints: dict[str, Path]) -> None:
    settings = SETTINGS["fp4-double-bf16"]
    given: Any = {
        "lmport": lambda: lmport.BitsAndBytesConfig(**settings),
        "transformers": lambda: transformers.BitsAndBytesConfig(**settings),
        "dict": lambda: dict(settings),
        "transformers-dict": lambda: transformers.BitsAndBytesConfig(**settings).to_dict(),
    }[form]()
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=given)
    assert model.quantization_config == lmport.BitsAndBytesConfig(**settings)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_type == "fp4" and layer.weight.compress_statistics


# --- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_llama_quantized_like_transformers(setting: str, checkpoints: dict[str, Path]) -> None:
    settings = SETTINGS[setting]
    ours, theirs = load_both(checkpoints["llama"], settings)

    kind = "Linear4bit" if settings.get("load_in_4bit") else "Linear8bitLt"
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}": kind for i in range(2) for p in projections
    }
    assert quantized_modules(ours) == expected == quantized_modules(theirs)
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32  # kept by default
    if kind == "Linear4bit":
        layer = ours.model.layers[1].mlp.down_proj
        assert layer.compute_dtype == settings.get("bnb_4bit_compute_dtype", torch.float32)
        assert layer.weight.quant_state.quant_type == settings["bnb_4bit_quant_type"]
        assert layer.weight.quant_state.nested == settings.get("bnb_4bit_use_double_quant", False)
    assert ours.is_quantized and ours.quantization_method == "bitsandbytes"
    assert (ours.is_loaded_in_4bit, ours.is_loaded_in_8bit) == (kind == "Linear4bit", kind == "Linear8bitLt")

    # Before any forward: bitsandbytes repacks 4-bit weights for its CPU kernel on the first
    # inference call (state_dict() undoes that, but compare the as-loaded form).
    assert_same_state(ours.state_dict(), theirs.state_dict())
    assert torch.equal(logits(ours), logits(theirs))


@pytest.mark.parametrize("setting", ["nf4", "fp4-double-bf16", "int8"])
def test_mistral_quantized_like_transformers(setting: str, checkpoints: dict[str, Path]) -> None:
    ours, theirs = load_both(checkpoints["mistral"], SETTINGS[setting])
    assert quantized_modules(ours) == quantized_modules(theirs)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    assert torch.equal(logits(ours), logits(theirs))


GPT2_UNFUSED = (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))


@pytest.mark.parametrize("setting", ["nf4", "fp4-double", "nf4-bf16", "int8"])
def test_gpt2_quantized_like_transformers(setting: str, checkpoints: dict[str, Path]) -> None:
    settings = SETTINGS[setting]
    ours, theirs = load_both(checkpoints["gpt2"], settings)
    assert {n.rsplit(".", 1)[-1] for n in quantized_modules(ours)} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "up_proj", "down_proj"}  # fmt: skip
    assert {n.rsplit(".", 1)[-1] for n in quantized_modules(theirs)} == {"c_attn", "c_proj", "c_fc"}
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, kept

    mine, reference = ours.state_dict(), theirs.state_dict()
    for i in range(GPT2.n_layer):
        for lm, hf in GPT2_UNFUSED:  # same layout on both sides: every tensor identical
            ours_part = {k.rsplit(f".{lm}.", 1)[1]: v for k, v in mine.items() if f"layers.{i}.{lm}." in k}
            theirs_part = {k.rsplit(f".{hf}.", 1)[1]: v for k, v in reference.items() if f"h.{i}.{hf}." in k}
            assert_same_state(ours_part, theirs_part)
        # The fused c_attn is (q; k; v) stacked by output row: so are the quantized codes.
        codes = torch.cat([mine[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(codes, reference[f"transformer.h.{i}.attn.c_attn.weight"])
        statistic = "SCB" if settings.get("load_in_8bit") else "weight.absmax"
        if not settings.get("bnb_4bit_use_double_quant"):
            scales = torch.cat([mine[f"model.layers.{i}.self_attn.{x}_proj.{statistic}"] for x in "qkv"])
            assert torch.equal(scales, reference[f"transformer.h.{i}.attn.c_attn.{statistic}"])
    if settings.get("bnb_4bit_use_double_quant"):
        # Per-tensor double quantization of absmax (see the module docstring): not comparable
        # through the fused tensor, and the logits differ accordingly.
        assert not torch.equal(logits(ours), logits(theirs))
    else:
        assert torch.equal(logits(ours), logits(theirs))


@pytest.mark.parametrize(
    "skip", [None, ["down_proj"], ["lm_head", "down_proj"], ["model.layers.0"], ["mlp.up_proj", "lm_head"]]
)
def test_modules_kept_unquantized_like_transformers(skip: list[str] | None, checkpoints: dict[str, Path]) -> None:
    ours, theirs = load_both(checkpoints["llama"], dict(load_in_8bit=True, llm_int8_skip_modules=skip))
    quantized = quantized_modules(ours)
    assert quantized == quantized_modules(theirs)
    every = {n for n, m in ours.named_modules() if isinstance(m, nn.Linear) or n in quantized}
    kept = every - set(quantized)
    patterns = skip if skip is not None else ["lm_head"]
    expected_kept = {n for n in every if any(n == s or n.endswith("." + s) or n.startswith(s + ".") for s in patterns)}
    assert kept == expected_kept and kept  # a given list replaces the default, as in transformers
    for name in kept:
        assert ours.get_submodule(name).weight.dtype == torch.float32
    assert torch.equal(logits(ours), logits(theirs))


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_legacy_flags(flag: str, checkpoints: dict[str, Path]) -> None:
    with pytest.warns(FutureWarning, match="quantization_config=BitsAndBytesConfig"):
        legacy = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], **{flag: True})
    explicit = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(**{flag: True})
    )
    assert legacy.quantization_config == lmport.BitsAndBytesConfig(**{flag: True})
    assert getattr(legacy, f"is_loaded_in_{flag[-4:]}")
    assert_same_state(legacy.state_dict(), explicit.state_dict())


def test_quantized_with_a_cpu_device_map(checkpoints: dict[str, Path]) -> None:
    settings = SETTINGS["nf4-double"]
    plain = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(**settings)
    )
    mapped = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(**settings), device_map="auto"
    )
    assert dict(mapped.hf_device_map) == {"": "cpu"}
    assert_same_state(plain.state_dict(), mapped.state_dict())


# --- memory: quantized while streaming --------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, sys, torch, bitsandbytes, lmport

    def status():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in f) if k in ("VmRSS", "VmHWM")}

    config = lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    dtype = "auto" if sys.argv[3] == "auto" else getattr(torch, sys.argv[3])
    # Warm-up on a tiny checkpoint: lazy imports and kernel libraries are paid for here.
    lmport.AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config, dtype=dtype)
    baseline = status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    model = lmport.AutoModelForCausalLM.from_pretrained(sys.argv[2], quantization_config=config, dtype=dtype)
    peak = status()["VmHWM"]
    quantized = sum(t.nbytes for t in model.state_dict().values())
    print(json.dumps({"delta": peak - baseline, "quantized": quantized}))
    """
)


@pytest.fixture(scope="module")
def memory_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantization_memory")
    tiny = save_hf_llama(root / "tiny", dtype=torch.bfloat16, intermediate_size=128)
    big = save_hf_llama(
        root / "big", dtype=torch.bfloat16, vocab_size=2048, hidden_size=512, intermediate_size=1408,
        num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    return tiny, big


def test_transient_reads_equal_ordinary_reads(tmp_path: Path) -> None:
    """Tensors the loader consumes at once are read into memory of their own: same values, every dtype."""
    from safetensors.torch import save_file

    from lmport.plugins.safetensors_format import SafetensorsSource

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(64, 96, generator=generator).to(torch.bfloat16),
        "f32": torch.randn(3, 5, 7, generator=generator),
        "f16": torch.randn(33, generator=generator).half(),
        "i64": torch.arange(-50, 50),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = SafetensorsSource([tmp_path / "model.safetensors"], None)
    try:
        for info in source.infos():
            expected = tensors[info.name]
            for dtype in (None, info.dtype, torch.float32):
                got = source.read_as(info, dtype, transient=True)
                want = expected.to(dtype) if dtype is not None and expected.is_floating_point() else expected
                assert got.dtype == want.dtype and got.shape == want.shape, (info.name, dtype)
                assert torch.equal(got, want), (info.name, dtype)
                if got.dtype != torch.bool:
                    got.add_(1)  # writable memory of its own (the re-read below is unchanged)
        for info in source.infos():
            assert torch.equal(source.read_as(info, None), tensors[info.name])  # the file is untouched
    finally:
        source.close()


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_quantizes_while_streaming_peak_memory(dtype: str, memory_checkpoints: tuple[Path, Path]) -> None:
    """Peak RSS of a 4-bit load stays far below the unquantized model's size.

    The checkpoint (12 layers, hidden 512, ~40M parameters, 78 MB) is saved in bf16 and
    loaded in a fresh process with ``dtype="auto"`` (bf16, no cast) or ``float32`` (a
    cast). Let U be the unquantized model's bytes in that dtype (78 or 156 MB). The
    measure is the peak RSS (VmHWM, reset after a warm-up load) minus the RSS before.

    Bound: delta < 0.75 U. A loader that materialises the floating-point model before
    quantizing holds at least U at once (as anonymous memory, or as checkpoint pages
    mapped into the process, which RSS counts just the same). Streaming holds the
    quantized model (4-bit codes and fp32 block scales for the projections,
    embeddings and head unquantized: 0.32 U in bf16, 0.19 U in fp32) plus a few tensors
    in flight (at most 2 per reader thread, each <= 1/56 of U): <= ~0.5 U with lmport's
    maximum of 4 reader threads. Measured on 2 cores: 0.48 U (auto), 0.32 U (float32);
    a variant of the quantizer that holds every weight until the end of the load
    measures 1.38 U and 1.19 U, and so did (1.35 U, auto) a loader that handed the
    quantizer views into the memory-mapped checkpoint.

    The child sets ``MALLOC_MMAP_THRESHOLD_`` so that glibc returns each freed buffer to
    the OS at once: by default it keeps freed buffers of bitsandbytes' quantization
    temporaries (the same for transformers) in its heaps, and RSS would then count
    memory already let go of, not what the load holds.
    """
    tiny, big = memory_checkpoints
    with safe_open(str(big / "model.safetensors"), framework="pt") as f:
        numel = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    unquantized = numel * (2 if dtype == "auto" else 4)
    assert 75e6 < numel * 2 < 85e6

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tiny), str(big), dtype],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["quantized"] < (0.35 if dtype == "auto" else 0.2) * unquantized
    assert measured["delta"] < 0.75 * unquantized, (measured, unquantized)


# --- errors -----------------------------------------------------------------------------------------


def raises(error: type[Exception], *fragments: str) -> Any:
    """Exactly ``error``, with every fragment in its message."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_bitsandbytes_missing(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k)
    )
    with raises(errors.UnsupportedFeatureError, "bitsandbytes", "pip install", "lmport[bnb]"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True)
        )


@pytest.mark.parametrize(
    "kwargs",
    [dict(device_map="auto", max_memory={"cpu": 20_000}), dict(device_map={"model": "cpu", "lm_head": "disk"})],
    ids=["auto", "dict"],
)
def test_quantized_modules_are_not_offloaded_to_disk(
    kwargs: dict[str, Any], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with raises(errors.UnsupportedFeatureError, "quantized modules cannot be offloaded", "disk"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True),
            offload_folder=tmp_path / "offload", **kwargs,
        )  # fmt: skip
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())


def test_both_4bit_and_8bit(checkpoints: dict[str, Path]) -> None:
    with raises(errors.ArgumentError, "load_in_4bit", "load_in_8bit"):
        lmport.BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    with raises(errors.ArgumentError, "load_in_4bit and load_in_8bit"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config={"load_in_4bit": True, "load_in_8bit": True}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with raises(errors.ArgumentError, "load_in_4bit and load_in_8bit"):
            lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], load_in_4bit=True, load_in_8bit=True)
        with raises(errors.ArgumentError, "either quantization_config or load_in_4bit"):
            lmport.AutoModelForCausalLM.from_pretrained(
                checkpoints["llama"],
                load_in_4bit=True,
                quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True),
            )


def test_bad_quant_type(checkpoints: dict[str, Path]) -> None:
    with raises(errors.ArgumentError, "bnb_4bit_quant_type", "'int3'"):
        lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int3")
    with raises(errors.ArgumentError, "bnb_4bit_quant_type", "'nf5'"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}
        )
    with raises(errors.ArgumentError, "bnb_4bit_compute_dtype", "'float99'"):
        lmport.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float99")


def test_other_quantization_methods(checkpoints: dict[str, Path]) -> None:
    with raises(errors.ArgumentError, "'gptq'", "not supported", "bitsandbytes"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], quantization_config={"quant_method": "gptq", "bits": 4}
        )

    class AwqSettings:  # an object no installed quantizer plugin serves
        quant_method = "awq"

    with raises(errors.UnsupportedFeatureError, "no installed plugin serves quantization_config"):
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=AwqSettings())


def test_saving_a_quantized_model_is_refused_clearly(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True)
    )
    with raises(errors.UnsupportedFeatureError, "quantized", "peft adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
