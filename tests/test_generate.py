"""``generate()``: greedy parity with transformers, eos and padding, the cache, sampling and its filters.

On tiny fp32 checkpoints saved by transformers (Llama, GPT-2, Mistral with a window of 4
shorter than prompt + continuation), random weights (``conftest.save_hf``):

- greedy tokens equal transformers' ``generate(do_sample=False)`` for eager and sdpa, one
  prompt and left-padded batches, and each row of a batch equals its prompt generated alone;
- eos: a row that emits eos emits pad afterwards, generation stops once every row has
  finished, the config's eos is the default; ``max_length`` and ``max_new_tokens``;
- ``use_cache=False`` gives the tokens the cache gives;
- sampling: a seeded ``torch.Generator`` reproduces its output, ``top_k=1`` is greedy;
  ``filter_logits`` equals transformers' temperature/top-k/top-p warpers on random logits;
  invalid temperature and top_p raise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf, tiny_configs
from helpers import ATTENTION, VOCAB, hf_model_cache, one_intraop_thread
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import lmport
from lmport.generation import filter_logits

EOS = 1  # in every config; the tests that must not stop on it pass eos_token_id explicitly
PAD = 0
ARCHS = ("llama", "gpt2", "mistral")
NEW = 10

HF_CONFIGS: dict[str, Callable[[], Any]] = tiny_configs(bos_token_id=2, eos_token_id=EOS)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: save_hf(tmp_path_factory.mktemp(arch), make()) for arch, make in HF_CONFIGS.items()}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> Callable[[str, str], Any]:
    """``models(arch, attn)``: lmport's model, loaded once per module."""
    return functools.cache(
        lambda arch, attn: lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation=attn)
    )


@pytest.fixture(scope="module")
def hf_models(checkpoints: dict[str, Path]) -> Callable[[str, str], Any]:
    """``hf_models(arch, attn)``: transformers' model of the same checkpoint."""
    return hf_model_cache(checkpoints)


def prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded prompts (ids from 3 up: never pad, eos or bos): (input_ids, attention_mask, rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask, rows


def hf_greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


NO_EOS = VOCAB  # the eos of runs that must not stop: an id outside the vocabulary, never produced


# --- greedy parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_single_prompt_matches_transformers(
    models: Callable[[str, str], Any], hf_models: Callable[[str, str], Any], arch: str, attn: str
) -> None:
    ids, mask, _ = prompts([7], seed=1)
    ours = models(arch, attn).generate(ids, max_new_tokens=NEW, eos_token_id=NO_EOS)  # no mask: all real
    ref = hf_greedy(hf_models(arch, attn), ids, mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    assert ours.shape == (1, 7 + NEW)
    assert torch.equal(ours, ref), f"\nlmport:       {ours[0, 7:].tolist()}\ntransformers: {ref[0, 7:].tolist()}"
    assert torch.equal(ours[:, :7], ids)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_left_padded_batch_matches_transformers(
    models: Callable[[str, str], Any], hf_models: Callable[[str, str], Any], arch: str, attn: str
) -> None:
    model = models(arch, attn)
    ids, mask, rows = prompts([9, 6, 2], seed=2)  # padding longer than Mistral's window
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, pad_token_id=PAD)
    ref = hf_greedy(hf_models(arch, attn), ids, mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    assert ours.shape == (3, 9 + NEW)
    assert torch.equal(ours, ref), f"\nlmport:\n{ours[:, 9:]}\ntransformers:\n{ref[:, 9:]}"
    # Each row is its prompt generated alone: padding changes nothing.
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=NEW, eos_token_id=NO_EOS)
        assert torch.equal(alone[0, len(row) :], ours[i, 9:]), f"row {i} differs from its prompt alone"
    # The rows continue differently (the check above would be weak if every row said the same).
    assert len({tuple(r) for r in ours[:, 9:].tolist()}) == 3


def test_max_length_and_nothing_to_generate(models: Callable[[str, str], Any]) -> None:
    model = models("llama", "sdpa")
    ids, _, _ = prompts([5], seed=3)
    by_length = model.generate(ids, max_length=9, eos_token_id=NO_EOS)
    assert torch.equal(by_length, model.generate(ids, max_new_tokens=4, eos_token_id=NO_EOS))
    assert by_length.shape == (1, 9)
    assert torch.equal(model.generate(ids, max_new_tokens=0), ids)
    assert model.generate(ids, eos_token_id=NO_EOS).shape == (1, 5 + 20)  # transformers' default of 20 new tokens


# --- eos and padding of finished rows ---------------------------------------------------------------


