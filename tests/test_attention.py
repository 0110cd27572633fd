"""Attention kernels as plugins: selection, masks (causal, padding, packing, sliding window), KV cache.

Checked, on tiny fp32 checkpoints that transformers saved (Llama, GPT-2, Mistral with a
window of 4), every weight random (``conftest.save_hf``) so that masks matter:

1. Selection: ``attn_implementation=None`` picks ``sdpa`` on CPU and says so (the model
   records it; an INFO record of logger ``lmport`` names it). ``flash_attention_2`` asked
   for where it cannot run raises :class:`AttentionKernelError` naming the missing piece
   (package, CUDA device, half-precision dtype) whether or not ``flash_attn`` is
   importable; nothing falls back silently; an unknown name lists the installed kernels.
2. Masks, the same for every kernel (``eager``, ``sdpa`` and the third-party
   ``reference_attention``): at the kernel level against a naive softmax over the allowed
   keys for every combination of cache offset, padding, window and packed segments; at
   the model level causal order, left and right padding (parity with transformers for
   eager/sdpa, and a padded row equals the row alone), packed documents delimited by
   ``position_ids`` restarting at 0 as ``DataCollatorWithFlattening`` produces them (each
   document's logits equal the document alone within 1e-5; the loss equals the
   per-document losses combined), Mistral's window together with packing and padding.
3. Third-party kernel: ``tests/fixtures/refkernel`` (distribution
   ``lmport-refkernel-example``, entry point group ``lmport.plugins``) pip-installed into
   a target folder, chosen by argument or by ``config.json``, equal to sdpa within 1e-5,
   listed by ``lmport plugins``. A ``config.json`` naming a kernel that is not installed
   raises and imports nothing.
4. KV cache: ``use_cache`` returns the cache; decoding token by token (and in chunks, and
   with left padding) gives the full forward's logits within 1e-5, Mistral with a window
   shorter than the sequence included.

Weights have std 0.1 rather than conftest's 0.2. Comparisons here are between two
computations that agree mathematically but not operation by operation (a document alone
against the same document inside a packed row, one decoding step against a full
forward): the same row computed in a differently shaped matrix product rounds
differently. With std 0.2 that fp32 noise floor was measured up to 1.1e-5 (and a document
alone differs from its own float64 result by up to 1.6e-5), i.e. at the tolerance
itself; with std 0.1 it stays near 3e-6 while every masked effect still moves logits by
more than 1 (asserted where it matters). ``test_exact_in_float64``
repeats the key comparisons in float64 with std 0.2 at 1e-10.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import json
import logging
import math
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import WINDOW, save_hf, tiny_configs
from helpers import LOGITS_ATOL, LOSS_TOL, MOVED, VOCAB, hf_model_cache, one_intraop_thread, pip_installed
from transformers import DataCollatorWithFlattening

import lmport
from lmport import AttentionKernelError, AttentionMask
from lmport.cache import KVCache
from lmport.cli import main as cli_main
from lmport.hooks import kernel_names, select_attention
from lmport.plugins import flash_attention
from lmport.plugins.attention import KERNELS as BUILTIN_KERNELS
from lmport.registry import PLUGINS_GROUP, get_registry

FP64_ATOL = 1e-10  # float64: what "mathematically equal" leaves
STD = 0.1  # weight scale (see the module docstring)
REF = "reference_attention"
REF_DIST = "lmport-refkernel-example"
ARCHS = ("llama", "gpt2", "mistral")
HF_KERNELS = ("eager", "sdpa")  # the kernels transformers also has
KERNEL_NAMES = ("eager", "sdpa", REF)
FIXTURE = Path(__file__).parent / "fixtures" / "refkernel"

HF_CONFIGS: dict[str, Callable[[], Any]] = tiny_configs(bos_token_id=0, eos_token_id=1)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Architecture -> folder saved by transformers (random weights, std :data:`STD`)."""
    return {arch: save_hf(tmp_path_factory.mktemp(arch), make(), std=STD) for arch, make in HF_CONFIGS.items()}


