"""The plugin contract, proven with real entry-point metadata.

Fake installed distributions are written as ``<name>-<version>.dist-info`` folders
(``METADATA`` + ``entry_points.txt``) next to their modules in a temporary folder
that is put on ``sys.path``; ``importlib_metadata`` then finds them exactly as it
finds a ``pip install``-ed package. Every test starts and ends with a fresh
registry, and the fake folder, its modules and the environment are removed again.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lmport
from lmport.config import PretrainedConfig
from lmport.modeling import Attention, DecoderLayer, DecoderModel, GatedMLP, PreTrainedCausalLM, RMSNorm, RotaryEmbedding
from lmport.registry import ARCHITECTURES_GROUP, CHOICE_ENV, PLUGINS_GROUP, get_registry, reset_registry
from lmport.weights import Rename, Split, Transpose, WeightMap, match, translate

INPUT_IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [7, 7, 64, 12, 0, 127, 45, 8]])

# A line prepended to every fake module: importing it leaves a ``<module>.imported`` file.
RECORD_IMPORT = "import pathlib as _p; _p.Path(__file__).with_suffix('.imported').touch()\n"


# --- fake installed distributions ------------------------------------------------------


@dataclass
class FakeSite:
    """A folder on ``sys.path`` holding fake distributions and their modules."""

    root: Path

    def module(self, name: str, source: str) -> Path:
        """Write ``<name>.py``; importing it records itself (see :meth:`imported`)."""
        path = self.root / f"{name}.py"
        path.write_text(RECORD_IMPORT + textwrap.dedent(source), encoding="utf-8")
        return path

    def dist(self, name: str, entry_points: dict[str, dict[str, str]], version: str = "1.0") -> Path:
        """Write ``<name>-<version>.dist-info`` with the given entry points."""
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: fake {name}\n", encoding="utf-8"
        )
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{key} = {value}" for key, value in eps.items())
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
        return info

    def imported(self, module: str) -> bool:
        return (self.root / f"{module}.imported").exists() or module in sys.modules


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    """A fake site folder on ``sys.path``; the registry is fresh before and after the test."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    reset_registry()
    yield FakeSite(root)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).is_relative_to(root):
            del sys.modules[name]
    reset_registry()


def fresh_registry() -> lmport.registry.Registry:
    """Forget everything loaded so far and read the (fake) installed metadata again."""
    reset_registry()
    return get_registry()


