"""A Gemma plugin written with lmport's public API only, at parity with transformers' GemmaForCausalLM.

The package under tests/fixtures/gemma (distribution ``lmport-gemma``) is pip-installed
and found through its entry point. It passes to ``build_rope_decoder`` its ``(1 + w)``
RMSNorm (whose ``init_values`` start it at zero) and an embedding scale of
``sqrt(hidden_size)``; the rest is the shared Llama-style decoder. Variants: GQA/MQA/MHA, a
``head_dim`` apart from (and not dividing) ``hidden_size``, tied and untied heads, attention
bias and the legacy ``hidden_act: "gelu"``.

- ``lmport.testing``'s conformance cases (plugin contract, and against transformers for eager
  and sdpa: fp32 logits/loss/gradients, padding, ``inputs_embeds``, greedy generation, bf16,
  the save round trip), each required bit-identical here (max abs diff 0);
- what is Gemma's own: the norms really compute ``1 + w`` and the scale is applied inside the
  embedding module, rounded to bf16 in bf16; generation without the cache;
- ``from_config``: zero norms, normal(0, initializer_range) weights, tied head, and a save that
  transformers loads;
- the package imports no private name, and its config refuses what it cannot honour.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf
from helpers import VOCAB, batch_of_two, load_clean, load_lmport, one_intraop_thread, pip_installed

import lmport
import lmport.testing
from lmport.errors import ConfigError
from lmport.registry import ARCHITECTURES_GROUP, get_registry

FIXTURE = Path(__file__).parent / "fixtures" / "gemma"
SEQ = 16
PAD = 0

TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # not hidden_size // heads (12)
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=2,
    eos_token_id=1,
)

#: id -> GemmaConfig values over TINY
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa_tied": {},
    "mqa_head_dim_not_dividing": {"hidden_size": 40, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 8},
    "mha_untied_bias_legacy_gelu": {
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "hidden_act": "gelu",
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pip_installed(FIXTURE, tmp_path_factory.mktemp("gemma"), "lmport_gemma") as target:
        yield target


@pytest.fixture(scope="module")
def checkpoints(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``checkpoints(case, dtype=torch.float32)``: a folder transformers saved, once per module."""

    @functools.cache
    def make(case: str, dtype: torch.dtype = torch.float32) -> Path:
        config = transformers.GemmaConfig(**{**TINY, **VARIANTS[case]})
        return save_hf(tmp_path_factory.mktemp(case), config, dtype=dtype)

    return make


def test_installed_from_its_entry_point_with_public_api_only(site: Path) -> None:
    entries = [e for e in get_registry().entry_points(ARCHITECTURES_GROUP) if e.name == "gemma"]
    assert [(e.distribution, e.value) for e in entries] == [("lmport-gemma", "lmport_gemma:plugin")]
    for path in sorted((site / "lmport_gemma").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmport"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, f"{path.name}: private import {node.module} {private}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"{path.name}:{node.lineno}: private attribute {node.attr}")


@pytest.mark.parametrize("case", lmport.testing.conformance_cases("gemma", VARIANTS, base=TINY), ids=str)
def test_conformance(site: Path, case: Any, tmp_path: Path) -> None:
    figures = lmport.testing.check_case(case, tmp_path)
    if case.kind == "reference":  # bit-identical, not merely within tolerance
        assert figures["logits_max_abs_diff"] == figures["loss_max_abs_diff"] == figures["grad_max_rel_diff"] == 0


def test_norms_compute_one_plus_w_and_the_embedding_scales(checkpoints: Any) -> None:
    folder = checkpoints("gqa_tied")
    ours, ref = load_lmport(folder), load_clean(transformers.GemmaForCausalLM, folder, dtype=torch.float32)
    assert type(ours).__module__ == "lmport_gemma.model"
    assert ours.model.norm.weight.abs().min() > 0.5  # random norms: (1 + w) against w would show
    ids = batch_of_two(SEQ, seed=1)["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
        norm = ours.model.layers[0].input_layernorm
        x = torch.randn(2, 3, TINY["hidden_size"])
        unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        torch.testing.assert_close(norm(x), unit * (1 + norm.weight), rtol=0, atol=1e-5)
        embed = ours.get_input_embeddings()
        assert torch.equal(embed(ids), ours.model.embed_tokens.weight[ids] * torch.tensor(TINY["hidden_size"] ** 0.5))
        assert torch.equal(embed(ids), ref.get_input_embeddings()(ids))


def test_bf16_scale_rounds_as_transformers(checkpoints: Any) -> None:
    folder = checkpoints("gqa_tied", torch.bfloat16)
    ours = load_lmport(folder, dtype="auto")
    ref = transformers.GemmaForCausalLM.from_pretrained(folder, dtype="auto")
    assert ours.dtype == ref.dtype == torch.bfloat16
    ids = batch_of_two(SEQ, seed=3)["input_ids"]
    with torch.no_grad():
        rows = ours.get_input_embeddings()(ids)
        assert torch.equal(rows, ours.model.embed_tokens.weight[ids] * 6.9375)  # sqrt(48) = 6.9282 in bf16
        assert torch.equal(rows, ref.get_input_embeddings()(ids))
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_greedy_generation_without_cache_matches_transformers(checkpoints: Any) -> None:
    folder = checkpoints("gqa_tied")
    ours, ref = load_lmport(folder), load_clean(transformers.GemmaForCausalLM, folder, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD, 0  # left padding
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        expected = ref.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(ours.generate(ids, use_cache=False, **kwargs), expected)
    assert torch.equal(ours.generate(ids, **kwargs), expected)


def test_from_config_zero_norms_and_transformers_reads_its_save(site: Path, tmp_path: Path) -> None:
    plugin = get_registry().architecture("gemma")
    config = plugin.config_class.from_dict({**TINY, "model_type": "gemma"})
    model = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    again = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    norms = [m for m in model.modules() if type(m).__name__ == "GemmaRMSNorm"]
    assert len(norms) == 2 * TINY["num_hidden_layers"] + 1
    assert all(torch.count_nonzero(n.weight) == 0 for n in norms)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - config.initializer_range) < 0.005 and q.mean().abs() < 0.005
    embed = model.model.embed_tokens
    assert model.lm_head.weight is embed.weight and torch.count_nonzero(embed.weight[PAD]) == 0
    assert embed.embed_scale.item() == torch.tensor(TINY["hidden_size"] ** 0.5).item()
    model.save_pretrained(tmp_path / "fresh")
    ref = load_clean(transformers.GemmaForCausalLM, tmp_path / "fresh", dtype=torch.float32)
    ids = batch_of_two(SEQ, seed=7)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref(ids).logits)


def test_config_reads_gemma_keys_and_refuses_what_it_cannot_honour(site: Path, tmp_path: Path) -> None:
    config_class = get_registry().architecture("gemma").config_class
    legacy = config_class.from_dict({**TINY, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"})
    assert legacy.hidden_act == "gelu_pytorch_tanh"
    odd = config_class.from_dict(
        {**TINY, "hidden_size": 40, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 8}
    )
    assert odd.head_dim == 8 and odd.hidden_size % odd.num_attention_heads
    with pytest.raises(ConfigError, match="hidden_activation"):
        config_class.from_dict({**TINY, "hidden_act": "gelu", "hidden_activation": "silu"})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        config_class.from_dict({**TINY, "use_bidirectional_attention": True})
