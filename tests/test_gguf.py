"""GGUF files (llama.cpp's format) through the builtin GGUF weight format, on small synthetic files.

Files are written by the ``gguf`` package's own ``GGUFWriter`` from checkpoints transformers
saved (``gguf_files.convert``: llama.cpp's names, metadata keys, q/k permutation and layouts).
The oracles: transformers' logits on the original checkpoint (an F32 file round-trips it
exactly), transformers' own GGUF loading of the same file, ``gguf``'s name table and reader,
and transformers' independent torch dequantizer. The real SmolLM2 file: test_gguf_smollm2.py.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_LLAMA, save_hf, tiny_configs
from hubserver import hub  # noqa: F401  (the loopback hub fixture)
from gguf_files import QUANTIZABLE, convert, quantized, random_blocks, transformers_logits, write_tensors

import lmport
from lmport.errors import (
    ArgumentError,
    ConfigError,
    CorruptWeightsError,
    UnknownModelTypeError,
    UnsafePathError,
    UnsupportedFeatureError,
    UnsupportedTensorError,
    WeightsNotFoundError,
)
from lmport.gguf_reader import GGML_TYPES, GGUFFile
from lmport.gguf_spec import permute_rows, unpermute_rows
from lmport.testing import load_lmport

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17, 64, 3], [4, 4, 8, 15, 16, 23, 42, 99, 100, 127]])


def lmport_logits(folder: Path, **kwargs: Any) -> torch.Tensor:
    model = load_lmport(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model_type -> a tiny checkpoint transformers saved (GPT-2 with transformers' n_positions: its GGUF
    loading reads the context length into n_ctx and keeps 1024 positions)."""
    root = tmp_path_factory.mktemp("hf")
    configs = tiny_configs(bos_token_id=1, eos_token_id=2)
    out = {}
    for model_type in ("llama", "mistral", "gpt2"):
        config = configs[model_type]()
        if model_type == "gpt2":
            config.n_positions = 1024
        out[model_type] = save_hf(root / model_type, config, seed=3)
    return out


