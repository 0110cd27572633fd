"""``push_to_hub`` (model and config) and ``save_pretrained(push_to_hub=True)`` against the loopback hub.

The uploads go through huggingface_hub's real client (create_repo, preupload, LFS batch
and PUT, the ndjson commit API) to ``FakeHub`` (tests/hubserver.py), which records the
files of every commit; the uploaded checkpoint is then loaded from that hub by lmport
and by transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf, tiny_configs
from helpers import assert_logits_close, load_lmport, one_intraop_thread
from hubserver import FakeHub, go_offline, hub  # noqa: F401  (hub: the fixture)

import lmport
from lmport import errors

# huggingface_hub's LFS PUT passes a file object as data=, which its HTTP client deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

TOKEN = "hf_write_token"
IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])
#: Files a model save may write besides the weights (generation_config.json when the model has one).
OPTIONAL = {"generation_config.json"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(tmp_path_factory.mktemp("push") / "gpt2", tiny_configs()["gpt2"]())


@pytest.fixture
def writer(hub: FakeHub) -> FakeHub:
    hub.users[TOKEN] = "alice"
    return hub


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def from_hub(repo_id: str, cache: Path, **kwargs: Any) -> tuple[Any, Any]:
    """(lmport's, transformers') model of ``repo_id`` downloaded from the fake hub."""
    import transformers

    ours = lmport.AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache / "lmport", **kwargs)
    ref = transformers.AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache / "hf", **kwargs)
    return ours, ref


def card_tags(readme: bytes) -> list[str]:
    from huggingface_hub import ModelCard

    return list(ModelCard(readme.decode()).data.tags or [])


def test_model_push_to_hub_uploads_a_checkpoint_both_libraries_load(
    writer: FakeHub, ckpt: Path, tmp_path: Path
) -> None:
    model = load_lmport(ckpt)
    model.add_model_tags(["trl", "sft"])
    expected = logits(model)
    info = model.push_to_hub("tiny-pushed", token=TOKEN, commit_message="first push", tags="extra", private=True)

    repo = writer.repos["alice/tiny-pushed"]  # no namespace: the token's user
    assert repo.token == TOKEN  # private=True reached create_repo
    files = repo.files("main")
    assert info.oid == repo.refs["main"] and writer.commit_log[-1]["message"] == "first push"
    assert {"config.json", "model.safetensors", "README.md", ".gitattributes"} <= set(files)
    assert set(files) - {"config.json", "model.safetensors", "README.md", ".gitattributes"} <= OPTIONAL
    # weights went up through LFS (a PUT of the blob), the config in the commit itself
    assert writer.lfs_puts == [hashlib.sha256(files["model.safetensors"]).hexdigest()]
    assert all(a == f"Bearer {TOKEN}" for (m, p), a in zip(writer.requests, writer.auth) if m in ("POST", "PUT")
               and not p.startswith("/lfs-upload/"))  # fmt: skip
    assert card_tags(files["README.md"]) == ["trl", "sft", "extra"]
    assert json.loads(files["config.json"])["model_type"] == "gpt2"

    ours, ref = from_hub("alice/tiny-pushed", tmp_path, token=TOKEN)
    assert_logits_close(logits(ours), expected)
    assert_logits_close(logits(ref), expected)

    # a second push commits on top; the existing card is kept and tagged, not replaced
    with torch.no_grad():
        model.model.norm.bias.add_(0.5)
    model.push_to_hub("alice/tiny-pushed", token=TOKEN, tags=["v2"])
    assert len(repo.commits) == 3 and writer.commit_log[-1]["message"] == "Upload model"  # transformers' default
    assert card_tags(repo.files("main")["README.md"]) == ["trl", "sft", "extra", "v2"]
    ours, _ = from_hub("alice/tiny-pushed", tmp_path / "again", token=TOKEN)
    assert_logits_close(logits(ours), logits(model))


def test_save_pretrained_push_to_hub_arguments(writer: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    """repo_id, commit_message, create_pr, token and create_repo kwargs, as transformers takes them."""
    model = load_lmport(ckpt)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("not part of the save")  # older files are not uploaded
    returned = model.save_pretrained(
        folder, push_to_hub=True, repo_id="alice/pr-model", commit_message="via save", create_pr=True,
        token=TOKEN, private=False, commit_description="a PR",
    )  # fmt: skip
    assert returned == folder and (folder / "README.md").is_file() and (folder / "config.json").is_file()
    repo = writer.repos["alice/pr-model"]
    assert repo.token is None and set(repo.files("main")) == {".gitattributes"}  # the upload is a pull request
    log = writer.commit_log[-1]
    assert log["ref"] == "refs/pr/1" and log["message"] == "via save" and log["description"] == "a PR"
    assert "notes.txt" not in log["files"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(log["files"])
    assert set(log["files"]) - {"config.json", "model.safetensors", "README.md"} <= OPTIONAL
    ours, ref = from_hub("alice/pr-model", tmp_path, revision="refs/pr/1")
    assert_logits_close(logits(ours), logits(model))
    assert_logits_close(logits(ref), logits(model))

    # repo_id defaults to the folder's name, in the token's namespace; a revision creates its branch
    model.save_pretrained(tmp_path / "my-model", push_to_hub=True, token=TOKEN, revision="dev")
    repo = writer.repos["alice/my-model"]
    assert "model.safetensors" in repo.files("dev") and "model.safetensors" not in repo.files("main")
    assert writer.commit_log[-1]["message"] == "Upload model"


def test_config_push_to_hub(writer: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    import transformers

    config = lmport.AutoConfig.from_pretrained(ckpt)
    config.push_to_hub("alice/cfg", token=TOKEN)
    files = writer.repos["alice/cfg"].files("main")
    assert set(files) == {".gitattributes", "config.json", "README.md"}
    assert writer.commit_log[-1]["message"] == "Upload config"
    ref = transformers.AutoConfig.from_pretrained("alice/cfg", cache_dir=tmp_path / "hf")
    assert ref.to_dict()["n_embd"] == config.hidden_size and ref.model_type == "gpt2"

    config.save_pretrained(tmp_path / "cfg-dir", push_to_hub=True, repo_id="alice/cfg2", token=TOKEN)
    assert set(writer.repos["alice/cfg2"].files("main")) == {".gitattributes", "config.json"}  # no card (transformers)
    with pytest.raises(errors.ArgumentError, match="max_shard_size"):
        config.save_pretrained(tmp_path / "x", max_shard_size="1GB")


def test_push_errors_are_typed_hub_errors(
    writer: FakeHub, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_lmport(ckpt)
    with pytest.raises(errors.AuthenticationError, match="write access"):
        model.push_to_hub("alice/no-token", token=False)
    with pytest.raises(errors.AuthenticationError, match="refused the token"):
        model.push_to_hub("alice/bad-token", token="hf_wrong")
    with pytest.raises(errors.ArgumentError, match="no_such_arg"):
        model.save_pretrained(tmp_path / "bad", push_to_hub=True, token=TOKEN, no_such_arg=1)
    assert "alice/no-token" not in writer.repos and not (tmp_path / "bad").exists()

    writer.requests.clear()
    go_offline(monkeypatch)
    for push in (
        lambda: model.push_to_hub("alice/offline", token=TOKEN),
        lambda: model.save_pretrained(tmp_path / "offline", push_to_hub=True, token=TOKEN),
        lambda: model.config.push_to_hub("alice/offline", token=TOKEN),
    ):
        with pytest.raises(errors.OfflineError, match="HF_HUB_OFFLINE") as info:
            push()
        assert isinstance(info.value, errors.HubError)
    assert writer.requests == [] and not (tmp_path / "offline").exists()
