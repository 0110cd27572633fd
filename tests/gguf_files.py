"""GGUF files for the tests, written with the ``gguf`` package's own ``GGUFWriter``.

:func:`convert` turns a checkpoint transformers saved into a GGUF file the way llama.cpp's
``convert_hf_to_gguf.py`` does: tensor names from ``gguf``'s own table
(``gguf.get_tensor_name_map``), metadata through the writer's ``add_*`` methods, q/k rows
permuted for Llama-style models (``LlamaModel.permute``), GPT-2's Conv1D weights transposed
and its tied head written again as ``output.weight``; 2-D weights quantized with
``gguf.quants.quantize``, 1-D ones kept F32 (as llama.cpp keeps norms).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from lmport.gguf_tokenizer import bytes_to_unicode

F32 = gguf.GGMLQuantizationType.F32
#: Types ``gguf.quants.quantize`` writes (the others it only reads).
QUANTIZABLE = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4")
#: Byte offsets of each block's float16 scale fields, for random blocks with finite scales.
HALF_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ3_XXS": (0,), "IQ1_S": (0,),
    "IQ4_NL": (0,), "IQ3_S": (0,), "IQ2_S": (0,), "IQ4_XS": (0,),
}  # fmt: skip


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def quantized(data: np.ndarray, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), qtype


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random block bytes of ``type_name`` with finite, modest float16 scales: (rows, bytes per row)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset in HALF_FIELDS.get(type_name, ()):
        data[:, offset : offset + 2] = (rng.uniform(-0.05, 0.05, size=len(data)).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    if type_name == "IQ1_M":  # its scale is spread over the top nibbles of 4 uint16: keep the exponent finite
        data[:, 55] = (data[:, 55] & 0x0F) | 0x20
    return data.reshape(rows, -1)


def token_list(vocab_size: int) -> list[str]:
    """A byte-level vocabulary of ``vocab_size`` tokens (single bytes, then pairs)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars[:vocab_size] + [a + b for a in chars for b in chars][: max(0, vocab_size - 256)]
    return tokens[:vocab_size]


def convert(
    hf_folder: Path,
    out: Path,
    *,
    qtype: str = "F32",
    architecture: str | None = None,
    extra: Callable[[gguf.GGUFWriter], Any] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """``hf_folder`` (config.json + model.safetensors saved by transformers) as a llama.cpp-style GGUF file."""
    config = json.loads((hf_folder / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(hf_folder / "model.safetensors").items()}
    model_type = config["model_type"]
    arch = architecture or model_type
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny " + model_type)
    if model_type == "gpt2":
        layers, heads = config["n_layer"], config["n_head"]
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_feed_forward_length(4 * config["n_embd"])
        writer.add_block_count(layers)
        writer.add_head_count(heads)
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, layers)
    else:
        layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
        rope = config.get("rope_parameters") or {}
        writer.add_vocab_size(config["vocab_size"])
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_rope_dimension_count(config["hidden_size"] // heads)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        if model_type == "mistral" and config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(token_list(config["vocab_size"]))
    writer.add_token_types([1] * config["vocab_size"])
    for key in ("bos", "eos"):
        if isinstance(config.get(f"{key}_token_id"), int):
            getattr(writer, f"add_{key}_token_id")(config[f"{key}_token_id"])
    if extra is not None:
        extra(writer)
    for name, data in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{table.get_name(base)}.{suffix}"
        if gguf_name in skip:
            continue
        if model_type != "gpt2" and base.endswith("q_proj"):
            data = llama_cpp_permute(data, heads, heads)
        elif model_type != "gpt2" and base.endswith("k_proj"):
            data = llama_cpp_permute(data, heads, kv)
        elif model_type == "gpt2" and suffix == "weight" and base.endswith(("c_attn", "c_proj", "c_fc")):
            data = data.T
        tensors = [(gguf_name, data)] + ([("output.weight", data)] if model_type == "gpt2" and gguf_name == "token_embd.weight" else [])
        for tname, tdata in tensors:
            if data.ndim == 2 and qtype != "F32":
                qdata, qt = quantized(tdata, qtype)
                writer.add_tensor(tname, qdata, raw_dtype=qt)
            else:
                writer.add_tensor(tname, np.ascontiguousarray(tdata, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_tensors(
    out: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], architecture: str = "llama"
) -> Path:
    """A GGUF file with ``tensors`` (name -> (data, type); quantized data as block bytes) and little metadata."""
    writer = gguf.GGUFWriter(str(out), architecture)
    for name, (data, qtype) in tensors.items():
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.I32):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def transformers_logits(folder: Path, ids: torch.Tensor, gguf_file: str | None = None) -> torch.Tensor:
    """transformers' fp32 logits of ``folder`` (its GGUF loading when ``gguf_file`` is given)."""
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(ids).logits
