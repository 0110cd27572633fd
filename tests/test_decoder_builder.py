"""Extension points of the shared building blocks: the decoder builder's parts, the init rules,
the per-step generation hook and the KV cache's reset/crop.

- ``build_rope_decoder`` builds Llama by default and uses each part it is given (norm,
  embedding with or without a scale, attention, MLP, layer) with the documented arguments.
- ``from_config`` fills Llama, Mistral and GPT-2 exactly as before the rules were made explicit
  (the former rule is re-implemented here and compared bit for bit, same seed); a module's
  ``init_values`` takes precedence over every other rule; the rules per parameter kind.
- ``generate`` asks ``prepare_inputs_for_generation`` before each forward; an override that
  empties the cache (``KVCache.reset``) or drops it (``past_key_values=None``) recomputes the
  sequence and still gives the tokens of a plain run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import lmport
from lmport.cache import KVCache
from lmport.modeling import (
    Attention,
    DecoderLayer,
    GatedMLP,
    RMSNorm,
    ScaledEmbedding,
    build_rope_decoder,
    init_parameter,
    is_norm,
)
from lmport.registry import get_registry

from helpers import one_intraop_thread

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


def config_of(model_type: str, **overrides: Any) -> Any:
    plugin = get_registry().architecture(model_type)
    raw = {**plugin.tiny_config, **overrides} if model_type == "gpt2" else {**TINY, **overrides}
    return plugin.config_class.from_dict({**raw, "model_type": model_type})


# --- the builder ---------------------------------------------------------------------------------


def test_builder_defaults_build_llama() -> None:
    decoder = build_rope_decoder(config_of("llama"))
    assert type(decoder.embed_tokens) is nn.Embedding and type(decoder.norm) is RMSNorm
    layer = decoder.layers[0]
    assert type(layer) is DecoderLayer and type(layer.self_attn) is Attention and type(layer.mlp) is GatedMLP
    assert type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm


def test_builder_uses_each_part_given() -> None:
    config = config_of("llama", head_dim=16)
    calls: dict[str, list[Any]] = {"norm": [], "attention": [], "mlp": [], "layer": []}

    class Norm(nn.LayerNorm):
        def __init__(self, size: int, eps: float) -> None:
            calls["norm"].append((size, eps))
            super().__init__(size, eps)

    class MyAttention(Attention):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls["attention"].append((args, kwargs))
            super().__init__(*args, **kwargs)

    def mlp(hidden: int, inner: int, act: str, bias: bool) -> nn.Module:
        calls["mlp"].append((hidden, inner, act, bias))
        return GatedMLP(hidden, inner, "gelu_pytorch_tanh", bias)

    class Layer(DecoderLayer):
        def __init__(self, **parts: nn.Module) -> None:
            calls["layer"].append(sorted(parts))
            super().__init__(**parts)

    decoder = build_rope_decoder(
        config, attention_bias=True, mlp_bias=True, norm=Norm, embed_scale=2.0, attention=MyAttention, mlp=mlp,
        layer=Layer,
    )  # fmt: skip
    assert calls["norm"] == [(32, config.rms_norm_eps)] * 5
    assert calls["attention"] == [
        ((32, 4, 2, 16), {"bias": True, "dropout": 0.0, "layer_idx": i}) for i in range(2)
    ]
    assert calls["mlp"] == [(32, 64, "silu", True)] * 2
    assert calls["layer"] == [["input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]] * 2
    embed = decoder.embed_tokens
    assert isinstance(embed, ScaledEmbedding) and embed.scale == 2.0 and embed.padding_idx == config.pad_token_id
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(embed(ids), nn.functional.embedding(ids, embed.weight) * 2.0)

    seen: list[Any] = []

    def embedding(*args: Any, **kwargs: Any) -> nn.Module:
        seen.append((args, kwargs))
        return ScaledEmbedding(*args, **kwargs)

    build_rope_decoder(config, embedding=embedding, embed_scale=3.0)
    build_rope_decoder(config, embedding=embedding)
    assert seen == [((128, 32, None), {"scale": 3.0}), ((128, 32, None), {})]


def test_scaled_embedding_multiplies_in_the_weight_dtype() -> None:
    embed = ScaledEmbedding(8, 4, scale=48**0.5).to(torch.bfloat16)
    ids = torch.arange(8)
    rows = embed.weight[ids]
    assert torch.equal(embed(ids), rows * torch.tensor(48**0.5).to(torch.bfloat16))
    assert not torch.equal(embed(ids), (rows.float() * 48**0.5).to(torch.bfloat16))  # not rounded once in fp32
    assert "embed_scale" not in embed.state_dict()


# --- init rules ----------------------------------------------------------------------------------


def _former_rule(model: Any, module: nn.Module, attr: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """``init_parameter`` as it was before the rules were documented (plus GPT-2's residual scaling)."""
    with torch.no_grad():
        if attr == "bias":
            tensor.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)) or "Norm" not in type(module).__name__:
            tensor.normal_(0.0, model.config.initializer_range, generator=generator)
            padding_idx = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and padding_idx is not None:
                tensor[padding_idx].zero_()
        else:
            tensor.fill_(1.0)
        if model.config.model_type == "gpt2" and attr == "weight" and isinstance(module, nn.Linear):
            if any(module is layer.self_attn.o_proj or module is layer.mlp.down_proj for layer in model.model.layers):
                tensor.div_((2 * model.config.num_hidden_layers) ** 0.5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gpt2"])
def test_from_config_fills_existing_architectures_as_before(model_type: str) -> None:
    config = config_of(model_type, pad_token_id=0, tie_word_embeddings=False)
    model = lmport.AutoModelForCausalLM.from_config(config, seed=3)
    former = lmport.AutoModelForCausalLM.from_config(config, seed=0)
    generator = torch.Generator().manual_seed(3)
    for module in former.modules():
        for attr, param in module.named_parameters(recurse=False):
            _former_rule(former, module, attr, param.data, generator)
    ours, theirs = model.state_dict(), former.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(torch.all(m.weight == 1) for m in norms)


class _Scaled(nn.Module):
    init_values = {"weight": 0.0, "bias": 0.5}

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4))
        self.bias = nn.Parameter(torch.empty(4))


