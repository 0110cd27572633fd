"""The hub source: repo ids through huggingface_hub, against a loopback stand-in for the hub.

No network is used: ``FakeHub`` (tests/hubserver.py) answers the requests huggingface_hub
makes, as the real hub does, and records them, so tests assert what was (not) fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hubserver import FakeHub, folder_files, go_offline, hub  # noqa: F401  (hub: the fixture)

import lmport
import lmport.pipeline
from lmport import errors

from conftest import save_hf_llama_random

# --- checkpoints -----------------------------------------------------------------------------

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 0]])


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_logits(model: Any, expected: torch.Tensor) -> None:
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


@dataclass
class Checkpoints:
    """Files of one random tiny Llama in several layouts, with transformers' logits for it."""

    single: dict[str, bytes]  # config.json, generation_config.json, model.safetensors
    sharded: dict[str, bytes]  # config.json, model.safetensors.index.json, model-0000k-of-0000n.safetensors
    bin: bytes  # pytorch_model.bin with the same tensors
    expected: torch.Tensor

    @property
    def shards(self) -> list[str]:
        return sorted(n for n in self.sharded if n.startswith("model-"))


def make_checkpoints(root: Path, seed: int, **overrides: Any) -> Checkpoints:
    import transformers
    from safetensors.torch import load_file

    single = save_hf_llama_random(root / f"single{seed}", seed=seed, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(root / f"sharded{seed}", max_shard_size="100KB")
    buffer = io.BytesIO()
    torch.save(load_file(single / "model.safetensors"), buffer)
    sharded = folder_files(root / f"sharded{seed}")
    assert sum(n.startswith("model-") for n in sharded) >= 2, sorted(sharded)
    return Checkpoints(folder_files(single), sharded, buffer.getvalue(), logits(model))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoints, Checkpoints, Checkpoints]:
    """Three different checkpoints: A and B (seeds 0, 1) share a config; C (seed 2) has one layer."""
    root = tmp_path_factory.mktemp("hub-ckpts")
    a, b, c = make_checkpoints(root, 0), make_checkpoints(root, 1), make_checkpoints(root, 2, num_hidden_layers=1)
    assert a.single["config.json"] == b.single["config.json"] != c.single["config.json"]
    return a, b, c


def everything(a: Checkpoints, b: Checkpoints) -> dict[str, bytes]:
    """A repository holding A in every format at once, B as variant "v2", and files no load needs."""
    return {
        **a.sharded,
        "pytorch_model.bin": a.bin,
        "model.v2.safetensors": b.single["model.safetensors"],
        "model-00009-of-00009.safetensors": b.sharded[b.shards[0]],  # a shard no index lists
        "README.md": b"# tiny\n",
        "tokenizer.json": b"{}",
        "tf_model.h5": b"not fetched",
    }


def requested(hub: FakeHub, repo_id: str = "org/tiny") -> set[str]:
    """File names of every /resolve/ request (HEAD or GET) for ``repo_id``."""
    return {p.split("/", 3)[3] for m in ("HEAD", "GET") for p in hub.fetched(m) if p.startswith(repo_id + "/")}


def revisions_used(hub: FakeHub) -> set[str]:
    return {p.split("/")[2] for m in ("HEAD", "GET") for p in hub.fetched(m)}


def cdn_gets(hub: FakeHub) -> set[str]:
    return {p.removeprefix("/cdn/") for m, p in hub.requests if m == "GET" and p.startswith("/cdn/")}


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def load(name: str, cache: Path, **kwargs: Any) -> Any:
    return lmport.AutoModelForCausalLM.from_pretrained(name, cache_dir=cache, **kwargs)


