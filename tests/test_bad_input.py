"""Bad checkpoints and bad paths: each gets the most specific typed error, naming the culprit, and nothing is written.

Every case starts from a tiny Llama checkpoint saved by transformers, breaks one
thing, and asserts three things: the exact :class:`lmport.LmportError` subclass,
a message naming the file / key / tensor / plugin at fault, and that the
checkpoint folder is byte-for-byte what it was before the load.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf_llama, tree_digest
from safetensors.torch import load_file, save_file

import lmport
import lmport.registry
from lmport import errors

ST = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One transformers-saved tiny Llama per module; tests break copies of it."""
    return save_hf_llama(tmp_path_factory.mktemp("bad_input_base") / "ckpt", seed=3)


@pytest.fixture
def ckpt(base_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the base checkpoint (``tmp_path/ckpt``)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint, folder)
    return folder


def fails(
    folder: Path | str, error: type[Exception], *fragments: str, digest_of: Path | None = None, **kwargs: Any
) -> str:
    """Load ``folder``; assert exactly ``error`` is raised, its message holds every fragment, and no file changed.

    Returns the message.
    """
    watched = Path(digest_of if digest_of is not None else folder)
    before = tree_digest(watched) if watched.is_dir() else None
    with pytest.raises(lmport.LmportError) as info:
        lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"
    if before is not None:
        assert tree_digest(watched) == before, "the checkpoint folder changed during a failed load"
    return message


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=2))


def read_raw_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw_safetensors(path: Path, header: dict[str, Any], data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors file byte by byte, so its header may lie."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + text + data)


def shard(folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """Split ``model.safetensors`` into two shards with an index; returns (shard1, shard2, weight_map)."""
    state = load_file(str(folder / ST))
    names = sorted(state)
    half = len(names) // 2
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({n: state[n] for n in names[:half]}, str(folder / first), metadata={"format": "pt"})
    save_file({n: state[n] for n in names[half:]}, str(folder / second), metadata={"format": "pt"})
    weight_map = {n: (first if i < half else second) for i, n in enumerate(names)}
    write_index(folder, weight_map)
    (folder / ST).unlink()
    return folder / first, folder / second, weight_map


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / ST_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))


def to_bin(folder: Path, state: dict[str, Any], **save_kwargs: Any) -> Path:
    """Replace the safetensors weights of ``folder`` by ``pytorch_model.bin`` holding ``state``."""
    (folder / ST).unlink()
    path = folder / "pytorch_model.bin"
    torch.save(state, path, **save_kwargs)
    return path


@pytest.fixture
def registry_without(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make the process registry blind to installed providers of a model_type (so the test is stable once
    ``lmport-gpt2`` / ``lmport-mistral`` exist)."""

    def hide(model_type: str) -> None:
        fresh = lmport.registry.Registry()
        installed = fresh.entry_points

        def entry_points(group: str) -> list[Any]:
            hidden = group == lmport.registry.ARCHITECTURES_GROUP
            return [e for e in installed(group) if not (hidden and e.name == model_type)]

        monkeypatch.setattr(fresh, "entry_points", entry_points)
        monkeypatch.setattr(lmport.registry, "_registry", fresh)
        assert model_type not in lmport.registry.get_registry().model_types()

    return hide


class WritesMarker:
    """Pickles to ``open(marker, "w")``: unpickling it anywhere creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


# --- the source ----------------------------------------------------------------------------


def test_nonexistent_path_is_a_source_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    fails(missing, errors.SourceError, str(missing))
    assert not missing.exists()


def test_path_that_is_a_file_is_a_source_error(ckpt: Path) -> None:
    fails(ckpt / ST, errors.SourceError, str(ckpt / ST), "config.json", digest_of=ckpt)


# --- config.json ---------------------------------------------------------------------------


def test_missing_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"))


def test_invalid_json_names_line_and_column(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n  "vocab_size": 128\n}\n')
    message = fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "line 3", "column 21")  # the second comma
    assert "JSON" in message


