"""The symlink policy (lmport.shards): every file a load opens may link only inside the checkpoint folder, or into
the real huggingface_hub cache ``blobs/`` of the same repository, decided on resolved paths.

Refusals are :class:`lmport.UnsafePathError` naming the file, before anything is read from
the link's target, and leave the folder unchanged; the allowed layouts load the same
weights as the plain checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf_llama, tree_digest
from safetensors.torch import load_file, save_file

import lmport
from lmport import errors

ST = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("symlinks") / "ckpt", seed=7)


@pytest.fixture
def ckpt(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(base, folder)
    return folder


def refused(folder: Path, *fragments: str, **kwargs: Any) -> str:
    """The load fails with exactly UnsafePathError naming every fragment; the folder is unchanged."""
    before = tree_digest(folder)
    with pytest.raises(lmport.LmportError) as info:
        lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert type(info.value) is errors.UnsafePathError, f"{type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    assert tree_digest(folder) == before
    return str(info.value)


def assert_loads_base(name: str | Path, base: Path, **kwargs: Any) -> None:
    model = lmport.AutoModelForCausalLM.from_pretrained(name, **kwargs)
    reference = load_file(str(base / ST))
    state = model.state_dict()
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), key


def shard(folder: Path) -> list[Path]:
    """Split model.safetensors into two shards with an index; returns the shard paths."""
    state = load_file(str(folder / ST))
    names = sorted(state)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for file, part in zip(files, parts):
        save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / ST_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / ST).unlink()
    return [folder / f for f in files]


def move_out(path: Path, outside: Path) -> None:
    """Replace ``path`` by a link to a copy of it at ``outside``."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, outside)
    path.symlink_to(outside)


# --- links leaving the folder ------------------------------------------------------------------


@pytest.mark.parametrize("name", [ST, "pytorch_model.bin"])
def test_single_file_linked_outside_is_refused(ckpt: Path, tmp_path: Path, name: str) -> None:
    if name != ST:
        torch.save(load_file(str(ckpt / ST)), ckpt / name)
        (ckpt / ST).unlink()
    outside = tmp_path / "elsewhere" / name
    move_out(ckpt / name, outside)
    before = outside.read_bytes()
    refused(ckpt, str(ckpt / name), str(outside), "outside the checkpoint folder")
    assert outside.read_bytes() == before


def test_shard_linked_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    second = shard(ckpt)[1]
    move_out(second, tmp_path / "elsewhere" / second.name)
    refused(ckpt, str(ckpt / ST_INDEX), repr(second.name), "outside the checkpoint folder")


@pytest.mark.parametrize("name", ["config.json", ST_INDEX, "generation_config.json"])
def test_config_and_index_linked_outside_are_refused(ckpt: Path, tmp_path: Path, name: str) -> None:
    if name == ST_INDEX:
        shard(ckpt)
    move_out(ckpt / name, tmp_path / "elsewhere" / name)
    refused(ckpt, str(ckpt / name), "outside the checkpoint folder")


def test_link_through_a_folder_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """A shard name whose folder part is a link out of the checkpoint: resolved, so refused."""
    first, second = shard(ckpt)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(second, tmp_path / "elsewhere" / second.name)
    (ckpt / "sub").symlink_to(tmp_path / "elsewhere")
    index = json.loads((ckpt / ST_INDEX).read_text())
    index["weight_map"] = {k: (f"sub/{v}" if v == second.name else v) for k, v in index["weight_map"].items()}
    (ckpt / ST_INDEX).write_text(json.dumps(index))
    refused(ckpt, str(ckpt / ST_INDEX), repr(f"sub/{second.name}"))


# --- loops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [ST, "config.json", "shard"])
def test_link_loop_is_a_typed_error(ckpt: Path, name: str) -> None:
    if name == "shard":
        name = shard(ckpt)[1].name
    (ckpt / name).unlink()
    (ckpt / name).symlink_to(ckpt / "loop")
    (ckpt / "loop").symlink_to(ckpt / name)
    refused(ckpt, name, "symbolic link loop")


