"""The tokenizer a GGUF file describes, built with Hugging Face's ``tokenizers`` library.

A GGUF file has no ``tokenizer.json``: it keeps the vocabulary, merges, token types and
special token ids as ``tokenizer.ggml.*`` metadata. :func:`build_tokenizer` turns them into a
``tokenizers.Tokenizer`` the way transformers' GGUF loading does (so both encode alike):
byte-level BPE (``tokenizer.ggml.model = "gpt2"``) and sentencepiece-style BPE with byte
fallback (``"llama"``). :class:`GGUFTokenizer` wraps it with ``encode``/``decode`` and the
file's special tokens and chat template; transformers' ``PreTrainedTokenizerFast(tokenizer_object=
tok.backend)`` wraps it for the training libraries. Needs ``pip install 'lmport[gguf]'``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UnsupportedFeatureError
from .generation_processors import bytes_to_unicode

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: ``tokenizer.ggml.pre`` -> the split regex its merges were learned with (others: GPT-2's byte-level split).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


@functools.lru_cache(maxsize=1)
def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise UnsupportedFeatureError("building a GGUF file's tokenizer needs: pip install 'lmport[gguf]'") from exc
    return tokenizers


def _merges(meta: Mapping[str, Any], vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        return [tuple(m.split(" ", 1)) for m in merges]  # type: ignore[misc]
    # No merges stored (sentencepiece files): every split of a token into two known tokens, best score first.
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores") or ()))
    found = []
    for token, score in scores.items():
        splits = ((token[:i], token[i:]) for i in range(1, len(token)))
        local = [(a, b, score) for a, b in splits if a in vocab and b in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _byte_level(meta: Mapping[str, Any]) -> Any:
    tk = _tokenizers()
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokenizer.ggml.tokens"])
    }
    model = tk.models.BPE(
        vocab=vocab, merges=_merges(meta, vocab), dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False,
    )  # fmt: skip
    tok = tk.Tokenizer(model)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [
                tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
                tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = tk.decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(meta: Mapping[str, Any]) -> Any:
    tk = _tokenizers()
    vocab = {token: index for index, token in enumerate(meta["tokenizer.ggml.tokens"])}
    model = tk.models.BPE(vocab=vocab, merges=_merges(meta, vocab), fuse_unk=True, byte_fallback=True, dropout=None)
    tok = tk.Tokenizer(model)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    scheme = "first" if prefix else "never"
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        steps.append(tk.decoders.Strip(content=" ", left=1))
    tok.decoder = tk.decoders.Sequence(steps)
    return tok, None


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def build_tokenizer(metadata: Mapping[str, Any], source: str = "") -> Any:
    """A ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

    Raises:
        UnsupportedFeatureError: a tokenizer model other than ``gpt2`` and ``llama``, no vocabulary,
            or ``tokenizers`` not installed.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in _BUILDERS or "tokenizer.ggml.tokens" not in metadata:
        raise UnsupportedFeatureError(
            f"{source}: GGUF tokenizer.ggml.model is {kind!r}; lmport builds 'gpt2' (byte-level BPE) and 'llama' "
            "(sentencepiece BPE) tokenizers"
        )
    tk = _tokenizers()
    tok, alphabet = _BUILDERS[kind](metadata)
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type") or ()
    # Control tokens stay whole and are special; one spelled outside a byte-level alphabet is a mislabel.
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    tok.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t in user])
    ids = _special_ids(metadata)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = (tokens[ids[k]] if ids.get(k) is not None else None for k in ("bos", "eos"))
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, ids["bos"])] if add_bos else []) + ([(eos, ids["eos"])] if add_eos else [])
    tok.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok


def _special_ids(metadata: Mapping[str, Any]) -> dict[str, int | None]:
    n = len(metadata["tokenizer.ggml.tokens"])
    out: dict[str, int | None] = {}
    keys = (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    for short, key in keys:
        value = metadata.get(f"tokenizer.ggml.{key}")
        out[short] = value if isinstance(value, int) and 0 <= value < n else None
    return out


class GGUFTokenizer:
    """A GGUF file's own tokenizer: ``encode``/``decode`` over a ``tokenizers.Tokenizer`` (:attr:`backend`).

    Attributes:
        backend: the ``tokenizers.Tokenizer``.
        bos_token_id, eos_token_id, pad_token_id, unk_token_id: from the file, or ``None``.
        bos_token, eos_token, pad_token, unk_token: their strings.
        chat_template: the file's ``tokenizer.chat_template`` (a Jinja template), or ``None``.
    """

    def __init__(self, metadata: Mapping[str, Any], source: str = "") -> None:
        self.backend = build_tokenizer(metadata, source)
        tokens = metadata["tokenizer.ggml.tokens"]
        for short, token_id in _special_ids(metadata).items():
            setattr(self, f"{short}_token_id", token_id)
            setattr(self, f"{short}_token", tokens[token_id] if token_id is not None else None)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GGUFTokenizer:
        """The tokenizer of the GGUF file at ``path`` (only its metadata is read)."""
        from .gguf_reader import GGUFFile

        with GGUFFile(path) as file:
            return cls(file.metadata, str(path))

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the file's BOS/EOS if it asks for them and ``add_special_tokens``)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a list, or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (transformers' ``AutoTokenizer`` reads them)."""
        import json
        from pathlib import Path

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for short in ("bos", "eos", "unk", "pad"):
            if getattr(self, f"{short}_token") is not None:
                settings[f"{short}_token"] = getattr(self, f"{short}_token")
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """``messages`` rendered with the file's chat template (needs ``jinja2``).

        Raises:
            UnsupportedFeatureError: the file has no chat template, or jinja2 is not installed.
        """
        if not self.chat_template:
            raise UnsupportedFeatureError("this GGUF file has no tokenizer.chat_template")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise UnsupportedFeatureError("rendering a chat template needs jinja2: pip install jinja2") from exc
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return str(
            env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )  # fmt: skip
        )


__all__ = ["GGUFTokenizer", "PRE_TOKENIZER_SPLITS", "build_tokenizer", "bytes_to_unicode"]
