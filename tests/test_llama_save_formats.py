"""Checkpoint formats and save_pretrained, judged by transformers loading the same files.

Formats: transformers-saved single and sharded safetensors, ``pytorch_model.bin``
single and sharded (the layout transformers 4 wrote with ``safe_serialization=False``;
transformers 5 no longer writes it, so the files are written here the way it did),
``variant`` files, and ``use_safetensors`` choosing between formats present side by
side. Each loads to logits identical to transformers' from the same folder.

save_pretrained: lmport's save (single, sharded, bf16, after a training step, with a
variant, as .bin) loads in transformers with identical logits and no missing or
unexpected keys; its config.json is in the Hugging Face form; lmport reloads it
identically; re-saving into one folder leaves no stale shards. Every lmport load
asserts that the checkpoint folder is byte-for-byte unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf_llama_random, tree_digest
from helpers import load_clean, load_lmport, one_intraop_thread
from safetensors.torch import load_file
from transformers.modeling_utils import _add_variant as hf_variant_name  # the oracle's own file naming

import lmport

SMALL_SHARD = "40KB"  # the tiny model is ~200 KB in fp32: several shards
MEDIUM_SHARD = "120KB"  # fewer shards


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    yield from one_intraop_thread()


# --- helpers -------------------------------------------------------------------------------


def load_hf(folder: Path, **kwargs: Any) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)


def load_hf_clean(folder: Path, **kwargs: Any) -> Any:
    """transformers' model, asserting it found every weight and nothing else."""
    return load_clean(transformers.LlamaForCausalLM, folder, **kwargs)


IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    return model(IDS).logits


def assert_same_logits(ours: Any, ref: Any) -> torch.Tensor:
    """Identical logits (lmport computes exactly transformers' ops); returns them."""
    a, b = logits(ours), logits(ref)
    assert a.dtype == b.dtype
    assert torch.equal(a, b), f"max abs diff {(a.float() - b.float()).abs().max().item():.3g}"
    return a