class _LN(nn.LayerNorm):  # a torch norm whose class name does not say so
    pass


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1000))


@pytest.mark.parametrize(
    ("module", "attr", "expected"),
    [
        (_Scaled(), "weight", 0.0),  # 1. the module's own constant wins ...
        (_Scaled(), "bias", 0.5),  # ... over every other rule
        (nn.Linear(4, 4), "bias", 0.0),  # 2. biases
        (RMSNorm(4, 1e-6), "weight", 1.0),  # 4. norms: by class name ...
        (_LN(4), "weight", 1.0),  # ... or torch norm class
        (_LN(4), "bias", 0.0),
    ],
)
def test_init_rules_constants(module: nn.Module, attr: str, expected: float) -> None:
    tensor = getattr(module, attr).data
    tensor.fill_(float("nan"))
    init_parameter(module, attr, tensor, 0.02)
    assert torch.all(tensor == expected)


@pytest.mark.parametrize("module", [nn.Linear(200, 10), nn.Embedding(200, 10, padding_idx=3), _Gate()])
def test_init_rules_normal(module: nn.Module) -> None:
    attr = next(iter(dict(module.named_parameters())))
    tensor = getattr(module, attr).data
    init_parameter(module, attr, tensor, 0.02, torch.Generator().manual_seed(0))
    if isinstance(module, nn.Embedding):
        assert torch.all(tensor[3] == 0)
        tensor = torch.cat([tensor[:3], tensor[4:]])
    assert abs(tensor.std().item() - 0.02) < 0.002 and abs(tensor.mean().item()) < 0.002


