"""Weights, index files, vanishing files and arguments: every failure is a typed LmportError naming the culprit.

Each case starts from a tiny Llama saved by transformers, breaks one thing, and asserts
the exact :class:`lmport.LmportError` subclass, a message naming the file and the
tensor / key / argument at fault, and (with ``tree_digest``) that the folder is
unchanged. Controls show that the unbroken variant of each case loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf_llama, tree_digest
from safetensors.torch import load_file, save_file

import lmport
from lmport import errors
from lmport.plugins import safetensors_format, torch_bin_format

ST = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
UP = "model.layers.0.mlp.up_proj.weight"  # a floating parameter of every tiny Llama


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("weight_errors") / "ckpt", seed=5)


@pytest.fixture
def ckpt(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(base, folder)
    return folder


def fails(folder: Path | Any, error: type[Exception], *fragments: str, **kwargs: Any) -> str:
    """Load ``folder``: exactly ``error``, every fragment in its message, and no file of the folder changed."""
    watched = Path(folder) if isinstance(folder, Path) else None
    before = tree_digest(watched) if watched is not None else None
    with pytest.raises(lmport.LmportError) as info:
        lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message: {message}"
    if watched is not None:
        assert tree_digest(watched) == before, "the checkpoint folder changed during a failed load"
    return message


def rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / ST))
    edit(state)
    save_file(state, str(folder / ST), metadata={"format": "pt"})
    return state


def shard(folder: Path, fmt: str = "safetensors") -> tuple[list[Path], dict[str, str]]:
    """Split the weights into two shards with an index (safetensors or .bin); returns (shards, weight_map)."""
    state = load_file(str(folder / ST))
    names = sorted(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files = [f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"]
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for file, part in zip(files, parts):
        tensors = {n: state[n] for n in part}
        if fmt == "safetensors":
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    write_index(folder / (ST_INDEX if fmt == "safetensors" else BIN_INDEX), weight_map)
    (folder / ST).unlink()
    return [folder / f for f in files], weight_map


def write_index(path: Path, weight_map: dict[str, Any]) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def to_bin(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(str(folder / ST))
    edit(state)
    (folder / ST).unlink()
    torch.save(state, folder / BIN)
    return folder / BIN


# --- dtypes and layouts --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int64])
def test_safetensors_non_float_weight_of_a_floating_parameter(ckpt: Path, dtype: torch.dtype) -> None:
    rewrite(ckpt, lambda s: s.__setitem__(UP, s[UP].to(dtype)))
    label = str(dtype).removeprefix("torch.")
    fails(ckpt, errors.UnsupportedTensorError, str(ckpt / ST), repr(UP), label, "floating-point")


def test_unused_non_float_tensor_is_only_unexpected(ckpt: Path) -> None:
    """The control: an integer tensor that no parameter needs does not fail the load."""
    rewrite(ckpt, lambda s: s.__setitem__("extra.step_counter", torch.arange(3, dtype=torch.int32)))
    _, info = lmport.AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert info["unexpected_keys"] == ["extra.step_counter"]


@pytest.mark.parametrize("everything", [False, True], ids=["one-tensor", "all-F8"])
def test_safetensors_float8_without_a_quantizer_is_refused(ckpt: Path, everything: bool) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        for name in list(state) if everything else [UP]:
            state[name] = state[name].to(torch.float8_e4m3fn)

    rewrite(ckpt, edit)
    message = fails(ckpt, errors.UnsupportedTensorError, str(ckpt / ST), "float8_e4m3fn", "quantization_config")
    if not everything:
        assert repr(UP) in message


def make_qint8(t: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(t, 0.01, 0, torch.qint8)


@pytest.mark.parametrize(
    ("kind", "convert", "fragment"),
    [
        ("qint8", make_qint8, "torch-quantized (qint8)"),
        ("sparse_coo", lambda t: t.to_sparse(), "sparse_coo"),
        ("sparse_csr", lambda t: t.to_sparse_csr(), "sparse_csr"),
        ("complex", lambda t: t.to(torch.complex64), "complex64"),
        ("float8", lambda t: t.to(torch.float8_e5m2), "float8_e5m2"),
        ("int8", lambda t: t.to(torch.int8), "int8"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation of qint8, beta state of CSR
def test_bin_tensor_lmport_cannot_use(
    ckpt: Path, kind: str, convert: Callable[[torch.Tensor], torch.Tensor], fragment: str
) -> None:
    path = to_bin(ckpt, lambda s: s.__setitem__(UP, convert(s[UP])))
    fails(ckpt, errors.UnsupportedTensorError, str(path), repr(UP), fragment)


def test_float8_dtype_argument_is_refused(ckpt: Path) -> None:
    fails(ckpt, errors.ArgumentError, "float8_e4m3fn", dtype=torch.float8_e4m3fn)


# --- index files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        (["model-00001-of-00002.safetensors"], errors.CorruptWeightsError, "not a shard file name"),
        ({"file": "x"}, errors.CorruptWeightsError, "not a shard file name"),
        (7, errors.CorruptWeightsError, "not a shard file name"),
        (None, errors.CorruptWeightsError, "not a shard file name"),
        ("", errors.CorruptWeightsError, "not a shard file name"),
        ("model-00001-of-00002.safetensors\x00.txt", errors.UnsafePathError, "NUL"),
        ("a" * 5000, errors.CorruptWeightsError, "longer than a file name can be"),
        ("sub/" + "b" * 300, errors.CorruptWeightsError, "longer than a file name can be"),
    ],
    ids=["list", "object", "int", "null", "empty", "nul", "too-long", "part-too-long"],
)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_value_that_is_not_a_file_name(
    ckpt: Path, fmt: str, value: Any, error: type[Exception], fragment: str
) -> None:
    _, weight_map = shard(ckpt, fmt)
    index = ckpt / (ST_INDEX if fmt == "safetensors" else BIN_INDEX)
    write_index(index, {**weight_map, UP: value})
    fails(ckpt, error, str(index), repr(UP), fragment)


def test_index_that_is_deeply_nested_json(ckpt: Path) -> None:
    shard(ckpt)
    (ckpt / ST_INDEX).write_text("[" * 100_000 + "]" * 100_000)
    fails(ckpt, errors.CorruptWeightsError, str(ckpt / ST_INDEX))


# --- duplicates -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_unlisted_copy_in_another_shard_is_refused(ckpt: Path, fmt: str) -> None:
    """The index puts UP in shard 1; a zeroed copy in shard 2 must not silently win (it would, loaded last)."""
    files, weight_map = shard(ckpt, fmt)
    listed = Path(weight_map[UP])
    other = next(f for f in files if f.name != listed.name)
    if fmt == "safetensors":
        state = load_file(str(other))
        state[UP] = torch.zeros_like(load_file(str(ckpt / listed))[UP])
        save_file(state, str(other), metadata={"format": "pt"})
    else:
        state = torch.load(other, weights_only=True)
        state[UP] = torch.zeros_like(torch.load(ckpt / listed, weights_only=True)[UP])
        torch.save(state, other)
    index = ST_INDEX if fmt == "safetensors" else BIN_INDEX
    fails(ckpt, errors.DuplicateTensorError, repr(UP), listed.name, other.name, index)


# --- files that change during the load ------------------------------------------------------


def test_shard_deleted_after_listing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = shard(ckpt)
    found = safetensors_format.SafetensorsFormat.find

    def then_delete(*args: Any, **kwargs: Any) -> Any:
        result = found(*args, **kwargs)
        files[1].unlink()
        return result

    monkeypatch.setattr(safetensors_format.SafetensorsFormat, "find", then_delete)
    with pytest.raises(errors.WeightsChangedError, match=files[1].name):
        lmport.AutoModelForCausalLM.from_pretrained(ckpt)


def after_listing(monkeypatch: pytest.MonkeyPatch, source_class: type, change: Callable[[], None]) -> None:
    """Run ``change`` once every tensor of the load has been listed (before any is read)."""
    infos = source_class.infos

    def then_change(self: Any) -> Iterator[Any]:
        yield from infos(self)
        change()

    monkeypatch.setattr(source_class, "infos", then_change)


def test_safetensors_truncated_after_listing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ckpt / ST
    after_listing(monkeypatch, safetensors_format.SafetensorsSource, lambda: os.truncate(path, 4096))
    with pytest.raises(errors.WeightsChangedError, match="truncated") as info:
        lmport.AutoModelForCausalLM.from_pretrained(ckpt)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["mapped", "cast"])
def test_safetensors_deleted_after_listing_loads_what_was_listed(
    ckpt: Path, base: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype | None
) -> None:
    """Deleted (or replaced) once opened, the file that was listed is still the one read: a whole model."""
    path = ckpt / ST
    after_listing(monkeypatch, safetensors_format.SafetensorsSource, path.unlink)
    model = lmport.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    reference = load_file(str(base / ST))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_bin_shard_deleted_after_listing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = shard(ckpt, "bin")
    after_listing(monkeypatch, torch_bin_format.TorchBinSource, files[0].unlink)
    with pytest.raises(errors.WeightsChangedError, match=files[0].name):
        lmport.AutoModelForCausalLM.from_pretrained(ckpt)


def test_bin_truncated_after_listing(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = to_bin(ckpt, lambda s: None)
    after_listing(monkeypatch, torch_bin_format.TorchBinSource, lambda: os.truncate(path, 4096))
    with pytest.raises(errors.WeightsChangedError, match="truncated") as info:
        lmport.AutoModelForCausalLM.from_pretrained(ckpt)
    assert str(path) in str(info.value)


def test_io_error_while_reading_names_the_file_and_tensor(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight source that lets the file system's OSError through still fails with a typed error."""

    def broken(self: Any, info: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors_format.SafetensorsSource, "read_as", broken)
    with pytest.raises(errors.CorruptWeightsError, match="Input/output error") as info:
        lmport.AutoModelForCausalLM.from_pretrained(ckpt)
    assert str(ckpt / ST) in str(info.value) and "cannot read tensor" in str(info.value)


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"plugin": ["x"]},
        {"plugin": 3},
        {"plugin": ""},
        {"variant": ["fp16"]},
        {"variant": "../fp16"},
        {"use_safetensors": "yes"},
        {"output_loading_info": "no"},
        {"ignore_mismatched_sizes": 1},
        {"trust_remote_code": "x"},
        {"local_files_only": "x"},
        {"subfolder": ["x"]},
        {"revision": 3},
        {"cache_dir": 3},
        {"offload_folder": 3},
        {"attn_implementation": ["eager"]},
        {"token": 3},
        {"proxies": "http://x"},
        {"max_memory": "1GB"},
        {"subfolder": "a\x00b"},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_wrongly_typed_argument_is_an_argument_error(base: Path, kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    fails(base, errors.ArgumentError, name, **kwargs)


@pytest.mark.parametrize("name_or_path", [["ckpt"], 3, None, b"ckpt"], ids=["list", "int", "none", "bytes"])
def test_name_or_path_of_the_wrong_type(name_or_path: Any) -> None:
    fails(name_or_path, errors.ArgumentError, "pretrained_model_name_or_path")


def test_name_too_long_for_a_path_is_a_source_error() -> None:
    fails("a" * 5000, errors.SourceError, "not a usable path")


def test_autoconfig_plugin_of_the_wrong_type(base: Path) -> None:
    with pytest.raises(errors.ArgumentError, match="plugin"):
        lmport.AutoConfig.from_pretrained(base, plugin=["x"])


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path: Path) -> None:
    """A folder holding model.safetensors and a (stale) index with other shards: both libraries read the single file."""
    import shutil

    import transformers
    from conftest import save_hf_llama_random
    from helpers import load_lmport

    single = save_hf_llama_random(tmp_path / "single", seed=0)
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(save_hf_llama_random(tmp_path / "other", seed=1)).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    for f in sharded.iterdir():
        if f.name.startswith("model-") or f.name.endswith(".index.json"):
            shutil.copy(f, single / f.name)
    ids = torch.tensor([[1, 5, 9, 33, 2, 77]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(load_lmport(single)(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
