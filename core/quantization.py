"""Quantization settings and the contract a quantizer plugin fulfils while a model loads.

Two kinds of load: *quantize on load* (a ``quantization_config`` argument; each
floating weight is quantized as it streams in) and *pre-quantized* (the checkpoint's
``config.json`` holds a ``quantization_config``: its weights are stored quantized and
are loaded as they are, never quantized again).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .caller import warn_user
from .errors import ArgumentError, ConfigError, PluginError, UnsupportedQuantizationError

#: ``quant_method`` spellings of bitsandbytes (transformers writes "bitsandbytes").
BNB_METHODS = ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit")


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
        for name in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
                     "bnb_4bit_use_double_quant"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"BitsAndBytesConfig.{name} must be true or false, got {getattr(self, name)!r}")
        threshold = self.llm_int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ArgumentError(f"BitsAndBytesConfig.llm_int8_threshold must be a finite number, got {threshold!r}")
        skip = self.llm_int8_skip_modules
        if skip is not None and (not isinstance(skip, (list, tuple)) or not all(isinstance(m, str) for m in skip)):
            raise ArgumentError(
                f"BitsAndBytesConfig.llm_int8_skip_modules must be a list of module names, got {skip!r}"
            )
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
        if str(method).lower() not in BNB_METHODS:
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


@dataclass(frozen=True)
class QuantizationState:
    """What a quantized model is: returned by its quantizer's ``finalize``, kept as ``model.quantization_state``.

    The transformers-facing attributes of a model (``is_quantized``, ``is_loaded_in_4bit``,
    ``is_loaded_in_8bit``, ``quantization_method``, ``quantization_config``, ``hf_quantizer``)
    are read-only views of it (:class:`QuantizedModelAttributes`).
    """

    #: The ``quant_method`` (transformers' ``model.quantization_method``): ``"bitsandbytes"``, ``"fp8"``, ...
    method: str
    #: The quantization settings (``model.quantization_config``): a :class:`BitsAndBytesConfig`, or the
    #: plugin's own object or dict.
    settings: Any
    #: Bits per stored weight (4, 8) where the method has one number; ``None`` otherwise.
    bits: int | None = None
    #: Whether the weights came stored quantized from the checkpoint (not quantized while loading).
    pre_quantized: bool = False
    #: Whether adapters (peft) may be trained on top (transformers' ``hf_quantizer.is_trainable``).
    trainable: bool = True

    # transformers' HfQuantizer names that Trainer reads on ``model.hf_quantizer``.
    @property
    def quantization_config(self) -> Any:
        return self.settings

    @property
    def is_trainable(self) -> bool:
        return self.trainable

    @property
    def is_qat_trainable(self) -> bool:
        return False


def _derived(name: str, doc: str, get: Any) -> property:
    def refuse(self: Any, value: Any) -> None:
        raise AttributeError(
            f"{name} is read-only on lmport models: it follows model.quantization_state, which the loader sets from "
            "the quantizer's finalize() (a QuantizationState, or None)"
        )

    return property(lambda self: get(self.quantization_state), refuse, doc=doc)


class QuantizedModelAttributes:
    """transformers' names for a model's quantization, derived from :attr:`quantization_state` (read-only)."""

    #: What the model's quantizer said of it (:class:`QuantizationState`); ``None``: not quantized.
    quantization_state: QuantizationState | None = None

    is_quantized = _derived("is_quantized", "Whether the model is quantized.", lambda s: s is not None)
    is_loaded_in_4bit = _derived(
        "is_loaded_in_4bit", "A bitsandbytes 4-bit model.", lambda s: _bnb_bits(s) == 4
    )
    is_loaded_in_8bit = _derived(
        "is_loaded_in_8bit", "A bitsandbytes 8-bit model.", lambda s: _bnb_bits(s) == 8
    )
    quantization_method = _derived(
        "quantization_method", "The ``quant_method`` (``None``: not quantized).", lambda s: s and s.method
    )
    quantization_config = _derived(
        "quantization_config", "The quantization settings (``None``: not quantized).", lambda s: s and s.settings
    )
    hf_quantizer = _derived(
        "hf_quantizer",
        "What transformers' Trainer reads of a quantizer (``quantization_config``, ``is_trainable``): the state.",
        lambda s: s,
    )


def _bnb_bits(state: QuantizationState | None) -> int | None:
    return state.bits if state is not None and state.method == BitsAndBytesConfig.quant_method else None


def finish_quantization(quantizer: Quantizer, model: nn.Module) -> QuantizationState | None:
    """``quantizer.finalize(model)``, checked: the state to store as ``model.quantization_state``.

    Raises:
        PluginError: ``finalize`` returned something other than a :class:`QuantizationState` or ``None``.
    """
    state = quantizer.finalize(model)
    if state is not None and not isinstance(state, QuantizationState):
        raise PluginError(
            f"quantizer {type(quantizer).__module__}.{type(quantizer).__qualname__}: finalize() returned "
            f"{type(state).__name__}, not an lmport.quantization.QuantizationState or None"
        )
    return state


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

    def finalize(self, model: nn.Module) -> QuantizationState | None:
        """Say what the loaded model is, once every tensor is in place.

        Returns:
            The model's :class:`QuantizationState` (the loader stores it as
            ``model.quantization_state``), or ``None`` when the model ends up unquantized
            (a plugin that dequantizes stored weights). Never set attributes on the model.
        """
        ...


@runtime_checkable
class StoredQuantizer(Quantizer, Protocol):
    """A :class:`Quantizer` that loads weights a checkpoint stores quantized (``pre_quantized`` loads).

    The ``lmport_quantizer`` hook called with ``pre_quantized=True`` must return one of
    these with :attr:`pre_quantized` true; the loader then never calls ``materialize``
    (which would quantize again) for the weights it claims.
    """

    #: True: this quantizer loads stored quantized weights as they are.
    pre_quantized: bool

    def stored_part(self, checkpoint_name: str) -> tuple[str, str] | None:
        """Which stored weight a checkpoint tensor belongs to.

        Returns:
            ``(weight, key)``: the checkpoint name of the weight (``"....q_proj.weight"``)
            and the tensor's key in its stored form (``"weight"`` for the quantized data
            itself, ``"absmax"``, ``"SCB"`` … for its statistics); ``None`` for a tensor that
            is no part of a quantized weight. The loader maps ``weight`` through the
            architecture's weight map and groups the parts of the weights :meth:`claims`
            claims.
        """
        ...

    def materialize_stored(
        self,
        model: nn.Module,
        module_names: list[str],
        parts: dict[str, torch.Tensor],
        device: torch.device,
        where: str,
    ) -> None:
        """Assign the stored quantized weight ``parts`` (key → tensor, as read) to ``module_names``.

        ``module_names`` has one name, or several when the checkpoint fuses them (the weight
        map splits that tensor, e.g. GPT-2's ``c_attn``): the stored rows are then those of
        each module in order. ``where`` names the file and tensor for error messages; an
        incomplete, inconsistent or unsplittable stored weight raises a typed
        :class:`~lmport.errors.LmportError` naming it.
        """
        ...


def quantization_method(value: Any) -> str | None:
    """The ``quant_method`` of quantization settings (an object or a dict), as transformers reads it.

    bitsandbytes settings (``load_in_4bit`` / ``load_in_8bit`` set) give ``"bitsandbytes"``.
    """
    if isinstance(value, BitsAndBytesConfig):
        return BitsAndBytesConfig.quant_method
    get = value.get if isinstance(value, dict) else (lambda key, default=None: getattr(value, key, default))
    if get("load_in_4bit", False) is True or get("load_in_8bit", False) is True:
        return BitsAndBytesConfig.quant_method
    method = get("quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str Enum
    if not isinstance(method, str):
        return None
    return BitsAndBytesConfig.quant_method if method.lower() in BNB_METHODS else method


def stored_quantization(config: Any, source: str) -> tuple[Any, str] | None:
    """The checkpoint's own ``quantization_config`` (``config.json``): settings for the hook and the method.

    Returns:
        ``None`` when the config has none; else ``(settings, method)``: a
        :class:`BitsAndBytesConfig` for bitsandbytes, a copy of the dict for any other method.

    Raises:
        ConfigError: it is not an object, names no ``quant_method``, or has invalid bitsandbytes
            settings (the message names ``source``).
    """
    extra = getattr(config, "extra", None)
    raw = extra.get("quantization_config") if isinstance(extra, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be an object, got {type(raw).__name__} {raw!r}")
    method = quantization_method(raw)
    if method is None:
        raise ConfigError(
            f"{source}: 'quantization_config' names no 'quant_method' (got {raw.get('quant_method')!r}); the "
            "checkpoint says it is quantized but not how. Fix config.json or re-save the checkpoint."
        )
    if method == BitsAndBytesConfig.quant_method:
        try:
            return BitsAndBytesConfig.from_any(raw), method
        except ArgumentError as exc:
            raise ConfigError(f"{source}: quantization_config: {exc}") from exc
    return dict(raw), method


def resolve_quantization(argument: Any, config: Any, source: str) -> tuple[Any, bool, str | None]:
    """The quantization a load applies: the checkpoint's own (pre-quantized) or the argument's.

    As transformers does: a checkpoint stored quantized is loaded with its own
    ``quantization_config``; an argument of the same method is ignored with a warning, one
    of another method is refused (stored quantized weights are never quantized again).

    Returns:
        ``(settings, pre_quantized, method)``; ``settings`` is ``argument`` when the
        checkpoint is not quantized (``method`` is then ``None``).
    """
    stored = stored_quantization(config, source)
    if stored is None:
        return argument, False, None
    settings, method = stored
    if argument is not None:
        given = quantization_method(argument)
        if given is None or given.lower() != method.lower():
            raise ArgumentError(
                f"quantization_config asks for {given or type(argument).__name__!r}, but {source} says the checkpoint "
                f"is already quantized with quant_method {method!r}; stored quantized weights are never quantized "
                "again. Drop the quantization_config argument (or load an unquantized checkpoint to quantize it)."
            )
        warn_user(
            f"from_pretrained: the checkpoint is already quantized ({source} has a quantization_config, quant_method "
            f"{method!r}); that quantization_config is used and the one passed to from_pretrained is ignored."
        )
    return settings, True, method


def unsupported_stored_quantization(source: str, method: str, reason: str = "") -> UnsupportedQuantizationError:
    """The error for a stored quantization no installed plugin serves."""
    return UnsupportedQuantizationError(
        f"{source}: the checkpoint is stored quantized (quantization_config, quant_method {method!r}), and "
        f"{reason or 'no installed lmport quantizer plugin serves that method'}. Its weights cannot be used as plain "
        "ones. lmport itself loads bitsandbytes checkpoints (4-bit and 8-bit; pip install 'lmport[bnb]'); for "
        f"{method!r}, install an lmport plugin that implements the lmport_quantizer hook for it (see docs/plugins.md, "
        "'A quantizer plugin'), or load an unquantized copy of the model (dequantized with the tool that quantized it)."
    )
