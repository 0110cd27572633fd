"""torch.compile: each architecture's forward and backward compile to one graph, and compute what eager does.

Checked on tiny fp32 checkpoints that transformers saved (Llama, GPT-2, Mistral with a
window of 4, shorter than the rows), weights random with std 0.1 (see test_attention's
docstring on the fp32 noise floor):

1. ``torch.compile(model, fullgraph=True)`` with a counting backend (``aot_eager``: dynamo's
   graph capture plus AOTAutograd's forward/backward split, no code generation, so it is
   fast on CPU) on three inputs: no mask; an ``attention_mask`` with left and right
   padding, then an all-ones one (the same graph serves both: no recompilation, no branch
   on the mask's values); packed ``position_ids`` restarting at 0 with no mask, then plain
   ``0..n-1`` positions. Exactly one graph is captured, no graph break is counted, and the
   logits (at real positions), the loss and every gradient equal the uncompiled model's
   (logits and loss within 1e-5, gradients within 1e-5 of each one's largest entry).
   ``torch._dynamo.explain`` agrees (one graph, no break), and gradient checkpointing
   (TRL's default) keeps the single graph.
2. Inductor (the default backend, generated C++ code) on one representative case, Llama
   with padding, forward and backward: the same equalities.
3. The KV-cache decoding path under ``torch.compile`` (graph breaks allowed there): token
   by token with left padding, the logits equal eager decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._dynamo.utils
from conftest import save_hf, tiny_configs
from helpers import LOGITS_ATOL, LOSS_TOL, VOCAB, assert_grads_close

import lmport
from lmport.cache import KVCache

ARCHS = ("llama", "gpt2", "mistral")
STD = 0.1
SEQ = 12  # longer than Mistral's window (4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    configs = tiny_configs()
    return {arch: save_hf(tmp_path_factory.mktemp(arch), configs[arch](), std=STD) for arch in ARCHS}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> Callable[[str], Any]:
    """``models(arch)``: lmport's model (sdpa, fp32, eval), loaded once per module."""

    @functools.cache
    def get(arch: str) -> Any:
        return lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation="sdpa")

    return get


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test starts with empty dynamo caches and counters (no recompile limit shared between tests)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def ids_and_labels(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def padded(seed: int) -> dict[str, torch.Tensor]:
    """Row 0 left-padded by 3, row 1 right-padded by 5; no loss on padding."""
    batch = ids_and_labels(seed)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, SEQ - 5 :] = 0
    batch["labels"][mask == 0] = -100
    batch["attention_mask"] = mask
    return batch


def all_ones(seed: int) -> dict[str, torch.Tensor]:
    return {**ids_and_labels(seed), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}


def packed(seed: int) -> dict[str, torch.Tensor]:
    """Documents of 5, 4 and 3 tokens in each row (positions restart at 0), no mask."""
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]] * 2)
    return {**ids_and_labels(seed), "position_ids": positions}


def plain_positions(seed: int) -> dict[str, torch.Tensor]:
    return {**ids_and_labels(seed), "position_ids": torch.arange(SEQ).repeat(2, 1)}


# Each case: batches run one after another through the same compiled model (one graph for all).
CASES: dict[str, tuple[Callable[[int], dict[str, torch.Tensor]], ...]] = {
    "no_mask": (ids_and_labels,),
    "attention_mask": (padded, all_ones),
    "packed_position_ids": (packed, plain_positions),
}


def forward_backward(
    call: Callable[..., Any], model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, loss and every parameter's gradient (``model``'s) of one forward/backward through ``call``."""
    for p in model.parameters():
        p.grad = None
    out = call(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(model.parameters())), "some parameter got no gradient"
    return (out.logits.detach() if out.logits_materialized else None), out.loss.detach(), grads


def assert_same_as_eager(model: Any, compiled: Any, batch: dict[str, torch.Tensor]) -> None:
    logits_c, loss_c, grads_c = forward_backward(compiled, model, batch)
    logits_e, loss_e, grads_e = forward_backward(model, model, batch)
    assert (logits_c is None) == (logits_e is None) == model.training  # training with labels: chunked loss
    if logits_c is not None:
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones(2, SEQ, dtype=torch.bool)
        assert torch.isfinite(logits_c[real]).all()
        diff = (logits_c[real] - logits_e[real]).abs().max().item()
        assert diff <= LOGITS_ATOL, f"compiled logits differ from eager by {diff:.3g}"
    torch.testing.assert_close(loss_c, loss_e, rtol=LOSS_TOL, atol=LOSS_TOL)
    assert_grads_close(grads_c, grads_e)


# --- 1. one graph, same numbers (aot_eager) ------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fullgraph_forward_backward_equals_eager(models: Callable[[str], Any], arch: str, case: str) -> None:
    model = models(arch)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed, make in enumerate(CASES[case]):
        assert_same_as_eager(model, compiled, make(seed))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs captured (recompiled or broken)"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("arch", ARCHS)
def test_explain_reports_one_graph_with_a_mask(models: Callable[[str], Any], arch: str) -> None:
    """``torch._dynamo.explain``, as a user would check it: one graph, no break, with padding and with packing."""
    for batch in (padded(0), packed(0)):
        explanation = torch._dynamo.explain(models(arch))(**batch)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_fullgraph_with_gradient_checkpointing(checkpoints: dict[str, Path]) -> None:
    """Checkpointed layers (TRL's default) still compile to one graph, with padding, in training mode."""
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["mistral"], attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    assert_same_as_eager(model, torch.compile(model, backend=counter, fullgraph=True), padded(4))
    assert counter.frame_count == 1
    assert not torch._dynamo.utils.counters["graph_break"]


# --- 2. inductor -----------------------------------------------------------------------------


def test_inductor_forward_backward_equals_eager(models: Callable[[str], Any]) -> None:
    model = models("llama")
    compiled = torch.compile(model, fullgraph=True)
    assert_same_as_eager(model, compiled, padded(3))


# --- 3. KV cache -----------------------------------------------------------------------------


def test_compiled_cache_decoding_equals_eager(models: Callable[[str], Any]) -> None:
    """Mistral: 9 positions, more than its window of 4."""
    model = models("mistral")
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generate() batches prompts
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode(m: Any) -> torch.Tensor:
        """A prefill of 5 positions, then one position at a time."""
        cache, pieces = KVCache(), []
        with torch.no_grad():
            for start, end in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
                out = m(
                    ids[:, start:end],
                    attention_mask=mask[:, :end],
                    position_ids=positions[:, start:end],
                    past_key_values=cache,
                )
                pieces.append(out.logits)
        assert cache.get_seq_length() == 9
        return torch.cat(pieces, dim=1)

    ours, ref = decode(compiled), decode(model)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max().item() <= LOGITS_ATOL
