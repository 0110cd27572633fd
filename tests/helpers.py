"""Helpers shared by the test modules: tolerances, loading, parity checks against transformers, packaging.

Checkpoint factories live in ``conftest``; this module holds what several test modules
compare, load or install the same way.
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
from conftest import tree_digest
from safetensors.torch import load_file

import lmport
from lmport.registry import reset_registry

LOGITS_ATOL = 1e-5  # fp32, absolute (DESIGN.md)
GRAD_RTOL = 1e-5  # fp32, relative to the reference gradient's largest magnitude, per parameter
LOSS_TOL = 1e-6  # fp32, absolute and relative
MOVED = 1e-3  # a setting "is in effect" when toggling it moves some logit by more than this
ATTENTION = ("eager", "sdpa")
VOCAB = 128


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


def load_lmport(folder: Path, **kwargs: Any) -> Any:
    """lmport's model (and loading info), asserting the load left every file of ``folder`` as it was."""
    before = tree_digest(folder)
    result = lmport.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert tree_digest(folder) == before, "loading changed the checkpoint folder"
    return result


def load_fp32_pair(model_class: Any, folder: Path, attn: str) -> tuple[Any, Any]:
    """lmport's and transformers' (``model_class``) model of ``folder`` in fp32 with kernel ``attn``: (ours, ref).

    Asserts lmport's is fp32, runs ``attn`` and is in eval mode (from_pretrained returns eval mode,
    as transformers does).
    """
    ref = model_class.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    ours = load_lmport(folder, attn_implementation=attn)
    assert ours.dtype == torch.float32 and ours.attn_implementation == attn
    assert not ours.training
    return ours, ref


def load_clean(model_class: Any, folder: Path, **kwargs: Any) -> Any:
    """transformers' ``model_class`` from ``folder``, asserting it found every weight and nothing else."""
    model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model


def hf_model_cache(checkpoints: dict[str, Path]) -> Callable[[str, str], Any]:
    """``get(arch, attn)``: transformers' model of ``checkpoints[arch]`` (eval, fp32), loaded once."""
    import transformers

    @functools.cache
    def get(arch: str, attn: str) -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(
            checkpoints[arch], attn_implementation=attn, dtype=torch.float32
        ).eval()

    return get


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder`` (there must be some)."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


# --- inputs and comparisons --------------------------------------------------------------


def batch_of_two(seq: int, seed: int = 0, padded: bool = False, *, left_pad: int = 0) -> dict[str, torch.Tensor]:
    """A batch of two rows of ``seq`` random ids below :data:`VOCAB`, labels with -100 entries.

    ``padded`` adds an attention mask that right-pads the second row by 5 (and left-pads the
    first by ``left_pad``); padded positions get label -100.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, seq // 2 : seq // 2 + 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[0, :left_pad] = 0
        mask[1, seq - 5 :] = 0
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
    return batch


def max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_logits_close(
    ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None, *, finite: bool = False
) -> None:
    """Same shape and dtype, within :data:`LOGITS_ATOL` (at the real positions of ``mask``); ``finite``: no inf/NaN there."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if mask is not None:  # padded positions are don't-care in both libraries
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    if finite:
        assert torch.isfinite(ours).all(), "non-finite logits at real positions"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= LOGITS_ATOL, f"logits differ by {diff:.3g} (> {LOGITS_ATOL})"


def assert_padded_logits_close(
    ours: Any, ref: Any, batch: dict[str, torch.Tensor], *, finite: bool = False, **kwargs: Any
) -> None:
    """Both models on ``batch``'s ids and attention mask (and ``kwargs``): logits close at the real positions."""
    mask = batch["attention_mask"]
    assert_logits_close(
        ours(batch["input_ids"], attention_mask=mask, **kwargs).logits,
        ref(batch["input_ids"], attention_mask=mask, **kwargs).logits,
        mask,
        finite=finite,
    )


def assert_loss_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=LOSS_TOL, atol=LOSS_TOL)


