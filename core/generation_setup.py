"""The settings and inputs of one ``generate`` call, as transformers derives them: which settings are
honoured, the prompt as tensors on the model's device, the length bounds, the logits processors and
the stopping criteria (:mod:`lmport.generation` runs the decoding loop)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import generation_processors as gp
from .errors import ArgumentError, GenerationSettingError, UnsupportedFeatureError
from .generation_config import DEFAULTS, FIELDS, GenerationConfig

logger = logging.getLogger("lmport")

#: Settings ``generate`` honours (any value transformers accepts).
SUPPORTED = frozenset(
    {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings", "do_sample",
     "num_beams", "use_cache", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
     "suppress_tokens", "begin_suppress_tokens", "renormalize_logits", "num_return_sequences", "output_scores",
     "output_logits", "output_hidden_states", "output_attentions", "return_dict_in_generate", "pad_token_id",
     "bos_token_id", "eos_token_id"}
)  # fmt: skip
#: Settings with no effect on a decoder-only greedy or sampled run (beam search, assisted decoding,
#: performance knobs): transformers ignores them too.
NO_EFFECT = frozenset(
    {"early_stopping", "length_penalty", "diversity_penalty", "low_memory", "decoder_start_token_id", "is_assistant",
     "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
     "max_matching_ngram_size", "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight",
     "speculation_type", "compile_config", "disable_compile", "prefill_chunk_size", "continuous_batching_config",
     "cache_config", "max_cache_len"}
)  # fmt: skip
#: Sampling-only settings: ignored when greedy, as transformers does.
SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"})
#: Model inputs ``generate`` accepts besides the prompt (``None`` values of any other are dropped).
_MODEL_INPUTS = ("attention_mask", "position_ids")
#: Model inputs that are accepted when ``None`` or unused: lmport computes them itself.
_DERIVED_INPUTS = ("logits_to_keep", "cache_position", "return_dict")


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering, as transformers orders them.

    Filtered-out entries become ``-inf``; the result is ready for ``softmax``.

    Raises:
        GenerationSettingError: (a ``ValueError``) temperature is not positive, or top_p not in (0, 1].
    """
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationSettingError(f"top_p must be in (0, 1], got {top_p}")
    processors: list[gp.Processor] = [gp.Temperature(temperature)]
    if top_k is not None and top_k > 0:
        processors.append(gp.TopK(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(gp.TopP(top_p))
    return gp.apply(processors, logits, logits)


def unsupported_settings(config: GenerationConfig) -> list[str]:
    """``name=value`` of each setting in ``config`` that ``generate`` cannot honour."""
    found = []
    for name in FIELDS:
        value = getattr(config, name)
        if name in NO_EFFECT or value is None or value is False or value == DEFAULTS.get(name, None):
            continue
        if name in SAMPLING_ONLY and not config.do_sample:
            continue
        if name == "num_beams" and value == 1 or name == "cache_implementation" and value == "dynamic":
            continue
        if name == "output_attentions" or name == "num_beams" or name not in SUPPORTED:
            found.append(f"{name}={value!r}")
    return found


# --- the settings -----------------------------------------------------------------------------------


def refuse_arguments(refused: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedFeatureError` naming each of ``generate``'s arguments given that lmport lacks."""
    if any(v is not None for v in refused.values()):
        raise UnsupportedFeatureError(
            f"generate: {', '.join(k for k, v in refused.items() if v is not None)} not supported by lmport"
        )


def merged_settings(
    model: Any, generation_config: Any, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any], bool]:
    """The settings of one call, the keywords that are not settings, and whether ``max_length``
    is transformers' default (then it counts new tokens)."""
    try:
        model_config = GenerationConfig.from_any(model.generation_config)
        given = GenerationConfig.from_any(generation_config)
    except TypeError as exc:
        raise ArgumentError(f"generate: {exc}") from exc
    assert model_config is not None
    default_max_length = (
        kwargs.get("max_length") is None
        and (given is None or given.max_length is None)
        and model_config.max_length is None
    )
    config = copy.deepcopy(given) if given is not None else GenerationConfig()
    config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**DEFAULTS, defaults_only=True)
    model_kwargs = config.update(**kwargs)
    return config, model_kwargs, default_max_length


def token_types(model: Any, model_kwargs: dict[str, Any]) -> Any:
    """``token_type_ids`` from the keywords that are not settings: refused for a model that embeds none."""
    token_type_ids = model_kwargs.pop("token_type_ids", None)
    if token_type_ids is not None and not getattr(getattr(model, "model", None), "embed_token_types", False):
        raise ArgumentError(  # transformers' generate refuses them too (its forward has no such parameter)
            f"generate: {type(model).__name__} does not use token_type_ids; only models with token types "
            "(GPT-2) take them"
        )
    return token_type_ids


def model_inputs(model_kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``attention_mask`` and ``position_ids`` from the keywords that are not settings; refuse the rest."""
    found = {name: model_kwargs.pop(name, None) for name in _MODEL_INPUTS}
    for name in _DERIVED_INPUTS:
        model_kwargs.pop(name, None)
    for name in ("past_key_values", "cache", "inputs_embeds"):
        if model_kwargs.get(name) is not None:
            raise UnsupportedFeatureError(f"generate: {name} is not supported by lmport")
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None)
    if unknown:
        raise ArgumentError(
            f"generate got unexpected arguments {unknown}: they are neither generation settings "
            "(GenerationConfig fields) nor model inputs"
        )
    return found["attention_mask"], found["position_ids"]


def check_settings(gc: GenerationConfig, tokenizer: Any) -> None:
    """Refuse settings lmport cannot honour and inconsistent ones, as transformers refuses them."""
    unsupported = unsupported_settings(gc)
    if unsupported:
        hint = " (beam search: use num_beams=1)" if any(u.startswith("num_beams") for u in unsupported) else ""
        raise UnsupportedFeatureError(f"generate: lmport does not support {', '.join(unsupported)}{hint}")
    num_return = int(gc.num_return_sequences or 1)
    if num_return > 1 and not gc.do_sample:
        raise GenerationSettingError(
            f"greedy decoding (do_sample=False) gives one sequence per prompt; num_return_sequences={num_return} "
            "needs do_sample=True (as in transformers)"
        )
    if gc.stop_strings is not None and tokenizer is None:
        raise GenerationSettingError("stop_strings need the model's tokenizer: pass tokenizer= to generate")
    if gc.max_new_tokens is not None and gc.max_new_tokens < 0:
        raise GenerationSettingError(f"max_new_tokens must be positive, got {gc.max_new_tokens}")


# --- the inputs -------------------------------------------------------------------------------------


def eos_and_pad(gc: GenerationConfig, device: torch.device) -> tuple[list[int], torch.Tensor | None, int | None]:
    """The eos ids (a list, and a tensor on ``device`` or ``None`` when there are none) and the pad
    id finished rows emit (the first eos id when ``pad_token_id`` is unset)."""
    eos = _as_list(gc.eos_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    return eos, eos_t, pad


@dataclass
class DecodingInputs:
    """The model inputs of every token so far, each ``(rows, length)`` on the model's device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor | None

    def append(self, next_tokens: torch.Tensor) -> None:
        """Add one generated token per row."""
        self.input_ids = torch.cat([self.input_ids, next_tokens[:, None]], dim=-1)

    def extend_masks(self) -> None:
        """Cover the token :meth:`append` added: attended, at the next position, repeating the row's last type."""
        rows = self.input_ids.shape[0]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((rows, 1))], dim=-1)
        self.position_ids = torch.cat([self.position_ids, self.position_ids[:, -1:] + 1], dim=-1)
        if self.token_type_ids is not None:
            self.token_type_ids = torch.cat([self.token_type_ids, self.token_type_ids[:, -1:]], dim=-1)


def prompt_inputs(
    gc: GenerationConfig,
    input_ids: Any,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    token_type_ids: Any,
    pad: int | None,
    eos: list[int],
    device: torch.device,
) -> DecodingInputs:
    """The prompt (``bos_token_id`` when none), its mask (inferred from ``pad`` when not given),
    positions and types on ``device``, each row repeated ``num_return_sequences`` times."""
    if input_ids is None:
        if gc.bos_token_id is None:
            raise GenerationSettingError("generate got no prompt and has no bos_token_id to start from")
        rows = attention_mask.shape[0] if attention_mask is not None else 1
        input_ids = torch.full((rows, 1), int(gc.bos_token_id), dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationSettingError(f"input_ids must be a (batch, length) tensor, got {shape}")
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
    elif input_ids.shape[0] > 1 and pad is not None and bool((attention_mask[:, -1] == 0).any()):
        logger.warning("generate: right-padding detected; decoder-only models need left padding")
    attention_mask = attention_mask.to(device).long()
    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    position_ids = position_ids.to(device)
    if token_type_ids is not None:
        if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape:
            shape = tuple(token_type_ids.shape) if isinstance(token_type_ids, torch.Tensor) else token_type_ids
            raise GenerationSettingError(
                f"token_type_ids must have the prompt's shape {tuple(input_ids.shape)}, got {shape}"
            )
        token_type_ids = token_type_ids.to(device)
    num_return = int(gc.num_return_sequences or 1)
    if num_return > 1:
        input_ids, attention_mask, position_ids = (
            t.repeat_interleave(num_return, dim=0) for t in (input_ids, attention_mask, position_ids)
        )
        if token_type_ids is not None:
            token_type_ids = token_type_ids.repeat_interleave(num_return, dim=0)
    return DecodingInputs(input_ids, attention_mask, position_ids, token_type_ids)


def length_bounds(
    gc: GenerationConfig, prompt_len: int, default_max_length: bool, model_config: Any
) -> tuple[int, int | None]:
    """``(max_length, min_length)`` in tokens, prompt included, as transformers computes them."""
    if gc.max_new_tokens is not None:
        max_length = gc.max_new_tokens + prompt_len
    elif default_max_length or gc.max_length is None:
        max_length = (gc.max_length if gc.max_length is not None else DEFAULTS["max_length"]) + prompt_len
        limit = getattr(model_config, "max_position_embeddings", None)
        max_length = min(max_length, limit) if isinstance(limit, int) else max_length
    else:
        max_length = gc.max_length
    min_length = gc.min_new_tokens + prompt_len if gc.min_new_tokens is not None else gc.min_length
    return max_length, min_length


# --- processors and criteria ------------------------------------------------------------------------


def logits_processors(
    gc: GenerationConfig,
    attention_mask: torch.Tensor,
    eos: torch.Tensor | None,
    prompt_len: int,
    min_length: int | None,
    extra: Sequence[Any] | None,
) -> list[gp.Processor]:
    """The processors transformers builds for these settings, in its order."""
    processors: list[gp.Processor] = []
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        # transformers drops an all-ones mask first, then skips each row's left padding.
        padding = None if bool(attention_mask.all()) else (attention_mask != 0).int().argmax(dim=1)
        processors.append(gp.RepetitionPenalty(gc.repetition_penalty, padding))
    if gc.no_repeat_ngram_size is not None and gc.no_repeat_ngram_size > 0:
        processors.append(gp.NoRepeatNGram(gc.no_repeat_ngram_size))
    if min_length is not None and eos is not None and min_length > 0:
        processors.append(gp.MinLength(min_length, eos))
    if gc.min_new_tokens is not None and eos is not None and gc.min_new_tokens > 0:
        processors.append(gp.MinNewTokens(prompt_len, gc.min_new_tokens, eos))
    if gc.suppress_tokens is not None:
        processors.append(gp.SuppressTokens(gc.suppress_tokens))
    if gc.begin_suppress_tokens is not None:
        processors.append(gp.SuppressTokens(gc.begin_suppress_tokens, begin_index=prompt_len))
    processors.extend(extra or [])
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            processors.append(gp.Temperature(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            processors.append(gp.TopK(gc.top_k))
        if gc.top_p is not None and gc.top_p < 1.0:
            processors.append(gp.TopP(gc.top_p))
        if gc.min_p is not None:
            processors.append(gp.MinP(gc.min_p))
    if gc.renormalize_logits:
        processors.append(lambda ids, s: s.log_softmax(dim=-1))
    return processors


def stopping_criteria(
    gc: GenerationConfig, tokenizer: Any, eos: torch.Tensor | None, extra: Sequence[Any] | None
) -> list[Any]:
    """The criteria transformers builds for these settings, in its order, then ``extra``."""
    criteria: list[Any] = []
    if gc.max_time is not None:
        criteria.append(gp.MaxTime(gc.max_time))
    if gc.stop_strings is not None:
        criteria.append(gp.StopStrings(gc.stop_strings, tokenizer))
    if eos is not None:
        criteria.append(gp.EosCriterion(eos))
    criteria.extend(extra or [])
    return criteria


def input_device(model: Any) -> torch.device:
    """Where prompts go: the input embedding's device (the first parameter's, failing that)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, StopIteration):
        device = model.device
    return torch.device("cpu") if device.type == "meta" else device