# --- downloads: only what the load needs, all at one commit ------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "source", "wanted"),
    [
        ({}, "a", "sharded"),
        ({"use_safetensors": True}, "a", "sharded"),
        ({"use_safetensors": False}, "a", "pytorch_model.bin"),
        ({"variant": "v2"}, "b", "model.v2.safetensors"),
    ],
    ids=["default", "use_safetensors", "bin", "variant"],
)
def test_download_fetches_only_the_chosen_format(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, kwargs: dict[str, Any], source: str, wanted: str
) -> None:
    a, b, _ = ckpts
    commit = hub.push("org/tiny", everything(a, b))
    model = load("org/tiny", tmp_path / "cache", **kwargs)
    assert_logits(model, {"a": a, "b": b}[source].expected)

    files = ["model.safetensors.index.json", *a.shards] if wanted == "sharded" else [wanted]
    # config, generation config, one format; no other format, no orphan shard, no README...
    assert requested(hub) == {"config.json", "generation_config.json", *files}
    assert revisions_used(hub) == {commit}  # every file at the resolved commit, never at "main"
    weights = {sha256(everything(a, b)[f]) for f in files if f.endswith((".safetensors", ".bin"))}
    assert cdn_gets(hub) == weights  # each weight file downloaded exactly from its own blob
    assert sum(1 for m, p in hub.requests if m == "GET" and p.startswith("/cdn/")) == len(weights)
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / commit
    assert sorted(folder_files(snapshot)) == sorted(["config.json", "generation_config.json", *files])
    assert model.name_or_path == "org/tiny"

    hub.requests.clear()  # a second load reads the cache: the API is asked, no file is downloaded again
    assert_logits(load("org/tiny", tmp_path / "cache", **kwargs), {"a": a, "b": b}[source].expected)
    assert not [p for m, p in hub.requests if m == "GET" and ("/resolve/" in p or p.startswith("/cdn/"))]


def test_force_download_fetches_again(hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path) -> None:
    a = ckpts[0]
    hub.push("org/tiny", a.single)
    load("org/tiny", tmp_path / "cache")
    hub.requests.clear()
    assert_logits(load("org/tiny", tmp_path / "cache", force_download=True), a.expected)
    assert requested(hub) == {"config.json", "generation_config.json", "model.safetensors"}
    assert cdn_gets(hub) == {sha256(a.single["model.safetensors"])}
    with pytest.raises(errors.ArgumentError, match="force_download"):
        load("org/tiny", tmp_path / "cache", force_download=True, local_files_only=True)


def test_revision_pins_one_commit(hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path) -> None:
    a, b, c = ckpts
    old = hub.push("org/tiny", a.sharded, ref="v1")
    new = hub.push("org/tiny", b.single)  # main
    cache = tmp_path / "cache"

    assert_logits(load("org/tiny", cache, revision="v1"), a.expected)  # a tag
    assert revisions_used(hub) == {old}
    assert_logits(load("org/tiny", cache, revision=old), a.expected)  # a commit id
    hub.requests.clear()

    # main moves to C (another config and other weights) right after config.json was asked for:
    # the weights must still come from the commit the config came from.
    def push_after_config(method: str, path: str) -> None:
        if path.endswith("/config.json") and hub.repos["org/tiny"].refs["main"] == new:
            hub.push("org/tiny", c.single)

    hub.on_served = push_after_config
    model = load("org/tiny", cache)
    assert_logits(model, b.expected)
    assert model.config.num_hidden_layers == 2
    assert revisions_used(hub) == {new}
    moved = hub.repos["org/tiny"].refs["main"]
    assert moved not in (old, new)
    hub.on_served = None
    model = load("org/tiny", cache)  # the next load resolves main again
    assert_logits(model, c.expected)
    assert model.config.num_hidden_layers == 1
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == moved
    assert (cache / "models--org--tiny" / "refs" / "v1").read_text() == old


def test_subfolder_autoconfig_and_token(hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path) -> None:
    a = ckpts[0]
    commit = hub.push("org/private", {f"llm/{k}": v for k, v in a.single.items()} | {"README.md": b"x"}, token="hf_ok")
    cache = tmp_path / "cache"
    model = load("org/private", cache, subfolder="llm", token="hf_ok")
    assert_logits(model, a.expected)
    assert requested(hub, "org/private") == {"llm/config.json", "llm/generation_config.json", "llm/model.safetensors"}
    hub_calls = [auth for (m, p), auth in zip(hub.requests, hub.auth) if not p.startswith(("/cdn/", "/api/agent"))]
    assert hub_calls and set(hub_calls) == {"Bearer hf_ok"}  # the token reached every hub request
    cdn_auth = [auth for (m, p), auth in zip(hub.requests, hub.auth) if p.startswith("/cdn/")]
    assert cdn_auth == [None]  # and was not sent to the CDN origin

    config = lmport.AutoConfig.from_pretrained("org/private", cache_dir=cache, subfolder="llm", token="hf_ok")
    assert type(config).__name__ == "LlamaConfig" and config.num_hidden_layers == 2 and config.vocab_size == 128
    folder = lmport.pipeline.resolve_folder(
        "org/private", lmport.options.SourceOptions(cache_dir=str(cache), subfolder="llm", token="hf_ok")
    )
    assert folder == (cache / "models--org--private" / "snapshots" / commit / "llm").resolve()
    with pytest.warns(UserWarning, match="proxies= is ignored"):
        load("org/private", cache, subfolder="llm", token="hf_ok", proxies={"https": "http://proxy:1"})


