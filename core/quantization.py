"""Quantization settings and the contract a quantizer plugin fulfils while a model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ArgumentError


def _dtype(value: Any, field: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        candidate = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise ArgumentError(f"BitsAndBytesConfig.{field} must be a torch dtype or its name, got {value!r}")


@dataclass
class BitsAndBytesConfig:
    """bitsandbytes 4-bit / 8-bit settings, field for field as transformers' ``BitsAndBytesConfig``.

    Args:
        load_in_8bit: LLM.int8() linear layers.
        load_in_4bit: 4-bit linear layers (QLoRA).
        llm_int8_threshold: outlier threshold of LLM.int8().
        llm_int8_skip_modules: module names kept unquantized (default: the output head, ``lm_head``).
        llm_int8_enable_fp32_cpu_offload: accepted for compatibility; offloading quantized
            modules is refused.
        llm_int8_has_fp16_weight: keep fp16 master weights for 8-bit training.
        bnb_4bit_compute_dtype: dtype of 4-bit matmuls (default float32).
        bnb_4bit_quant_type: ``"fp4"`` or ``"nf4"``.
        bnb_4bit_use_double_quant: also quantize the quantization constants.
        bnb_4bit_quant_storage: storage dtype of packed 4-bit weights (default uint8).
    """

    quant_method: ClassVar[str] = "bitsandbytes"

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype | str | None = None

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ArgumentError("BitsAndBytesConfig: load_in_4bit and load_in_8bit cannot both be True")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ArgumentError("BitsAndBytesConfig: set load_in_4bit=True or load_in_8bit=True")
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ArgumentError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {self.bnb_4bit_quant_type!r}")
        self.bnb_4bit_compute_dtype = _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype") or torch.float32
        self.bnb_4bit_quant_storage = _dtype(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage") or torch.uint8

    @property
    def skip_modules(self) -> list[str]:
        return list(self.llm_int8_skip_modules) if self.llm_int8_skip_modules is not None else ["lm_head"]

    @classmethod
    def from_any(cls, value: Any) -> BitsAndBytesConfig:
        """Accept this class, a dict, or any object with ``to_dict()`` (transformers' config)."""
        if isinstance(value, cls):
            return value
        if hasattr(value, "to_dict") and callable(value.to_dict):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise ArgumentError(f"quantization_config must be a BitsAndBytesConfig or a dict, got {type(value).__name__}")
        method = value.get("quant_method", cls.quant_method)
        method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str Enum
        if str(method).lower() not in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
            raise ArgumentError(f"quantization method {method!r} is not supported; only bitsandbytes is")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form transformers writes under ``quantization_config``."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out


@runtime_checkable
class Quantizer(Protocol):
    """What a ``lmport_quantizer`` hook returns: a plan applied while loading, tensor by tensor."""

    def prepare(self, model: nn.Module) -> None:
        """Swap modules for their quantized forms while the model is still on the meta device."""
        ...

    def claims(self, module_name: str) -> bool:
        """Whether the tensor ``module_name`` is materialised by :meth:`materialize`."""
        ...

    def materialize(self, model: nn.Module, module_name: str, tensor: torch.Tensor, device: torch.device) -> None:
        """Quantize ``tensor`` onto ``device`` and assign it as ``module_name``."""
        ...

    def finalize(self, model: nn.Module) -> None:
        """Mark the loaded model (``is_loaded_in_4bit`` …) once every tensor is in place."""
        ...
