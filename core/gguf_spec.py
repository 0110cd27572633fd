"""How an architecture plugin reads GGUF files: :class:`GGUFArchitecture`, plain data.

A GGUF file (llama.cpp's format) names its architecture in ``general.architecture``
(``"llama"``, ``"gpt2"``, ...), keeps the config as metadata under that prefix
(``llama.block_count``) and names tensors llama.cpp's way (``blk.0.attn_q.weight``). An
architecture plugin declares, per GGUF architecture name it reads, which metadata keys are
which ``config.json`` keys and which GGUF tensor names are which checkpoint (Hugging Face)
names; lmport builds the config and streams the tensors under their checkpoint names, so the
plugin's ordinary :class:`~lmport.weights.WeightMap` maps them into its modules as for any
checkpoint, and ``save_pretrained`` writes the Hugging Face format.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, UnsupportedFeatureError
from .weights import match, translate

#: Config values every llama.cpp file keeps outside its architecture's prefix.
TOKENIZER_CONFIG = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

#: llama.cpp's metadata keys of a rotary pre-norm decoder (Llama and its relatives), as
#: ``config.json`` keys of :class:`~lmport.modeling.RopeDecoderConfig`. Keys are under the
#: architecture's prefix (``llama.block_count``).
ROPE_DECODER_CONFIG = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "attention.key_length": "head_dim",  # newer files state it (it wins over the rotary width when present)
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}

#: llama.cpp's tensor names of that decoder -> the checkpoint names ``build_rope_decoder`` models load.
ROPE_DECODER_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.*.attn_norm.weight": "model.layers.*.input_layernorm.weight",
    "blk.*.attn_q.*": "model.layers.*.self_attn.q_proj.*",
    "blk.*.attn_k.*": "model.layers.*.self_attn.k_proj.*",
    "blk.*.attn_v.*": "model.layers.*.self_attn.v_proj.*",
    "blk.*.attn_output.*": "model.layers.*.self_attn.o_proj.*",
    "blk.*.ffn_norm.weight": "model.layers.*.post_attention_layernorm.weight",
    "blk.*.ffn_gate.*": "model.layers.*.mlp.gate_proj.*",
    "blk.*.ffn_up.*": "model.layers.*.mlp.up_proj.*",
    "blk.*.ffn_down.*": "model.layers.*.mlp.down_proj.*",
}

#: llama.cpp's converter permutes the rows of Llama-style q and k projections (weights and
#: biases) per head, for its rotary kernel; the head count of each is the first of these keys present.
ROPE_QK_PERMUTED = {
    "blk.*.attn_q.*": ("attention.head_count",),
    "blk.*.attn_k.*": ("attention.head_count_kv", "attention.head_count"),
}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How GGUF files of one llama.cpp architecture load as one lmport architecture.

    Args:
        name: the file's ``general.architecture`` (``"llama"``).
        config: metadata key (without the ``"<name>."`` prefix) -> ``config.json`` key.
        tensors: GGUF tensor name pattern -> checkpoint tensor name pattern (``*`` is one dotted
            segment, ``**`` several; placeholders correspond in order). Tried in order.
        model_type: the ``model_type`` the config gets; :class:`~lmport.Architecture` fills in its own.
        defaults: ``config.json`` values the file implies but does not state.
        transpose: GGUF tensor patterns stored transposed relative to the checkpoint (last two dims).
        permuted: GGUF tensor patterns whose rows llama.cpp's converter permuted for its rotary
            kernel -> the metadata keys (without prefix) of the head count, first present wins; the
            permutation is undone on load.
        ignore: GGUF tensor patterns with no checkpoint counterpart, dropped on load.
        output: the output projection's GGUF name: when the file lacks it the head is tied to
            the embeddings (``tie_word_embeddings``), as llama.cpp writes it only when it differs.
        rope_scaling: whether ``rope.scaling.*`` keys are read (linear scaling; others are refused).
    """

    name: str
    config: Mapping[str, str]
    tensors: Mapping[str, str]
    model_type: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    transpose: tuple[str, ...] = ()
    permuted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    output: str | None = "output.weight"
    rope_scaling: bool = False

    # --- config -----------------------------------------------------------------------------

    def config_dict(
        self, metadata: Mapping[str, Any], tensor_names: Collection[str], source: str = ""
    ) -> dict[str, Any]:
        """The ``config.json`` equivalent of a file's metadata (validated later by the config class).

        Raises:
            ConfigError: a metadata value of the wrong kind (an array where a number belongs).
            UnsupportedFeatureError: RoPE scaling of a kind lmport cannot reproduce.
        """
        raw: dict[str, Any] = {"model_type": self.model_type, **self.defaults}
        for key, name in TOKENIZER_CONFIG.items():
            if key in metadata:
                raw[name] = metadata[key]
        for key, name in self.config.items():
            full = f"{self.name}.{key}"
            if full in metadata:
                value = metadata[full]
                if not isinstance(value, (int, float, str, bool)):
                    kind = type(value).__name__
                    raise ConfigError(f"{source}: GGUF metadata {full!r} should be a number, got {kind}")
                raw[name] = value
        if "vocab_size" not in raw and "tokenizer.ggml.tokens" in metadata:  # as llama.cpp and transformers read it
            raw["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
        if self.output is not None:
            raw["tie_word_embeddings"] = self.output not in tensor_names
        if self.rope_scaling:
            scaling = self._rope_scaling(metadata, source)
            if scaling is not None:
                raw["rope_scaling"] = scaling
        return raw

    def _rope_scaling(self, metadata: Mapping[str, Any], source: str) -> dict[str, Any] | None:
        kind = metadata.get(f"{self.name}.rope.scaling.type", "none")
        if kind == "none":
            return None
        factor = metadata.get(f"{self.name}.rope.scaling.factor")
        if kind == "linear" and isinstance(factor, (int, float)):
            return {"rope_type": "linear", "factor": float(factor)}
        raise UnsupportedFeatureError(
            f"{source}: GGUF metadata {self.name}.rope.scaling.type is {kind!r} (factor {factor!r}); lmport reads "
            "linear RoPE scaling from GGUF files only. Load the model's original checkpoint instead"
        )

    # --- tensors ----------------------------------------------------------------------------

    def ignored(self, gguf_name: str) -> bool:
        return any(match(p, gguf_name) is not None for p in self.ignore)

    def checkpoint_name(self, gguf_name: str) -> str:
        """The checkpoint name of a GGUF tensor (unchanged when no pattern matches)."""
        for source, target in self.tensors.items():
            out = translate(gguf_name, source, target)
            if out is not None:
                return out
        return gguf_name

    def gguf_name(self, checkpoint_name: str) -> str:
        """The GGUF name of a checkpoint tensor: the inverse of :meth:`checkpoint_name`."""
        for source, target in self.tensors.items():
            out = translate(checkpoint_name, target, source)
            if out is not None:
                return out
        return checkpoint_name

    def transposed(self, gguf_name: str) -> bool:
        return any(match(p, gguf_name) is not None for p in self.transpose)

    def heads(self, gguf_name: str, metadata: Mapping[str, Any]) -> int | None:
        """The head count to undo the row permutation of ``gguf_name`` with, or ``None`` if it is not permuted."""
        for pattern, keys in self.permuted.items():
            if match(pattern, gguf_name) is None:
                continue
            for key in keys:
                value = metadata.get(f"{self.name}.{key}")
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            raise ConfigError(f"GGUF metadata has no head count ({', '.join(keys)}) to read {gguf_name!r} with")
        return None

    def to_checkpoint(self, gguf_name: str, tensor: torch.Tensor, metadata: Mapping[str, Any]) -> torch.Tensor:
        """A GGUF tensor in the checkpoint's layout: rows un-permuted, transposed back where declared."""
        heads = self.heads(gguf_name, metadata)
        if heads is not None:
            tensor = unpermute_rows(tensor, heads)
        if self.transposed(gguf_name) and tensor.dim() >= 2:
            tensor = tensor.transpose(-1, -2)
        return tensor


def permute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of q/k rows (``LlamaModel.permute``): per head, the two rotary
    halves are interleaved."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows`."""
    rows = tensor.shape[0]
    if heads <= 0 or rows % (2 * heads):
        raise ConfigError(f"a tensor of {rows} rows cannot be split into {heads} heads of two rotary halves")
    return tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


__all__ = [
    "GGUFArchitecture",
    "ROPE_DECODER_CONFIG",
    "ROPE_DECODER_TENSORS",
    "ROPE_QK_PERMUTED",
    "TOKENIZER_CONFIG",
    "permute_rows",
    "unpermute_rows",
]
