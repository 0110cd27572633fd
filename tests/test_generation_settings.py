"""Generation settings: ``generation_config``, the logits processors and stopping criteria, and the
libraries that call ``generate`` (pipelines, peft), each against transformers' own ``generate``.

On one tiny fp32 checkpoint per architecture saved by transformers (Llama, GPT-2, Mistral with a
sliding window; ids of the char tokenizer: pad 0, bos 1, eos 2):

- each setting (``repetition_penalty`` above and below 1, ``no_repeat_ngram_size``,
  ``min_new_tokens``, ``min_length``, ``suppress_tokens``, ``begin_suppress_tokens``, several
  together) gives greedy tokens identical to transformers' on left-padded batches, and changes
  the output (so the check has teeth);
- ``inputs=``, a ``generation_config`` argument (lmport's or transformers' object), keywords
  overriding it; the checkpoint's ``generation_config.json`` (written by transformers, with an
  extra eos id, ``max_new_tokens`` and an unknown key) is read at load, honoured, overridable,
  and written back by ``save_pretrained``; ``from_pretrained(generation_config=...)``;
- seeded sampling with ``num_return_sequences`` draws transformers' tokens;
- ``return_dict_in_generate`` with ``output_scores``/``output_logits``/``output_hidden_states``;
- transformers' ``TextStreamer`` prints what transformers' run prints;
- ``stop_strings`` with the char tokenizer; the criterion equals transformers' on multi-character
  and byte-level vocabularies;
- ``pipeline("text-generation")`` and ``peft``'s ``PeftModel.generate``;
- what lmport cannot do (beam search, unknown keywords, ...) raises typed errors.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf, tiny_configs
from helpers import LOGITS_ATOL, VOCAB, hf_model_cache, make_tokenizer, one_intraop_thread

import lmport
from lmport.generation_processors import StopStrings

ARCHS = ("llama", "gpt2", "mistral")
PAD, BOS, EOS = 0, 1, 2  # the char tokenizer's
NO_EOS = VOCAB  # an id never produced: runs that must not stop
NEW = 10
WIDTH = 7  # the padded prompt width

HF_CONFIGS = tiny_configs(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: save_hf(tmp_path_factory.mktemp(arch), make()) for arch, make in HF_CONFIGS.items()}


@pytest.fixture(scope="module")
def ours(checkpoints: dict[str, Path]) -> Callable[[str], Any]:
    return functools.cache(lambda arch: lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch]))


@pytest.fixture(scope="module")
def ref(checkpoints: dict[str, Path]) -> Callable[[str], Any]:
    get = hf_model_cache(checkpoints)
    return lambda arch: get(arch, "sdpa")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def prompts(lengths: tuple[int, ...] = (WIDTH, 4), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of ids from 4 up (never pad, bos, eos or unk): (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def hf_generate(model: Any, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(*args, **kwargs)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), f"\nlmport:\n{a}\ntransformers:\n{b}"


# --- each setting, greedy, against transformers ----------------------------------------------

# kwargs of each case, from the new tokens of a run without it (rows 0 and 1 of the batch).
CASES: dict[str, Callable[[list[list[int]]], dict[str, Any]]] = {
    "repetition_penalty": lambda new: {"repetition_penalty": 1.5},
    "repetition_penalty_below_1": lambda new: {"repetition_penalty": 0.5},
    "no_repeat_ngram_size": lambda new: {"no_repeat_ngram_size": 1},  # larger sizes: test_processors_...
    # eos ids each row emits at step 1: without the setting, both rows finish at once
    "min_new_tokens": lambda new: {"eos_token_id": [new[0][1], new[1][1]], "min_new_tokens": 6},
    "min_length": lambda new: {"eos_token_id": [new[0][1], new[1][1]], "min_length": WIDTH + 5},
    "suppress_tokens": lambda new: {"suppress_tokens": [new[0][0], new[1][3]]},
    "begin_suppress_tokens": lambda new: {"begin_suppress_tokens": [new[0][0], new[1][0]]},
    "together": lambda new: {
        "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 4, "eos_token_id": [new[0][2]]
    },  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_setting_matches_transformers(ours: Any, ref: Any, arch: str, case: str) -> None:
    ids, mask = prompts()
    base: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": NEW, "pad_token_id": PAD}
    free = ours(arch).generate(ids, eos_token_id=NO_EOS, **base)
    settings = CASES[case](free[:, WIDTH:].tolist())
    settings.setdefault("eos_token_id", NO_EOS)
    got = ours(arch).generate(ids, **base, **settings)
    assert_same(got, hf_generate(ref(arch), ids, do_sample=False, **base, **settings))
    without = ours(arch).generate(ids, **base, eos_token_id=settings["eos_token_id"])
    assert not torch.equal(got, without), f"{case} changed nothing: the check has no teeth"


def test_processors_equal_transformers() -> None:
    """Each processor on random scores and ids with many repeats (so n-grams recur) equals transformers'."""
    from lmport import generation_processors as gp

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 12, (6, 15), generator=g)
    ids[1, :4] = PAD  # left padding, skipped by the repetition penalty
    ignore = torch.tensor([0, 4, 0, 0, 0, 0])
    eos = torch.tensor([3, 5])
    pairs = [
        (gp.RepetitionPenalty(1.7), transformers.RepetitionPenaltyLogitsProcessor(1.7)),
        (gp.RepetitionPenalty(0.4, ignore), transformers.RepetitionPenaltyLogitsProcessor(0.4, ignore)),
        (gp.MinLength(16, eos), transformers.MinLengthLogitsProcessor(16, eos)),
        (gp.MinLength(15, eos), transformers.MinLengthLogitsProcessor(15, eos)),
        (gp.MinNewTokens(10, 6, eos), transformers.MinNewTokensLengthLogitsProcessor(10, 6, eos)),
        (gp.SuppressTokens([4, 7]), transformers.SuppressTokensLogitsProcessor([4, 7])),
        (gp.SuppressTokens([4], begin_index=15), transformers.SuppressTokensAtBeginLogitsProcessor([4], 15)),
        (gp.MinP(0.2), transformers.MinPLogitsWarper(0.2)),
        (gp.TopP(0.0), transformers.TopPLogitsWarper(0.0)),
    ]
    pairs += [(gp.NoRepeatNGram(n), transformers.NoRepeatNGramLogitsProcessor(n)) for n in (1, 2, 3, 16)]
    for ours_, theirs in pairs:
        scores = torch.randn(6, VOCAB, generator=g) * 3
        expected = theirs(ids, scores.clone())
        assert torch.equal(ours_(ids, scores.clone()), expected), type(theirs).__name__
    banned = gp.NoRepeatNGram(2)(ids, torch.zeros(6, VOCAB))
    assert bool(torch.isinf(banned).any()), "the ids should repeat bigrams"


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_and_generation_config_arguments(ours: Any, ref: Any, arch: str) -> None:
    ids, mask = prompts(seed=1)
    model, hf = ours(arch), ref(arch)
    expected = hf_generate(hf, inputs=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=NO_EOS)
    assert expected.shape == (2, WIDTH + 6)
    assert_same(model.generate(inputs=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=NO_EOS), expected)
    assert_same(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=NO_EOS), expected)

    settings = {"max_new_tokens": 4, "eos_token_id": NO_EOS, "pad_token_id": PAD, "repetition_penalty": 1.4}
    hf_config = transformers.GenerationConfig(**settings)
    expected = hf_generate(hf, ids, hf_config, attention_mask=mask)
    assert expected.shape == (2, WIDTH + 4)
    assert_same(model.generate(ids, lmport.GenerationConfig(**settings), attention_mask=mask), expected)
    assert_same(model.generate(ids, generation_config=hf_config, attention_mask=mask), expected)
    # keywords override the generation_config argument
    longer = model.generate(ids, generation_config=hf_config, attention_mask=mask, max_new_tokens=7)
    assert_same(longer, hf_generate(hf, ids, hf_config, attention_mask=mask, max_new_tokens=7))
    assert longer.shape == (2, WIDTH + 7)

    # user logits processors and stopping criteria (transformers' objects) run where transformers runs them
    def extras() -> dict[str, Any]:
        return dict(
            logits_processor=transformers.LogitsProcessorList([transformers.SuppressTokensLogitsProcessor([4, 5])]),
            stopping_criteria=transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(WIDTH + 3)]),
        )

    custom = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=NO_EOS, **extras())
    assert custom.shape == (2, WIDTH + 3) and not bool(torch.isin(custom[:, WIDTH:], torch.tensor([4, 5])).any())
    assert_same(custom, hf_generate(hf, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=NO_EOS, **extras()))


