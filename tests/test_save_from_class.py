"""A model built from its class (not ``from_pretrained``) saves with its architecture's weight map.

Cases: the first-party plugins (llama, gpt2, mistral), the fixture plugins (tinymix, phi3, gemma:
tests/fixtures, pip-installed, each put on ``sys.path`` only for its own tests) and ``fusedphi3``.
Each case starts from a fresh registry, so the architecture's entry point is not loaded yet
(as in a process that imported the model class and never called ``from_pretrained``). The
model is built three ways — ``Model(config)``, ``Model.from_config(config)`` and
``lmport.AutoModelForCausalLM.from_config(config)`` — saved, then loaded by transformers
(where it has the architecture: clean load, logits within 1e-5) and by lmport (identical logits).

``fusedphi3`` is the bug this guards: a fake installed distribution (``*.dist-info`` with an
``lmport.architectures`` entry point) whose weight map, fusing ``qkv_proj`` (unequal parts under
grouped KV heads) and ``gate_up_proj``, exists ONLY as a ``weight_mapping`` hook on its
``Architecture``. Saved without that hook the checkpoint holds unfused Llama names, and
transformers' Phi-3 initialises ``qkv_proj`` / ``gate_up_proj`` randomly with only a warning.
The same plugin registered at run time (``lmport.register``) is covered too. The registry also
refuses a plugin whose hook implementation matches no hook spec (``check_pending``).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_logits_close, forget_modules, load_clean, perturb_parameters
from safetensors.torch import load_file

import lmport
from lmport.registry import ARCHITECTURES_GROUP, CHOICE_ENV, get_registry, reset_registry

FIXTURES = Path(__file__).parent / "fixtures"
IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
HOW = ("init", "class_from_config", "auto_from_config")

FAKE_DIST = "fake-fused-phi3"
FAKE_MODULE = "fake_fused_phi3"
# Phi-3 computes Llama's function with fused q/k/v and gate/up projections: this plugin reuses Llama's
# modules, and its weight map (depending on the config: unequal q/k/v parts) lives only in a hook.
FAKE_SOURCE = '''
from lmport import Architecture, Split, WeightMap, hookimpl
from lmport_llama import LlamaConfig, LlamaForCausalLM

_L = "model.layers.*"


class Phi3Config(LlamaConfig):
    model_type = "phi3"
    hf_architecture = "Phi3ForCausalLM"


class Phi3ForCausalLM(LlamaForCausalLM):
    config_class = Phi3Config  # weight_map stays Llama's: unfused names


class FusedArchitecture(Architecture):
    @hookimpl
    def lmport_weight_mapping(self, config, model_class):
        if not issubclass(model_class, self.model_class):
            return None
        head = config.hidden_size // config.num_attention_heads
        qkv = (config.num_attention_heads * head, config.num_key_value_heads * head, config.num_key_value_heads * head)
        return WeightMap(
            split=(
                Split(f"{_L}.self_attn.qkv_proj.weight", tuple(f"{_L}.self_attn.{x}_proj.weight" for x in "qkv"),
                      sizes=qkv),
                Split(f"{_L}.mlp.gate_up_proj.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight")),
            ),
        )


TINY = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
}
plugin = FusedArchitecture("phi3", Phi3Config, Phi3ForCausalLM, tiny_config=TINY)
'''

# case: (plugin module, site holding it or None when installed, registered at run time, transformers has it)
CASES: dict[str, tuple[str, str | None, bool, bool]] = {
    "llama": ("lmport_llama", None, False, True),
    "gpt2": ("lmport_gpt2", None, False, True),
    "mistral": ("lmport_mistral", None, False, True),
    "tinymix": ("lmport_tinymix", "tinymix", False, False),
    "phi3": ("lmport_phi3", "phi3", False, True),
    "gemma": ("lmport_gemma", "gemma", False, True),
    "fusedphi3": (FAKE_MODULE, "fake", False, True),
    "fusedphi3-runtime": (FAKE_MODULE, "fake", True, True),
}


def write_dist(site: Path, dist: str, module: str, source: str, entry_points: dict[str, dict[str, str]]) -> None:
    """A fake installed distribution in ``site``: ``<module>.py`` and a ``*.dist-info`` naming its entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Folders to put on ``sys.path``: each fixture plugin pip-installed (from a copy) into its own, and the
    fake fused Phi-3 distribution. None is on ``sys.path`` outside the tests that use it (two claim phi3)."""
    out = {}
    for name in ("tinymix", "phi3", "gemma"):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(FIXTURES / name, root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(root / "site"), str(root / "src")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        out[name] = root / "site"
    out["fake"] = tmp_path_factory.mktemp("fake")
    entry_points = {ARCHITECTURES_GROUP: {"phi3": f"{FAKE_MODULE}:plugin"}}
    write_dist(out["fake"], FAKE_DIST, FAKE_MODULE, FAKE_SOURCE, entry_points)
    yield out
    for module in ("lmport_tinymix", "lmport_phi3", "lmport_gemma", FAKE_MODULE):
        forget_modules(module)


@pytest.fixture
def on_path(sites: dict[str, Path]) -> Iterator[Any]:
    """``on_path(name)`` puts ``sites[name]`` on ``sys.path`` until the test ends (the registry reset)."""
    added: list[str] = []

    def put(name: str) -> Path:
        sys.path.insert(0, str(sites[name]))
        added.append(str(sites[name]))
        reset_registry()
        return sites[name]

    yield put
    for path in added:
        sys.path.remove(path)
    reset_registry()


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


def _plugin(module: str) -> Any:
    """The plugin object of ``module``, imported as a user imports a package (its entry point is not loaded)."""
    return importlib.import_module(module).plugin


def _build(plugin: Any, how: str) -> Any:
    """A seeded model of ``plugin``'s tiny config, built from its class ``how``; every weight moved."""
    config = plugin.config_class.from_dict({**plugin.tiny_config, "model_type": plugin.model_type})
    if how == "init":
        torch.manual_seed(0)
        model = plugin.model_class(config)
    elif how == "class_from_config":
        model = plugin.model_class.from_config(config, seed=0)
    else:
        model = lmport.AutoModelForCausalLM.from_config(config, seed=0)
        assert type(model) is plugin.model_class
    perturb_parameters(model)
    return model.eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("case", list(CASES))