def weight_files(folder: Path) -> set[str]:
    return {
        p.name
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin") or (".index." in p.name and p.suffix == ".json")
    }


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (single or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def hf_checkpoint(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    return save_hf_llama_random(folder, seed=seed, **overrides)


def write_bin(
    folder: Path,
    state: dict[str, torch.Tensor],
    shards: int = 1,
    variant: str | None = None,
) -> list[str]:
    """Write ``state`` as transformers 4 ``save_pretrained(safe_serialization=False)`` did; returns file names."""
    folder.mkdir(parents=True, exist_ok=True)
    weights_name = hf_variant_name("pytorch_model.bin", variant)
    if shards == 1:
        torch.save(state, folder / weights_name)
        return [weights_name]
    names = list(state)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    files = []
    for i in range(shards):
        file = weights_name.replace(".bin", f"-{i + 1:05d}-of-{shards:05d}.bin")
        chunk = {k: state[k] for k in names[i * per : (i + 1) * per]}
        torch.save(chunk, folder / file)
        weight_map.update(dict.fromkeys(chunk, file))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_name = hf_variant_name("pytorch_model.bin.index.json", variant)
    (folder / index_name).write_text(json.dumps(index, indent=2))
    return [*files, index_name]


def config_only(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


# --- 6. formats transformers reads -------------------------------------------------------------


@pytest.mark.parametrize("case", ["gqa", "tied_biases_head_dim"])
def test_transformers_sharded_safetensors(tmp_path: Path, case: str) -> None:
    overrides = {} if case == "gqa" else {"tie_word_embeddings": True, "attention_bias": True, "head_dim": 8}
    single = hf_checkpoint(tmp_path / "single", **overrides)
    load_hf(single).save_pretrained(tmp_path / "sharded", max_shard_size=SMALL_SHARD)
    folder = tmp_path / "sharded"
    files = weight_files(folder)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(files) >= 4, files  # index + at least three shards
    ours, info = load_lmport(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    ref = load_hf_clean(folder)
    assert_same_logits(ours, ref)
    assert_same_logits(ours, load_lmport(single))  # sharding changes nothing


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize(
    "case", ["gqa", "tied_with_lm_head_in_file", "with_rotary_inv_freq"]
)
def test_pytorch_model_bin(tmp_path: Path, shards: int, case: str) -> None:
    """``.bin`` checkpoints: tied models that still store ``lm_head.weight``, and old ones with rotary buffers."""
    src = hf_checkpoint(tmp_path / "src", tie_word_embeddings=case == "tied_with_lm_head_in_file")
    state = {k: v.clone() for k, v in load_hf(src).state_dict().items()}
    if case == "tied_with_lm_head_in_file":
        assert "lm_head.weight" in state  # transformers 4 kept the tied copy in .bin files
    if case == "with_rotary_inv_freq":  # Llama checkpoints of 2023 carry these non-parameters
        for i in range(2):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    folder = config_only(src, tmp_path / "bin")
    written = write_bin(folder, state, shards=shards)
    assert weight_files(folder) == set(written)

    ours, info = load_lmport(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    ref = load_hf(folder)
    assert_same_logits(ours, ref)
    assert_same_logits(ours, load_lmport(src))  # same numbers as the safetensors original


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_variant_files(tmp_path: Path, fmt: str, sharded: bool) -> None:
    """``variant="fp16"`` reads ``model.fp16.safetensors`` (etc.), the plain files otherwise."""
    plain = hf_checkpoint(tmp_path / "plain", seed=0)
    other = hf_checkpoint(tmp_path / "other", seed=1)
    folder = tmp_path / "both"
    if fmt == "safetensors":
        load_hf(plain).save_pretrained(folder, max_shard_size=SMALL_SHARD if sharded else "50GB")
        load_hf(other, dtype=torch.float16).save_pretrained(
            folder, variant="fp16", max_shard_size=SMALL_SHARD if sharded else "50GB"
        )
        expected = "model.safetensors.index.fp16.json" if sharded else "model.fp16.safetensors"
    else:
        config_only(plain, folder)
        write_bin(folder, dict(load_hf(plain).state_dict()), shards=3 if sharded else 1)
        fp16_state = dict(load_hf(other, dtype=torch.float16).state_dict())
        write_bin(folder, fp16_state, shards=3 if sharded else 1, variant="fp16")
        expected = "pytorch_model.bin.index.fp16.json" if sharded else "pytorch_model.fp16.bin"
    assert (folder / expected).is_file()

    default_ours = load_lmport(folder, dtype=torch.float32)
    default_ref = load_hf(folder, dtype=torch.float32)
    base = assert_same_logits(default_ours, default_ref)
    assert_same_logits(default_ours, load_lmport(plain))

    # dtype="auto" follows config.json's dtype (float16 where transformers' fp16 save rewrote it).
    variant_ours = load_lmport(folder, variant="fp16", dtype="auto")
    variant_ref = load_hf(folder, variant="fp16", dtype="auto")
    assert variant_ours.dtype == variant_ref.dtype == (torch.float16 if fmt == "safetensors" else torch.float32)
    variant_logits = assert_same_logits(variant_ours, variant_ref)
    assert (variant_logits.float() - base).abs().max() > 1e-2  # really the other weights


@pytest.mark.parametrize("bin_shards", [1, 3], ids=["bin_single", "bin_sharded"])
@pytest.mark.parametrize("st_sharded", [False, True], ids=["st_single", "st_sharded"])
def test_use_safetensors_chooses_format(tmp_path: Path, st_sharded: bool, bin_shards: int) -> None:
    """Both formats side by side, holding different weights: the choice is visible in the logits."""
    st_src = hf_checkpoint(tmp_path / "st", seed=0)
    bin_src = hf_checkpoint(tmp_path / "bin", seed=1)
    folder = tmp_path / "both"
    load_hf(st_src).save_pretrained(folder, max_shard_size=SMALL_SHARD if st_sharded else "50GB")
    write_bin(folder, dict(load_hf(bin_src).state_dict()), shards=bin_shards)

    st_logits = logits(load_lmport(st_src))
    bin_logits = logits(load_lmport(bin_src))
    assert (st_logits - bin_logits).abs().max() > 1e-2

    for choice, expected in ((None, st_logits), (True, st_logits), (False, bin_logits)):
        ours = load_lmport(folder, use_safetensors=choice)
        ref = load_hf(folder, use_safetensors=choice)
        assert torch.equal(assert_same_logits(ours, ref), expected), f"use_safetensors={choice}"


def test_use_safetensors_true_without_safetensors_fails(tmp_path: Path) -> None:
    src = hf_checkpoint(tmp_path / "src")
    folder = config_only(src, tmp_path / "bin")
    write_bin(folder, dict(load_hf(src).state_dict()))
    assert_same_logits(load_lmport(folder), load_hf(folder))
    with pytest.raises(lmport.LmportError, match="model.safetensors"):
        load_lmport(folder, use_safetensors=True)
    with pytest.raises(OSError):  # the oracle refuses too
        load_hf(folder, use_safetensors=True)


# --- 5. save_pretrained ---------------------------------------------------------------------

SAVE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    # id -> (config overrides, legacy rope_scaling to write into config.json or None)
    "gqa": ({}, None),
    "mha_tied_biases_head_dim": (
        {"num_key_value_heads": 4, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
         "head_dim": 8},  # fmt: skip
        None,
    ),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}, None),
    "legacy_llama3": (
        {},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
    ),  # fmt: skip
}


def save_case(folder: Path, case: str, dtype: torch.dtype = torch.float32) -> Path:
    overrides, legacy = SAVE_CASES[case]
    hf_checkpoint(folder, dtype=dtype, **overrides)
    if legacy is not None:
        raw = json.loads((folder / "config.json").read_text())
        raw.pop("rope_parameters")
        raw["rope_scaling"], raw["rope_theta"] = legacy, 500000.0
        (folder / "config.json").write_text(json.dumps(raw))
    return folder


def assert_hf_config(folder: Path, ref_config: Any) -> dict[str, Any]:
    """config.json in the form transformers writes: model_type, architectures, rope_parameters."""
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "llama"
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert "rope_scaling" not in raw and "rope_theta" not in raw  # the legacy keys are not written back
    assert raw["rope_parameters"] == ref_config.rope_parameters
    for key in ("hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias",
                "max_position_embeddings", "vocab_size", "rms_norm_eps"):  # fmt: skip
        assert raw[key] == getattr(ref_config, key), key
    return raw


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_pretrained_loads_in_transformers(tmp_path: Path, case: str, layout: str) -> None:
    src = save_case(tmp_path / "src", case)
    ref_src = load_hf(src)
    ours = load_lmport(src)
    original = assert_same_logits(ours, ref_src)

    out = tmp_path / "saved"
    returned = ours.save_pretrained(out, **({"max_shard_size": SMALL_SHARD} if layout == "sharded" else {}))
    assert Path(returned) == out
    files = weight_files(out)
    if layout == "single":
        assert files == {"model.safetensors"}
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 3 and files == shards | {"model.safetensors.index.json"}
        for name, shard in index["weight_map"].items():
            assert name in load_file(str(out / shard))
    raw = assert_hf_config(out, ref_src.config)
    assert raw["dtype"] == "float32"

    # The tensors are the checkpoint's own, by name and value (tied lm_head not stored).
    saved, given = read_checkpoint(out), read_checkpoint(src)
    assert saved.keys() == given.keys()
    assert all(torch.equal(saved[k], given[k]) for k in given)
    if ours.config.tie_word_embeddings:
        assert "lm_head.weight" not in saved

    ref_saved = load_hf_clean(out)
    assert ref_saved.config.rope_parameters == ref_src.config.rope_parameters
    assert torch.equal(logits(ref_saved), original)
    assert torch.equal(logits(load_lmport(out)), original)


def test_save_pretrained_bf16(tmp_path: Path) -> None:
    src = save_case(tmp_path / "src", "mha_tied_biases_head_dim", dtype=torch.bfloat16)
    ours = load_lmport(src, dtype="auto")
    assert ours.dtype == torch.bfloat16
    ours.save_pretrained(tmp_path / "saved", max_shard_size=SMALL_SHARD)
    saved = read_checkpoint(tmp_path / "saved")
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"
    ref = load_hf_clean(tmp_path / "saved", dtype="auto")
    assert ref.dtype == torch.bfloat16
    assert_same_logits(ours, ref)
    assert_same_logits(load_lmport(tmp_path / "saved", dtype="auto"), ref)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_after_training_step(tmp_path: Path, tied: bool) -> None:
    """A fine-tuned model goes back to the HF format: transformers sees the updated weights."""
    src = hf_checkpoint(tmp_path / "src", tie_word_embeddings=tied)
    ours = load_lmport(src)
    before = logits(ours)
    ours.train()
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours(IDS, labels=IDS).loss.backward()
    optimizer.step()
    ours.eval()
    after = logits(ours)
    assert (after - before).abs().max() > 1e-3
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path / "tuned")
    ref = load_hf_clean(tmp_path / "tuned")
    assert torch.equal(logits(ref), after)
    assert torch.equal(logits(load_lmport(tmp_path / "tuned")), after)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_pretrained_variant_and_bin(tmp_path: Path, sharded: bool) -> None:
    src = hf_checkpoint(tmp_path / "src")
    ours = load_lmport(src)
    original = logits(ours)
    size = {"max_shard_size": SMALL_SHARD} if sharded else {}

    ours.save_pretrained(tmp_path / "variant", variant="ema", **size)
    files = weight_files(tmp_path / "variant")
    if sharded:
        index = hf_variant_name("model.safetensors.index.json", "ema")
        assert index in files and all(f.startswith("model.ema-") for f in files - {index})
    else:
        assert files == {hf_variant_name("model.safetensors", "ema")}
    assert torch.equal(logits(load_hf_clean(tmp_path / "variant", variant="ema")), original)
    assert torch.equal(logits(load_lmport(tmp_path / "variant", variant="ema")), original)

    ours.save_pretrained(tmp_path / "bin", safe_serialization=False, **size)
    files = weight_files(tmp_path / "bin")
    if sharded:
        assert "pytorch_model.bin.index.json" in files and len(files) >= 4
    else:
        assert files == {"pytorch_model.bin"}
    assert torch.equal(logits(load_hf_clean(tmp_path / "bin")), original)
    assert torch.equal(logits(load_lmport(tmp_path / "bin")), original)


def test_resave_leaves_no_stale_shards(tmp_path: Path) -> None:
    """Saving again into one folder with another shard count removes the previous save's weight files."""
    src = hf_checkpoint(tmp_path / "src", seed=0)
    first = load_lmport(src)
    second = load_lmport(hf_checkpoint(tmp_path / "src2", seed=1))
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text("mine")  # not a weight file: kept
    (folder / "tokenizer.json").write_text("{}")

    def check(model: Any, max_shard_size: str | None) -> int:
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        files = weight_files(folder)
        if max_shard_size is None:
            assert files == {"model.safetensors"}
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert files == set(index["weight_map"].values()) | {"model.safetensors.index.json"}
        assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer.json").is_file()
        expected = logits(model)
        assert torch.equal(logits(load_hf_clean(folder)), expected)
        assert torch.equal(logits(load_lmport(folder)), expected)
        return len(files)

    many = check(first, SMALL_SHARD)
    fewer = check(second, MEDIUM_SHARD)
    assert many > fewer > 2  # really different shard counts, still sharded
    assert check(first, None) == 1  # sharded -> single: index and shards gone
    assert check(second, SMALL_SHARD) == many  # single -> sharded: model.safetensors gone


# --- 7. loading never writes --------------------------------------------------------------------


def test_loading_every_format_leaves_folder_unchanged(tmp_path: Path) -> None:
    """One folder holding every format at once, loaded every way; not a byte changes, nothing is added."""
    src = hf_checkpoint(tmp_path / "src")
    folder = tmp_path / "all"
    ref = load_hf(src)
    ref.save_pretrained(folder, max_shard_size=SMALL_SHARD)
    ref.save_pretrained(folder, variant="fp16")
    write_bin(folder, dict(ref.state_dict()))
    write_bin(folder, dict(ref.state_dict()), variant="fp16", shards=2)
    options: list[dict[str, Any]] = [
        {},
        {"use_safetensors": True},
        {"use_safetensors": False},
        {"variant": "fp16"},
        {"variant": "fp16", "use_safetensors": False},
        {"dtype": torch.bfloat16},
        {"attn_implementation": "eager"},
    ]
    expected = [logits(load_hf(folder, **kwargs)) for kwargs in options]  # the oracle, before any lmport load
    before = tree_digest(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    for kwargs, want in zip(options, expected):
        model, _ = lmport.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        assert torch.equal(logits(model), want), kwargs
        assert tree_digest(folder) == before, kwargs
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
