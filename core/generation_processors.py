"""Logits processors and stopping criteria of ``generate()``, with transformers' exact semantics.

Each processor is a callable ``(input_ids, scores) -> scores`` and each criterion a callable
``(input_ids, scores) -> (batch,) bool`` (True: that row is done), the interfaces of
transformers' ``LogitsProcessor`` and ``StoppingCriteria``, so user-supplied lists of either
library's objects mix with these. The arithmetic follows transformers' classes of the same
purpose line by line (``transformers/generation/logits_process.py``, ``stopping_criteria.py``),
so greedy and seeded sampled outputs are token-identical.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .errors import GenerationSettingError

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- processors applied whether greedy or sampling --------------------------------------------


class RepetitionPenalty:
    """Divide positive (multiply negative) scores of tokens already in the sequence by ``penalty``.

    ``prompt_ignore_length``: per row, how many leading positions (left padding) not to count.
    """

    def __init__(self, penalty: float, prompt_ignore_length: torch.Tensor | None = None) -> None:
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise GenerationSettingError(f"repetition_penalty has to be a strictly positive float, but is {penalty}")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        if self.prompt_ignore_length is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            ignore = self.prompt_ignore_length.to(input_ids.device)
            input_ids = input_ids.masked_fill(positions[None, :] < ignore[:, None], vocab_size)
        input_ids = input_ids.clamp(max=vocab_size)
        padded = torch.nn.functional.pad(scores, (0, 1))  # column vocab_size absorbs ignored ids
        score = torch.gather(padded, 1, input_ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return padded.scatter(1, input_ids, score)[..., :vocab_size]


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the sequence (prompt included)."""

    def __init__(self, ngram_size: int) -> None:
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size <= 0:
            raise GenerationSettingError(f"no_repeat_ngram_size has to be a positive integer, but is {ngram_size}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cur_len = input_ids.shape[-1]
        if cur_len < self.ngram_size:
            return scores
        prefix = input_ids[:, cur_len + 1 - self.ngram_size :]
        windows = input_ids.unfold(dimension=1, size=self.ngram_size, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        vocab_size = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return scores.masked_fill(banned[:, :vocab_size], -float("inf"))


class MinLength:
    """Forbid the eos ids while the sequence (prompt included) is shorter than ``min_length``."""

    def __init__(self, min_length: int, eos_token_id: torch.Tensor) -> None:
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
            raise GenerationSettingError(f"min_length has to be a non-negative integer, but is {min_length}")
        self.min_length = min_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores.clone()
        return torch.where(_vocab_mask(scores, self.eos_token_id), -math.inf, scores)


class MinNewTokens:
    """Forbid the eos ids until ``min_new_tokens`` tokens follow the ``prompt_length`` prompt."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_token_id: torch.Tensor) -> None:
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise GenerationSettingError(f"min_new_tokens has to be a non-negative integer, but is {min_new_tokens}")
        self.prompt_length = prompt_length
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length >= self.min_new_tokens:
            return scores.clone()
        return torch.where(_vocab_mask(scores, self.eos_token_id), -math.inf, scores)


class SuppressTokens:
    """Never generate ``tokens``; with ``begin_index``, only at the step where the sequence has that length."""

    def __init__(self, tokens: Iterable[int], begin_index: int | None = None) -> None:
        self.tokens = torch.tensor(list(tokens), dtype=torch.long)
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.begin_index is not None and input_ids.shape[-1] != self.begin_index:
            return scores
        return torch.where(_vocab_mask(scores, self.tokens), -float("inf"), scores)


def _vocab_mask(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids.to(scores.device))


# --- sampling warpers ---------------------------------------------------------------------------


class Temperature:
    """Divide the scores by ``temperature``."""

    def __init__(self, temperature: float) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            hint = "; for greedy decoding use do_sample=False" if temperature == 0 else ""
            raise GenerationSettingError(f"temperature has to be a strictly positive float, got {temperature}{hint}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the ``top_k`` highest scores (and ties with the k-th), set the rest to ``-inf``."""

    def __init__(self, top_k: int) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise GenerationSettingError(f"top_k has to be a strictly positive integer, but is {top_k}")
        self.top_k = top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.size(-1))
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))