def test_a_models_init_parameter_override_is_used_for_resized_rows() -> None:
    model = lmport.AutoModelForCausalLM.from_config(config_of("llama", tie_word_embeddings=False), seed=0)

    calls: list[tuple[str, str]] = []
    base = model.init_parameter

    def recording(module: nn.Module, attr: str, tensor: torch.Tensor, generator: Any = None) -> None:
        calls.append((type(module).__name__, attr))
        base(module, attr, tensor, generator)

    model.init_parameter = recording  # type: ignore[method-assign]
    model.resize_token_embeddings(130, mean_resizing=False)
    assert ("Embedding", "weight") in calls


# --- the generation hook and the cache ------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> Any:
    return lmport.AutoModelForCausalLM.from_config(config_of("llama", initializer_range=0.2), seed=1).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


GREEDY = dict(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("drop", ["reset", "none"])
def test_generate_asks_the_hook_each_step_and_a_dropped_cache_is_recomputed(
    llama: Any, monkeypatch: pytest.MonkeyPatch, drop: str
) -> None:
    ids, mask = _prompts()
    expected = llama.generate(ids, attention_mask=mask, **GREEDY)
    steps: list[tuple[int, int]] = []  # (tokens so far, tokens the forward gets)
    original = type(llama).prepare_inputs_for_generation

    def hook(self: Any, input_ids: torch.Tensor, past_key_values: KVCache | None = None, **kwargs: Any) -> Any:
        if input_ids.shape[1] == ids.shape[1] + 4:  # the switch point: drop what was cached
            assert past_key_values is not None and past_key_values.get_seq_length() == ids.shape[1] + 3
            if drop == "reset":
                past_key_values.reset()
            else:
                past_key_values = None
        inputs = original(self, input_ids, past_key_values, **kwargs)
        steps.append((input_ids.shape[1], inputs["input_ids"].shape[1]))
        return inputs

    monkeypatch.setattr(type(llama), "prepare_inputs_for_generation", hook)
    got = llama.generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got, expected)
    prompt = ids.shape[1]
    assert steps == [(prompt, prompt)] + [(n, 1) for n in range(prompt + 1, prompt + 4)] + [
        (prompt + 4, prompt + 4)
    ] + [(n, 1) for n in range(prompt + 5, prompt + 8)]  # fmt: skip


def test_prepare_inputs_for_generation_slices_what_the_cache_has_not_seen(llama: Any) -> None:
    ids = torch.arange(10).view(2, 5)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = KVCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    inputs = llama.prepare_inputs_for_generation(ids, cache, mask, token_type_ids=ids + 1, logits_to_keep=1)
    assert torch.equal(inputs["input_ids"], ids[:, 3:])
    assert torch.equal(inputs["position_ids"], torch.tensor([[2, 3], [3, 4]]))
    assert torch.equal(inputs["token_type_ids"], ids[:, 3:] + 1)
    assert inputs["use_cache"] is True and inputs["past_key_values"] is cache and inputs["logits_to_keep"] == 1
    assert inputs["attention_mask"] is mask


def test_kv_cache_reset_and_crop() -> None:
    cache = KVCache()
    for layer in range(2):
        cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), layer)
    keys = [k.clone() for k in cache.keys]
    cache.crop(7)
    assert cache.get_seq_length() == 5
    cache.crop(3)
    assert cache.get_seq_length() == 3 and torch.equal(cache.keys[1], keys[1][..., :3, :])
    cache.crop(-1)
    assert cache.get_seq_length() == 2 and cache.values[0].shape == (1, 2, 2, 4)
    cache.crop(-5)
    assert cache.get_seq_length() == 0 and len(cache) == 2
    cache.reset()
    assert len(cache) == 0 and cache.get_seq_length() == 0
    k, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    assert k.shape == (1, 2, 1, 4)