@pytest.fixture(scope="module")
def refkernel_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fixture kernel package pip-installed (built from a copy) into a target folder put on sys.path."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    with pip_installed(FIXTURE, tmp_path_factory.mktemp("refkernel"), "lmport_refkernel", ignore) as target:
        yield target


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path], request: pytest.FixtureRequest) -> Callable[[str, str], Any]:
    """``models(arch, kernel)``: lmport's model of the checkpoint, loaded once per module (eval, fp32)."""

    @functools.cache
    def get(arch: str, kernel: str) -> Any:
        if kernel == REF:
            request.getfixturevalue("refkernel_site")
        model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation=kernel)
        assert model.attn_implementation == kernel and not model.training
        return model

    return get


@pytest.fixture(scope="module")
def hf_models(checkpoints: dict[str, Path]) -> Callable[[str, str], Any]:
    """``hf_models(arch, attn)``: transformers' model of the same checkpoint (eval, fp32)."""
    return hf_model_cache(checkpoints)


# --- helpers -------------------------------------------------------------------------------


def random_ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "logits") -> None:
    assert torch.isfinite(ours).all(), f"non-finite {what}"
    diff = max_diff(ours, ref)
    assert diff <= LOGITS_ATOL, f"{what} differ by {diff:.3g} (> {LOGITS_ATOL})"


def padding_mask(lengths: list[int], seq: int, side: str) -> torch.Tensor:
    """``(len(lengths), seq)`` attention mask with ``lengths[i]`` real tokens, padded on ``side``."""
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seq - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens numbered from 0 in each row (what generate() and transformers' generation pass)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def flattened(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    """One packed row as ``DataCollatorWithFlattening`` makes it: no attention_mask, positions restart at 0."""
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    assert "attention_mask" not in batch
    return dict(batch)


# --- 1. selection ------------------------------------------------------------------------


def fake_find_spec(installed: bool) -> Callable[..., Any]:
    """``importlib.util.find_spec`` that reports ``flash_attn`` as (not) installed, all else unchanged."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec("flash_attn", None) if installed else None
        return real(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize("arch", ARCHS)
def test_default_is_sdpa_on_cpu_and_recorded(
    checkpoints: dict[str, Path], arch: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lmport"):
        model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    assert model.attn_implementation == "sdpa"
    assert model.attention_kernel is BUILTIN_KERNELS["sdpa"]
    kernels = {id(layer.self_attn.kernel) for layer in model.model.layers}
    assert kernels == {id(BUILTIN_KERNELS["sdpa"])}, "some attention module runs another kernel"
    records = [r for r in caplog.records if r.name == "lmport" and r.levelno == logging.INFO and "'sdpa'" in r.getMessage()]
    assert records, f"no INFO record of logger 'lmport' names the kernel: {[r.getMessage() for r in caplog.records]}"


def test_default_on_cpu_stays_sdpa_even_with_flash_attn_installed(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(installed=True))
    assert lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).attn_implementation == "sdpa"


def test_default_prefers_flash_where_it_can_run(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device in bf16 with the package present, "best available" is flash_attention_2."""
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(installed=True))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    config = lmport.AutoConfig.from_pretrained(checkpoints["llama"])
    kernel = select_attention(None, config, torch.device("cuda"), torch.bfloat16)
    assert kernel.name == "flash_attention_2"
    # ... but not in fp32, where it cannot run: then sdpa, because nothing was asked for by name.
    assert select_attention(None, config, torch.device("cuda"), torch.float32).name == "sdpa"


