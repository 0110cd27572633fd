"""Weight formats (lmport.formats): one place for file names, preference, readers and writers.

A third-party format declared through ``lmport_weight_formats`` is read by ``from_pretrained``
from a local folder and from the hub (only its files are downloaded), is named in the
"no weight files" error, wins or loses against the builtins by its ``preference``, is
ruled out by ``use_safetensors=True``, is written by ``save_pretrained`` when it is the
preferred writer of its kind, and its stale files are replaced by a save. A read-only
format's model saves as safetensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hubserver import FakeHub, folder_files, hub  # noqa: F401  (hub: the fixture)
from safetensors.torch import load_file

import lmport
from lmport import errors, formats
from lmport.formats import WeightFiles, WeightFormat
from lmport.options import LoadOptions
from lmport.weights import TensorInfo

from conftest import save_hf_llama_random

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


class NpzSource:
    """Tensors of one ``.npz`` file (numpy), read on demand."""

    def __init__(self, path: Path) -> None:
        self.files = [path]
        self._npz = np.load(path)
        self.reads: list[str] = []

    def infos(self) -> Iterator[TensorInfo]:
        for name in self._npz.files:
            array = self._npz[name]
            yield TensorInfo(name, self.files[0], tuple(array.shape), torch.from_numpy(array[:0]).dtype)

    def read(self, info: TensorInfo) -> torch.Tensor:
        return torch.from_numpy(self._npz[info.name])

    def close(self) -> None:
        self._npz.close()


class NpzFormat(WeightFormat):
    """``model.npz``: one numpy archive, no shards."""

    name = "npz"
    extension = "npz"
    single = "model.npz"

    def __init__(self, preference: int, writable: bool = True) -> None:
        self.preference = preference
        self.writable = writable

    def open(self, found: WeightFiles, options: LoadOptions) -> NpzSource:
        return NpzSource(found.files[0])

    def write(self, tensors: dict[str, torch.Tensor], path: Path, *, save_function: Any = None) -> None:
        with path.open("wb") as f:
            np.savez(f, **{name: t.numpy() for name, t in tensors.items()})


class NpzPlugin:
    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt

    @lmport.hookimpl
    def lmport_weight_formats(self) -> list[Any]:
        return [self.fmt] if not isinstance(self.fmt, list) else self.fmt


@pytest.fixture
def npz() -> Iterator[Callable[..., NpzFormat]]:
    """``npz(preference, writable=True)`` registers an :class:`NpzFormat` for the test."""
    plugins: list[NpzPlugin] = []

    def install(preference: int, writable: bool = True) -> NpzFormat:
        plugin = NpzPlugin(NpzFormat(preference, writable))
        lmport.register(plugin, name=f"npz-format-{len(plugins)}")
        plugins.append(plugin)
        return plugin.fmt

    yield install
    for plugin in plugins:
        lmport.unregister(plugin)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different tiny Llama checkpoints saved by transformers (same config)."""
    root = tmp_path_factory.mktemp("formats")
    return save_hf_llama_random(root / "a", seed=0), save_hf_llama_random(root / "b", seed=1)


def write_npz(source: Path, path: Path) -> None:
    np.savez(path, **{n: t.numpy() for n, t in load_file(str(source / "model.safetensors")).items()})