def test_config_that_is_a_json_list(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('[{"model_type": "llama"}]')
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "JSON object", "list")


def test_config_without_model_type(ckpt: Path) -> None:
    edit_config(ckpt, lambda raw: raw.pop("model_type"))
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "'model_type'")


@pytest.mark.parametrize("value", [7, ["llama"], None, ""], ids=["int", "list", "null", "empty"])
def test_model_type_not_a_string(ckpt: Path, value: Any) -> None:
    edit_config(ckpt, lambda raw: raw.update(model_type=value))
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "'model_type'")


def test_unknown_model_type_lists_installed_types(ckpt: Path) -> None:
    edit_config(ckpt, lambda raw: raw.update(model_type="falcon_xyz"))
    message = fails(ckpt, errors.UnknownModelTypeError, str(ckpt / "config.json"), "'falcon_xyz'", "installed:")
    installed = message.split("installed:", 1)[1]
    for model_type in lmport.registry.get_registry().model_types():
        assert model_type in installed
    assert "llama" in installed
    assert "lmport.register" in message


@pytest.mark.parametrize("model_type", ["gpt2", "mistral"])
def test_known_but_uninstalled_model_type_says_what_to_install(
    ckpt: Path, model_type: str, registry_without: Callable[[str], None]
) -> None:
    registry_without(model_type)
    edit_config(ckpt, lambda raw: raw.update(model_type=model_type))
    fails(ckpt, errors.UnknownModelTypeError, f"'{model_type}'", f"pip install lmport-{model_type}", "llama")


def test_remote_code_is_refused_and_never_imported(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "REPOSITORY_CODE_RAN"
    for module in ("configuration_custom", "modeling_custom"):
        (ckpt / f"{module}.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text({module!r})\n"
            "class CustomConfig: pass\nclass CustomForCausalLM: pass\n"
        )
    auto_map = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    edit_config(ckpt, lambda raw: raw.update(model_type="custom_remote_lm", auto_map=auto_map))
    message = fails(
        ckpt, errors.RemoteCodeError, str(ckpt / "config.json"), "'custom_remote_lm'", "auto_map", "plugin",
        trust_remote_code=True,
    )  # fmt: skip
    assert "modeling_custom.CustomForCausalLM" in message
    assert not marker.exists()
    assert "modeling_custom" not in sys.modules and "configuration_custom" not in sys.modules
    # The same without trust_remote_code.
    fails(ckpt, errors.RemoteCodeError, "'custom_remote_lm'")
    assert not marker.exists()


def test_field_of_wrong_type_names_the_key(ckpt: Path) -> None:
    edit_config(ckpt, lambda raw: raw.update(hidden_size="big"))
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "'hidden_size'", "int", "'big'")


def test_inconsistent_config(ckpt: Path) -> None:
    edit_config(ckpt, lambda raw: raw.update(num_attention_heads=6, head_dim=None))
    fails(ckpt, errors.ConfigError, str(ckpt / "config.json"), "hidden_size (64)", "num_attention_heads (6)")


# --- safetensors files ---------------------------------------------------------------------


def test_truncated_safetensors(ckpt: Path) -> None:
    path = ckpt / ST
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 1000])
    fails(ckpt, errors.CorruptWeightsError, str(path))


def test_safetensors_with_only_a_few_bytes(ckpt: Path) -> None:
    (ckpt / ST).write_bytes(b"\x01\x02\x03")
    fails(ckpt, errors.CorruptWeightsError, str(ckpt / ST))