@pytest.mark.parametrize("installed", [False, True], ids=["flash_attn_absent", "flash_attn_importable"])
@pytest.mark.parametrize("how", ["attn_implementation", "use_flash_attention_2"])
def test_flash_on_cpu_raises_saying_what_is_missing(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, installed: bool, how: str
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(installed))
    kwargs: dict[str, Any] = (
        {"attn_implementation": "flash_attention_2"} if how == "attn_implementation" else {"use_flash_attention_2": True}
    )
    with pytest.raises(AttentionKernelError) as err:
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], **kwargs)
    message = str(err.value)
    assert "flash_attention_2" in message
    if installed:
        assert "CUDA" in message and "'cpu'" in message, message
        assert "pip install" not in message, message
    else:
        assert "flash-attn" in message and "pip install" in message and "CUDA" in message, message


def test_flash_availability_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(installed=False))
    assert "flash-attn" in (flash_attention.availability(cuda, torch.bfloat16) or "")
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(installed=True))
    assert "CUDA" in (flash_attention.availability(cpu, torch.bfloat16) or "")
    reason = flash_attention.availability(cuda, torch.float32)
    assert reason is not None and "float16 or bfloat16" in reason and "float32" in reason, reason
    assert flash_attention.availability(cuda, torch.bfloat16) is None
    assert flash_attention.availability(cuda, torch.float16) is None
    # Asked for by name on a CUDA device in fp32: the dtype reason, as an error, not another kernel.
    with pytest.raises(AttentionKernelError, match="float16 or bfloat16"):
        flash_attention.load(cuda, torch.float32)


def test_unknown_kernel_lists_installed_choices(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(AttentionKernelError) as err:
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], attn_implementation="flash_attention_3")
    message = str(err.value)
    assert "'flash_attention_3'" in message
    for name in ("eager", "sdpa", "flash_attention_2"):
        assert name in message, message
    config = lmport.AutoConfig.from_pretrained(checkpoints["llama"])
    with pytest.raises(AttentionKernelError, match="installed kernels"):
        lmport.AutoModelForCausalLM.from_config(config, attn_implementation="Eager")  # names are exact


