"""Checkpoints stored quantized: ``quantization_config`` in ``config.json`` is served or refused, never ignored.

- bitsandbytes checkpoints saved by transformers itself (``from_pretrained(...,
  quantization_config=BitsAndBytesConfig(...)).save_pretrained(out)``: packed ``weight``,
  ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
  ``weight.quant_state.bitsandbytes__*`` for 4-bit, ``weight`` + ``SCB`` + ``weight_format``
  for 8-bit) load through the bnb quantizer plugin with no argument, as transformers
  loads them: every tensor of the state dict and the logits are *bit-identical* to
  transformers' loading of the same folder (4-bit nf4 + double quantization, fp4, 8-bit;
  Llama and Mistral). The checkpoint's ``quantization_config`` stays on the model's config.
- GPT-2: transformers stores the fused ``c_attn`` as one quantized tensor; lmport splits
  it by output rows into q/k/v (double-quantized block scales are dequantized once, exactly
  as bitsandbytes does before every matmul), so each projection's dequantized weight equals
  its rows of transformers' and the logits are bit-identical too.
- A ``quantization_config`` argument on a stored quantized checkpoint: of the same method,
  ignored with a warning (transformers' merge); of another, refused (``ArgumentError``).
- quant_methods no installed plugin serves (``fp8``, ``compressed-tensors`` with F8 weights
  and ``weight_scale`` tensors, an unknown name): ``UnsupportedQuantizationError`` naming
  config.json, the method and what to do; the folder is unchanged. Malformed
  ``quantization_config`` and stored statistics: typed errors naming the file and tensor.
- The hook contract: a third-party plugin that returns a ``StoredQuantizer`` serves a stored
  method (a dequantizing FP8 loader here); one that only quantizes on load is refused.
- QLoRA (peft) trains on a stored 4-bit checkpoint; ``save_pretrained`` stays refused.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from conftest import QUANT_GPT2, QUANT_LLAMA, QUANT_MISTRAL, save_hf, save_hf_llama_random, tree_digest
from safetensors.torch import load_file, save_file
from torch import nn

import lmport
from lmport import errors

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))

LLAMA, MISTRAL, GPT2 = QUANT_LLAMA, QUANT_MISTRAL, QUANT_GPT2
SETTINGS: dict[str, dict[str, Any]] = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
#: What transformers stores per quantized layer, after ``<layer>.``.
STORED = {
    "nf4-double": {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                   "weight.quant_state.bitsandbytes__nf4"},
    "fp4": {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"},
    "int8": {"weight", "SCB", "weight_format"},
}  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREQUANTIZED = [("llama", s) for s in SETTINGS] + [("mistral", "nf4-double"), ("mistral", "int8")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prequantized_sources")
    return {
        "llama": save_hf_llama_random(root / "llama", seed=4, std=0.05, **LLAMA),
        "mistral": save_hf(root / "mistral", MISTRAL, seed=5, std=0.05),
        "gpt2": save_hf(root / "gpt2", GPT2, seed=6, std=0.05),
    }


@pytest.fixture(scope="module")
def stored(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``stored(arch, setting)``: the folder transformers saved from its bitsandbytes model (made once)."""
    root = tmp_path_factory.mktemp("prequantized")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, setting: str) -> Path:
        if (arch, setting) not in made:
            config = transformers.BitsAndBytesConfig(**SETTINGS[setting])
            model = transformers.AutoModelForCausalLM.from_pretrained(sources[arch], quantization_config=config)
            model.save_pretrained(root / f"{arch}-{setting}")
            made[arch, setting] = root / f"{arch}-{setting}"
        return made[arch, setting]

    return get


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def quantized_modules(model: nn.Module) -> dict[str, str]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}


def dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data.float() * layer.weight.SCB.unsqueeze(1) / 127


