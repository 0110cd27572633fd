"""How a freshly built model's parameters are filled: one documented rule per parameter kind.

:meth:`PreTrainedCausalLM.from_config <lmport.modeling.PreTrainedCausalLM.from_config>`,
``resize_token_embeddings`` (added rows without mean resizing) and ``ignore_mismatched_sizes``
ask :meth:`PreTrainedCausalLM.init_parameter`, which applies :func:`init_parameter` below.
The first rule that matches a parameter wins:

1. the module's own constant: ``module.init_values[attr]`` (a class or instance attribute,
   ``{"weight": 0.0}`` for a norm computing ``x * (1 + weight)``);
2. ``bias`` (any module): zero;
3. the weight of an ``nn.Linear`` or ``nn.Embedding`` (and their subclasses): normal(0, ``std``),
   the embedding's ``padding_idx`` row zero;
4. the parameters of a norm (see :func:`is_norm`): one;
5. anything else: normal(0, ``std``).

``std`` is ``config.initializer_range``. An architecture overrides
``PreTrainedCausalLM.init_parameter`` for rules that depend on where a module sits (GPT-2 scales
its residual projections), or sets ``init_values`` on a module class for a constant.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: Module classes whose parameters rule 4 fills with one, besides class names containing ``"Norm"``.
NORM_CLASSES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether rule 4 applies: a torch norm class, or a class whose name contains ``"Norm"`` (``RMSNorm``),
    as transformers' ``_init_weights`` decides."""
    return isinstance(module, NORM_CLASSES) or "Norm" in type(module).__name__


def init_parameter(
    module: nn.Module, attr: str, tensor: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> None:
    """Fill ``tensor`` (the parameter ``module.<attr>``) in place by the rules of this module's docstring."""
    values: Mapping[str, float] | None = getattr(module, "init_values", None)
    with torch.no_grad():
        if values is not None and attr in values:
            tensor.fill_(values[attr])
        elif attr == "bias":
            tensor.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)) or not is_norm(module):
            tensor.normal_(0.0, std, generator=generator)
            padding_idx = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and padding_idx is not None:
                tensor[padding_idx].zero_()
        else:
            tensor.fill_(1.0)