# --- 2. masks: the kernel contract ------------------------------------------------------------


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the allowed keys only, in float64, query by query; rows that see nothing are zero."""
    batch, heads, q_len, _ = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, q_len, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                keys = allowed[min(b, allowed.shape[0] - 1), 0, i].nonzero().flatten()
                if keys.numel():
                    scores = (k[b, h // groups, keys].double() @ q[b, h, i].double()) * scale
                    out[b, i, h] = scores.softmax(-1) @ v[b, h // groups, keys].double()
    return out


def mask_cases() -> dict[str, AttentionMask]:
    """Every combination the model produces: cache offset, padding (left/right), window, packed segments."""
    left = padding_mask([9, 6, 3], 9, "left")
    right = padding_mask([9, 6, 3], 9, "right")
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1], [0] * 9])
    return {
        "causal": AttentionMask(9, 9),
        "causal_window": AttentionMask(9, 9, sliding_window=WINDOW),
        "window_longer_than_keys": AttentionMask(9, 9, sliding_window=16),
        "left_padding": AttentionMask(9, 9, padding=left),
        "right_padding": AttentionMask(9, 9, padding=right),
        "left_padding_window": AttentionMask(9, 9, padding=left, sliding_window=WINDOW),
        "packed": AttentionMask(9, 9, segments=segments),
        "packed_window": AttentionMask(9, 9, segments=segments, sliding_window=WINDOW),
        "decode_one": AttentionMask(1, 9),
        "decode_one_window": AttentionMask(1, 9, sliding_window=WINDOW),
        "decode_one_left_padding": AttentionMask(1, 9, padding=left),
        "decode_chunk_window_left_padding": AttentionMask(3, 9, padding=left, sliding_window=WINDOW),
    }


@pytest.mark.parametrize("gqa", [1, 2], ids=["mha", "gqa2"])
@pytest.mark.parametrize("case", list(mask_cases()))
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_kernel_honours_mask(request: pytest.FixtureRequest, kernel_name: str, case: str, gqa: int) -> None:
    if kernel_name == REF:
        request.getfixturevalue("refkernel_site")
        kernel = select_attention(REF, lmport.PretrainedConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1), torch.device("cpu"), torch.float32)
    else:
        kernel = BUILTIN_KERNELS[kernel_name]
    mask = mask_cases()[case]
    g = torch.Generator().manual_seed(len(case))
    batch, heads, dim = 3, 4, 8
    q = torch.randn(batch, heads, mask.q_len, dim, generator=g)
    k = torch.randn(batch, heads // gqa, mask.kv_len, dim, generator=g) * 2
    v = torch.randn(batch, heads // gqa, mask.kv_len, dim, generator=g)
    scale = dim**-0.5
    out = kernel(q, k, v, mask=mask, scaling=scale, dropout=0.0, num_kv_groups=gqa)
    assert out.shape == (batch, mask.q_len, heads, dim)
    assert torch.isfinite(out).all(), "a query that sees no key must still give finite output"
    allowed = mask.to_bool(torch.device("cpu"))
    expected = naive_attention(q, k, v, allowed, scale)
    sees = allowed.expand(batch, 1, mask.q_len, mask.kv_len).any(-1)[:, 0]  # (batch, q_len)
    diff = (out.double() - expected)[sees].abs().max().item()
    assert diff <= 1e-5, f"{kernel_name} on {case}: differs from softmax over the allowed keys by {diff:.3g}"


def test_mask_cases_are_what_they_claim() -> None:
    """The kernel test above is vacuous if the masks did not hide anything; check they do."""
    cases = mask_cases()
    dense = {name: m.to_bool(torch.device("cpu")) for name, m in cases.items()}
    assert not dense["causal_window"][0, 0, 8, 4] and dense["causal_window"][0, 0, 8, 5]
    assert torch.equal(dense["window_longer_than_keys"], dense["causal"])
    assert not dense["left_padding"][1, 0, 5, 2] and dense["left_padding"][1, 0, 5, 3]
    assert not dense["packed"][0, 0, 3, 2] and dense["packed"][0, 0, 7, 3] and not dense["packed"][0, 0, 8, 7]
    assert not dense["packed_window"][0, 0, 7, 3] and dense["packed_window"][0, 0, 7, 4]
    assert dense["decode_one"].shape == (1, 1, 1, 9) and bool(dense["decode_one"].all())
    assert int(dense["decode_one_window"].sum()) == WINDOW


# --- 2. masks: whole models ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_causal(models: Callable[[str, str], Any], arch: str, kernel: str) -> None:
    model = models(arch, kernel)
    ids = random_ids((2, 12), seed=1)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1 + VOCAB // 2) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :7], after[:, :7]), "a later token changed an earlier position's logits"
    assert max_diff(before[:, 7:], after[:, 7:]) > MOVED


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", HF_KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_matches_transformers(
    models: Callable[[str, str], Any], hf_models: Callable[[str, str], Any], arch: str, attn: str, side: str
) -> None:
    ids = random_ids((3, 12), seed=2)
    mask = padding_mask([12, 8, 3], 12, side)  # 8 > window: the window and the padding both act
    real = mask.bool()
    with torch.no_grad():
        ours = models(arch, attn)(ids, attention_mask=mask).logits
        ref = hf_models(arch, attn)(ids, attention_mask=mask).logits
        assert torch.isfinite(ours).all(), "padding positions must not produce NaN or inf"
        assert_close(ours[real], ref[real])
        if side == "left":  # positions numbered from the first real token, as generation does
            pos = positions_from_mask(mask)
            ours = models(arch, attn)(ids, attention_mask=mask, position_ids=pos).logits
            ref = hf_models(arch, attn)(ids, attention_mask=mask, position_ids=pos).logits
            assert_close(ours[real], ref[real])


def pad_rows(rows: list[torch.Tensor], seq: int, side: str, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (1-D token tensors) padded with ``pad`` to ``seq`` on ``side``: (input_ids, attention_mask)."""
    mask = padding_mask([len(r) for r in rows], seq, side)
    ids = torch.full((len(rows), seq), pad, dtype=torch.long)
    ids[mask.bool()] = torch.cat(rows)
    return ids, mask


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_row_equals_row_alone(models: Callable[[str, str], Any], arch: str, kernel: str) -> None:
    """Left- and right-padded rows give, at their real tokens, the logits of the row run alone."""
    model = models(arch, kernel)
    rows = [random_ids((n,), seed=3 + n) for n in (12, 8, 3)]  # 8 > window: window and padding both act
    with torch.no_grad():
        alone = [model(r[None]).logits[0] for r in rows]
        for side in ("left", "right"):
            ids, mask = pad_rows(rows, 12, side)
            batched = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
            assert torch.isfinite(batched).all(), "padding positions must not produce NaN or inf"
            for row, expected in enumerate(alone):
                assert_close(batched[row][mask[row].bool()], expected, f"row {row} ({side}-padded)")
        # Left padding is really in effect: unmasked, the real tokens would see the pads. (An all-ones
        # mask: positions repeating 0 over the pads without a mask would read as packed documents.)
        ids, mask = pad_rows(rows, 12, "left")
        unmasked = model(ids, attention_mask=torch.ones_like(mask), position_ids=positions_from_mask(mask)).logits
        assert max_diff(unmasked[1][mask[1].bool()], alone[1]) > MOVED