# --- the checkpoint's generation_config.json -----------------------------------------------------


@pytest.fixture(scope="module")
def with_generation_config(checkpoints: dict[str, Path], ours: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(arch)``: (folder, extra eos id, max_new_tokens) of a copy of the checkpoint whose
    ``generation_config.json`` (saved by transformers) adds a stop token that row 1 emits at step 2,
    sets ``max_new_tokens`` and holds a key transformers does not know."""

    @functools.cache
    def get(arch: str) -> tuple[Path, int, int]:
        ids, mask = prompts(seed=2)
        free = ours(arch).generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=NO_EOS)
        extra = int(free[1, WIDTH + 2])
        folder = tmp_path_factory.mktemp(f"{arch}-gc")
        shutil.copytree(checkpoints[arch], folder, dirs_exist_ok=True)
        config = transformers.GenerationConfig(
            bos_token_id=BOS, eos_token_id=[EOS, extra], pad_token_id=PAD, max_new_tokens=9
        )
        config.save_pretrained(folder)
        raw = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**raw, "my_custom_key": [1, 2]}))
        return folder, extra, 9

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_generation_config_is_honoured(with_generation_config: Any, arch: str) -> None:
    folder, extra, max_new = with_generation_config(arch)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.generation_config.eos_token_id == [EOS, extra] == hf.generation_config.eos_token_id
    assert model.generation_config.max_new_tokens == max_new
    assert model.generation_config.my_custom_key == [1, 2]
    ids, mask = prompts(seed=2)
    got = model.generate(ids, attention_mask=mask)
    assert_same(got, hf_generate(hf, ids, attention_mask=mask))
    new = got[:, WIDTH:]
    assert new[1, 2] == extra and bool((new[1, 3:] == PAD).all()), "row 1 should stop on the extra eos id"
    assert new.shape[1] <= max_new
    if not bool(torch.isin(new[0], torch.tensor([EOS, extra])).any()):
        assert new.shape[1] == max_new, "without an eos in row 0, max_new_tokens comes from the file"
    # keywords override the file
    loose = model.generate(ids, attention_mask=mask, eos_token_id=NO_EOS, max_new_tokens=11)
    assert loose.shape == (2, WIDTH + 11)
    assert_same(loose, hf_generate(hf, ids, attention_mask=mask, eos_token_id=NO_EOS, max_new_tokens=11))


def test_generation_config_saved_and_passed_at_load(with_generation_config: Any, tmp_path: Path) -> None:
    folder, extra, max_new = with_generation_config("llama")
    model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.temperature = 0.6  # edited after load: saved too
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [EOS, extra] and saved["max_new_tokens"] == max_new
    assert saved["my_custom_key"] == [1, 2] and saved["temperature"] == 0.6
    hf_config = transformers.GenerationConfig.from_pretrained(tmp_path / "saved")
    assert hf_config.eos_token_id == [EOS, extra] and hf_config.max_new_tokens == max_new
    reloaded = lmport.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.generation_config == model.generation_config

    # from_pretrained(generation_config=...) replaces the file's, with transformers' object too
    given = transformers.GenerationConfig(max_new_tokens=3, eos_token_id=NO_EOS, pad_token_id=PAD)
    for config in (given, lmport.GenerationConfig(**given.to_diff_dict())):
        loaded = lmport.AutoModelForCausalLM.from_pretrained(folder, generation_config=config)
        assert isinstance(loaded.generation_config, lmport.GenerationConfig)
        assert loaded.generation_config.max_new_tokens == 3
        ids, mask = prompts(seed=2)
        assert loaded.generate(ids, attention_mask=mask).shape == (2, WIDTH + 3)


def test_generation_config_derived_from_config(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Without a generation_config.json, and for models built from a config, the config's token ids."""
    folder = tmp_path / "no-gc"
    shutil.copytree(checkpoints["llama"], folder)
    (folder / "generation_config.json").unlink()
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, eos_token_id=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert (model.generation_config.bos_token_id, model.generation_config.pad_token_id) == (BOS, PAD)
    assert hf.generation_config.bos_token_id == BOS and hf.generation_config.pad_token_id == PAD
    assert model.generation_config.eos_token_id == 5  # the override, as the model's config has it
    fresh = type(model).from_config(model.config, seed=0)
    assert fresh.generation_config.eos_token_id == 5 and fresh.generation_config.bos_token_id == BOS
    fresh.save_pretrained(tmp_path / "fresh")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "fresh").eos_token_id == 5