def test_self_link_loop(ckpt: Path) -> None:
    (ckpt / ST).unlink()
    (ckpt / ST).symlink_to(ST)
    refused(ckpt, str(ckpt / ST), "symbolic link loop")


# --- links the policy allows ------------------------------------------------------------------


def test_links_inside_the_folder_load(ckpt: Path, base: Path) -> None:
    first, second = shard(ckpt)
    (ckpt / "store").mkdir()
    for path in (first, second, ckpt / "config.json"):
        shutil.move(path, ckpt / "store" / path.name)
        path.symlink_to(Path("store") / path.name)  # relative links, as a cache would write them
    assert_loads_base(ckpt, base)


def test_folder_reached_through_a_link_loads(ckpt: Path, base: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(ckpt)
    assert_loads_base(tmp_path / "alias", base)


def hub_cache(cache: Path, files: dict[str, Path], repo: str = "models--org--tiny", sub: str = "") -> Path:
    """The huggingface_hub cache layout, by hand: blobs/<sha256>, snapshots/<commit>/<name> → ../../blobs/<sha>."""
    root = cache / repo
    snapshot = root / "snapshots" / COMMIT / sub
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        content = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_real_hub_cache_loads(ckpt: Path, base: Path, tmp_path: Path) -> None:
    files = {p.name: p for p in base.iterdir()}
    shard(ckpt)
    sharded = {p.name: p for p in ckpt.iterdir()}
    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, files)
    assert_loads_base(snapshot, base)  # the snapshot folder, as a path
    assert_loads_base("org/tiny", base, cache_dir=cache, local_files_only=True)  # the repo id, offline
    sub = hub_cache(tmp_path / "cache2", sharded, sub="llm")  # in a subfolder: links climb three levels
    assert_loads_base(sub, base)
    assert_loads_base("org/tiny", base, cache_dir=tmp_path / "cache2", local_files_only=True, subfolder="llm")


def test_fake_blobs_linked_to_the_root_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """models--x/snapshots/<commit> whose ``../../blobs`` is a link to ``/``: not a cache; its links go anywhere."""
    outside = tmp_path / "elsewhere" / ST
    outside.parent.mkdir()
    shutil.copy(ckpt / ST, outside)
    snapshot = tmp_path / "fake" / "models--org--tiny" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "blobs").symlink_to("/")
    shutil.copy(ckpt / "config.json", snapshot / "config.json")
    (snapshot / ST).symlink_to("../../blobs" + str(outside))
    refused(snapshot, str(snapshot / ST), str(outside))


def test_blob_that_links_elsewhere_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """A real blobs/ folder whose entry is itself a link out: the resolved target decides."""
    snapshot = hub_cache(tmp_path / "cache", {"config.json": ckpt / "config.json", ST: ckpt / ST})
    blob = Path(os.path.realpath(snapshot / ST))
    outside = tmp_path / "elsewhere" / ST
    move_out(blob, outside)
    refused(snapshot, str(snapshot / ST), str(outside))


def test_blob_of_another_cached_repo_is_refused(ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    other = hub_cache(cache, {ST: ckpt / ST}, repo="models--org--other")
    snapshot = hub_cache(cache, {"config.json": ckpt / "config.json"})
    (snapshot / ST).symlink_to(os.path.relpath(os.path.realpath(other / ST), snapshot))
    refused(snapshot, str(snapshot / ST), "models--org--other")


def test_snapshot_outside_a_models_repo_is_not_a_cache(ckpt: Path, tmp_path: Path) -> None:
    """``snapshots/<commit>`` under a folder that is not ``models--*``: its ``blobs`` gets no exception."""
    snapshot = hub_cache(tmp_path / "cache", {"config.json": ckpt / "config.json", ST: ckpt / ST}, repo="plain")
    refused(snapshot, str(snapshot / "config.json"), str(tmp_path / "cache" / "plain" / "blobs"))