DOCS = ([7, 3, 9], [10, 9])  # two packed rows of 19 tokens; most documents longer than the window of 4


def packed_batch(seed: int) -> tuple[dict[str, torch.Tensor], list[list[list[int]]]]:
    """Two rows, each several documents flattened; returns the batch and the documents of each row."""
    g = torch.Generator().manual_seed(seed)
    rows = [[torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths] for lengths in DOCS]
    parts = [flattened(docs) for docs in rows]
    batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    assert batch["position_ids"][0].tolist() == [*range(7), *range(3), *range(9)]
    assert (batch["labels"][0, [0, 7, 10]] == -100).all(), "the collator marks each document's first token"
    return batch, rows


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_documents_alone(models: Callable[[str, str], Any], arch: str, kernel: str) -> None:
    """Each document's logits as if alone; the loss (labels -100 at boundaries) the documents' losses combined."""
    model = models(arch, kernel)
    batch, rows = packed_batch(seed=4)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        packed = model(**batch)
        unpacked = model(input_ids=batch["input_ids"]).logits
        for row, docs in enumerate(rows):
            start = 0
            for i, doc in enumerate(docs):
                ids = torch.tensor([doc])
                alone = model(ids, labels=ids)
                assert_close(packed.logits[row, start : start + len(doc)], alone.logits[0], f"row {row} document {i}")
                if start:  # without the document boundaries, a later document would see the earlier ones
                    assert max_diff(unpacked[row, start : start + len(doc)], alone.logits[0]) > MOVED
                total += alone.loss.double() * (len(doc) - 1)
                count += len(doc) - 1
                start += len(doc)
    torch.testing.assert_close(packed.loss.double(), total / count, rtol=LOSS_TOL, atol=LOSS_TOL)