def test_model_built_from_its_class_saves_in_its_architectures_layout(
    case: str, how: str, on_path: Any, tmp_path: Path
) -> None:
    module, site, runtime, in_transformers = CASES[case]
    if site is not None:
        on_path(site)
    plugin = _plugin(module)
    registry = get_registry()
    if runtime:
        lmport.register(plugin, override=True)
    else:
        assert registry.provider(plugin.model_type) is None
    model = _build(plugin, how)
    expected = _logits(model)
    folder = model.save_pretrained(tmp_path / "ckpt")

    if case.startswith("fusedphi3"):
        names = set(load_file(folder / "model.safetensors"))
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
        assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    if in_transformers:
        import transformers

        ref = load_clean(transformers.AutoModelForCausalLM, folder, dtype=torch.float32).eval()
        assert type(ref).__name__ == plugin.config_class.hf_architecture
        assert_logits_close(expected, _logits(ref))

    reset_registry()  # lmport's own load resolves the plugin from scratch
    if runtime:
        lmport.register(plugin, override=True)
    ours = lmport.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(ours) is plugin.model_class
    assert torch.equal(_logits(ours), expected)


def test_load_state_dict_of_a_saved_checkpoint_into_a_model_built_from_its_class(on_path: Any, tmp_path: Path) -> None:
    """Trainer resumes by ``model.load_state_dict(<checkpoint file>)``: checkpoint names go through the
    architecture's weight map even when the model was built from its class in a fresh process."""
    on_path("fake")
    plugin = _plugin(FAKE_MODULE)
    lmport.register(plugin, override=True)
    saved = _build(plugin, "init")
    folder = saved.save_pretrained(tmp_path / "ckpt")
    reset_registry()
    fresh = plugin.model_class(saved.config).eval()
    assert get_registry().provider("phi3") is None
    fresh.load_state_dict(load_file(folder / "model.safetensors"))  # strict: every name placed
    assert torch.equal(_logits(fresh), _logits(saved))


