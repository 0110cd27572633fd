"""GPT-2: learned positions, pre-LayerNorm blocks, plain GELU MLP, tied head.

The checkpoint stores Conv1D weights as (in, out) and the attention's q/k/v fused
in one ``c_attn``; the weight map turns those into separate ``nn.Linear`` layers
(out, in) and back on save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmport.attention import AttentionKernel, AttentionMask, repeat_kv
from lmport.modeling import MLP, Attention, DecoderLayer, DecoderModel, PreTrainedCausalLM
from lmport.weights import Rename, Split, Transpose, WeightMap

from .config import GPT2Config

_LAYER = "model.layers.*"


def _weight_map() -> WeightMap:
    h = "transformer.h.*"
    return WeightMap(
        # Original OpenAI checkpoints have no "transformer." prefix.
        aliases=tuple(Rename(f"{n}.**", f"transformer.{n}.**") for n in ("wte", "wpe", "h", "ln_f")),
        rename=(
            Rename("transformer.wte.weight", "model.embed_tokens.weight"),
            Rename("transformer.wpe.weight", "model.embed_positions.weight"),
            Rename("transformer.ln_f.**", "model.norm.**"),
            Rename(f"{h}.ln_1.**", f"{_LAYER}.input_layernorm.**"),
            Rename(f"{h}.ln_2.**", f"{_LAYER}.post_attention_layernorm.**"),
            Rename(f"{h}.attn.c_attn.**", f"{_LAYER}.self_attn.qkv.**"),
            Rename(f"{h}.attn.c_proj.**", f"{_LAYER}.self_attn.o_proj.**"),
            Rename(f"{h}.mlp.c_fc.**", f"{_LAYER}.mlp.up_proj.**"),
            Rename(f"{h}.mlp.c_proj.**", f"{_LAYER}.mlp.down_proj.**"),
        ),
        split=tuple(
            Split(f"{_LAYER}.self_attn.qkv.{p}", tuple(f"{_LAYER}.self_attn.{x}_proj.{p}" for x in "qkv"), dim=-1)
            for p in ("weight", "bias")
        ),
        transpose=tuple(
            Transpose(f"{_LAYER}.{m}.weight")
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
        ),
        # Causal-mask buffers of old checkpoints: recomputed, never loaded.
        ignore=("transformer.h.*.attn.bias", "transformer.h.*.attn.masked_bias"),
    )


class UpcastReorderedEager:
    """The eager kernel as transformers runs it for ``reorder_and_upcast_attn=True``.

    ``q @ k.T`` is computed in float32 with the scaling folded in (``baddbmm`` with
    ``alpha``, autocast off), softmaxed in float32, then cast to the value dtype.
    In fp16/bf16 this differs from the plain eager kernel (and avoids fp16
    overflow of the scores), which is why the config flag exists. transformers
    applies it to ``eager`` only; every other kernel ignores the flag.
    """

    name = "eager"

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: AttentionMask,
        scaling: float,
        dropout: float,
        num_kv_groups: int,
    ) -> torch.Tensor:
        key, value = repeat_kv(key, num_kv_groups), repeat_kv(value, num_kv_groups)
        batch, heads, q_len, head_dim = query.shape
        kv_len = key.shape[2]
        with torch.autocast(query.device.type, enabled=False):
            q = query.reshape(-1, q_len, head_dim).float()
            k = key.transpose(-1, -2).reshape(-1, head_dim, kv_len).float()
            empty = torch.empty(batch * heads, q_len, kv_len, dtype=torch.float32, device=query.device)
            weights = torch.baddbmm(empty, q, k, beta=0, alpha=scaling).reshape(batch, heads, q_len, kv_len)
        allowed = mask.to_bool(query.device)
        # Added, not filled, as transformers does (and lmport's eager kernel): a query that sees no key
        # (a left-padding position) passes gradient to its scores through the addition.
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=weights.device)
        weights = weights + bias.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        weights = F.softmax(weights, dim=-1).to(value.dtype)
        if dropout:
            weights = F.dropout(weights, p=dropout, training=True)
        return torch.matmul(weights, value).transpose(1, 2).contiguous()


_UPCAST_REORDERED_EAGER = UpcastReorderedEager()


class GPT2LMHeadModel(PreTrainedCausalLM):
    """GPT-2 with its (tied) language-model head."""

    config_class = GPT2Config
    no_split_modules = ("DecoderLayer",)
    weight_map = _weight_map()

    def __init__(self, config: GPT2Config) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        layers = []
        for i in range(config.num_hidden_layers):
            scaling = head_dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scaling /= float(i + 1)
            layers.append(
                DecoderLayer(
                    self_attn=Attention(
                        config.hidden_size,
                        config.num_attention_heads,
                        config.num_attention_heads,
                        head_dim,
                        bias=True,
                        dropout=config.attn_pdrop,
                        layer_idx=i,
                        scaling=scaling,
                        resid_dropout=config.resid_pdrop,
                        rotary=False,
                    ),
                    mlp=MLP(config.hidden_size, config.inner_size, config.activation_function, dropout=config.resid_pdrop),
                    input_layernorm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
                    post_attention_layernorm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
                )
            )
        model = DecoderModel(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=layers,
            norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            embed_positions=nn.Embedding(config.max_position_embeddings, config.hidden_size),
            embed_dropout=config.embd_pdrop,
            embed_token_types=True,  # token_type_ids index wte, as in transformers' GPT2Model
        )
        super().__init__(config, model)

    def set_attention_kernel(self, kernel: AttentionKernel) -> None:
        """As the base, but ``eager`` + ``reorder_and_upcast_attn`` computes the scores in float32."""
        super().set_attention_kernel(kernel)
        if getattr(self.config, "reorder_and_upcast_attn", False) and getattr(kernel, "name", None) == "eager":
            for layer in self.model.layers:
                layer.self_attn.kernel = _UPCAST_REORDERED_EAGER

    def init_parameter(
        self, module: nn.Module, attr: str, tensor: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """As transformers: residual output projections get std / sqrt(2 * n_layer)."""
        super().init_parameter(module, attr, tensor, generator)
        if attr == "weight" and isinstance(module, nn.Linear) and self._is_residual_projection(module):
            with torch.no_grad():
                tensor.div_((2 * self.config.num_hidden_layers) ** 0.5)

    def _is_residual_projection(self, module: nn.Module) -> bool:
        return any(module is layer.self_attn.o_proj or module is layer.mlp.down_proj for layer in self.model.layers)