def raises(error: type[Exception], *fragments: str) -> Any:
    """``error`` (or a subclass), with every fragment in its message."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw, indent=2))


# --- bitsandbytes checkpoints saved by transformers ----------------------------------------------------


@pytest.mark.parametrize(("arch", "setting"), PREQUANTIZED, ids=[f"{a}-{s}" for a, s in PREQUANTIZED])
def test_loads_like_transformers(arch: str, setting: str, stored: Any) -> None:
    folder = stored(arch, setting)
    names = set(load_file(folder / "model.safetensors"))
    layer = "model.layers.1.mlp.down_proj"
    assert {n.removeprefix(layer + ".") for n in names if n.startswith(layer + ".")} == STORED[setting]
    before = tree_digest(folder)

    ours = lmport.AutoModelForCausalLM.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    kind = "Linear8bitLt" if setting == "int8" else "Linear4bit"
    expected = {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}": kind
                for i in range(2) for p in PROJECTIONS}  # fmt: skip
    assert quantized_modules(ours) == expected == quantized_modules(theirs)
    assert ours.is_quantized and ours.quantization_method == "bitsandbytes"
    assert (ours.is_loaded_in_4bit, ours.is_loaded_in_8bit) == (kind == "Linear4bit", kind == "Linear8bitLt")
    assert ours.quantization_config == lmport.BitsAndBytesConfig(**SETTINGS[setting])
    stored_config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert ours.config.quantization_config == stored_config == ours.config.to_dict()["quantization_config"]

    # Before any forward (bitsandbytes repacks 4-bit weights for its CPU kernel on the first call).
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    for name in mine:
        assert mine[name].dtype == reference[name].dtype and torch.equal(mine[name], reference[name]), name
    assert torch.equal(logits(ours), logits(theirs))
    assert tree_digest(folder) == before


@pytest.mark.parametrize("setting", ["nf4-double", "int8"])
def test_gpt2_fused_c_attn_is_split_exactly(setting: str, stored: Any) -> None:
    folder = stored("gpt2", setting)
    ours = lmport.AutoModelForCausalLM.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert {n.rsplit(".", 1)[-1] for n in quantized_modules(theirs)} == {"c_attn", "c_proj", "c_fc"}
    for i in range(GPT2.n_layer):
        attention = ours.model.layers[i].self_attn
        fused = dequantized(theirs.transformer.h[i].attn.c_attn)
        assert torch.equal(torch.cat([dequantized(getattr(attention, f"{x}_proj")) for x in "qkv"]), fused)
        unfused = (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))
        for lm, hf in unfused:
            assert torch.equal(dequantized(ours.model.layers[i].get_submodule(lm)),
                               dequantized(theirs.transformer.h[i].get_submodule(hf)))  # fmt: skip
    assert torch.equal(logits(ours), logits(theirs))


def test_argument_on_a_stored_checkpoint(stored: Any) -> None:
    folder = stored("llama", "nf4-double")
    plain = lmport.AutoModelForCausalLM.from_pretrained(folder)
    for given in (lmport.BitsAndBytesConfig(load_in_8bit=True), transformers.BitsAndBytesConfig(load_in_4bit=True)):
        # Same method: the checkpoint's own settings win, with transformers' warning.
        with pytest.warns(UserWarning, match="already quantized.*quantization_config is used"):
            model = lmport.AutoModelForCausalLM.from_pretrained(folder, quantization_config=given)
        assert model.quantization_config == plain.quantization_config and model.is_loaded_in_4bit
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.warns(UserWarning, match="already quantized"):
            lmport.AutoModelForCausalLM.from_pretrained(folder, load_in_8bit=True)


def test_save_pretrained_stays_refused(stored: Any, tmp_path: Path) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(stored("llama", "int8"))
    with raises(errors.UnsupportedFeatureError, "quantized"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qlora_on_a_stored_checkpoint(stored: Any) -> None:
    import bitsandbytes as bnb
    import peft

    model = lmport.AutoModelForCausalLM.from_pretrained(stored("llama", "nf4-double"))
    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                               task_type="CAUSAL_LM"),  # fmt: skip
    )
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- stored quantizations nobody serves, and broken ones ------------------------------------------------

FP8_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [64, 64]},
    "compressed-tensors": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}},
        "ignore": ["lm_head"],
    },
    "unknown": {"quant_method": "hyperquant-3bit", "bits": 3},
}  # fmt: skip
SCALE_NAMES = {"fp8": "weight_scale_inv", "compressed-tensors": "weight_scale", "unknown": "weight_scale"}


def save_fp8(source: Path, folder: Path, method: str) -> dict[str, torch.Tensor]:
    """A copy of ``source`` with every projection stored as float8_e4m3fn plus a scale tensor, as FP8
    checkpoints are; returns the dequantized projection weights (checkpoint names)."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    dequantized_weights = {}
    for name in list(tensors):
        if name.endswith("_proj.weight"):
            weight = tensors[name]
            scale = weight.abs().amax(dim=1, keepdim=True) / 448.0  # per output row
            codes = (weight / scale).to(torch.float8_e4m3fn)
            tensors[name] = codes
            tensors[name.removesuffix("weight") + SCALE_NAMES[method]] = scale
            dequantized_weights[name] = codes.float() * scale
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    edit_config(folder, quantization_config=FP8_CONFIGS[method])
    return dequantized_weights