def test_generation_config_object(tmp_path: Path) -> None:
    hf = transformers.GenerationConfig(max_new_tokens=5, eos_token_id=[2, 7], do_sample=True, top_p=0.8)
    hf.save_pretrained(tmp_path)
    config = lmport.GenerationConfig.from_pretrained(tmp_path)
    assert (config.max_new_tokens, config.eos_token_id, config.do_sample, config.top_p) == (5, [2, 7], True, 0.8)
    assert config.temperature is None and config.transformers_version == transformers.__version__
    assert lmport.GenerationConfig.from_any(hf) == config
    unused = config.update(max_new_tokens=8, not_a_setting=1)
    assert unused == {"not_a_setting": 1} and config.max_new_tokens == 8
    config.update(top_p=0.5, top_k=7, defaults_only=True)
    assert config.top_p == 0.8 and config.top_k == 7
    assert config.to_dict()["min_length"] is None and "min_length" not in config.to_diff_dict()
    config.save_pretrained(tmp_path / "again")
    back = transformers.GenerationConfig.from_pretrained(tmp_path / "again")
    assert back.max_new_tokens == 8 and back.top_k == 7 and back.eos_token_id == [2, 7]


# --- sampling, returned scores, streaming ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_with_num_return_sequences(ours: Any, ref: Any, arch: str) -> None:
    ids, mask = prompts(seed=3)
    settings: dict[str, Any] = dict(
        attention_mask=mask, do_sample=True, num_return_sequences=3, temperature=1.5, top_k=40, top_p=0.95,
        repetition_penalty=1.2, max_new_tokens=NEW, eos_token_id=NO_EOS, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(11)
    got = ours(arch).generate(ids, **settings)
    torch.manual_seed(11)
    assert_same(got, hf_generate(ref(arch), ids, **settings))
    assert got.shape == (6, WIDTH + NEW)
    assert torch.equal(got[:3, :WIDTH], ids[:1].expand(3, -1)) and torch.equal(got[3:, :WIDTH], ids[1:].expand(3, -1))
    assert len({tuple(r) for r in got[:3, WIDTH:].tolist()}) > 1, "the samples of one prompt should differ"
    with pytest.raises(lmport.GenerationSettingError, match="num_return_sequences"):
        ours(arch).generate(ids, attention_mask=mask, num_return_sequences=2)
    with pytest.raises(ValueError):  # transformers refuses it too
        hf_generate(ref(arch), ids, attention_mask=mask, num_return_sequences=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_return_dict_with_scores_and_logits(ours: Any, ref: Any, arch: str) -> None:
    ids, mask = prompts(seed=4)
    settings: dict[str, Any] = dict(
        attention_mask=mask, max_new_tokens=5, eos_token_id=NO_EOS, pad_token_id=PAD, repetition_penalty=1.3,
        no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True, output_logits=True,
    )  # fmt: skip
    got = ours(arch).generate(ids, **settings)
    expected = hf_generate(ref(arch), ids, **settings)
    assert_same(got.sequences, expected.sequences)
    assert got[0] is got.sequences and got["sequences"] is got.sequences
    for name in ("scores", "logits"):
        mine, theirs = getattr(got, name), getattr(expected, name)
        assert isinstance(mine, tuple) and len(mine) == len(theirs) == 5
        for a, b in zip(mine, theirs):
            assert a.shape == b.shape == (2, VOCAB)
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            finite = torch.isfinite(b)
            assert (a[finite] - b[finite]).abs().max().item() <= LOGITS_ATOL
    assert not torch.equal(got.scores[-1], got.logits[-1]), "processed scores should differ from the raw logits"
    assert got.cache is not None and got.cache.get_seq_length() == WIDTH + 4
    plain = ours(arch).generate(ids, **{**settings, "return_dict_in_generate": False})
    assert torch.equal(plain, got.sequences)
    settings.update(renormalize_logits=True, output_logits=False)
    got, expected = ours(arch).generate(ids, **settings), hf_generate(ref(arch), ids, **settings)
    for a, b in zip(got.scores, expected.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)) and (a[finite] - b[finite]).abs().max().item() <= LOGITS_ATOL
        torch.testing.assert_close(a[finite].exp().sum(), torch.tensor(2.0))  # log-probabilities, two rows


def test_return_dict_hidden_states(ours: Any, ref: Any) -> None:
    ids, _ = prompts((6,), seed=5)
    settings: dict[str, Any] = dict(
        max_new_tokens=3, eos_token_id=NO_EOS, return_dict_in_generate=True, output_hidden_states=True
    )
    got, expected = ours("llama").generate(ids, **settings), hf_generate(ref("llama"), ids, **settings)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert len(mine) == len(theirs) == 3  # embeddings + 2 layers
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=LOGITS_ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_streamer(ours: Any, ref: Any, tokenizer: Any, arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tokenizer(["Stream me"], return_tensors="pt").input_ids
    outputs = []
    for model in (ours(arch), ref(arch)):
        capsys.readouterr()
        streamer = transformers.TextStreamer(tokenizer, skip_prompt=True)
        out = hf_generate(model, ids, streamer=streamer, max_new_tokens=NEW, eos_token_id=NO_EOS)
        outputs.append((out, capsys.readouterr().out))
    (got, printed), (expected, printed_ref) = outputs
    assert_same(got, expected)
    assert printed == printed_ref
    assert printed.strip() and printed.rstrip("\n") == tokenizer.decode(got[0, ids.shape[1] :])


# --- stop strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_strings(ours: Any, ref: Any, tokenizer: Any, arch: str) -> None:
    ids = tokenizer(["Once upon a time", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    base: dict[str, Any] = dict(attention_mask=ids.attention_mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    free = ours(arch).generate(ids.input_ids, **base)
    width = ids.input_ids.shape[1]
    # a two-character stop string that row 0 completes at step k (both characters in the vocabulary)
    k = next(j for j in range(3, NEW) if all(4 <= t < len(tokenizer) for t in free[0, width + j - 1 : width + j + 1]))
    stop = tokenizer.decode(free[0, width + k - 1 : width + k + 1])
    assert len(stop) == 2, stop
    settings = dict(base, stop_strings=[stop, "never seen"], tokenizer=tokenizer)
    got = ours(arch).generate(ids.input_ids, **settings)
    assert_same(got, hf_generate(ref(arch), ids.input_ids, **settings))
    new = got[0, width:].tolist()
    end = new.index(PAD) if PAD in new else len(new)  # row 0 emits pad once finished
    assert end <= k + 1 and set(new[end:]) == {PAD}, "row 0 should stop right after the stop string"
    assert tokenizer.decode(new[:end]).endswith(stop)
    with pytest.raises(lmport.GenerationSettingError, match="tokenizer"):
        ours(arch).generate(ids.input_ids, stop_strings=[stop])


def _tokenizer(model: Any, pre_tokenizer: Any = None, decoder: Any = None) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_stop_string_criterion_equals_transformers() -> None:
    """Multi-character tokens (stop strings spanning, overhanging or inside tokens) and byte-level BPE."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer

    words = ["<unk>", "st", "op", "opera", "las", "topper", "s", "to", "pped", "stop", "x", "p", "é", "at", "abcdef"]
    word_level = _tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"),
                            pre_tokenizers.Whitespace(), decoders.Fuse())  # fmt: skip
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["stop stopping the top stops", "héllo wörld ünïcode", "a stop sign at the stop"] * 5,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    byte_level = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    g = torch.Generator().manual_seed(0)
    for tok, stops in ((word_level, ["stop", "é", "pat"]), (byte_level, ["stop", "ö", " the"])):
        ours = StopStrings(stops, tok)
        theirs = transformers.StopStringCriteria(tok, stops)
        n = len(tok.get_vocab())
        ids = torch.randint(0, n, (4000, 5), generator=g)
        if tok is word_level:  # frequent hits: draw from the stop-relevant tokens
            ids = torch.randint(1, 13, (4000, 5), generator=g)
        expected = theirs(ids, None)
        assert torch.equal(ours(ids), expected)
        assert 0 < int(expected.sum()) < len(ids), "some rows should stop and some not"
        encoded = tok("we stop here at the top", add_special_tokens=False, return_tensors="pt").input_ids
        for end in range(1, encoded.shape[1] + 1):
            assert torch.equal(ours(encoded[:, :end]), theirs(encoded[:, :end], None))


# --- pipeline and peft -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_text_generation_pipeline(ours: Any, ref: Any, tokenizer: Any, arch: str) -> None:
    prompts_ = ["The quick brown fox", "Hi"]
    results = []
    for model in (ours(arch), ref(arch)):
        generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
        single = generator(prompts_[0], do_sample=False, max_new_tokens=8)
        batched = generator(prompts_, do_sample=False, max_new_tokens=8, batch_size=2)
        results.append((single, batched))
    assert results[0] == results[1]
    text = results[0][0][0]["generated_text"]
    assert text.startswith(prompts_[0]) and len(text) > len(prompts_[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_model_generate(checkpoints: dict[str, Path], ours: Any, arch: str) -> None:
    import peft

    ids, mask = prompts(seed=6)
    base = ours(arch).generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    assert_same(got, base)  # LoRA's B starts at zero
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    moved = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=NO_EOS)
    assert not torch.equal(moved, base), "generate should run through the adapter"


# --- what lmport refuses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_beams": 2}, lmport.UnsupportedFeatureError, "num_beams"),
        ({"do_sample": True, "typical_p": 0.5}, lmport.UnsupportedFeatureError, "typical_p"),
        ({"output_attentions": True, "return_dict_in_generate": True}, lmport.UnsupportedFeatureError, "attentions"),
        ({"assistant_model": object()}, lmport.UnsupportedFeatureError, "assistant_model"),
        ({"not_a_setting": 3}, lmport.ArgumentError, "not_a_setting"),
        ({"generation_config": 3}, lmport.ArgumentError, "GenerationConfig"),
        ({"do_sample": True, "temperature": 0.0}, lmport.GenerationSettingError, "temperature"),
    ],
)
def test_refused_settings(ours: Any, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    ids, _ = prompts((4,))
    with pytest.raises(error, match=match) as info:
        ours("llama").generate(ids, max_new_tokens=2, **kwargs)
    assert isinstance(info.value, lmport.LmportError)


# --- token_type_ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_token_type_ids_as_transformers(ours: Any, ref: Any, arch: str) -> None:
    """GPT-2 embeds ``token_type_ids`` (each new token repeats its row's last type); the models whose
    forward has no token types refuse them in ``generate``, as transformers' do."""
    ids, mask = prompts()
    types = torch.zeros_like(ids)
    types[0, 4:], types[1, 5:] = 5, 9  # the rows end on different, nonzero types
    base: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": NEW, "pad_token_id": PAD, "eos_token_id": NO_EOS}
    if arch != "gpt2":
        with pytest.raises(ValueError, match="token_type_ids"):
            hf_generate(ref(arch), ids, token_type_ids=types, **base)
        with pytest.raises(lmport.ArgumentError, match="token_type_ids"):
            ours(arch).generate(ids, token_type_ids=types, **base)
        return
    got = ours(arch).generate(ids, token_type_ids=types, **base)
    assert_same(got, hf_generate(ref(arch), ids, token_type_ids=types, **base))
    assert not torch.equal(got, ours(arch).generate(ids, **base)), "token types changed nothing"
    # no cache: every step sees the whole sequence's types
    no_cache = ours(arch).generate(ids, token_type_ids=types, use_cache=False, **base)
    assert_same(no_cache, hf_generate(ref(arch), ids, token_type_ids=types, use_cache=False, **base))
    with pytest.raises(lmport.GenerationSettingError, match="token_type_ids"):
        ours(arch).generate(ids, token_type_ids=types[:, 1:], **base)