def test_a_conflict_is_settled_by_the_class_or_by_the_plugin_argument(on_path: Any, tmp_path: Path) -> None:
    """Two distributions claim phi3 (the fused fake and tests/fixtures/phi3): saving a model built from
    a class uses the distribution defining that class; ``AutoModelForCausalLM.from_config`` needs a
    choice, which ``plugin=`` gives."""
    on_path("fake")
    on_path("phi3")
    plugin = _plugin(FAKE_MODULE)
    model = _build(plugin, "init")
    model.save_pretrained(tmp_path / "ckpt")
    assert get_registry().provider("phi3") == f"{FAKE_DIST}:phi3"
    assert "model.layers.0.self_attn.qkv_proj.weight" in load_file(tmp_path / "ckpt" / "model.safetensors")
    reset_registry()
    with pytest.raises(lmport.PluginConflictError, match="lmport-phi3"):
        lmport.AutoModelForCausalLM.from_config(model.config)
    built = lmport.AutoModelForCausalLM.from_config(model.config, plugin=FAKE_DIST)
    assert type(built) is plugin.model_class
    with pytest.raises(lmport.UnknownModelTypeError, match="not-installed"):
        lmport.AutoModelForCausalLM.from_config(model.config, plugin="not-installed")


# --- hook implementations that match no spec --------------------------------------------------


class Misspelled:
    @lmport.hookimpl
    def lmport_weight_maping(self, config: Any, model_class: type) -> Any:  # missing "p"
        raise AssertionError("never called")


class Unmarked:
    def lmport_weight_mapping(self, config: Any, model_class: type) -> Any:  # no @hookimpl
        raise AssertionError("never called")


@pytest.mark.parametrize("plugin_class", [Misspelled, Unmarked])
def test_runtime_plugin_with_a_hook_matching_no_spec_is_refused(plugin_class: type) -> None:
    plugin = plugin_class()
    with pytest.raises(lmport.PluginError) as info:
        lmport.register(plugin, name="typo-plugin")
    message = str(info.value)
    assert "typo-plugin" in message
    if plugin_class is Misspelled:
        assert "'lmport_weight_maping' matches no lmport hook (did you mean 'lmport_weight_mapping'?)" in message
    else:
        assert "'lmport_weight_mapping' is not marked with @lmport.hookimpl" in message
    assert not get_registry().pm.is_registered(plugin)
    get_registry().pm.check_pending()  # nothing of it is left behind


def test_runtime_architecture_with_a_misspelled_hook_is_refused() -> None:
    from lmport_llama import LlamaConfig, LlamaForCausalLM

    class TypoArchitecture(lmport.Architecture):
        @lmport.hookimpl
        def lmport_resolve_model_clas(self, config: Any) -> Any:
            raise AssertionError("never called")

    with pytest.raises(lmport.PluginError, match=r"runtime:typo.*'lmport_resolve_model_clas' matches no lmport hook"):
        lmport.register(TypoArchitecture("typo", LlamaConfig, LlamaForCausalLM))
    registry = get_registry()
    assert registry.provider("typo") is None and "typo" not in registry.model_types()


def test_installed_plugin_with_a_misspelled_hook_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture entry point fails its load with a typed error naming the distribution; a capability
    entry point is recorded and skipped, as one that fails to import is."""
    source = """
        from lmport import hookimpl

        class Plugin:
            @hookimpl
            def lmport_open_weight(self, folder, options):
                raise AssertionError("never called")

        plugin = Plugin()
    """
    write_dist(tmp_path, "typo-arch", "typo_arch", source, {ARCHITECTURES_GROUP: {"typo": "typo_arch:plugin"}})
    write_dist(tmp_path, "typo-cap", "typo_cap", source, {"lmport.plugins": {"formats": "typo_cap:plugin"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    registry = get_registry()
    registry.load_capability_plugins()
    assert [f.distribution for f in registry.failures] == ["typo-cap"]
    assert "'lmport_open_weight' matches no lmport hook (did you mean 'lmport_open_weights'?)" in str(
        registry.failures[0]
    )
    with pytest.raises(lmport.PluginError, match=r"typo-arch:typo.*'lmport_open_weight' matches no lmport hook"):
        registry.ensure("typo")
    assert registry.provider("typo") is None
    for name in ("typo_arch", "typo_cap"):
        sys.modules.pop(name, None)
