"""How GGUF files of Mistral models load (``general.architecture = "mistral"``).

llama.cpp's converter writes Mistral-7B-style models as ``"llama"`` files (no sliding window):
those load with the Llama plugin.
"""

from lmport.gguf_spec import ROPE_DECODER_CONFIG, ROPE_DECODER_TENSORS, ROPE_QK_PERMUTED, GGUFArchitecture

MISTRAL_GGUF = GGUFArchitecture(
    "mistral",
    config={**ROPE_DECODER_CONFIG, "attention.sliding_window": "sliding_window"},
    tensors=ROPE_DECODER_TENSORS,
    permuted=ROPE_QK_PERMUTED,
    rope_scaling=True,
)
