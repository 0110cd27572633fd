"""Helpers shared by the test modules: tolerances and comparisons (from :mod:`lmport.testing`), packaging.

Checkpoint factories live in ``conftest``; the comparisons and parity checks against
transformers live in the conformance kit :mod:`lmport.testing` and are re-exported here;
this module adds what only lmport's own tests need (fixture packages, a tokenizer).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmport.registry import reset_registry
from lmport.testing import (  # noqa: F401 - the kit's tolerances and comparisons, re-exported for the tests
    ATTENTION,
    GRAD_RTOL,
    LOGITS_ATOL,
    LOSS_TOL,
    MOVED,
    VOCAB,
    assert_bf16_parity,
    assert_grads_close,
    assert_logits_close,
    assert_loss_equal,
    assert_padded_logits_close,
    assert_same_outputs,
    assert_same_training_step,
    assert_saved_like_transformers,
    batch_of_two,
    load_clean,
    load_lmport,
    loss_and_grads,
    max_change,
    perturb_parameters,
    tensors_of,
)


def one_intraop_thread() -> Iterator[None]:
    """Fixture body: one intra-op thread while it lasts (tiny matmuls gain nothing from more, and a loaded
    machine's thread hand-offs cost 100x), the previous count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- loading -----------------------------------------------------------------------------


def hf_model_cache(checkpoints: dict[str, Path]) -> Callable[[str, str], Any]:
    """``get(arch, attn)``: transformers' model of ``checkpoints[arch]`` (eval, fp32), loaded once."""
    import transformers

    @functools.cache
    def get(arch: str, attn: str) -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(
            checkpoints[arch], attn_implementation=attn, dtype=torch.float32
        ).eval()

    return get


def load_fp32_pair(model_class: Any, folder: Path, attn: str) -> tuple[Any, Any]:
    """lmport's and transformers' (``model_class``) model of ``folder`` in fp32 with kernel ``attn``: (ours, ref).

    Asserts lmport's is fp32 by default, runs ``attn`` and is in eval mode (as transformers returns it).
    """
    ref = model_class.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    ours = load_lmport(folder, attn_implementation=attn)
    assert ours.dtype == torch.float32 and ours.attn_implementation == attn
    assert not ours.training
    return ours, ref


def assert_transformers_reads_save(
    model_class: Any, folder: Path, overrides: dict[str, Any], base: dict[str, Any], keys: Iterable[str]
) -> Any:
    """transformers' ``model_class`` loads lmport's save in ``folder`` cleanly, in fp32, with ``overrides``
    and the ``keys`` of ``base`` as its config; returns that model."""
    ref = load_clean(model_class, folder)
    assert ref.dtype == torch.float32
    for key, value in overrides.items():
        assert getattr(ref.config, key) == value, f"config {key} did not round-trip"
    for key in keys:
        assert getattr(ref.config, key) == base[key]
    return ref


# --- fixture packages ---------------------------------------------------------------------


def forget_modules(prefix: str) -> None:
    """Drop every imported module whose name starts with ``prefix``, then reset the plugin registry."""
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]
    reset_registry()


@contextmanager
def pip_installed(
    source: Path, root: Path, module_prefix: str, ignore: Callable[..., Any] | None = None
) -> Iterator[Path]:
    """The package in ``source`` pip-installed (built from a copy, ``ignore`` as in shutil.copytree) into
    ``root / "site"``, which is put on sys.path with a fresh registry; afterwards taken off again, its
    modules (``module_prefix``...) forgotten and the registry reset."""
    shutil.copytree(source, root / "src", ignore=ignore)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(root / "src")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    reset_registry()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        forget_modules(module_prefix)


# --- tokenizer ----------------------------------------------------------------------------

#: Special tokens of :func:`make_tokenizer`, with their ids.
SPECIAL_TOKENS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + ': ' + message['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def make_tokenizer(folder: Path | None = None) -> Any:
    """A character-level transformers ``PreTrainedTokenizerFast`` with ids below :data:`VOCAB`.

    ``<pad>``/``<s>``/``</s>``/``<unk>`` are 0-3, printable ASCII follows (every character is
    one token, so decoding is exact), a chat template renders ``<s>role: content</s>`` turns.
    Saved to ``folder`` when given (beside a checkpoint, as a hub repo would ship it).
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = dict(SPECIAL_TOKENS)
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
