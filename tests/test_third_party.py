"""A third-party architecture, packaged as its own distribution, pip-installed and loaded by entry point.

The package under tests/fixtures/tinymix follows docs/plugins.md: a config, a model
from lmport's building blocks, and a weight map with names of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import forget_modules, pip_installed
from safetensors import safe_open

import lmport
from lmport.cli import run_demo
from lmport.registry import ARCHITECTURES_GROUP, get_registry, reset_registry

FIXTURE = Path(__file__).parent / "fixtures" / "tinymix"
DIST = "lmport-tinymix-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fixture package pip-installed (built from a copy) into a target folder put on sys.path."""
    with pip_installed(FIXTURE, tmp_path_factory.mktemp("tinymix"), "lmport_tinymix") as target:
        yield target


def _checkpoint(folder: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Save a seeded TinyMix with lmport; return (folder, input ids, its logits)."""
    plugin = get_registry().architecture("tinymix")
    config = plugin.config_class.from_dict({**plugin.tiny_config, "model_type": "tinymix"})
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0).eval()
    model.save_pretrained(folder)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return folder, ids, model(ids).logits


def test_installed_plugin_is_listed_from_metadata(site: Path) -> None:
    entries = [e for e in get_registry().entry_points(ARCHITECTURES_GROUP) if e.name == "tinymix"]
    assert [(e.distribution, e.version, e.value) for e in entries] == [(DIST, "1.2.3", "lmport_tinymix:plugin")]
    assert "lmport_tinymix" not in sys.modules


def test_checkpoint_uses_the_plugins_own_names(site: Path, tmp_path: Path) -> None:
    folder, _, _ = _checkpoint(tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "tinymix" and raw["d_model"] == 64 and raw["n_blocks"] == 2
    assert "hidden_size" not in raw
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("backbone.blocks.0.attn.wqkv.weight").get_shape() == [192, 64]
    assert "head.weight" in names and "backbone.embed.weight" in names
    assert not any(n.startswith("model.") for n in names)


def test_loads_through_its_entry_point_in_a_fresh_process(site: Path, tmp_path: Path) -> None:
    folder, ids, logits = _checkpoint(tmp_path / "ckpt")
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")
    code = f"""
import sys, torch, lmport
from lmport.registry import get_registry
assert "lmport_tinymix" not in sys.modules
model, info = lmport.AutoModelForCausalLM.from_pretrained({str(folder)!r}, output_loading_info=True)
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
print(type(model).__module__, get_registry().provider("tinymix"), diff, sum(map(len, info.values())))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    module, provider, diff, issues = out.stdout.split()
    assert module == "lmport_tinymix.model"
    assert provider == f"{DIST}:tinymix"
    assert float(diff) == 0.0
    assert issues == "0"


def test_fine_tunes_saves_and_reloads(site: Path, tmp_path: Path) -> None:
    results = run_demo(["tinymix"], steps=8, output=tmp_path, log=lambda *_: None)
    assert results[0]["plugin"] == f"{DIST}:tinymix"
    assert results[0]["loss_last"] < results[0]["loss_first"]
    assert results[0]["reload_max_abs_diff"] == 0.0


def test_same_model_registered_at_run_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpackaged: the source folder is importable but installs no entry point; lmport.register serves it."""
    # Hide any installed copy (the module-scoped `site`), then expose only the bare source folder.
    monkeypatch.setattr(sys, "path", [str(FIXTURE), *(p for p in sys.path if not (Path(p) / "lmport_tinymix").is_dir())])
    reset_registry()
    try:
        import lmport_tinymix

        with pytest.raises(lmport.UnknownModelTypeError):
            get_registry().architecture("tinymix")
        lmport.register(lmport_tinymix.plugin)
        folder, ids, logits = _checkpoint(tmp_path / "ckpt")
        model = lmport.AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits)
        assert get_registry().provider("tinymix") == "runtime:tinymix"
    finally:
        forget_modules("lmport_tinymix")