@pytest.mark.parametrize("method", sorted(FP8_CONFIGS))
def test_unserved_quant_method_is_refused(method: str, sources: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_fp8(sources["llama"], folder, method)
    before = tree_digest(folder)
    quant_method = FP8_CONFIGS[method]["quant_method"]
    with raises(errors.UnsupportedQuantizationError, str(folder / "config.json"), f"quant_method {quant_method!r}",
                "pip install 'lmport[bnb]'", "lmport_quantizer hook", "unquantized copy"):  # fmt: skip
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert issubclass(errors.UnsupportedQuantizationError, errors.UnsupportedFeatureError)
    # Quantizing it again on load is refused too: the stored method differs from the argument's.
    with raises(errors.ArgumentError, "'bitsandbytes'", str(folder / "config.json"), repr(quant_method)):
        lmport.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=lmport.BitsAndBytesConfig(load_in_4bit=True)
        )
    assert tree_digest(folder) == before


@pytest.mark.parametrize(
    ("value", "error", "fragments"),
    [
        ("fp8", errors.ConfigError, ("'quantization_config' must be an object",)),
        ({"bits": 4}, errors.ConfigError, ("names no 'quant_method'",)),
        ({"quant_method": 8}, errors.ConfigError, ("names no 'quant_method'", "8")),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, errors.ConfigError,
         ("quantization_config", "bnb_4bit_quant_type", "'nf5'")),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": "lm_head"},
         errors.ConfigError, ("llm_int8_skip_modules",)),
        ({"quant_method": "bitsandbytes"}, errors.ConfigError, ("load_in_4bit=True or load_in_8bit=True",)),
    ],
    ids=["not-object", "no-method", "method-not-string", "bad-quant-type", "bad-skip-list", "no-bits"],
)  # fmt: skip
def test_malformed_quantization_config(
    value: Any, error: type[Exception], fragments: tuple[str, ...], stored: Any, tmp_path: Path
) -> None:
    folder = copy_of(stored("llama", "fp4"), tmp_path)
    edit_config(folder, quantization_config=value)
    before = tree_digest(folder)
    with raises(error, str(folder / "config.json"), *fragments):
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert tree_digest(folder) == before


def break_tensors(folder: Path, edit: Any) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


LAYER = "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize(
    ("setting", "edit", "error", "fragments"),
    [
        ("nf4-double", lambda t: t.pop(f"{LAYER}.weight.absmax"), errors.CorruptWeightsError,
         ("4-bit quantization state", "incomplete or invalid")),
        ("fp4", lambda t: t.update({f"{LAYER}.weight.absmax": t[f"{LAYER}.weight.absmax"][:7]}),
         errors.CorruptWeightsError, ("absmax has 7 values",)),
        ("fp4", lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{LAYER}.weight.")],
         errors.CorruptWeightsError, ("without quantization statistics",)),
        ("fp4", lambda t: t.pop(f"{LAYER}.weight"), errors.CorruptWeightsError, ("stored quantized weight itself",)),
        ("int8", lambda t: t.pop(f"{LAYER}.SCB"), errors.CorruptWeightsError, ("'SCB'", "missing")),
        ("int8", lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].float()}), errors.CorruptWeightsError,
         ("must be int8",)),
        ("int8", lambda t: t.update({f"{LAYER}.weight_format": torch.tensor(2, dtype=torch.uint8)}),
         errors.UnsupportedQuantizationError, ("weight_format",)),
    ],
    ids=["no-absmax", "short-absmax", "plain-weight", "no-data", "no-SCB", "float-int8", "col-format"],
)  # fmt: skip
def test_broken_stored_weights(
    setting: str, edit: Any, error: type[Exception], fragments: tuple[str, ...], stored: Any, tmp_path: Path
) -> None:
    folder = copy_of(stored("llama", setting), tmp_path)
    break_tensors(folder, edit)
    before = tree_digest(folder)
    with raises(error, str(folder / "model.safetensors"), f"{LAYER}.weight", *fragments):
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert tree_digest(folder) == before


