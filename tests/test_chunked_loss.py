"""The chunked loss: a training forward with labels takes the loss chunk by chunk, without full logits.

Checked on tiny fp32 checkpoints that transformers saved (Llama, GPT-2, Mistral; tied and
untied heads), weights random with std 0.1:

1. Numbers. With ``model.loss_chunk_size = 5`` (24 rows: five chunks, the last partial, and rows
   that take no loss dropped) the loss is within 1e-6 (relative) and every gradient within 1e-5
   of its largest entry of the plain path's (full logits) and of transformers' model's: plain
   labels, ``-100`` padding, ``num_items_in_batch``, ``shift_labels``, another ``ignore_index``;
   with gradient checkpointing; with peft LoRA on the head (the head module is called chunk by
   chunk); under ``torch.compile(fullgraph=True)`` (one graph, no break). GPT-2's key bias has
   an exact gradient of zero (softmax ignores a constant shift), so both paths give rounding
   noise there: it is held to 1e-5 of the model's largest gradient instead. A batch that fits
   one chunk is computed by the same kernels as the plain path: bit-identical, in fp32, in
   bf16 and under bf16 autocast.
2. Memory. No tensor of ``rows x vocab`` elements is ever made (the plain path makes several).
3. The rule. Training with labels skips the logits (``logits_materialized`` is ``False``);
   evaluation, ``torch.no_grad``, no labels, ``return_dict=False``, ``model.chunked_loss = False``,
   ``LMPORT_CHUNKED_LOSS=0`` and ``skip_logits=False`` keep them; ``skip_logits=True`` skips them in
   evaluation too; wrong values of ``skip_logits`` raise ``ArgumentError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._dynamo.utils
from conftest import save_hf, tiny_configs
from helpers import LOSS_TOL, VOCAB, assert_loss_equal, one_intraop_thread

import lmport
from lmport.errors import ArgumentError

ARCHS = ("llama", "gpt2", "mistral")
SEQ = 12
CHUNK = 5
GRAD_RTOL = 1e-5

one_thread = pytest.fixture(autouse=True)(one_intraop_thread)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    configs = tiny_configs()
    found = {}
    for arch in ARCHS:
        for tied in (False, True):
            config = configs[arch]()
            config.tie_word_embeddings = tied
            found[arch, tied] = save_hf(tmp_path_factory.mktemp(f"{arch}{int(tied)}"), config, std=0.1)
    return found


def load(folder: Path, **kwargs: Any) -> Any:
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
    model.loss_chunk_size = CHUNK
    return model.train()


def batch(seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    out = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[0, :3] = 0
        mask[1, SEQ - 4 :] = 0
        out["labels"][mask == 0] = -100
        out["attention_mask"] = mask
    return out


def step(model: Any, call: Callable[..., Any] | None = None, **inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The output of one forward/backward and the gradient of every parameter that requires grad."""
    model.zero_grad(set_to_none=True)
    out = (call if call is not None else model)(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return out, grads


def assert_grads_match(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Each gradient within ``GRAD_RTOL`` of its largest entry; one whose exact value is zero (its
    entries below 1e-6 of the largest gradient anywhere: GPT-2's key bias) within ``GRAD_RTOL`` of that."""
    assert ours.keys() == ref.keys()
    largest = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        scale = g.abs().max().item()
        if scale < 1e-6 * largest:
            scale = largest
        diff = (ours[name] - g).abs().max().item()
        assert diff <= GRAD_RTOL * scale, f"{name}: gradient differs by {diff:.3g} (scale {scale:.3g})"


def chunked_vs_plain(model: Any, call: Callable[..., Any] | None = None, **inputs: Any) -> torch.Tensor:
    """The chunked and the plain path on ``inputs``: equal losses, matching gradients; the chunked loss."""
    chunked, grads_c = step(model, call, skip_logits=None, **inputs)
    plain, grads_p = step(model, None, skip_logits=False, **inputs)
    assert not chunked.logits_materialized and chunked.logits is None
    assert plain.logits_materialized and plain.logits.shape[-1] == VOCAB
    assert_loss_equal(chunked.loss, plain.loss, tol=LOSS_TOL)
    assert_grads_match(grads_c, grads_p)
    return chunked.loss


# --- 1. numbers -------------------------------------------------------------------------------------


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "labels": lambda: batch(0),
    "padded": lambda: batch(1, padded=True),
    "num_items_in_batch": lambda: {**batch(2, padded=True), "num_items_in_batch": torch.tensor(37)},
    "shift_labels": lambda: {**batch(3), "shift_labels": batch(4, padded=True)["labels"]},
    "ignore_index": lambda: {**(b := batch(5)), "labels": b["labels"].masked_fill(b["labels"] < 20, 7), "ignore_index": 7},
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_equals_plain_path(checkpoints: dict[tuple[str, bool], Path], arch: str, tied: bool, case: str) -> None:
    model = load(checkpoints[arch, tied])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    chunked_vs_plain(model, **CASES[case]())


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_equals_transformers(checkpoints: dict[tuple[str, bool], Path], arch: str) -> None:
    """Against the oracle: transformers' model of the same checkpoint, plain path, same batch."""
    import transformers

    folder = checkpoints[arch, False]
    ours = load(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").train()
    inputs = {**batch(6, padded=True), "num_items_in_batch": torch.tensor(19)}
    out, grads = step(ours, **inputs)
    assert not out.logits_materialized
    ref.zero_grad(set_to_none=True)
    ref_loss = ref(**inputs).loss
    ref_loss.backward()
    assert_loss_equal(out.loss, ref_loss)
    from lmport.testing.compare import checkpoint_weight_map

    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert_grads_match(checkpoint_weight_map(ours).to_checkpoint(grads), ref_grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing(checkpoints: dict[tuple[str, bool], Path], arch: str) -> None:
    model = load(checkpoints[arch, True])
    model.gradient_checkpointing_enable()
    chunked_vs_plain(model, **batch(7, padded=True))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_the_head(checkpoints: dict[tuple[str, bool], Path], arch: str, tied: bool) -> None:
    """peft wraps ``lm_head`` in its LoRA ``Linear``: the chunked path calls that module chunk by chunk."""
    from peft import LoraConfig, get_peft_model

    model = load(checkpoints[arch, tied])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).train()
    assert type(model.lm_head).__name__ == "Linear" and type(model.lm_head) is not torch.nn.Linear
    chunked_vs_plain(peft_model, **batch(8, padded=True))
    head_grads = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert len(head_grads) == 2  # lora_A and lora_B of the head were trained


@pytest.mark.parametrize("arch", ARCHS)
def test_fullgraph_compile(checkpoints: dict[tuple[str, bool], Path], arch: str) -> None:
    """One graph, no break, for padded and unpadded batches; loss and gradients match eager's plain path."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = load(checkpoints[arch, False])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    try:
        for inputs in (batch(9, padded=True), {**batch(10), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}):
            chunked_vs_plain(model, compiled, **inputs)
        assert counter.frame_count == 1, f"{counter.frame_count} graphs"
        assert not torch._dynamo.utils.counters["graph_break"]
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_one_chunk_is_the_plain_path_bit_for_bit(checkpoints: dict[tuple[str, bool], Path], mode: str) -> None:
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = load(checkpoints["llama", False], dtype=dtype)
    model.loss_chunk_size = None  # 24 rows fit the default chunk
    inputs = batch(11, padded=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with autocast:
        chunked, grads_c = step(model, **inputs)
    with autocast:
        plain, grads_p = step(model, skip_logits=False, **inputs)
    assert not chunked.logits_materialized and plain.logits.dtype == (torch.float32 if mode == "fp32" else torch.bfloat16)
    assert torch.equal(chunked.loss, plain.loss)
    assert all(torch.equal(grads_c[n], grads_p[n]) for n in grads_p)


def test_bf16_chunks_close_to_plain(checkpoints: dict[tuple[str, bool], Path]) -> None:
    """Several chunks in bf16: the head's gradient is summed chunk by chunk in bf16, so bf16 tolerances."""
    model = load(checkpoints["llama", False], dtype=torch.bfloat16)
    chunked, grads_c = step(model, **batch(12, padded=True))
    plain, grads_p = step(model, skip_logits=False, **batch(12, padded=True))
    assert chunked.loss.dtype == torch.float32
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=0)  # fp32 loss from the same logits
    for name, g in grads_p.items():
        diff = (grads_c[name].float() - g.float()).abs().max().item()
        assert diff <= 2e-2 * g.float().abs().max().item(), name


# --- 2. memory --------------------------------------------------------------------------------------


def largest_tensor_made(run: Callable[[], None]) -> int:
    """The most elements of any tensor created while ``run`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        run()
    return Largest.most


def test_no_tensor_holds_all_the_logits(tmp_path: Path) -> None:
    vocab, rows = 4096, 2 * 64
    config = lmport.AutoConfig.from_pretrained(
        save_hf(tmp_path, tiny_configs()["llama"](), std=0.1), vocab_size=vocab, hidden_size=32, intermediate_size=48
    )
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0).train()
    model.loss_chunk_size = 16
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))

    def run(skip: bool) -> Callable[[], None]:
        return lambda: model(input_ids=ids, labels=ids, skip_logits=skip).loss.backward()

    chunked = largest_tensor_made(run(True))
    assert chunked <= max(vocab * 32, 16 * vocab), chunked  # the head's weight (or its gradient), or one chunk
    assert largest_tensor_made(run(False)) >= rows * vocab  # the check has teeth


# --- 3. the rule --------------------------------------------------------------------------------------


def test_when_logits_are_kept(checkpoints: dict[tuple[str, bool], Path]) -> None:
    model = load(checkpoints["llama", False])
    inputs = batch(13, padded=True)
    reference = model(**inputs, skip_logits=False).loss.detach()

    def kept(out: Any) -> bool:
        assert torch.isclose(out.loss if isinstance(out, dict) else out[0], reference, rtol=LOSS_TOL, atol=0)
        return out.logits_materialized if isinstance(out, dict) else out[1].shape[-1] == VOCAB

    assert not kept(model(**inputs))  # training with labels
    with torch.no_grad():
        assert kept(model(**inputs))
    assert kept(model(**inputs, return_dict=False))  # a tuple is read by position: logits stay at [1]
    model.chunked_loss = False
    assert kept(model(**inputs))
    model.chunked_loss = True
    no_labels = model(input_ids=inputs["input_ids"])
    assert no_labels.loss is None and no_labels.logits_materialized
    model.eval()
    assert kept(model(**inputs))
    assert not kept(model(**inputs, skip_logits=True))  # asked for: evaluation without logits (Liger's switch)
    with torch.no_grad():
        assert not kept(model(**inputs, skip_logits=True))


def test_skip_logits_values_checked(checkpoints: dict[tuple[str, bool], Path]) -> None:
    model = load(checkpoints["gpt2", False])
    ids = batch(14)["input_ids"]
    with pytest.raises(ArgumentError, match="needs labels"):
        model(input_ids=ids, skip_logits=True)
    with pytest.raises(ArgumentError, match="skip_logits must be a bool"):
        model(input_ids=ids, labels=ids, skip_logits="yes")


def test_environment_switch(checkpoints: dict[tuple[str, bool], Path]) -> None:
    code = (
        "import lmport, torch, sys; m = lmport.AutoModelForCausalLM.from_pretrained(sys.argv[1]).train(); "
        "ids = torch.arange(8).view(1, 8); print(m(input_ids=ids, labels=ids).logits_materialized)"
    )
    env = {**os.environ, "LMPORT_CHUNKED_LOSS": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(checkpoints["llama", False])], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
