"""Builtin quantizer plugin: bitsandbytes 4-bit (fp4/nf4, double quantization) and 8-bit linear layers.

Two ways in. *Quantize on load* (a ``quantization_config`` argument): each weight is
quantized as it streams in, so peak memory stays close to the quantized model's size.
*Pre-quantized* (a checkpoint saved by transformers from a bitsandbytes model, with
``quantization_config`` in its ``config.json``): the stored packed weights and their
statistics (4-bit: ``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__{nf4,fp4}``; 8-bit: ``weight``, ``SCB``,
``weight_format``) are loaded as they are, with the same bitsandbytes calls transformers
makes. bitsandbytes is imported only when quantization is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any

import torch
from torch import nn

from lmport.config import PretrainedConfig
from lmport.errors import CorruptWeightsError, ShapeMismatchError, UnsupportedFeatureError, UnsupportedQuantizationError
from lmport.hookspecs import hookimpl
from lmport.quantization import BitsAndBytesConfig, QuantizationState

#: Keys of a stored 4-bit weight's statistics, after ``<module>.weight.``.
STORED_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
               "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")  # fmt: skip
#: Keys of a stored 8-bit weight's statistics, after ``<module>.``.
STORED_8BIT = ("SCB", "weight_format")


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


class BitsAndBytesQuantizer:
    """Replaces ``nn.Linear`` layers (except the skipped ones) with bitsandbytes layers.

    With ``pre_quantized`` their weights come stored quantized from the checkpoint
    (:meth:`stored_part`, :meth:`materialize_stored`); otherwise each is quantized as it
    streams in (:meth:`materialize`).
    """

    def __init__(self, settings: BitsAndBytesConfig, pre_quantized: bool = False) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            what = "this checkpoint is stored quantized with bitsandbytes (config.json's quantization_config); it"
            raise UnsupportedFeatureError(
                f"{what if pre_quantized else 'quantization_config'} needs bitsandbytes: pip install 'lmport[bnb]'"
            )
        self.bnb: Any = importlib.import_module("bitsandbytes")
        self.settings = settings
        self.pre_quantized = pre_quantized
        self.quantized: set[str] = set()  # weight names

    def prepare(self, model: nn.Module) -> None:
        s = self.settings
        replacements = []
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not _skipped(name, s.skip_modules):
                replacements.append((name, module))
        for name, module in replacements:
            with torch.device("meta"):
                if s.load_in_4bit:
                    new = self.bnb.nn.Linear4bit(
                        module.in_features,
                        module.out_features,
                        bias=module.bias is not None,
                        compute_dtype=s.bnb_4bit_compute_dtype,
                        compress_statistics=s.bnb_4bit_use_double_quant,
                        quant_type=s.bnb_4bit_quant_type,
                        quant_storage=s.bnb_4bit_quant_storage,
                    )
                else:
                    new = self.bnb.nn.Linear8bitLt(
                        module.in_features,
                        module.out_features,
                        bias=module.bias is not None,
                        has_fp16_weights=s.llm_int8_has_fp16_weight,
                        threshold=s.llm_int8_threshold,
                    )
            new.requires_grad_(False)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            self.quantized.add(f"{name}.weight")

    def claims(self, module_name: str) -> bool:
        return module_name in self.quantized

    def materialize(self, model: nn.Module, module_name: str, tensor: torch.Tensor, device: torch.device) -> None:
        s = self.settings
        if self.pre_quantized:  # the loader routes stored weights to materialize_stored
            raise UnsupportedQuantizationError(f"{module_name}: a stored quantized weight cannot be quantized again")
        owner_name, _, attr = module_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if s.load_in_4bit:
            param = self.bnb.nn.Params4bit(
                tensor,
                requires_grad=False,
                quant_type=s.bnb_4bit_quant_type,
                compress_statistics=s.bnb_4bit_use_double_quant,
                quant_storage=s.bnb_4bit_quant_storage,
                module=owner,
            )
        else:
            param = self.bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=s.llm_int8_has_fp16_weight)
        owner._parameters[attr] = param.to(device)  # moving to the device quantizes

    # --- pre-quantized checkpoints ------------------------------------------------------------

    def stored_part(self, checkpoint_name: str) -> tuple[str, str] | None:
        if self.settings.load_in_4bit:
            for key in STORED_4BIT:
                if checkpoint_name.endswith(".weight." + key):
                    return checkpoint_name[: -len(key) - 1], key
        else:
            for key in STORED_8BIT:
                if checkpoint_name.endswith("." + key):
                    return checkpoint_name[: -len(key)] + "weight", key
        if checkpoint_name.endswith(".weight"):
            return checkpoint_name, "weight"
        return None

    def materialize_stored(
        self,
        model: nn.Module,
        module_names: list[str],
        parts: dict[str, torch.Tensor],
        device: torch.device,
        where: str,
    ) -> None:
        owners = []
        for name in module_names:
            owner_name, _, attr = name.rpartition(".")
            owners.append(model.get_submodule(owner_name))
            if attr != "weight" or name not in self.quantized:
                raise UnsupportedQuantizationError(f"{where}: {name!r} is not a quantized layer's weight")
        data = parts.get("weight")
        expected = STORED_4BIT if self.settings.load_in_4bit else STORED_8BIT
        if data is None:
            raise CorruptWeightsError(
                f"{where}: the stored quantized weight itself is missing (only {sorted(parts)} are in the checkpoint)"
            )
        if len(parts) == 1:
            raise CorruptWeightsError(
                f"{where}: stored as a plain {data.dtype} tensor without quantization statistics "
                f"({', '.join(expected)}), although config.json's quantization_config says the checkpoint is "
                f"quantized with bitsandbytes {'4' if self.settings.load_in_4bit else '8'}-bit. Fix "
                "quantization_config (llm_int8_skip_modules) or re-save the checkpoint."
            )
        rows = [owner.out_features for owner in owners]
        columns = {owner.in_features for owner in owners}
        if len(columns) != 1:
            raise UnsupportedQuantizationError(
                f"{where}: fused into {module_names} of different input widths; only fusion along output rows loads"
            )
        shape = (sum(rows), columns.pop())
        if self.settings.load_in_4bit:
            self._load_4bit(owners, module_names, rows, shape, parts, device, where)
        else:
            self._load_8bit(owners, module_names, rows, shape, parts, device, where)

    def _load_4bit(
        self,
        owners: list[nn.Module],
        names: list[str],
        rows: list[int],
        shape: tuple[int, int],
        parts: dict[str, torch.Tensor],
        device: torch.device,
        where: str,
    ) -> None:
        functional = self.bnb.functional
        data = parts["weight"]
        stats = {k: v for k, v in parts.items() if k != "weight"}
        try:
            state = functional.QuantState.from_dict(qs_dict=dict(stats), device=device)
        except Exception as exc:  # noqa: BLE001 - foreign data: any failure is a corrupt checkpoint
            raise CorruptWeightsError(
                f"{where}: the stored 4-bit quantization state ({', '.join(sorted(stats))}) is incomplete or invalid: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _check_4bit_state(state, data, shape, where, self.settings)
        if len(owners) == 1:
            # Exactly what transformers does (Bnb4bitDeserialize).
            param = self.bnb.nn.Params4bit.from_prequantized(
                data=data, quantized_stats=dict(stats), requires_grad=False, device=device, module=owners[0]
            )
            owners[0]._parameters["weight"] = param
            return
        # Fused in the checkpoint (GPT-2's c_attn): split the packed codes and the block scales
        # by output rows. Each part's scales are the fused tensor's, exactly as bitsandbytes
        # computes them when it dequantizes (double quantization undone once, here), so every
        # part's dequantized weight equals its rows of the fused one.
        columns = shape[1]
        absmax = state.absmax
        if state.nested:
            absmax = functional.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        absmax = absmax.float()
        packed = data.contiguous().view(-1).view(torch.uint8)
        start = 0
        for owner, count in zip(owners, rows):
            begin, end = start * columns, (start + count) * columns
            if begin % state.blocksize or begin % (2 * data.element_size()) or end % (2 * data.element_size()):
                raise UnsupportedQuantizationError(
                    f"{where}: the fused 4-bit weight cannot be split exactly into {names}: a part starts inside a "
                    f"{state.blocksize}-value quantization block (or a packed storage element). Load the "
                    "unquantized checkpoint and quantize on load instead."
                )
            part_state = functional.QuantState(
                absmax=absmax[begin // state.blocksize : math.ceil(end / state.blocksize)].clone(),
                shape=torch.Size((count, columns)),
                code=state.code,
                blocksize=state.blocksize,
                quant_type=state.quant_type,
                dtype=state.dtype,
            )
            codes = packed[begin // 2 : end // 2].clone().view(data.dtype).reshape(-1, 1).to(device)
            owner._parameters["weight"] = self.bnb.nn.Params4bit(
                codes,
                requires_grad=False,
                quant_state=part_state,
                blocksize=state.blocksize,
                compress_statistics=False,
                quant_type=state.quant_type,
                quant_storage=data.dtype,
                module=owner,
                bnb_quantized=True,
            )
            owner.quant_state = part_state
            start += count

    def _load_8bit(
        self,
        owners: list[nn.Module],
        names: list[str],
        rows: list[int],
        shape: tuple[int, int],
        parts: dict[str, torch.Tensor],
        device: torch.device,
        where: str,
    ) -> None:
        data, scales, layout = parts["weight"], parts.get("SCB"), parts.get("weight_format")
        if data.dtype != torch.int8 or tuple(data.shape) != shape:
            raise CorruptWeightsError(
                f"{where}: a stored 8-bit weight must be int8 of shape {shape} for {names}, got {data.dtype} "
                f"{tuple(data.shape)}"
            )
        if scales is None or not scales.is_floating_point() or tuple(scales.shape) != (shape[0],):
            got = "missing" if scales is None else f"{scales.dtype} {tuple(scales.shape)}"
            raise CorruptWeightsError(f"{where}: the row scales 'SCB' must be floating, shape ({shape[0]},); got {got}")
        if layout is not None and (layout.numel() != 1 or int(layout.reshape(-1)[0]) != 0):
            raise UnsupportedQuantizationError(
                f"{where}: weight_format {layout.tolist()} is not row-major (0), the only layout bitsandbytes loads"
            )
        start = 0
        for owner, count in zip(owners, rows):
            codes, row_scales = data[start : start + count], scales[start : start + count]
            if len(owners) > 1:  # own storage, not a slice of the fused tensor
                codes, row_scales = codes.clone(), row_scales.clone()
            # Exactly what transformers does (Bnb8bitDeserialize).
            owner._parameters["weight"] = self.bnb.nn.Int8Params(
                codes, requires_grad=False, has_fp16_weights=self.settings.llm_int8_has_fp16_weight, SCB=row_scales
            ).to(device)
            start += count

    def finalize(self, model: nn.Module) -> QuantizationState:
        # pre-quantized: model.config keeps config.json's own quantization_config too
        return QuantizationState(
            method=BitsAndBytesConfig.quant_method,
            settings=self.settings,
            bits=4 if self.settings.load_in_4bit else 8,
            pre_quantized=self.pre_quantized,
        )


def _check_4bit_state(
    state: Any, data: torch.Tensor, shape: tuple[int, int], where: str, settings: BitsAndBytesConfig
) -> None:
    """Refuse a stored 4-bit state that does not describe ``data`` as a ``shape`` weight."""

    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if tuple(state.shape or ()) != shape:
        raise ShapeMismatchError(
            f"{where}: the stored 4-bit weight has shape {tuple(state.shape or ())}, but the layer needs {shape}. "
            "Fix config.json or use the checkpoint it was saved with."
        )
    problems = []
    if state.quant_type not in ("nf4", "fp4"):
        problems.append(f"quant_type {state.quant_type!r} is not 'nf4' or 'fp4'")
    if not isinstance(state.dtype, torch.dtype) or not state.dtype.is_floating_point:
        problems.append(f"dtype {state.dtype!r} is not a floating dtype")
    if not positive(state.blocksize):
        problems.append(f"blocksize {state.blocksize!r} is not a positive integer")
    elif state.absmax.dim() != 1 or state.absmax.numel() != math.ceil(shape[0] * shape[1] / state.blocksize):
        problems.append(f"absmax has {state.absmax.numel()} values for {shape} in blocks of {state.blocksize}")
    if data.numel() * data.element_size() * 2 != shape[0] * shape[1]:
        problems.append(f"the packed data holds {data.numel() * data.element_size() * 2} codes for {shape}")
    if data.dtype != settings.bnb_4bit_quant_storage:
        storage = settings.bnb_4bit_quant_storage
        problems.append(f"the packed data is {data.dtype}, but bnb_4bit_quant_storage is {storage}")
    if state.code.numel() != 16 or not state.code.is_floating_point():
        problems.append(f"quant_map has {state.code.numel()} values, not 16 floats")
    if state.nested:
        nested = state.state2
        blocks = math.ceil(state.absmax.numel() / nested.blocksize) if positive(nested.blocksize) else -1
        if nested.absmax.numel() != blocks:
            problems.append("nested_absmax does not fit absmax")
        if nested.code.numel() != 256 or not nested.code.is_floating_point():
            problems.append(f"nested_quant_map has {nested.code.numel()} values, not 256 floats")
        if not isinstance(nested.dtype, torch.dtype) or not nested.dtype.is_floating_point:
            problems.append(f"nested_dtype {nested.dtype!r} is not a floating dtype")
    elif not state.absmax.is_floating_point():
        problems.append(f"absmax is {state.absmax.dtype} without nested statistics")
    if problems:
        raise CorruptWeightsError(f"{where}: the stored 4-bit weight is inconsistent: {'; '.join(problems)}")


@hookimpl(trylast=True)
def lmport_quantizer(
    quantization_config: Any, config: PretrainedConfig, pre_quantized: bool
) -> BitsAndBytesQuantizer | None:
    if isinstance(quantization_config, BitsAndBytesConfig):
        return BitsAndBytesQuantizer(quantization_config, pre_quantized=pre_quantized)
    return None