def _last_tensor(header: dict[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def test_safetensors_header_offsets_past_the_end(ckpt: Path) -> None:
    path = ckpt / ST
    header, data = read_raw_safetensors(path)
    name = _last_tensor(header)
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4096]
    write_raw_safetensors(path, header, data)
    fails(ckpt, errors.CorruptWeightsError, str(path))


def test_safetensors_header_shape_disagrees_with_offsets(ckpt: Path) -> None:
    path = ckpt / ST
    header, data = read_raw_safetensors(path)
    header["model.norm.weight"]["shape"] = [128]  # 64 float32 values are stored
    write_raw_safetensors(path, header, data)
    fails(ckpt, errors.CorruptWeightsError, str(path))


def test_safetensors_header_length_larger_than_file(ckpt: Path) -> None:
    path = ckpt / ST
    header, data = read_raw_safetensors(path)
    write_raw_safetensors(path, header, data, header_len=path.stat().st_size * 2)
    fails(ckpt, errors.CorruptWeightsError, str(path))


# --- sharded checkpoints -------------------------------------------------------------------


def test_shard_listed_in_index_but_absent(ckpt: Path) -> None:
    _, second, _ = shard(ckpt)
    second.unlink()
    fails(ckpt, errors.MissingShardError, str(ckpt / ST_INDEX), "'model-00002-of-00002.safetensors'")


def test_sharded_checkpoint_loads(ckpt: Path, base_checkpoint: Path) -> None:
    """The control for the index cases below: the same split, unbroken, loads the same weights."""
    shard(ckpt)
    model = lmport.AutoModelForCausalLM.from_pretrained(ckpt)
    reference = load_file(str(base_checkpoint / ST))
    state = model.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_pointing_outside_the_folder(ckpt: Path, tmp_path: Path, kind: str) -> None:
    first, second, weight_map = shard(ckpt)
    outside = tmp_path / "x.safetensors"  # a valid shard, present, but outside the checkpoint
    shutil.move(second, outside)
    if kind == "dotdot":
        pointer = "../x.safetensors"
    elif kind == "absolute":
        pointer = str(outside)
    else:
        pointer = "link.safetensors"
        (ckpt / pointer).symlink_to(outside)
    write_index(ckpt, {n: (pointer if s == second.name else s) for n, s in weight_map.items()})
    before_outside = outside.read_bytes()
    fails(ckpt, errors.UnsafePathError, str(ckpt / ST_INDEX), repr(pointer))
    assert outside.read_bytes() == before_outside


def test_index_lists_a_tensor_in_a_shard_that_does_not_hold_it(ckpt: Path) -> None:
    first, second, weight_map = shard(ckpt)
    moved = next(n for n, s in weight_map.items() if s == second.name)
    weight_map[moved] = first.name
    write_index(ckpt, weight_map)
    fails(ckpt, errors.CorruptWeightsError, str(ckpt / ST_INDEX), repr(moved), first.name)


# --- tensors that do not fit the model -----------------------------------------------------

WRONG = "model.layers.0.mlp.down_proj.weight"  # (hidden 64, intermediate 96) in the model


def _with_wrong_shape(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / ST))
    original = dict(state)
    state[WRONG] = torch.randn(64, 80)
    save_file(state, str(folder / ST), metadata={"format": "pt"})
    return original


def test_tensor_of_the_wrong_shape(ckpt: Path) -> None:
    _with_wrong_shape(ckpt)
    fails(
        ckpt, errors.ShapeMismatchError, str(ckpt / ST), repr(WRONG), "(64, 80)", "(64, 96)", "ignore_mismatched_sizes"
    )


