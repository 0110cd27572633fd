"""How llama.cpp's GGUF files of Llama models load (``general.architecture = "llama"``)."""

from lmport.gguf_spec import ROPE_DECODER_CONFIG, ROPE_DECODER_TENSORS, ROPE_QK_PERMUTED, GGUFArchitecture

LLAMA_GGUF = GGUFArchitecture(
    "llama",
    config=ROPE_DECODER_CONFIG,
    tensors=ROPE_DECODER_TENSORS,
    permuted=ROPE_QK_PERMUTED,
    # Llama 3.1+ files carry their RoPE frequency factors as a tensor; checkpoints keep them in the config.
    ignore=("rope_freqs.weight",),
    rope_scaling=True,
)