@pytest.mark.parametrize("attn", HF_KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_matches_transformers(
    models: Callable[[str, str], Any], hf_models: Callable[[str, str], Any], arch: str, attn: str
) -> None:
    """transformers detects packing only without a cache (use_cache=False); then both agree."""
    batch, _ = packed_batch(seed=6)
    with torch.no_grad():
        ours = models(arch, attn)(**batch)
        ref = hf_models(arch, attn)(**batch, use_cache=False)
    assert_close(ours.logits, ref.logits)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=LOSS_TOL, atol=LOSS_TOL)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_mistral_window_with_packing_and_padding(
    checkpoints: dict[str, Path], models: Callable[[str, str], Any], kernel: str
) -> None:
    """Documents and padded rows longer than the window: the window acts within each, and only there."""
    model = models("mistral", kernel)
    unwindowed = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["mistral"], attn_implementation=kernel, sliding_window=None
    )
    batch, rows = packed_batch(seed=7)
    lengths = [12, 9]
    ids = random_ids((2, 12), seed=8)
    mask = padding_mask(lengths, 12, "left")
    pos = positions_from_mask(mask)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        packed_nowin = unwindowed(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        doc = torch.tensor([rows[0][2]])  # 9 tokens, after two others
        assert_close(packed[0, 10:], model(doc).logits[0])
        assert_close(packed_nowin[0, 10:], unwindowed(doc).logits[0])
        # Within the document, tokens past the window's reach differ with and without the window ...
        assert max_diff(packed[0, 10 + WINDOW :], packed_nowin[0, 10 + WINDOW :]) > MOVED
        # ... and the first WINDOW tokens of a document see only their own document either way.
        assert_close(packed[0, 10 : 10 + WINDOW], packed_nowin[0, 10 : 10 + WINDOW])
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        padded_nowin = unwindowed(ids, attention_mask=mask, position_ids=pos).logits
        real = mask[1].bool()
        assert_close(padded[1][real], model(ids[1][real][None]).logits[0])
        assert max_diff(padded[1][real], padded_nowin[1][real]) > MOVED


# --- 3. a third-party kernel, packaged ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_kernel_by_argument_equals_sdpa(
    refkernel_site: Path, models: Callable[[str, str], Any], arch: str
) -> None:
    ours = models(arch, REF)
    assert type(ours.attention_kernel).__module__ == "lmport_refkernel"
    assert Path(sys.modules["lmport_refkernel"].__file__ or "").is_relative_to(refkernel_site)
    assert {layer.self_attn.kernel.name for layer in ours.model.layers} == {REF}
    ids = random_ids((2, 14), seed=9)
    mask = padding_mask([14, 9], 14, "left")
    with torch.no_grad():
        sdpa = models(arch, "sdpa")
        assert_close(ours(ids).logits, sdpa(ids).logits)
        real = mask.bool()
        assert_close(ours(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real])


def with_config_entry(src: Path, dst: Path, **entries: Any) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(entries)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_reference_kernel_by_config_json(refkernel_site: Path, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = with_config_entry(checkpoints["mistral"], tmp_path / "ckpt", attn_implementation=REF)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert model.attn_implementation == REF
    # The argument wins over config.json.
    assert lmport.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").attn_implementation == "eager"
    ids = random_ids((1, 14), seed=10)
    with torch.no_grad():
        sdpa = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["mistral"], attn_implementation="sdpa")
        assert_close(model(ids).logits, sdpa(ids).logits)


def test_lmport_plugins_lists_the_kernel(refkernel_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if ln.startswith(REF)), None)
    assert line is not None, out
    assert REF_DIST in line and "0.3.0" in line and "lmport_refkernel" in line
    assert cli_main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["plugins"]
    assert {"group": PLUGINS_GROUP, "name": REF, "value": "lmport_refkernel", "distribution": REF_DIST,
            "version": "0.3.0"} in listed  # fmt: skip
    assert REF in kernel_names()


def test_config_json_cannot_name_a_kernel_that_is_not_installed(
    refkernel_site: Path, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module of that name is importable; naming it in config.json must still not import it.
    lure = tmp_path / "lure"
    lure.mkdir()
    (lure / "evil_kernel.py").write_text("raise SystemExit('evil_kernel was imported')\n")
    monkeypatch.syspath_prepend(str(lure))
    folder = with_config_entry(checkpoints["llama"], tmp_path / "ckpt", attn_implementation="evil_kernel")
    lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])  # every plugin this load needs, imported
    before = set(sys.modules)
    with pytest.raises(AttentionKernelError) as err:
        lmport.AutoModelForCausalLM.from_pretrained(folder)
    assert set(sys.modules) - before == set()
    message = str(err.value)
    assert "'evil_kernel'" in message
    for name in ("eager", "sdpa", "flash_attention_2", REF):
        assert name in message, message