def gguf_folder(tmp_path: Path, hf: Path, name: str = "model.gguf", **kwargs: Any) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir(exist_ok=True)
    convert(hf, folder / name, **kwargs)
    return folder


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_f32_file_round_trips_the_checkpoint_and_matches_transformers_gguf_loading(
    checkpoints: dict[str, Path], tmp_path: Path, model_type: str
) -> None:
    folder = gguf_folder(tmp_path, checkpoints[model_type])
    ours = lmport_logits(folder, gguf_file="model.gguf")
    original = transformers_logits(checkpoints[model_type], IDS)
    torch.testing.assert_close(ours, original, rtol=0, atol=1e-5)
    theirs = transformers_logits(folder, IDS, gguf_file="model.gguf")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_mistral_file_loads_as_mistral(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """transformers cannot load a "mistral" GGUF (gguf's name table has no such architecture): the
    original checkpoint is the oracle, sliding window included."""
    folder = gguf_folder(tmp_path, checkpoints["mistral"])
    model = load_lmport(folder, dtype=torch.float32)  # the folder's only .gguf file
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 4
    with torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(ours, transformers_logits(checkpoints["mistral"], IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0"])
def test_quantized_llama_matches_transformers_gguf_loading(
    checkpoints: dict[str, Path], tmp_path: Path, qtype: str
) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"], qtype=qtype)
    ours = lmport_logits(folder, gguf_file="model.gguf")
    torch.testing.assert_close(ours, transformers_logits(folder, IDS, gguf_file="model.gguf"), rtol=0, atol=1e-5)
    # The file really is quantized: the logits moved away from the original checkpoint's.
    assert (ours - transformers_logits(checkpoints["llama"], IDS)).abs().max().item() > 1e-3


def test_save_pretrained_writes_a_checkpoint_transformers_loads(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = gguf_folder(tmp_path, checkpoints["gpt2"], qtype="Q8_0")
    model = load_lmport(folder, gguf_file="model.gguf", dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors",
    ]  # fmt: skip
    with torch.no_grad():
        ours = model(IDS).logits
    torch.testing.assert_close(transformers_logits(tmp_path / "saved", IDS), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(lmport_logits(tmp_path / "saved"), ours, rtol=0, atol=0)


def test_config_and_autoconfig_come_from_the_metadata(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"], qtype="Q8_0")
    config = lmport.AutoConfig.from_pretrained(folder, gguf_file="model.gguf")
    expected = {k: v for k, v in TINY_LLAMA.items() if k != "max_position_embeddings"}
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.max_position_embeddings == 64 and config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id, config.dtype) == (1, 2, "float32")
    # dtype="auto": a quantized file loads in float32, the type its tensors are dequantized to.
    assert lmport.AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float32


# --- names and layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gpt2"])
def test_tensor_names_round_trip_through_ggufs_own_table(checkpoints: dict[str, Path], model_type: str) -> None:
    from safetensors import safe_open

    registry = lmport.get_registry()
    registry.ensure(model_type)
    spec = registry.hook.lmport_gguf_architecture(name=model_type)
    assert spec.model_type == model_type
    arch = gguf.MODEL_ARCH.GPT2 if model_type == "gpt2" else gguf.MODEL_ARCH.LLAMA
    table = gguf.get_tensor_name_map(arch, 2)
    with safe_open(checkpoints[model_type] / "model.safetensors", "pt") as f:
        names = [n for n in f.keys() if not n.endswith((".attn.bias", ".attn.masked_bias"))]
    assert names
    for name in names:
        base, suffix = name.rsplit(".", 1)
        expected = f"{table.get_name(base)}.{suffix}"
        assert spec.gguf_name(name) == expected
        assert spec.checkpoint_name(expected) == name


def test_row_permutation_is_llama_cpps_and_is_undone() -> None:
    from gguf_files import llama_cpp_permute

    for rows, heads, kv in ((64, 4, 4), (32, 4, 2), (48, 3, 3)):
        w = torch.randn(rows, 5)
        assert torch.equal(permute_rows(w, heads), torch.from_numpy(llama_cpp_permute(w.numpy(), heads, heads)))  # q
        assert torch.equal(permute_rows(w, kv), torch.from_numpy(llama_cpp_permute(w.numpy(), heads, kv)))  # k
        assert torch.equal(unpermute_rows(permute_rows(w, heads), heads), w)
        assert not torch.equal(permute_rows(w, heads), w)
    with pytest.raises(ConfigError):
        unpermute_rows(torch.randn(10, 2), 4)


# --- quant types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_every_type_gguf_quantizes_reads_as_gguf_dequantizes_it(tmp_path: Path, type_name: str) -> None:
    data = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    stored, qtype = quantized(data, type_name)
    path = write_tensors(tmp_path / "t.gguf", {"x": (stored, qtype)})
    reader = gguf.GGUFReader(path)
    expected = torch.from_numpy(gguf.quants.dequantize(reader.tensors[0].data, qtype).astype(np.float32))
    del reader
    with GGUFFile(path) as f:
        info = f.tensors["x"]
        assert info.shape == (8, 256) and info.type_name == type_name
        ours = f.read(info)
        assert ours.dtype == torch.float32 or type_name in ("F16", "BF16")
        torch.testing.assert_close(ours.float(), expected, rtol=0, atol=0)
        torch.testing.assert_close(f.read(info, torch.bfloat16), expected.to(torch.bfloat16), rtol=0, atol=0)
    error = (expected - torch.from_numpy(data)).abs().max().item()
    bound = {"F16": 1e-3, "BF16": 2e-2, "Q8_0": 0.05, "MXFP4": 1.5, "TQ1_0": 4.5, "TQ2_0": 4.5}.get(type_name, 0.6)
    assert 0 < error <= bound or type_name in ("F16", "BF16")  # the quantization itself (ternary types: coarse)


@pytest.mark.parametrize(
    "type_name", ["Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
                  "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M"],
)  # fmt: skip
def test_k_and_i_quants_match_transformers_dequantizer(tmp_path: Path, type_name: str) -> None:
    """Types gguf only reads: random blocks (finite scales), against transformers' own torch implementation."""
    from transformers.integrations.gguf.dequant import dequantize as reference

    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = random_blocks(type_name, 4, 512, seed=int(qtype))
    path = write_tensors(tmp_path / "t.gguf", {"w": (blocks, qtype)})
    with GGUFFile(path) as f:
        ours = f.read(f.tensors["w"])
    theirs = reference(torch.from_numpy(blocks.reshape(-1)), int(qtype)).reshape(4, 512)
    assert ours.shape == (4, 512) and torch.isfinite(ours).all() and ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _patch_type(path: Path, name: str, new_type: int) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, new_type)
    path.write_bytes(bytes(raw))


def test_unknown_and_undequantizable_types_are_typed_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"])
    _patch_type(folder / "model.gguf", "blk.0.ffn_up.weight", 99)
    with pytest.raises(UnsupportedTensorError, match=r"blk\.0\.ffn_up\.weight.*ggml type 99"):
        lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")
    # Q8_1 is a type gguf knows but does not dequantize (llama.cpp uses it for activations only).
    data = np.zeros((4, 64 // 32 * GGML_TYPES[9][2]), dtype=np.uint8)
    assert GGML_TYPES[9][1:] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    path = write_tensors(tmp_path / "q81.gguf", {"token_embd.weight": (data, gguf.GGMLQuantizationType.Q8_1)})
    from lmport.plugins.gguf_format import GGUFSource

    with pytest.raises(UnsupportedTensorError, match="Q8_1"):
        GGUFSource(path)
    path = write_tensors(tmp_path / "i32.gguf", {"token_embd.weight": (np.zeros((4, 32), np.int32), gguf.GGMLQuantizationType.I32)})
    with pytest.raises(UnsupportedTensorError, match="I32, which holds no floating weights"):
        GGUFSource(path)


def test_quantized_files_without_the_gguf_package(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmport.plugins import gguf_format

    folder = gguf_folder(tmp_path, checkpoints["llama"], qtype="Q8_0")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    monkeypatch.setitem(__import__("sys").modules, "gguf.quants", None)
    gguf_format.dequantizable.cache_clear()
    try:
        with pytest.raises(UnsupportedFeatureError, match=r"pip install 'lmport\[gguf\]'"):
            lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")
    finally:
        gguf_format.dequantizable.cache_clear()


# --- bad files and arguments ----------------------------------------------------------------------


def test_truncated_files_fail_with_typed_errors_at_every_length(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = gguf_folder(tmp_path, checkpoints["llama"], qtype="Q8_0") / "model.gguf"
    whole = source.read_bytes()
    cut = tmp_path / "cut" / "model.gguf"
    cut.parent.mkdir()
    header_end = whole.index(b"blk.1.ffn_up.weight") + 100
    lengths = sorted({*range(0, 64, 7), *range(64, header_end, 97), header_end + 1, len(whole) // 2, len(whole) - 1})
    for length in lengths:
        cut.write_bytes(whole[:length])
        with pytest.raises(CorruptWeightsError):
            lmport.AutoModelForCausalLM.from_pretrained(cut.parent, gguf_file="model.gguf")


@pytest.mark.parametrize(
    "patch, message",
    [
        (lambda b: b"GGML" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1"),
        (lambda b: b[:8] + struct.pack("<Q", 2**62) + b[16:], "tensors"),
        (lambda b: b[:16] + struct.pack("<Q", 2**62) + b[24:], "metadata"),
        (lambda b: b[:24] + struct.pack("<Q", 2**60) + b[32:], "string"),
    ],
)
def test_corrupt_headers_fail_fast_with_typed_errors(checkpoints: dict[str, Path], tmp_path: Path, patch: Any, message: str) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"])
    path = folder / "model.gguf"
    path.write_bytes(patch(path.read_bytes()))
    with pytest.raises(CorruptWeightsError, match=message):
        lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")


def test_unknown_architecture_names_it(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.gguf", {"x": (np.zeros((2, 32), np.float32), gguf.GGMLQuantizationType.F32)}, "mamba")
    with pytest.raises(UnknownModelTypeError, match=r"GGUF architecture 'mamba'.*read: .*gpt2.*llama"):
        lmport.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


def test_folder_and_gguf_file_arguments(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"])
    with pytest.raises(WeightsNotFoundError, match="'other.gguf' is not there"):
        lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file="other.gguf")
    for bad in ("../model.gguf", str(folder / "model.gguf")):
        with pytest.raises(UnsafePathError, match="inside the checkpoint folder"):
            lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file=bad)
    convert(checkpoints["llama"], folder / "second.gguf", qtype="Q8_0")
    with pytest.raises(ArgumentError, match="several GGUF files"):
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert load_lmport(folder, gguf_file="second.gguf").config.num_hidden_layers == 2


def test_ignored_tensors_warn_and_linear_rope_scaling_is_read(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def extra(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))

    folder = gguf_folder(tmp_path, checkpoints["llama"], extra=extra)
    with pytest.warns(UserWarning, match="rope_freqs.weight not loaded"):
        model = load_lmport(folder, gguf_file="model.gguf")
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 2.0

    def yarn(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    (tmp_path / "y").mkdir()
    folder = gguf_folder(tmp_path / "y", checkpoints["llama"], extra=yarn)
    with pytest.raises(UnsupportedFeatureError, match="yarn"):
        lmport.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")


def test_header_reads_as_ggufs_own_reader(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = gguf_folder(tmp_path, checkpoints["gpt2"], qtype="Q5_1") / "model.gguf"
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert fields.keys() == ours.metadata.keys()
        for key, value in fields.items():
            assert (list(ours.metadata[key]) if isinstance(value, list) else ours.metadata[key]) == value, key
        assert [(t.name, tuple(reversed(t.shape.tolist())), int(t.tensor_type), t.data_offset, t.n_bytes)
                for t in reader.tensors] == [
            (i.name, i.shape, i.ggml_type, i.offset, i.nbytes) for i in ours.tensors.values()
        ]  # fmt: skip
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == (block, size), name


def test_hub_repo_gguf_file_fetches_only_that_file(
    hub: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = gguf_folder(tmp_path, checkpoints["llama"], name="tiny.Q8_0.gguf", qtype="Q8_0")
    other = convert(checkpoints["gpt2"], tmp_path / "other.gguf")
    content = (folder / "tiny.Q8_0.gguf").read_bytes()
    hub.push("org/tiny-gguf", {"tiny.Q8_0.gguf": content, "other.gguf": other.read_bytes(), "README.md": b"# x\n"})
    cache = tmp_path / "cache"
    model = lmport.AutoModelForCausalLM.from_pretrained("org/tiny-gguf", gguf_file="tiny.Q8_0.gguf", cache_dir=cache)
    fetched = {p.split("/", 3)[3] for m in ("HEAD", "GET") for p in hub.fetched(m) if p.startswith("org/tiny-gguf/")}
    assert fetched == {"tiny.Q8_0.gguf"}  # no config.json, no other weights
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, lmport_logits(folder, gguf_file="tiny.Q8_0.gguf"), rtol=0, atol=0)
    config = lmport.AutoConfig.from_pretrained("org/tiny-gguf", gguf_file="tiny.Q8_0.gguf", cache_dir=cache)
    assert config.model_type == "llama"
    with pytest.raises(lmport.HubFileNotFoundError):
        lmport.AutoModelForCausalLM.from_pretrained("org/tiny-gguf", gguf_file="missing.gguf", cache_dir=cache)
    with pytest.raises(UnsafePathError):
        lmport.AutoModelForCausalLM.from_pretrained("org/tiny-gguf", gguf_file="../x.gguf", cache_dir=cache)


# --- tokenizers ------------------------------------------------------------------------------------

TEXTS = ["The theater in the sea, and then", "  leading and trailing  ", "héllo wörld 🤗 12345", "", "a", "it's\n\nok"]


def _tokenizer_file(path: Path, model: str, tokens: list[str], **fields: Any) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("x", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["default", "llama-bpe"])
def test_byte_level_tokenizer_encodes_as_transformers(tmp_path: Path, pre: str) -> None:
    import transformers

    from gguf_files import token_list

    singles = token_list(256)
    pairs = ["Ġt", "he", "Ġthe", "Ġa", "in", "er", "Ġs", "an", "Ġan", "Ġand", "en", "Ġth", "Ġthen"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "Ġ s", "a n", "Ġa n", "Ġan d", "e n", "Ġt h", "Ġth en"]
    tokens = ["<|endoftext|>", *singles, *pairs]
    fields: dict[str, Any] = {"token_merges": merges, "token_types": [3] + [1] * (len(tokens) - 1), "bos_token_id": 0,
                              "eos_token_id": 0, "add_bos_token": False}  # fmt: skip
    if pre != "default":
        fields["tokenizer_pre"] = pre
    _tokenizer_file(tmp_path / "t.gguf", "gpt2", tokens, **fields)
    ours = lmport.GGUFTokenizer.from_file(tmp_path / "t.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in [*TEXTS, "and then<|endoftext|>the"]:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids)
    assert len(ours.encode("the and then")) < len("the and then")  # the merges are used


def test_sentencepiece_tokenizer_encodes_as_transformers(tmp_path: Path) -> None:
    """``tokenizer.ggml.model = "llama"`` without stored merges: they come from the scores."""
    import transformers

    pieces = ["▁", "e", "t", "a", "o", "i", "n", "s", "h", "r", "▁t", "he", "▁a", "in", "▁the", "er", "on", "▁s",
              "at", "en", "▁w", "is", "▁i", "it", "an", "▁and", "nd", "l", "d", "c", "g", "T", ",", "▁th"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    _tokenizer_file(tmp_path / "t.gguf", "llama", tokens, token_types=types, token_scores=scores, bos_token_id=1,
                    eos_token_id=2, unk_token_id=0)  # fmt: skip
    ours = lmport.GGUFTokenizer.from_file(tmp_path / "t.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == 1  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.encode("héllo") != [1, 0]  # byte fallback: no <unk>


def test_gguf_file_without_a_format_plugin_reading_it_is_refused(tmp_path: Path) -> None:
    from lmport.plugins import gguf_format
    from lmport.registry import reset_registry

    lmport.get_registry().pm.unregister(gguf_format)
    try:
        with pytest.raises(UnsupportedFeatureError, match="no installed weight-format plugin reads GGUF files"):
            lmport.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    finally:
        reset_registry()