# --- the cache: offline, and shared with transformers both ways --------------------------------


def test_cache_filled_by_lmport_serves_offline_lmport_and_transformers(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    a, b, _ = ckpts
    hub.push("org/tiny", everything(a, b))
    cache = tmp_path / "cache"
    load("org/tiny", cache)
    hub.requests.clear()

    hub.down = True  # the hub answers 503: the cached commit of main and its files are used, as transformers does
    assert_logits(load("org/tiny", cache), a.expected)
    assert hub.requests and not [p for m, p in hub.requests if "/resolve/" in p or p.startswith("/cdn/")]
    hub.requests.clear()
    with pytest.raises(errors.OfflineError, match="could not be reached"):
        load("org/tiny", cache, use_safetensors=False)  # not cached, and cannot be fetched now
    hub.requests.clear()

    assert_logits(load("org/tiny", cache, local_files_only=True), a.expected)
    go_offline(monkeypatch)
    assert_logits(load("org/tiny", cache), a.expected)
    assert_logits(transformers.AutoModelForCausalLM.from_pretrained("org/tiny", cache_dir=cache), a.expected)
    assert hub.requests == []  # nothing left this process
    with pytest.raises(errors.OfflineError, match="HF_HUB_OFFLINE") as info:
        load("org/tiny", cache, use_safetensors=False)  # .bin was never downloaded
    assert "pytorch_model.bin" in str(info.value) and str(cache) in str(info.value)
    assert hub.requests == []


def test_cache_filled_by_transformers_serves_offline_lmport(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    a, b, _ = ckpts
    commit = hub.push("org/tiny", everything(a, b))
    cache = tmp_path / "cache"
    transformers.AutoModelForCausalLM.from_pretrained("org/tiny", cache_dir=cache)
    assert {"model.safetensors.index.json", *a.shards} <= requested(hub)  # transformers took the sharded safetensors
    hub.requests.clear()

    go_offline(monkeypatch)
    model = load("org/tiny", cache)
    assert_logits(model, a.expected)
    assert hub.requests == []
    folder = lmport.pipeline.resolve_folder("org/tiny", lmport.options.SourceOptions(cache_dir=str(cache)))
    assert folder == (cache / "models--org--tiny" / "snapshots" / commit).resolve()


def test_cache_built_by_hand_is_read_offline(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard layout, written without huggingface_hub: models--org--name/{blobs,snapshots/<commit>,refs/main}."""
    a = ckpts[0]
    repo = tmp_path / "cache" / "models--org--hand"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, content in a.single.items():
        blob = repo / "blobs" / sha256(content)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    go_offline(monkeypatch)
    assert_logits(load("org/hand", tmp_path / "cache"), a.expected)
    assert_logits(load("org/hand", tmp_path / "cache", revision=commit), a.expected)
    assert hub.requests == []


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_not_cached_and_no_network_is_an_offline_error(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    hub.push("org/tiny", ckpts[0].single)
    kwargs: dict[str, Any] = {}
    if how == "HF_HUB_OFFLINE":
        go_offline(monkeypatch)
    else:
        kwargs["local_files_only"] = True
    with pytest.raises(errors.OfflineError) as info:
        load("org/tiny", tmp_path / "empty", **kwargs)
    message = str(info.value)
    assert how in message and "'org/tiny'" in message and str(tmp_path / "empty") in message
    assert hub.requests == []


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "error", "fragments"),
    [
        ("no token", errors.AuthenticationError, ["401", "token=", "hf auth login", "huggingface-cli login"]),
        ("wrong token", errors.AuthenticationError, ["refused the token", "token="]),
        ("gated", errors.GatedRepoError, ["gated", "Request access", "token=", "huggingface-cli login"]),
        ("no repo", errors.RepoNotFoundError, ["'org/nope'", "not a local folder", "404"]),
        ("no revision", errors.RevisionNotFoundError, ["'nope'", "branch, a tag or a commit"]),
        ("no config", errors.HubFileNotFoundError, ["config.json", "README.md"]),
        ("no weights", errors.WeightsNotFoundError, ["model.safetensors", "pytorch_model.bin", "tf_model.h5"]),
        ("shard absent", errors.MissingShardError, ["model-00001-of-", "does not have"]),
        ("shard escapes", errors.UnsafePathError, ["../outside.safetensors"]),
    ],
)
def test_hub_errors_are_typed_and_say_what_to_do(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, case: str, error: type, fragments: list[str]
) -> None:
    a = ckpts[0]
    config = {"config.json": a.single["config.json"]}
    index = json.loads(a.sharded["model.safetensors.index.json"])
    repo, kwargs = "org/tiny", {}
    if case == "no token":
        hub.push(repo, a.single, token="hf_ok")
    elif case == "wrong token":
        hub.push(repo, a.single, token="hf_ok")
        kwargs["token"] = "hf_bad"
    elif case == "gated":
        hub.push(repo, a.single, gated=True)
        kwargs["token"] = "hf_ok"
    elif case == "no repo":
        hub.push(repo, a.single)
        repo = "org/nope"
    elif case == "no revision":
        hub.push(repo, a.single)
        kwargs["revision"] = "nope"
    elif case == "no config":
        hub.push(repo, {"model.safetensors": a.single["model.safetensors"], "README.md": b"x"})
    elif case == "no weights":
        hub.push(repo, {**config, "tf_model.h5": b"h5"})
    elif case == "shard absent":
        hub.push(repo, {**config, "model.safetensors.index.json": a.sharded["model.safetensors.index.json"]})
    else:
        index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
        hub.push(repo, {**config, "model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(lmport.LmportError) as info:
        load(repo, tmp_path / "cache", **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, (errors.SourceError, errors.WeightsError))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    weights_fetched = {f for f in requested(hub, repo) if f.endswith((".safetensors", ".bin"))}
    assert weights_fetched == set()  # a failed resolution downloads no weights


def test_local_paths_win_and_invalid_ids_are_not_sent(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _ = ckpts
    hub.push("org/tiny", b.single)
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    for name, content in a.single.items():
        (local / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert_logits(lmport.AutoModelForCausalLM.from_pretrained("org/tiny"), a.expected)  # the folder, not the repo
    for name in ("no/such/folder", "./tiny", "org/../tiny", "a--b/c"):
        with pytest.raises(errors.SourceError) as info:
            lmport.AutoModelForCausalLM.from_pretrained(name)
        assert type(info.value) is errors.SourceError and name in str(info.value)
    assert hub.requests == []


def test_cli_inspect_repo_id_through_hf_endpoint(hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path) -> None:
    a = ckpts[0]
    commit = hub.push("org/tiny", {**a.sharded, "pytorch_model.bin": a.bin})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-m", "lmport", "inspect", "org/tiny", "--json"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["folder"] == str((tmp_path / "cache" / "models--org--tiny" / "snapshots" / commit).resolve())
    assert report["model_type"] == "llama"
    # (names: the sharded format reports each shard by its resolved path, a blob of the cache; see the report)
    assert sorted(f["bytes"] for f in report["weight_files"]) == sorted(len(a.sharded[s]) for s in a.shards)
    assert requested(hub) == {"config.json", "generation_config.json", "model.safetensors.index.json", *a.shards}


def test_generation_config_of_the_repo_is_fetched_and_honoured(
    hub: FakeHub, ckpts: tuple[Checkpoints, ...], tmp_path: Path
) -> None:
    a = ckpts[0]
    settings = {"eos_token_id": [2, 7], "max_new_tokens": 5, "bos_token_id": 1}
    hub.push("org/tiny", {**a.single, "generation_config.json": json.dumps(settings).encode()})
    model = load("org/tiny", tmp_path / "cache")
    assert model.generation_config.eos_token_id == [2, 7]
    assert model.generation_config.max_new_tokens == 5
    hub.push("org/plain", {k: v for k, v in a.single.items() if k != "generation_config.json"})
    hub.requests.clear()
    assert load("org/plain", tmp_path / "cache").generation_config.max_new_tokens is None
    assert "generation_config.json" not in requested(hub, "org/plain")  # not asked for: the listing lacks it
