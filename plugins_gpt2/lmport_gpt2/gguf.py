"""How llama.cpp's GGUF files of GPT-2 models load (``general.architecture = "gpt2"``).

llama.cpp's converter stores the Conv1D weights as (out, in), transposed from the checkpoint's
(in, out), and writes the tied head again as ``output.weight``.
"""

from lmport.gguf_spec import GGUFArchitecture

GPT2_GGUF = GGUFArchitecture(
    "gpt2",
    config={
        "block_count": "n_layer",
        "context_length": "n_positions",
        "embedding_length": "n_embd",
        "feed_forward_length": "n_inner",
        "attention.head_count": "n_head",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
    },
    tensors={
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.*": "transformer.ln_f.*",
        "output.weight": "lm_head.weight",
        "blk.*.attn_norm.*": "transformer.h.*.ln_1.*",
        "blk.*.attn_qkv.*": "transformer.h.*.attn.c_attn.*",
        "blk.*.attn_output.*": "transformer.h.*.attn.c_proj.*",
        "blk.*.ffn_norm.*": "transformer.h.*.ln_2.*",
        "blk.*.ffn_up.*": "transformer.h.*.mlp.c_fc.*",
        "blk.*.ffn_down.*": "transformer.h.*.mlp.c_proj.*",
    },
    transpose=tuple(f"blk.*.{n}.weight" for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
)