def loss_and_grads(
    model: Any, batch: dict[str, torch.Tensor], **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one forward/backward on ``batch`` (and ``kwargs``) and every parameter's gradient, by name."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.detach().clone()
    return out.loss.detach(), grads


def assert_grads_close(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], *, check_shapes: bool = True
) -> None:
    """Same names; each gradient within :data:`GRAD_RTOL` of the reference's largest entry (``check_shapes``: same shape first)."""
    assert ours.keys() == ref.keys(), f"parameter names differ: {sorted(ours.keys() ^ ref.keys())}"
    for name, g_ref in ref.items():
        if check_shapes:
            assert ours[name].shape == g_ref.shape, f"{name}: gradient shape {ours[name].shape} != {g_ref.shape}"
        scale = g_ref.abs().max().item()
        assert scale > 0, f"reference gradient of {name} is all zero: the check would be vacuous"
        diff = (ours[name] - g_ref).abs().max().item()
        assert diff <= GRAD_RTOL * scale, f"{name}: gradient differs by {diff:.3g} (scale {scale:.3g})"


def assert_same_training_step(
    ours: Any,
    ref: Any,
    batch: dict[str, torch.Tensor],
    *,
    checkpoint_names: bool = True,
    check_shapes: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """One forward/backward of each model on ``batch`` (and ``kwargs``): equal losses, close gradients.

    With ``checkpoint_names`` lmport's module-named gradients are first put in checkpoint names
    and layouts by its weight map (``weight_map.to_checkpoint``), which transformers' use.
    Returns lmport's loss.
    """
    loss_ours, grads_ours = loss_and_grads(ours, batch, **kwargs)
    loss_ref, grads_ref = loss_and_grads(ref, batch, **kwargs)
    assert_loss_equal(loss_ours, loss_ref)
    if checkpoint_names:
        grads_ours = type(ours).weight_map.to_checkpoint(grads_ours)
    assert_grads_close(grads_ours, grads_ref, check_shapes=check_shapes)
    return loss_ours


def assert_same_outputs(ours: Any, ref: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Both models on ``batch`` (ids, mask if any, labels): bit-identical logits at real positions and loss.

    ``dtype``: lmport's logits must also be of it.
    """
    mask = batch.get("attention_mask")
    with torch.no_grad():
        out_ours = ours(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
        out_ref = ref(batch["input_ids"], attention_mask=mask, labels=batch["labels"])
    if dtype is not None:
        assert out_ours.logits.dtype == dtype
    keep = mask.bool() if mask is not None else torch.ones(out_ref.logits.shape[:2], dtype=torch.bool)
    assert torch.equal(out_ours.logits[keep], out_ref.logits[keep])
    assert torch.equal(out_ours.loss, out_ref.loss)


def assert_bf16_parity(ours: Any, ref: Any, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Both models loaded bf16 (lmport's config says so too) and bit-identical on every batch."""
    assert ref.dtype == torch.bfloat16  # the oracle agrees the checkpoint is bf16
    assert ours.dtype == torch.bfloat16 and ours.config.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    for batch in batches:
        assert_same_outputs(ours, ref, batch, dtype=torch.bfloat16)


# --- save_pretrained round trips -----------------------------------------------------------


def perturb_parameters(model: Any, seed: int = 7, scale: float = 0.05) -> None:
    """A "fine-tuned" model: every parameter moved, so a save must carry the model's own state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


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


def assert_saved_like_transformers(ours: Path, ref: Any, theirs: Path, original: Path) -> dict[str, torch.Tensor]:
    """``ref`` saved to ``theirs`` holds exactly the names, shapes, dtypes and values of lmport's save in
    ``ours`` (and the names of the ``original`` checkpoint); returns lmport's saved tensors."""
    ref.save_pretrained(theirs)
    mine, theirs_tensors = tensors_of(ours), tensors_of(theirs)
    assert mine.keys() == theirs_tensors.keys() == tensors_of(original).keys()
    for name, t in theirs_tensors.items():
        assert mine[name].shape == t.shape and mine[name].dtype == t.dtype, name
        assert torch.equal(mine[name], t), f"{name}: saved values differ from transformers' save"
    return mine


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