# --- 4. the KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_the_cache(models: Callable[[str, str], Any], arch: str) -> None:
    model = models(arch, "sdpa")
    ids = random_ids((2, 6), seed=11)
    with torch.no_grad():
        assert model(ids).past_key_values is None
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, KVCache) and len(cache) == model.config.num_hidden_layers
        assert cache.get_seq_length() == 6
        step = model(random_ids((2, 1), seed=12), past_key_values=cache)
    assert step.past_key_values is cache and cache.get_seq_length() == 7
    assert step.logits.shape == (2, 1, VOCAB)


@pytest.mark.parametrize("chunks", [[1] * 14, [5] + [1] * 9, [6, 3, 1, 4]], ids=["tokenwise", "prefill5", "chunks"])
@pytest.mark.parametrize("attn", HF_KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_full_forward(
    models: Callable[[str, str], Any], arch: str, attn: str, chunks: list[int]
) -> None:
    """14 tokens, more than Mistral's window of 4."""
    model = models(arch, attn)
    ids = random_ids((2, sum(chunks)), seed=13)
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = KVCache(), [], 0
        for n in chunks:
            pieces.append(model(ids[:, start : start + n], past_key_values=cache, use_cache=True).logits)
            start += n
    assert cache.get_seq_length() == ids.shape[1]
    assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("attn", HF_KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_with_left_padding(models: Callable[[str, str], Any], arch: str, attn: str) -> None:
    model = models(arch, attn)
    ids = random_ids((3, 14), seed=14)
    mask = padding_mask([14, 10, 6], 14, "left")
    pos = positions_from_mask(mask)
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = KVCache()
        pieces = [model(ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], past_key_values=cache).logits]
        for i in range(8, 14):
            step = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], position_ids=pos[:, i : i + 1], past_key_values=cache)
            pieces.append(step.logits)
    incremental = torch.cat(pieces, dim=1)
    assert_close(incremental[real], full[real])
    with pytest.raises(ValueError, match="attention_mask covers"):
        model(ids[:, :1], attention_mask=mask[:, :1], past_key_values=cache)


def test_sliding_window_cache_uses_only_the_window(models: Callable[[str, str], Any]) -> None:
    """Decoding with the cache: a key more than WINDOW - 1 positions back has no effect (one layer's reach)."""
    model = models("mistral", "sdpa")
    ids = random_ids((1, 14), seed=15)
    far = ids.clone()
    far[0, 0] = (far[0, 0] + 7) % VOCAB  # 13 positions behind the last query: outside 2 layers' reach of 2 * 3
    with torch.no_grad():
        logits = []
        for seq in (ids, far):
            cache = KVCache()
            model(seq[:, :13], past_key_values=cache)
            logits.append(model(seq[:, 13:], past_key_values=cache).logits)
    assert torch.equal(logits[0], logits[1])
    assert math.isfinite(logits[0].abs().max().item())


# --- exact equivalence, in float64 -----------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sdpa", REF])  # eager softmaxes in float32 whatever the dtype, as transformers'
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_in_float64(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, arch: str, kernel: str) -> None:
    """std 0.2 weights in float64: packed documents (and, for sdpa, cached decoding) equal their references to 1e-10."""
    if kernel == REF:
        request.getfixturevalue("refkernel_site")
    folder = tmp_path_factory.getbasetemp() / f"fp64-{arch}"
    if not folder.exists():
        save_hf(folder, HF_CONFIGS[arch](), std=0.2)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=kernel, dtype=torch.float64)
    batch, rows = packed_batch(seed=16)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        assert packed.dtype == torch.float64
        start = 0
        for doc in rows[0]:
            alone = model(torch.tensor([doc])).logits[0]
            assert max_diff(packed[0, start : start + len(doc)], alone) <= FP64_ATOL
            start += len(doc)
        if kernel == "sdpa":  # the reference kernel's cache path is covered in fp32 by generate's tests
            ids = random_ids((2, 14), seed=17)
            full = model(ids).logits
            cache = KVCache()
            steps = [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(ids.shape[1])]
            assert max_diff(torch.cat(steps, dim=1), full) <= FP64_ATOL