def test_stored_shape_must_fit_the_config(stored: Any, tmp_path: Path) -> None:
    folder = copy_of(stored("llama", "nf4-double"), tmp_path)
    edit_config(folder, intermediate_size=192)  # the stored 4-bit MLP weights are 128 wide
    with raises(errors.ShapeMismatchError, "model.safetensors", ".mlp.", "stored 4-bit weight has shape", "192)"):
        lmport.AutoModelForCausalLM.from_pretrained(folder)


# --- the hook contract: a plugin serves a stored method -------------------------------------------------


class DequantizingFp8:
    """A third-party ``StoredQuantizer``: loads ``fp8`` checkpoints by dequantizing each weight."""

    pre_quantized = True

    def __init__(self) -> None:
        self.names: set[str] = set()

    def prepare(self, model: nn.Module) -> None:
        self.names = {f"{n}.weight" for n, m in model.named_modules() if n.endswith("_proj")}

    def claims(self, module_name: str) -> bool:
        return module_name in self.names

    def materialize(self, model: nn.Module, module_name: str, tensor: torch.Tensor, device: torch.device) -> None:
        raise AssertionError("a stored weight must not be quantized again")

    def stored_part(self, checkpoint_name: str) -> tuple[str, str] | None:
        if checkpoint_name.endswith(".weight_scale_inv"):
            return checkpoint_name.removesuffix("_scale_inv"), "scale"
        return (checkpoint_name, "weight") if checkpoint_name.endswith(".weight") else None

    def materialize_stored(self, model: nn.Module, module_names: list[str], parts: dict[str, torch.Tensor],
                           device: torch.device, where: str) -> None:  # fmt: skip
        (name,) = module_names
        owner, _, attr = name.rpartition(".")
        weight = parts["weight"].float() * parts["scale"]
        model.get_submodule(owner)._parameters[attr] = nn.Parameter(weight.to(device), requires_grad=False)

    def finalize(self, model: nn.Module) -> None:
        return None  # dequantized: the model is not quantized (no QuantizationState)


class OnLoadOnly:
    """A plugin that quantizes on load only (no ``pre_quantized``): wrong for a stored checkpoint."""

    @lmport.hookimpl(tryfirst=True)
    def lmport_quantizer(self, quantization_config: Any) -> Any:
        if isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "fp8":
            return SimpleNamespace(prepare=lambda model: None, claims=lambda name: False)
        return None


class Fp8Plugin:
    @lmport.hookimpl(tryfirst=True)
    def lmport_quantizer(self, quantization_config: Any, pre_quantized: bool) -> Any:
        if pre_quantized and isinstance(quantization_config, dict) and quantization_config["quant_method"] == "fp8":
            return DequantizingFp8()
        return None


def test_a_plugin_serves_a_stored_method(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "fp8"
    weights = save_fp8(sources["llama"], folder, "fp8")
    for plugin, served in ((OnLoadOnly(), False), (Fp8Plugin(), True)):
        lmport.register(plugin, name=type(plugin).__name__)
        try:
            if not served:
                with raises(errors.UnsupportedQuantizationError, "quant_method 'fp8'", "only quantizes weights"):
                    lmport.AutoModelForCausalLM.from_pretrained(folder)
                continue
            model = lmport.AutoModelForCausalLM.from_pretrained(folder)
        finally:
            lmport.unregister(plugin)
    for name, weight in weights.items():
        assert torch.equal(model.get_parameter(name), weight), name
    # The oracle: transformers' own model holding the same dequantized weights.
    reference = transformers.AutoModelForCausalLM.from_pretrained(sources["llama"])
    with torch.no_grad():
        for name, weight in weights.items():
            reference.get_parameter(name).copy_(weight)
    assert (logits(model) - logits(reference)).abs().max().item() <= 1e-5
    assert model.config.quantization_config == FP8_CONFIGS["fp8"]


def test_bitsandbytes_missing(stored: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    folder = stored("llama", "int8")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k)
    )
    with raises(errors.UnsupportedFeatureError, "stored quantized with bitsandbytes", "config.json", "pip install"):
        lmport.AutoModelForCausalLM.from_pretrained(folder)