def only_config(source: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    return folder


# --- reading -----------------------------------------------------------------------------------


def test_registered_formats_in_preference_order(npz: Callable[..., NpzFormat]) -> None:
    names = [f.name for f in formats.registered_formats()]
    assert names[:2] == ["safetensors", "pytorch-bin"]
    npz(300)
    assert [f.name for f in formats.registered_formats()][:3] == ["npz", "safetensors", "pytorch-bin"]
    assert formats.looked_for(LoadOptions(variant="fp16"))[:3] == [
        "model.fp16.npz", "model.fp16.safetensors", "model.safetensors.index.fp16.json",
    ]  # fmt: skip
    assert formats.looked_for(LoadOptions(use_safetensors=True)) == ["model.safetensors", "model.safetensors.index.json"]


def test_third_party_format_loads_and_is_named_when_absent(
    npz: Callable[..., NpzFormat], two: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = two
    folder = only_config(a, tmp_path / "npz")
    with pytest.raises(errors.WeightsNotFoundError) as before:
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert "model.npz" not in str(before.value)
    npz(50)
    with pytest.raises(errors.WeightsNotFoundError) as after:
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    message = str(after.value)
    assert str(folder) in message
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "model.npz"):
        assert name in message
    write_npz(a, folder / "model.npz")
    assert torch.equal(logits(lmport.AutoModelForCausalLM.from_pretrained(folder)), logits(
        lmport.AutoModelForCausalLM.from_pretrained(a)
    ))  # fmt: skip


@pytest.mark.parametrize(("preference", "use_safetensors", "winner"), [
    (300, None, "b"), (50, None, "a"), (300, True, "a"),
])  # fmt: skip
def test_preference_chooses_among_formats(
    npz: Callable[..., NpzFormat],
    two: tuple[Path, Path],
    tmp_path: Path,
    preference: int,
    use_safetensors: bool | None,
    winner: str,
) -> None:
    a, b = two
    folder = only_config(a, tmp_path / "both")
    (folder / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    write_npz(b, folder / "model.npz")
    npz(preference)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=use_safetensors)
    expected = lmport.AutoModelForCausalLM.from_pretrained({"a": a, "b": b}[winner])
    assert torch.equal(logits(model), logits(expected))


def test_bad_declaration_names_the_plugin(two: tuple[Path, Path]) -> None:
    plugin = NpzPlugin(["not a format"])
    lmport.register(plugin, name="broken-format-plugin")
    try:
        with pytest.raises(errors.PluginError, match="broken-format-plugin.*lmport_weight_formats"):
            lmport.AutoModelForCausalLM.from_pretrained(two[0])
    finally:
        lmport.unregister(plugin)


# --- the hub downloads what the formats name -------------------------------------------------


def test_hub_downloads_the_preferred_format_only(
    hub: FakeHub, npz: Callable[..., NpzFormat], two: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two
    staging = tmp_path / "staging"
    staging.mkdir()
    write_npz(b, staging / "model.npz")
    files = {**folder_files(a), "model.npz": (staging / "model.npz").read_bytes()}
    hub.push("org/npz", files)
    npz(300)

    def requested() -> set[str]:
        return {p.split("/", 3)[3] for m in ("HEAD", "GET") for p in hub.fetched(m) if p.startswith("org/npz/")}

    model = lmport.AutoModelForCausalLM.from_pretrained("org/npz", cache_dir=tmp_path / "cache")
    assert torch.equal(logits(model), logits(lmport.AutoModelForCausalLM.from_pretrained(b)))
    assert "model.npz" in requested() and "model.safetensors" not in requested()
    model = lmport.AutoModelForCausalLM.from_pretrained(
        "org/npz", cache_dir=tmp_path / "cache2", use_safetensors=True
    )
    assert torch.equal(logits(model), logits(lmport.AutoModelForCausalLM.from_pretrained(a)))
    assert "model.safetensors" in requested()


# --- writing -------------------------------------------------------------------------------------


def test_preferred_writer_of_its_kind_saves(npz: Callable[..., NpzFormat], two: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two
    model = lmport.AutoModelForCausalLM.from_pretrained(a)
    npz(150)  # above pytorch .bin (100): safe_serialization=False now writes model.npz
    out = tmp_path / "out"
    model.save_pretrained(out, safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.npz"]
    assert torch.equal(logits(lmport.AutoModelForCausalLM.from_pretrained(out)), logits(model))
    with pytest.raises(errors.UnsupportedFeatureError, match="'npz' has no index file"):
        model.save_pretrained(tmp_path / "sharded", safe_serialization=False, max_shard_size="20KB")
    # A safetensors save replaces the registered format's files too: no stale model.npz is left to be preferred.
    model.save_pretrained(out)
    assert "model.npz" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()


def test_read_only_format_saves_as_safetensors(
    npz: Callable[..., NpzFormat], two: tuple[Path, Path], tmp_path: Path
) -> None:
    import transformers

    a, _ = two
    folder = only_config(a, tmp_path / "npz")
    write_npz(a, folder / "model.npz")
    fmt = npz(300, writable=False)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(errors.UnsupportedFeatureError, match="read-only"):
        fmt.save([{}], tmp_path / "never", None)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(reference), logits(model), atol=1e-5, rtol=0)