class TopP:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least ``top_p``."""

    def __init__(self, top_p: float) -> None:
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise GenerationSettingError(f"top_p has to be a float in [0, 1], but is {top_p}")
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)
        remove_sorted[..., -1:] = 0  # always keep the most likely token
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return scores.masked_fill(remove, -float("inf"))


class MinP:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""

    def __init__(self, min_p: float) -> None:
        if not 0.0 <= float(min_p) <= 1.0:
            raise GenerationSettingError(f"min_p has to be a float in [0, 1], but is {min_p}")
        self.min_p = float(min_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        return scores.masked_fill(remove, -float("inf"))


def apply(processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run ``processors`` in order."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


# --- stopping criteria ---------------------------------------------------------------------------


class EosCriterion:
    """A row is done once its last token is one of ``eos_token_id``."""

    def __init__(self, eos_token_id: torch.Tensor) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.eos_token_id.to(input_ids.device))


class MaxTime:
    """Every row is done once ``max_time`` seconds have passed since the criterion was made."""

    def __init__(self, max_time: float) -> None:
        self.max_time = float(max_time)
        self.start = time.time()

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        done = time.time() - self.start > self.max_time
        return torch.full((input_ids.shape[0],), done, device=input_ids.device, dtype=torch.bool)


class StopStrings:
    """A row is done when a stop string ends inside its last token (as transformers' ``StopStringCriteria``).

    Tokens are compared by the text each one yields (found as transformers finds it, with the
    tokenizer's ``convert_tokens_to_string``; as bytes for byte-level and byte-fallback
    vocabularies). The match may begin inside an earlier token and may run past the end of the
    last one (``["st", "opera"]`` stops on ``"stop"``), but must touch the last token, so a stop
    string already in the prompt or earlier in the output does not stop generation again.
    """

    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Any) -> None:
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) for s in strings):
            raise GenerationSettingError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
        self.mode = _matching_mode(tokenizer)
        self.targets: list[str | bytes] = [s.encode("utf-8") for s in strings] if self.mode else list(strings)
        self.texts = _token_texts(tokenizer, self.mode)
        self.window = max(len(t) for t in self.targets)
        if not any(_end_overlaps(text, t) for t in self.targets for text in self.texts.values()):
            raise GenerationSettingError(
                f"stop strings {strings!r}: no token of the tokenizer can end them (characters outside the vocabulary?)"
            )

    def __call__(self, input_ids: torch.Tensor, scores: Any = None) -> torch.Tensor:
        done = [self._row_matches(row) for row in input_ids[:, -self.window :].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _row_matches(self, ids: list[int]) -> bool:
        texts = [self.texts.get(i) for i in ids]
        last = texts[-1]
        if last is None:
            return False
        return any(self._matches(texts[:-1], target, end) for target in self.targets for end in _end_overlaps(last, target))

    @staticmethod
    def _matches(earlier: list[str | bytes | None], target: str | bytes, matched: int) -> bool:
        """Whether the tokens before the last, read backwards, complete ``target``'s first characters."""
        n = len(target)
        reversed_target = target[::-1]
        for text in reversed(earlier):
            if matched >= n:
                return True
            if text is None or not 1 <= matched < n:
                return False
            if not text[::-1].startswith(reversed_target[matched : matched + len(text)]):  # type: ignore[arg-type]
                return False
            matched += len(text)
        return matched >= n


def _end_overlaps(text: str | bytes, target: str | bytes) -> list[int]:
    """How many of ``target``'s last characters each occurrence of its end in ``text`` covers."""
    if not target:
        return [0] * max(0, len(text) - 1)
    n = len(target)
    found = []
    i = text.find(target[-1:])  # type: ignore[arg-type]
    while i >= 0:
        overlap = min(i + 1, n)
        if text[i + 1 - overlap : i + 1] == target[-overlap:]:
            found.append(overlap)
        i = text.find(target[-1:], i + 1)  # type: ignore[arg-type]
    return found


def _matching_mode(tokenizer: Any) -> str | None:
    """``"byte_level"``, ``"byte_fallback"`` or ``None``, read from a fast tokenizer's decoder."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    state = getattr(decoder, "__getstate__", lambda: None)()
    if isinstance(state, str):
        state = state.encode()
    config = None
    if isinstance(state, bytes):
        try:
            config = json.loads(state)
        except json.JSONDecodeError:
            config = None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    if config is not None:
        if _has_type(config, "ByteFallback"):
            return "byte_fallback"
        if _has_type(config, "ByteLevel"):
            return "byte_level"
    return None


def _has_type(config: Any, name: str) -> bool:
    if isinstance(config, dict):
        return config.get("type") == name or any(_has_type(v, name) for v in config.values())
    if isinstance(config, list):
        return any(_has_type(v, name) for v in config)
    return False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_TEXTS_CACHE: dict[Any, dict[int, str | bytes]] = {}


def _token_texts(tokenizer: Any, mode: str | None) -> dict[int, str | bytes]:
    """Token id → the text it yields, without tokenizer prefixes such as ``Ġ`` or ``##``."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    key = (tuple(sorted(vocab.items())), mode, type(tokenizer).__name__)
    if key in _TEXTS_CACHE:
        return _TEXTS_CACHE[key]
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()} if mode == "byte_level" else None
    prefix = "abcdef"
    base_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    to_token = getattr(tokenizer, "_convert_id_to_token", None)
    base = [to_token(i) for i in base_ids] if callable(to_token) else tokenizer.convert_ids_to_tokens(base_ids)
    texts: dict[int, str | bytes] = {}
    for token, index in vocab.items():
        text: str | bytes | None = _token_bytes(token, mode, byte_decoder)
        if text is None:
            decoded = tokenizer.convert_tokens_to_string(base + [token])
            text = decoded[decoded.index(prefix) + len(prefix) :]
            if mode is not None:
                text = text.encode("utf-8")
        texts[index] = text
    if len(_TEXTS_CACHE) >= 8:
        _TEXTS_CACHE.pop(next(iter(_TEXTS_CACHE)))
    _TEXTS_CACHE[key] = texts
    return texts


def _token_bytes(token: str, mode: str | None, byte_decoder: dict[str, int] | None) -> bytes | None:
    if mode == "byte_level":
        if byte_decoder is not None and all(c in byte_decoder for c in token):
            return bytes(byte_decoder[c] for c in token)
        return None
    if mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        if all(c in "0123456789abcdefABCDEF" for c in token[3:5]):
            return bytes([int(token[3:5], 16)])
    return None