def expected_with_eos(free: torch.Tensor, prompt_len: int, eos: set[int], pad: int) -> torch.Tensor:
    """What generation must return, derived from a run that never stopped (``free``)."""
    new = free[:, prompt_len:]
    done = torch.zeros(new.shape[0], dtype=torch.bool)
    out = []
    for step in range(new.shape[1]):
        token = torch.where(done, torch.full_like(new[:, step], pad), new[:, step])
        out.append(token)
        done = done | torch.tensor([t in eos for t in token.tolist()])
        if bool(done.all()):
            break
    return torch.cat([free[:, :prompt_len], torch.stack(out, dim=1)], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_then_pad_and_early_stop(
    models: Callable[[str, str], Any], hf_models: Callable[[str, str], Any], arch: str
) -> None:
    model = models(arch, "sdpa")
    ids, mask, _ = prompts([8, 5, 8], seed=4)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, pad_token_id=PAD)
    new = free[:, 8:].tolist()
    # eos: tokens that rows 0, 1 and 2 produce at steps 2, 6 and 3, so that rows finish at different
    # steps (a finished row then emits pad) and all before NEW (then generation stops early).
    eos = {new[0][2], new[1][6], new[2][3]}
    expected = expected_with_eos(free, 8, eos, PAD)
    stop = expected.shape[1] - 8
    assert stop < NEW, "the chosen eos ids should finish every row early"
    assert bool((expected[:, 8:] == PAD).any()), "some row should finish before another"
    eos_ids = sorted(eos)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos_ids, pad_token_id=PAD)
    assert torch.equal(ours, expected), f"\ngot:\n{ours[:, 8:]}\nexpected:\n{expected[:, 8:]}"
    ref = hf_greedy(hf_models(arch, "sdpa"), ids, mask, max_new_tokens=NEW, eos_token_id=eos_ids)
    assert torch.equal(ours, ref), f"\nlmport:\n{ours[:, 8:]}\ntransformers:\n{ref[:, 8:]}"


def test_config_eos_is_the_default(checkpoints: dict[str, Path], models: Callable[[str, str], Any]) -> None:
    """Without eos_token_id, the config's eos stops a row; pad defaults to the config's pad, else eos."""
    model = models("llama", "sdpa")
    ids, _, _ = prompts([6], seed=5)
    free = model.generate(ids, max_new_tokens=NEW, eos_token_id=NO_EOS)
    token = free[0, 6 + 3].item()
    first = free[0, 6:].tolist().index(token)
    eos_model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], eos_token_id=token)
    assert eos_model.config.eos_token_id == token and eos_model.config.pad_token_id is None
    out = eos_model.generate(ids, max_new_tokens=NEW)
    assert torch.equal(out, free[:, : 6 + first + 1]), "generation should stop right after the config's eos"


# --- the cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_without_cache_same_tokens(models: Callable[[str, str], Any], arch: str, attn: str) -> None:
    model = models(arch, attn)
    ids, mask, _ = prompts([9, 4], seed=6)
    kwargs: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, use_cache=False, **kwargs), model.generate(ids, use_cache=True, **kwargs))


# --- sampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_reproducible(models: Callable[[str, str], Any], arch: str) -> None:
    model = models(arch, "sdpa")
    ids, mask, _ = prompts([7, 4, 7], seed=7)

    def sample(seed: int, **kwargs: Any) -> torch.Tensor:
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, eos_token_id=NO_EOS, pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed), **kwargs,
        )  # fmt: skip

    first = sample(0, temperature=1.5, top_k=None)
    assert torch.equal(first, sample(0, temperature=1.5, top_k=None))
    assert not torch.equal(first, sample(1, temperature=1.5, top_k=None)), "another seed should sample otherwise"
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS, pad_token_id=PAD)
    assert not torch.equal(first, greedy), "sampling at temperature 1.5 should leave the greedy path"
    assert torch.equal(sample(2, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6, top_k=None), greedy)  # the nucleus keeps only the top token


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, None, None), (1.3, 5, None), (1.0, 1, None), (1.0, None, 0.9),
     (0.5, None, 0.3), (2.0, 20, 0.8), (1.0, 200, 0.95), (0.9, 10, 1.0)],
)  # fmt: skip
def test_filter_logits_equals_transformers_warpers(temperature: float, top_k: int | None, top_p: float | None) -> None:
    g = torch.Generator().manual_seed(int(temperature * 10) + (top_k or 0))
    logits = torch.randn(4, VOCAB, generator=g) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    ours = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected)), "a different set of tokens was filtered out"
    kept = torch.isfinite(expected)
    torch.testing.assert_close(ours[kept], expected[kept], rtol=0, atol=0)
    assert bool(kept.any(-1).all()), "every row keeps at least one token"
    if top_k is not None and top_k < VOCAB:
        assert bool((kept.sum(-1) <= top_k).all())


def test_filters_really_filter() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True, True]]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_invalid_temperature_raises(models: Callable[[str, str], Any], temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(torch.zeros(1, 4), temperature=temperature)
    ids, _, _ = prompts([4], seed=8)
    with pytest.raises(ValueError, match="temperature"):
        models("llama", "sdpa").generate(ids, do_sample=True, temperature=temperature, max_new_tokens=2)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_invalid_top_p_raises(top_p: float) -> None:
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(1, 4), top_p=top_p)
