"""Builtin quantizer plugin: bitsandbytes 4-bit (fp4/nf4, double quantization) and 8-bit linear layers.

Each weight is quantized as it streams in, so peak memory stays close to the
quantized model's size. bitsandbytes is imported only when quantization is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
from torch import nn

from lmport.config import PretrainedConfig
from lmport.errors import UnsupportedFeatureError
from lmport.hookspecs import hookimpl
from lmport.quantization import BitsAndBytesConfig


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


class BitsAndBytesQuantizer:
    """Replaces ``nn.Linear`` layers (except the skipped ones) with bitsandbytes layers."""

    def __init__(self, settings: BitsAndBytesConfig) -> None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UnsupportedFeatureError("quantization_config needs bitsandbytes: pip install 'lmport[bnb]'")
        self.bnb: Any = importlib.import_module("bitsandbytes")
        self.settings = settings
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

    def finalize(self, model: nn.Module) -> None:
        model.is_quantized = True
        model.is_loaded_in_4bit = self.settings.load_in_4bit
        model.is_loaded_in_8bit = self.settings.load_in_8bit
        model.quantization_method = "bitsandbytes"
        model.quantization_config = self.settings


@hookimpl(trylast=True)
def lmport_quantizer(quantization_config: Any, config: PretrainedConfig) -> BitsAndBytesQuantizer | None:
    if isinstance(quantization_config, BitsAndBytesConfig):
        return BitsAndBytesQuantizer(quantization_config)
    return None