def test_ignore_mismatched_sizes_loads_and_reports(ckpt: Path) -> None:
    original = _with_wrong_shape(ckpt)
    before = tree_digest(ckpt)
    model, info = lmport.AutoModelForCausalLM.from_pretrained(
        ckpt, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert tree_digest(ckpt) == before
    assert info["mismatched_keys"] == [(WRONG, (64, 80), (64, 96))]
    assert info["unexpected_keys"] == []
    fresh = model.get_parameter(WRONG)
    assert fresh.shape == (64, 96) and fresh.dtype == torch.float32 and fresh.device.type == "cpu"
    assert not fresh.is_meta and fresh.requires_grad
    assert torch.isfinite(fresh).all()
    assert not torch.equal(fresh, original[WRONG])
    # normal(0, initializer_range=0.02), as transformers initialises a Linear weight
    assert abs(fresh.mean().item()) < 0.002
    assert 0.018 < fresh.std().item() < 0.022
    state = model.state_dict()
    for name, tensor in original.items():
        if name != WRONG:
            assert torch.equal(state[name], tensor), name
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_checkpoint_missing_a_weight(ckpt: Path) -> None:
    state = load_file(str(ckpt / ST))
    gone = "model.layers.1.post_attention_layernorm.weight"
    del state[gone]
    save_file(state, str(ckpt / ST), metadata={"format": "pt"})
    message = fails(ckpt, errors.MissingWeightsError, str(ckpt / ST), gone)
    assert "1 weight" in message


# --- pytorch_model.bin ---------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_with_pickled_code_is_refused_and_not_run(ckpt: Path, tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "PICKLE_CODE_RAN"
    state: dict[str, Any] = dict(load_file(str(ckpt / ST)))
    state["model.norm.weight"] = WritesMarker(marker)
    path = to_bin(ckpt, state, _use_new_zipfile_serialization=zip_format)
    assert not marker.exists()
    message = fails(ckpt, errors.UnsafePickleError, str(path), "weights_only", "GLOBAL")
    assert "open" in message.split("Detail:", 1)[1]  # the refused object is named
    assert not marker.exists()


def test_bin_dict_with_a_non_tensor_value(ckpt: Path) -> None:
    state: dict[str, Any] = dict(load_file(str(ckpt / ST)))
    state["training_step"] = 1200
    path = to_bin(ckpt, state)
    fails(ckpt, errors.UnsafePickleError, str(path), "'training_step'", "int")


def test_bin_that_is_not_a_dict(ckpt: Path) -> None:
    state = load_file(str(ckpt / ST))
    path = to_bin(ckpt, list(state.values()))
    fails(ckpt, errors.UnsafePickleError, str(path), "list")


@pytest.mark.parametrize(
    "content",
    [
        random.Random(0).randbytes(4096),
        b"this is not a checkpoint, just text\n" * 20,
        b"PK\x03\x04" + b"\x00" * 200,
        b"\x80\x02" + b"\xff" * 64,
        b"",
    ],
    ids=["random", "text", "zip-magic", "pickle-magic", "empty"],
)
def test_garbage_bin(ckpt: Path, content: bytes) -> None:
    (ckpt / ST).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(content)
    fails(ckpt, errors.CorruptWeightsError, str(ckpt / "pytorch_model.bin"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_bin(ckpt: Path, zip_format: bool) -> None:
    path = to_bin(ckpt, dict(load_file(str(ckpt / ST))), _use_new_zipfile_serialization=zip_format)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    fails(ckpt, errors.CorruptWeightsError, str(path))


def test_bin_checkpoint_loads(ckpt: Path, base_checkpoint: Path) -> None:
    """The control for the .bin cases: a plain tensor dict loads."""
    reference = load_file(str(base_checkpoint / ST))
    to_bin(ckpt, dict(reference))
    state = lmport.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


# --- no weights ----------------------------------------------------------------------------


def test_no_weight_files(ckpt: Path) -> None:
    (ckpt / ST).unlink()
    (ckpt / "model.ckpt").write_bytes(b"something else")
    fails(
        ckpt, errors.WeightsNotFoundError, str(ckpt),
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    )  # fmt: skip


def test_no_weight_files_of_the_requested_kind(ckpt: Path) -> None:
    message = fails(ckpt, errors.WeightsNotFoundError, "pytorch_model.bin", use_safetensors=False)
    assert "model.safetensors" not in message.replace("pytorch_model.bin", "")
