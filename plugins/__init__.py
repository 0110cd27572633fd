"""Builtin capability plugins that core registers itself: sources, weight formats, attention
kernels, quantization (bitsandbytes) and device placement (accelerate)."""

from __future__ import annotations

from types import ModuleType


def builtin_modules() -> list[ModuleType]:
    """The builtin plugin modules, in registration order (later ones are asked first).

    ``lmport.formats`` holds the builtin ``lmport_open_weights``: it reads a folder in the
    most preferred of the formats the plugins declare (safetensors, then ``.bin``).
    """
    from lmport import formats

    from . import accelerate_placement, attention, bnb_quantizer, local_source, safetensors_format, torch_bin_format
    from . import hub_source  # both sources are trylast: local_source, registered later, is asked first
    from . import gguf_format

    return [formats, hub_source, local_source, gguf_format, torch_bin_format, safetensors_format, attention, bnb_quantizer,
            accelerate_placement]  # fmt: skip