def logits(model: Any, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def load(folder: Path, **kwargs: Any) -> Any:
    return lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def copy_checkpoint(src: Path, dst: Path, **config_changes: Any) -> Path:
    """Copy a checkpoint folder, changing keys of its ``config.json`` (``None`` deletes a key)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and path.name != "config.json":
            (dst / path.name).write_bytes(path.read_bytes())
    raw = json.loads((src / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst


def install_capability(site: FakeSite, how: str, module: str, source: str) -> lmport.registry.Registry:
    """Provide capability plugin ``module`` by a fake ``lmport.plugins`` entry point or by ``lmport.register``."""
    site.module(module, source)
    if how == "entry_point":
        site.dist(f"cap-{module.replace('_', '-')}", {PLUGINS_GROUP: {"main": module}})
        registry = fresh_registry()
    else:
        registry = fresh_registry()
        lmport.register(importlib.import_module(module))
    return registry


# Architecture plugins used below. Both subclass the Llama plugin's classes.

FAKEARCH_SOURCE = """
from dataclasses import dataclass
from typing import ClassVar

from lmport import Architecture
from lmport_llama import LlamaConfig, LlamaForCausalLM


@dataclass
class FakeArchConfig(LlamaConfig):
    model_type: ClassVar[str] = "fakearch"


class FakeArchForCausalLM(LlamaForCausalLM):
    config_class = FakeArchConfig


plugin = Architecture("fakearch", FakeArchConfig, FakeArchForCausalLM)
"""

FAKE_LLAMA_SOURCE = """
from lmport import Architecture
from lmport_llama import LlamaConfig, LlamaForCausalLM


class FakeLlamaForCausalLM(LlamaForCausalLM):
    pass


plugin = Architecture("llama", LlamaConfig, FakeLlamaForCausalLM)
"""


# --- (1) lazy loading ------------------------------------------------------------------------


def test_listing_reads_entry_point_metadata_without_importing(site: FakeSite) -> None:
    site.module("fakearch_mod", FAKEARCH_SOURCE)
    site.dist("lmport-fakearch", {ARCHITECTURES_GROUP: {"fakearch": "fakearch_mod:plugin"}}, version="2.3.0")
    registry = fresh_registry()

    listed = {(e.name, e.value, e.distribution, e.version) for e in registry.entry_points(ARCHITECTURES_GROUP)}
    assert ("fakearch", "fakearch_mod:plugin", "lmport-fakearch", "2.3.0") in listed
    assert ("llama", "lmport_llama:plugin", "lmport-llama", "0.1.0") in listed
    assert {"fakearch", "llama"} <= set(registry.model_types())
    assert not site.imported("fakearch_mod")
    assert registry.provider("fakearch") is None


def test_resolving_llama_imports_only_the_plugin_naming_it(site: FakeSite, hf_llama: Callable[..., Path]) -> None:
    site.module("fakearch_mod", FAKEARCH_SOURCE)
    site.dist("lmport-fakearch", {ARCHITECTURES_GROUP: {"fakearch": "fakearch_mod:plugin"}})
    ckpt = hf_llama()
    fresh_registry()

    model = load(ckpt)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(model).__module__ == "lmport_llama.model"
    assert get_registry().provider("llama") == "lmport-llama:llama"
    assert not site.imported("fakearch_mod"), "loading a llama checkpoint imported another architecture plugin"
    assert get_registry().provider("fakearch") is None

    # The other plugin is imported when, and only when, its model_type is loaded.
    other = load(copy_checkpoint(ckpt, ckpt.parent / "fakearch", model_type="fakearch"))
    assert site.imported("fakearch_mod")
    assert type(other).__name__ == "FakeArchForCausalLM"
    assert get_registry().provider("fakearch") == "lmport-fakearch:fakearch"
    assert torch.equal(logits(other), logits(model))


def test_architecture_with_subclassed_config_keeps_its_own_model_class(
    site: FakeSite, hf_llama: Callable[..., Path]
) -> None:
    """A plugin whose config subclasses Llama's must not be served Llama's model class.

    Loading order fakearch → llama → fakearch registers the Llama plugin last, so
    it is asked first; it must decline configs of another ``model_type``.
    """
    site.module("fakearch_mod", FAKEARCH_SOURCE)
    site.dist("lmport-fakearch", {ARCHITECTURES_GROUP: {"fakearch": "fakearch_mod:plugin"}})
    ckpt = hf_llama()
    fake_ckpt = copy_checkpoint(ckpt, ckpt.parent / "fakearch", model_type="fakearch")
    fresh_registry()

    assert type(load(fake_ckpt)).__name__ == "FakeArchForCausalLM"
    assert type(load(ckpt)).__name__ == "LlamaForCausalLM"
    assert type(load(fake_ckpt)).__name__ == "FakeArchForCausalLM"
    assert type(load(ckpt)).__name__ == "LlamaForCausalLM"


# --- (2) two distributions claiming one model_type ------------------------------------------


def test_two_distributions_claiming_llama_conflict_naming_both(
    site: FakeSite, hf_llama: Callable[..., Path]
) -> None:
    site.module("fake_llama_mod", FAKE_LLAMA_SOURCE)
    site.dist("fake-llama", {ARCHITECTURES_GROUP: {"llama": "fake_llama_mod:plugin"}})
    ckpt = hf_llama()
    fresh_registry()

    with pytest.raises(lmport.PluginConflictError) as info:
        load(ckpt)
    message = str(info.value)
    assert "'fake-llama'" in message and "'lmport-llama'" in message
    assert "plugin=" in message and CHOICE_ENV in message
    assert not site.imported("fake_llama_mod"), "the conflict must be found from metadata alone"
    with pytest.raises(lmport.PluginConflictError):
        lmport.AutoConfig.from_pretrained(ckpt)


def test_conflict_resolved_by_plugin_argument(site: FakeSite, hf_llama: Callable[..., Path]) -> None:
    site.module("fake_llama_mod", FAKE_LLAMA_SOURCE)
    site.dist("fake-llama", {ARCHITECTURES_GROUP: {"llama": "fake_llama_mod:plugin"}})
    ckpt = hf_llama()
    fresh_registry()

    fake = load(ckpt, plugin="fake-llama")
    assert type(fake).__name__ == "FakeLlamaForCausalLM"
    assert get_registry().provider("llama") == "fake-llama:llama"

    real = load(ckpt, plugin="lmport-llama")
    assert type(real).__name__ == "LlamaForCausalLM"
    assert type(real).__module__ == "lmport_llama.model"
    assert get_registry().provider("llama") == "lmport-llama:llama"
    assert torch.equal(logits(fake), logits(real))

    # Back again in the same process, and with the name spelled as an import name.
    assert type(load(ckpt, plugin="fake_llama")).__name__ == "FakeLlamaForCausalLM"
    assert type(lmport.AutoConfig.from_pretrained(ckpt, plugin="lmport-llama")).__name__ == "LlamaConfig"

    with pytest.raises(lmport.UnknownModelTypeError) as info:
        load(ckpt, plugin="lmport-gpt2")
    assert "lmport-gpt2" in str(info.value) and "fake-llama" in str(info.value)


@pytest.mark.parametrize(("choice", "expected"), [("fake-llama", "FakeLlamaForCausalLM"), ("lmport-llama", "LlamaForCausalLM")])
def test_conflict_resolved_by_environment(
    site: FakeSite, hf_llama: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, choice: str, expected: str
) -> None:
    site.module("fake_llama_mod", FAKE_LLAMA_SOURCE)
    site.dist("fake-llama", {ARCHITECTURES_GROUP: {"llama": "fake_llama_mod:plugin"}})
    ckpt = hf_llama()
    monkeypatch.setenv(CHOICE_ENV, f"gpt2=lmport-gpt2, llama={choice}")
    fresh_registry()

    assert type(load(ckpt)).__name__ == expected
    assert site.imported("fake_llama_mod") == (choice == "fake-llama")
    # An explicit argument beats the environment.
    other = "lmport-llama" if choice == "fake-llama" else "fake-llama"
    assert type(load(ckpt, plugin=other)).__name__ != expected


def test_environment_choice_of_a_non_provider_is_refused(
    site: FakeSite, hf_llama: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = hf_llama()
    monkeypatch.setenv(CHOICE_ENV, "llama=lmport-gpt2")
    fresh_registry()
    with pytest.raises(lmport.UnknownModelTypeError) as info:
        load(ckpt)
    assert "'lmport-gpt2'" in str(info.value) and "lmport-llama" in str(info.value)
    monkeypatch.setenv(CHOICE_ENV, "llama")
    fresh_registry()
    with pytest.raises(lmport.PluginError, match=CHOICE_ENV):
        load(ckpt)


# --- (3) broken plugins ---------------------------------------------------------------------------


def test_architecture_plugin_failing_to_import_names_its_distribution(
    site: FakeSite, hf_llama: Callable[..., Path]
) -> None:
    site.module("broken_arch_mod", "import lmport_missing_dependency_xyz\n")
    site.module("fine_mod", "value = 1\n")
    site.dist(
        "broken-arch",
        {ARCHITECTURES_GROUP: {"brokenarch": "broken_arch_mod:plugin", "noattr": "fine_mod:does_not_exist"}},
    )
    ckpt = hf_llama()
    fresh_registry()

    with pytest.raises(lmport.PluginImportError) as info:
        load(copy_checkpoint(ckpt, ckpt.parent / "broken", model_type="brokenarch"))
    assert info.value.distribution == "broken-arch"
    assert "'broken-arch'" in str(info.value) and "lmport_missing_dependency_xyz" in str(info.value)
    assert isinstance(info.value.cause, ImportError)

    with pytest.raises(lmport.PluginImportError) as info:
        load(copy_checkpoint(ckpt, ckpt.parent / "noattr", model_type="noattr"))
    assert info.value.distribution == "broken-arch"
    assert isinstance(info.value.cause, AttributeError)

    # The broken distribution takes nothing else down.
    model = load(ckpt, attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert logits(model).shape == (2, 8, 128)


def test_broken_capability_plugin_is_recorded_and_skipped(
    site: FakeSite, hf_llama: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    site.module("broken_cap_mod", "raise RuntimeError('kaboom at import')\n")
    site.dist("broken-cap", {PLUGINS_GROUP: {"kernels": "broken_cap_mod"}})
    site.module("good_cap_mod", RECORDING_KERNEL_SOURCE)
    site.dist("good-cap", {PLUGINS_GROUP: {"kernels": "good_cap_mod"}})
    ckpt = hf_llama()
    registry = fresh_registry()

    with caplog.at_level(logging.WARNING, logger="lmport"):
        model = load(ckpt)
        eager = load(ckpt, attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.attn_implementation == "sdpa"  # builtins survive
    assert [f.distribution for f in registry.failures] == ["broken-cap"]
    assert isinstance(registry.failures[0].cause, RuntimeError)
    assert "broken-cap" in caplog.text and "kaboom at import" in caplog.text
    # The healthy third-party plugin still registered.
    assert "recording" in lmport.hooks.kernel_names()
    traced = load(ckpt, attn_implementation="recording")
    assert torch.equal(logits(traced), logits(eager))


def test_capability_plugin_with_invalid_hook_is_recorded_and_skipped(
    site: FakeSite, hf_llama: Callable[..., Path]
) -> None:
    site.module(
        "bad_hooks_mod",
        """
        from lmport import hookimpl

        @hookimpl
        def lmport_open_weights(folder, options, not_an_argument_of_the_spec):
            raise AssertionError("never called")
        """,
    )
    site.dist("bad-hooks", {PLUGINS_GROUP: {"formats": "bad_hooks_mod"}})
    ckpt = hf_llama()
    registry = fresh_registry()

    model = load(ckpt)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert [f.distribution for f in registry.failures] == ["bad-hooks"]
    assert "not_an_argument_of_the_spec" in str(registry.failures[0])


# --- (4) run-time registration -------------------------------------------------------------------


@dataclass
class TinyMixConfig(PretrainedConfig):
    """A made-up architecture: MHA, tied embeddings, GELU gated MLP."""

    model_type: ClassVar[str] = "tinymix"

    vocab_size: int = 64
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 48
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500.0
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = True


class TinyMixForCausalLM(PreTrainedCausalLM):
    """Built from lmport.modeling blocks only; its checkpoints call the decoder ``backbone``."""

    config_class = TinyMixConfig
    weight_map = WeightMap(rename=(Rename("backbone.**", "model.**"),))

    def __init__(self, config: TinyMixConfig) -> None:
        h, heads = config.hidden_size, config.num_attention_heads
        head_dim = h // heads
        layers = [
            DecoderLayer(
                self_attn=Attention(h, heads, heads, head_dim, layer_idx=i),
                mlp=GatedMLP(h, config.intermediate_size, config.hidden_act),
                input_layernorm=RMSNorm(h, config.rms_norm_eps),
                post_attention_layernorm=RMSNorm(h, config.rms_norm_eps),
            )
            for i in range(config.num_hidden_layers)
        ]
        model = DecoderModel(
            embed_tokens=nn.Embedding(config.vocab_size, h),
            layers=layers,
            norm=RMSNorm(h, config.rms_norm_eps),
            rotary_emb=RotaryEmbedding(
                head_dim, config.max_position_embeddings, {"rope_type": "default", "rope_theta": config.rope_theta}
            ),
        )
        super().__init__(config, model)


def test_register_architecture_at_run_time(site: FakeSite, tmp_path: Path) -> None:
    config = TinyMixConfig()
    original = TinyMixForCausalLM.from_config(config, seed=3)
    folder = original.save_pretrained(tmp_path / "tinymix")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "backbone.embed_tokens.weight" in names and "lm_head.weight" not in names  # mapped back, tied
    assert json.loads((folder / "config.json").read_text())["model_type"] == "tinymix"
    ids = INPUT_IDS % config.vocab_size

    with pytest.raises(lmport.UnknownModelTypeError, match="tinymix"):
        load(folder)

    arch = lmport.register(lmport.Architecture("tinymix", TinyMixConfig, TinyMixForCausalLM))
    assert "tinymix" in get_registry().model_types()
    model = load(folder)
    assert type(model) is TinyMixForCausalLM and isinstance(model.config, TinyMixConfig)
    assert model.config.rope_theta == 500.0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.state_dict(), original.state_dict(), rtol=0, atol=0)
    original.set_attention_kernel(model.attention_kernel)
    assert torch.equal(logits(model, ids), logits(original, ids))

    with pytest.raises(lmport.PluginConflictError, match="earlier lmport.register"):
        lmport.register(lmport.Architecture("tinymix", TinyMixConfig, TinyMixForCausalLM))

    lmport.unregister(arch)
    assert "tinymix" not in get_registry().model_types()
    with pytest.raises(lmport.UnknownModelTypeError):
        load(folder)


def test_register_over_installed_model_type(site: FakeSite, hf_llama: Callable[..., Path]) -> None:
    from lmport_llama import LlamaConfig, LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    ckpt = hf_llama()
    fresh_registry()
    baseline = load(ckpt)  # the installed plugin is loaded before the override
    mine = lmport.Architecture("llama", LlamaConfig, MyLlama)

    with pytest.raises(lmport.PluginConflictError) as info:
        lmport.register(mine)
    assert "'lmport-llama'" in str(info.value) and "override=True" in str(info.value)
    assert type(load(ckpt)) is LlamaForCausalLM

    assert lmport.register(mine, override=True) is mine
    overridden = load(ckpt)
    assert type(overridden) is MyLlama
    assert torch.equal(logits(overridden), logits(baseline))

    lmport.unregister(mine)
    assert type(load(ckpt)) is LlamaForCausalLM

    # Overriding before the installed plugin was ever loaded wins too.
    fresh_registry()
    lmport.register(mine, override=True)
    assert type(load(ckpt)) is MyLlama
    lmport.unregister(mine)
    assert type(load(ckpt)) is LlamaForCausalLM


# --- (5) each named hook overridden by a capability plugin alone -------------------------------------

HOW = pytest.mark.parametrize("how", ["register", "entry_point"])

META_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_dim",
    "vocab_size": "vocab",
}

PARSE_CONFIG_SOURCE = f"""
from lmport import hookimpl
from lmport_llama import LlamaConfig

META_KEYS = {META_KEYS!r}
BACK = {{v: k for k, v in META_KEYS.items()}}


@hookimpl
def lmport_parse_config(raw, model_type):
    if model_type != "llama" or "dim" not in raw:
        return None
    return LlamaConfig.from_dict({{BACK.get(k, k): v for k, v in raw.items()}})
"""


@HOW
def test_parse_config_hook(site: FakeSite, hf_llama: Callable[..., Path], how: str) -> None:
    ckpt = hf_llama()
    raw = json.loads((ckpt / "config.json").read_text())
    changes: dict[str, Any] = {hf: None for hf in META_KEYS}
    changes.update({meta: raw[hf] for hf, meta in META_KEYS.items()})
    meta_ckpt = copy_checkpoint(ckpt, ckpt.parent / "meta_keys", **changes)

    fresh_registry()
    baseline = logits(load(ckpt))
    with pytest.raises(lmport.ShapeMismatchError):  # Llama's defaults (4096 wide) do not fit
        load(meta_ckpt)

    install_capability(site, how, "meta_keys_mod", PARSE_CONFIG_SOURCE)
    model = load(meta_ckpt)
    assert (model.config.hidden_size, model.config.num_key_value_heads) == (64, 2)
    assert "dim" not in model.config.extra
    assert torch.equal(logits(model), baseline)
    assert lmport.AutoConfig.from_pretrained(meta_ckpt).intermediate_size == 96


RESOLVE_CLASS_SOURCE = """
from lmport import hookimpl
from lmport_llama import LlamaConfig, LlamaForCausalLM

FORWARDS = []


class CountingLlama(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        FORWARDS.append(1)
        return super().forward(*args, **kwargs)


@hookimpl
def lmport_resolve_model_class(config):
    return CountingLlama if isinstance(config, LlamaConfig) else None
"""


@HOW
def test_resolve_model_class_hook(site: FakeSite, hf_llama: Callable[..., Path], how: str) -> None:
    ckpt = hf_llama()
    fresh_registry()
    baseline = logits(load(ckpt))

    install_capability(site, how, "counting_mod", RESOLVE_CLASS_SOURCE)
    model = load(ckpt)
    plugin_module = sys.modules["counting_mod"]
    assert type(model) is plugin_module.CountingLlama
    assert torch.equal(logits(model), baseline)
    assert plugin_module.FORWARDS == [1]


WEIGHT_MAPPING_SOURCE = """
from lmport import hookimpl, Rename, WeightMap
from lmport_llama import LlamaConfig

MAP = WeightMap(
    rename=(Rename("backbone.**", "model.**"), Rename("head.weight", "lm_head.weight")),
    ignore=("backbone.layers.*.self_attn.rotary_emb.inv_freq",),
)


@hookimpl
def lmport_weight_mapping(config, model_class):
    return MAP if isinstance(config, LlamaConfig) else None
"""


def _rename(name: str) -> str:
    if name == "lm_head.weight":
        return "head.weight"
    return "backbone." + name.removeprefix("model.")


@HOW
def test_weight_mapping_hook(site: FakeSite, hf_llama: Callable[..., Path], how: str, tmp_path: Path) -> None:
    ckpt = hf_llama()
    state = load_file(str(ckpt / "model.safetensors"))
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in state)
    renamed = {_rename(n): t for n, t in state.items()}
    renamed["backbone.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored by the plugin's map
    other = copy_checkpoint(ckpt, tmp_path / "renamed")
    save_file(renamed, str(other / "model.safetensors"), metadata={"format": "pt"})

    fresh_registry()
    baseline = logits(load(ckpt))
    with pytest.raises(lmport.MissingWeightsError):
        load(other)

    install_capability(site, how, "prefix_map_mod", WEIGHT_MAPPING_SOURCE)
    model, info = load(other, output_loading_info=True)
    assert info["unexpected_keys"] == [] and info["missing_keys"] == []
    assert torch.equal(logits(model), baseline)

    # save_pretrained runs the plugin's map backwards: the checkpoint's own names come back.
    saved = model.save_pretrained(tmp_path / "saved")
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(renamed) - {"backbone.layers.0.self_attn.rotary_emb.inv_freq"}
        assert torch.equal(f.get_tensor("head.weight"), state["lm_head.weight"])


OPEN_WEIGHTS_SOURCE = """
import numpy as np
import torch

from lmport import hookimpl
from lmport.weights import TensorInfo

READS = []


class NpzSource:
    def __init__(self, path):
        self.files = [path]
        self._npz = np.load(path)

    def infos(self):
        for name in self._npz.files:
            array = self._npz[name]
            yield TensorInfo(name, self.files[0], tuple(array.shape), torch.from_numpy(array[:0]).dtype)

    def read(self, info):
        READS.append(info.name)
        return torch.from_numpy(self._npz[info.name])

    def close(self):
        self._npz.close()


@hookimpl
def lmport_open_weights(folder, options):
    path = folder / "model.npz"
    return NpzSource(path) if path.is_file() else None
"""


@HOW
def test_open_weights_hook(site: FakeSite, hf_llama: Callable[..., Path], how: str, tmp_path: Path) -> None:
    ckpt = hf_llama()
    state = load_file(str(ckpt / "model.safetensors"))
    npz_ckpt = tmp_path / "npz"
    npz_ckpt.mkdir()
    (npz_ckpt / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    np.savez(npz_ckpt / "model.npz", **{n: t.numpy() for n, t in state.items()})

    fresh_registry()
    baseline = logits(load(ckpt))
    with pytest.raises(lmport.WeightsNotFoundError):
        load(npz_ckpt)

    install_capability(site, how, "npz_format_mod", OPEN_WEIGHTS_SOURCE)
    model = load(npz_ckpt)
    reads = sys.modules["npz_format_mod"].READS
    assert sorted(reads) == sorted(state), "every tensor read exactly once"
    assert model.dtype == torch.float32
    assert torch.equal(logits(model), baseline)
    # Folders in the builtin formats are still served by the builtins.
    assert torch.equal(logits(load(ckpt)), baseline)
    assert len(reads) == len(state)


RECORDING_KERNEL_SOURCE = """
from lmport import hookimpl
from lmport.plugins.attention import KERNELS

CALLS = []


class RecordingAttention:
    '''Reference kernel: records each call and delegates to the builtin eager (math) kernel.'''

    name = "recording"

    def __call__(self, query, key, value, *, mask, scaling, dropout, num_kv_groups):
        CALLS.append((tuple(query.shape), tuple(key.shape), num_kv_groups))
        return KERNELS["eager"](
            query, key, value, mask=mask, scaling=scaling, dropout=dropout, num_kv_groups=num_kv_groups
        )


KERNEL = RecordingAttention()


@hookimpl
def lmport_select_attention(requested, config, device, dtype):
    return KERNEL if requested == "recording" else None


@hookimpl
def lmport_attention_kernels():
    return ["recording"]
"""


@HOW
def test_select_attention_hook(site: FakeSite, hf_llama: Callable[..., Path], how: str) -> None:
    ckpt = hf_llama()
    fresh_registry()
    eager = logits(load(ckpt, attn_implementation="eager"))
    with pytest.raises(lmport.AttentionKernelError, match="recording"):
        load(ckpt, attn_implementation="recording")

    registry = install_capability(site, how, "recording_kernel_mod", RECORDING_KERNEL_SOURCE)
    assert "recording" in lmport.hooks.kernel_names() and "sdpa" in lmport.hooks.kernel_names()
    model = load(ckpt, attn_implementation="recording")
    calls = sys.modules["recording_kernel_mod"].CALLS
    assert model.attn_implementation == "recording"
    out = logits(model)
    assert calls == [((2, 4, 8, 16), (2, 2, 8, 16), 2)] * 2  # once per layer, GQA groups passed through
    assert torch.equal(out, eager)

    # config.json may name it too, now that it is installed; the default stays the builtin.
    by_config = load(copy_checkpoint(ckpt, ckpt.parent / "by_config", attn_implementation="recording"))
    assert by_config.attn_implementation == "recording"
    assert load(ckpt).attn_implementation == "sdpa"


# --- (6) config.json chooses among installed kernels only -----------------------------------------------


@pytest.mark.parametrize(
    "name", ["evil_kernel_mod", "evil_kernel_mod:Kernel", "evil_kernel_mod.Kernel", "https://example.com/k.py"]
)
def test_config_json_cannot_name_uninstalled_kernel(site: FakeSite, hf_llama: Callable[..., Path], name: str) -> None:
    site.module("evil_kernel_mod", "class Kernel:\n    name = 'evil'\n")
    ckpt = hf_llama()
    evil = copy_checkpoint(ckpt, ckpt.parent / "evil", attn_implementation=name)
    fresh_registry()
    assert load(ckpt).attn_implementation == "sdpa"  # warm: everything a load needs is imported

    before = set(sys.modules)
    with pytest.raises(lmport.AttentionKernelError) as info:
        load(evil)
    assert set(sys.modules) - before == set(), "a config.json made lmport import something"
    assert not site.imported("evil_kernel_mod")
    assert repr(name) in str(info.value)
    assert "eager" in str(info.value) and "sdpa" in str(info.value)

    # The config's choice among installed kernels is honoured, and the argument beats the config.
    assert load(copy_checkpoint(ckpt, ckpt.parent / "eager", attn_implementation="eager")).attn_implementation == "eager"
    assert load(evil, attn_implementation="eager").attn_implementation == "eager"


# --- WeightMap ----------------------------------------------------------------------------------------------


def test_patterns() -> None:
    assert match("model.layers.*.mlp.weight", "model.layers.12.mlp.weight") == ("12",)
    assert match("model.layers.*.mlp.weight", "model.layers.1.2.mlp.weight") is None  # * is one segment
    assert match("model.**", "model.layers.1.mlp.weight") == ("layers.1.mlp.weight",)
    assert match("model.**", "lm_head.weight") is None
    assert match("a.*.b", "a.x.bb") is None  # anchored at the end
    assert translate("h.3.attn.w", "h.*.attn.w", "layers.*.self_attn.w") == "layers.3.self_attn.w"


def test_weight_map_rename_both_ways() -> None:
    wm = WeightMap(
        rename=(
            Rename("transformer.h.*.attn.c_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
            Rename("transformer.h.**", "model.layers.**"),
            Rename("transformer.wte.weight", "model.embed_tokens.weight"),
        )
    )
    cases = {
        "transformer.h.0.attn.c_proj.weight": "model.layers.0.self_attn.o_proj.weight",
        "transformer.h.11.mlp.c_fc.bias": "model.layers.11.mlp.c_fc.bias",
        "transformer.wte.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",  # no rule: kept
    }
    for checkpoint, module in cases.items():
        assert wm.to_module_name(checkpoint) == module
        assert wm.to_checkpoint_name(module) == checkpoint
    t = torch.arange(6.0).reshape(2, 3)
    assert [(n, s) for n, s in wm.plan("transformer.h.0.attn.c_proj.weight", (2, 3))] == [
        ("model.layers.0.self_attn.o_proj.weight", (2, 3))
    ]
    [(name, out)] = wm.to_module("transformer.h.0.attn.c_proj.weight", t)
    assert name == "model.layers.0.self_attn.o_proj.weight" and out is t
    assert set(wm.to_checkpoint({name: t})) == {"transformer.h.0.attn.c_proj.weight"}


def test_weight_map_transpose() -> None:
    wm = WeightMap(transpose=(Transpose("**.c_fc.weight"),))
    stored = torch.arange(12.0).reshape(3, 4)  # checkpoint (in, out), module (out, in)
    assert wm.plan("h.0.mlp.c_fc.weight", (3, 4)) == [("h.0.mlp.c_fc.weight", (4, 3))]
    assert wm.plan("h.0.mlp.c_proj.weight", (3, 4)) == [("h.0.mlp.c_proj.weight", (3, 4))]
    [(name, module_t)] = wm.to_module("h.0.mlp.c_fc.weight", stored)
    assert torch.equal(module_t, stored.T)
    back = wm.to_checkpoint({name: module_t})
    assert torch.equal(back["h.0.mlp.c_fc.weight"], stored) and back["h.0.mlp.c_fc.weight"].is_contiguous()
    bias = torch.arange(4.0)
    assert torch.equal(wm.to_module("h.0.mlp.c_fc.bias", bias)[0][1], bias)


def test_weight_map_split_fuse_round_trip() -> None:
    # GPT-2 style: a fused Conv1D qkv stored (in, 3*out), with grouped sizes, renamed and transposed.
    wm = WeightMap(
        rename=(Rename("transformer.h.*.attn.c_attn.**", "model.layers.*.self_attn.qkv.**"),),
        split=(
            Split(
                "model.layers.*.self_attn.qkv.weight",
                (
                    "model.layers.*.self_attn.q_proj.weight",
                    "model.layers.*.self_attn.k_proj.weight",
                    "model.layers.*.self_attn.v_proj.weight",
                ),
                dim=1,
                sizes=(8, 4, 4),
            ),
            Split(
                "model.layers.*.self_attn.qkv.bias",
                (
                    "model.layers.*.self_attn.q_proj.bias",
                    "model.layers.*.self_attn.k_proj.bias",
                    "model.layers.*.self_attn.v_proj.bias",
                ),
                sizes=(8, 4, 4),
            ),
        ),
        transpose=(Transpose("model.layers.*.self_attn.*_proj.weight"),),
    )
    fused_w = torch.randn(6, 16)
    fused_b = torch.randn(16)
    assert wm.plan("transformer.h.2.attn.c_attn.weight", (6, 16)) == [
        ("model.layers.2.self_attn.q_proj.weight", (8, 6)),
        ("model.layers.2.self_attn.k_proj.weight", (4, 6)),
        ("model.layers.2.self_attn.v_proj.weight", (4, 6)),
    ]
    module = dict(wm.to_module("transformer.h.2.attn.c_attn.weight", fused_w))
    module.update(wm.to_module("transformer.h.2.attn.c_attn.bias", fused_b))
    assert torch.equal(module["model.layers.2.self_attn.q_proj.weight"], fused_w[:, :8].T)
    assert torch.equal(module["model.layers.2.self_attn.k_proj.weight"], fused_w[:, 8:12].T)
    assert torch.equal(module["model.layers.2.self_attn.v_proj.weight"], fused_w[:, 12:].T)
    assert torch.equal(module["model.layers.2.self_attn.v_proj.bias"], fused_b[12:])
    module["model.norm.weight"] = torch.ones(6)

    back = wm.to_checkpoint(module)
    assert set(back) == {"transformer.h.2.attn.c_attn.weight", "transformer.h.2.attn.c_attn.bias", "model.norm.weight"}
    assert torch.equal(back["transformer.h.2.attn.c_attn.weight"], fused_w)
    assert torch.equal(back["transformer.h.2.attn.c_attn.bias"], fused_b)


def test_weight_map_equal_split() -> None:
    wm = WeightMap(split=(Split("**.gate_up.weight", ("**.gate.weight", "**.up.weight")),))
    fused = torch.randn(10, 3)
    parts = dict(wm.to_module("mlp.gate_up.weight", fused))
    assert [tuple(t.shape) for t in parts.values()] == [(5, 3), (5, 3)]
    assert torch.equal(parts["mlp.gate.weight"], fused[:5]) and torch.equal(parts["mlp.up.weight"], fused[5:])
    assert torch.equal(wm.to_checkpoint(parts)["mlp.gate_up.weight"], fused)


def test_weight_map_ignore() -> None:
    wm = WeightMap(rename=(Rename("old.**", "new.**"),), ignore=("old.layers.*.rotary_emb.inv_freq", "**.masked_bias"))
    for name in ("old.layers.3.rotary_emb.inv_freq", "h.0.attn.masked_bias"):
        assert wm.ignored(name)
        assert wm.plan(name, (4,)) == []
        assert wm.to_module(name, torch.ones(4)) == []
    assert not wm.ignored("old.layers.3.rotary_emb.weight")
    assert wm.plan("old.layers.3.rotary_emb.weight", (4,)) == [("new.layers.3.rotary_emb.weight", (4,))]


def test_llama_checkpoint_with_rotary_tables_loads_without_unexpected_keys(
    site: FakeSite, hf_llama: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = hf_llama()
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["model.layers.1.self_attn.surprise"] = torch.ones(8)
    other = copy_checkpoint(ckpt, tmp_path / "old")
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    fresh_registry()
    _, info = load(other, output_loading_info=True)
    assert info["unexpected_keys"] == ["model.layers.1.self_attn.surprise"]


def test_register_capability_object_and_unregister(site: FakeSite, hf_llama: Callable[..., Path]) -> None:
    from lmport.plugins.attention import KERNELS

    class Tracing:
        name = "tracing"

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.calls += 1
            return KERNELS["eager"](query, key, value, **kwargs)

    class TracingPlugin:
        def __init__(self) -> None:
            self.kernel = Tracing()

        @lmport.hookimpl
        def lmport_select_attention(self, requested: str | None, config: Any, device: Any, dtype: Any) -> Any:
            return self.kernel if requested == "tracing" else None

    ckpt = hf_llama()
    fresh_registry()
    eager = logits(load(ckpt, attn_implementation="eager"))
    plugin = TracingPlugin()
    assert lmport.register(plugin) is plugin
    model = load(ckpt, attn_implementation="tracing")
    assert torch.equal(logits(model), eager) and plugin.kernel.calls == 2
    lmport.unregister(plugin)
    with pytest.raises(lmport.AttentionKernelError, match="'tracing'"):
        load(ckpt, attn_implementation="tracing")
