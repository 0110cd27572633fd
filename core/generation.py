"""``generate()``: greedy and sampled decoding with the KV cache, driven by a :class:`GenerationConfig`.

Settings come from transformers' places in transformers' order of priority (keyword arguments,
then a ``generation_config`` argument, then ``model.generation_config`` — read from the
checkpoint's ``generation_config.json`` — then transformers' defaults), and the logits
processors and stopping criteria run in transformers' order with its arithmetic
(:mod:`lmport.generation_processors`), so greedy output is token-identical to transformers'
``generate`` and seeded sampling draws the same tokens. Beam search and the other decoding
strategies raise :class:`~lmport.errors.UnsupportedFeatureError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from . import generation_processors as gp
from .cache import KVCache
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


class GenerationMixin:
    """Adds :meth:`generate` and :attr:`generation_config` to a causal LM whose forward takes
    ``past_key_values``/``use_cache``."""

    config: Any

    # --- the generation config -----------------------------------------------------------------

    @property
    def generation_config(self) -> Any:
        """The model's default generation settings: read from the checkpoint's ``generation_config.json``
        at load, else derived from the config (bos/eos/pad ids) as transformers does. Assignable
        (an lmport or transformers ``GenerationConfig``); written by ``save_pretrained``."""
        config = self.__dict__.get("_generation_config")
        if config is None:
            config = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = config
        return config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        if isinstance(value, dict):
            value = GenerationConfig.from_dict(value)
        elif value is not None and not callable(getattr(value, "to_dict", None)):
            raise ArgumentError(f"generation_config must be a GenerationConfig, got {type(value).__name__}")
        self.__dict__["_generation_config"] = value

    @classmethod
    def can_generate(cls) -> bool:
        """Whether :meth:`generate` works: always, for a causal LM (pipelines and peft ask)."""
        return True

    # --- one decoding step's inputs --------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward arguments of one decoding step; :meth:`generate` calls it before every forward.

        Args:
            input_ids: ``(batch, length)``, every token so far (prompt and generated).
            past_key_values: the cache of the positions already computed (``None`` without a cache).
            attention_mask: ``(batch, length)``, 1 for tokens, 0 for (left) padding.
            position_ids: ``(batch, length)`` positions of every token; derived from ``attention_mask``
                when ``None``.
            use_cache: whether the forward returns a cache (default: whether one was given).
            token_type_ids: ``(batch, length)`` token types, for models that embed them.
            kwargs: other forward arguments, passed on unchanged (``logits_to_keep``...).

        Returns:
            The keyword arguments of ``forward``: the tokens, positions and types the cache has
            not seen yet (all of them when it is empty or ``None``), the full attention mask,
            the cache and ``use_cache``.

        An architecture overrides it to change a step, calling ``super()``; to recompute the
        whole sequence (Phi-3 when the sequence outgrows LongRoPE's short factors), it empties
        the cache first (``past_key_values.reset()``) or passes ``past_key_values=None`` on with
        ``use_cache=True`` (the forward then starts a new cache, which :meth:`generate` keeps).
        """
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, seen:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": past_key_values is not None if use_cache is None else use_cache,
        }
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, seen:]
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids[:, seen:]
        for key, value in kwargs.items():
            inputs.setdefault(key, value)
        return inputs

    # --- generate -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: Any = None,
        logits_processor: Sequence[Any] | None = None,
        stopping_criteria: Sequence[Any] | None = None,
        prefix_allowed_tokens_fn: Any = None,
        synced_gpus: bool | None = None,
        assistant_model: Any = None,
        streamer: Any = None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Continue each prompt; returns ``(batch * num_return_sequences, prompt + new)`` token ids.

        Takes transformers' arguments. Any :class:`GenerationConfig` field can be passed as a
        keyword (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``min_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
        ``num_return_sequences``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``,
        ``return_dict_in_generate``, ``output_scores``, ...); it overrides ``generation_config``,
        which overrides :attr:`generation_config` of the model.

        Args:
            inputs: ``(batch, prompt_len)`` prompts, left-padded when lengths differ (also
                ``input_ids=``); ``None`` starts from ``bos_token_id``.
            generation_config: an lmport or transformers ``GenerationConfig``.
            logits_processor: extra callables ``(input_ids, scores) -> scores`` run after the
                built-in processors and before the sampling filters.
            stopping_criteria: extra callables ``(input_ids, scores) -> (batch,) bool``.
            streamer: gets ``put(prompt ids)``, ``put(new ids)`` each step, then ``end()``
                (transformers' ``TextStreamer`` works).
            attention_mask: 1 for prompt tokens, 0 for padding (inferred from ``pad_token_id``
                when it differs from every eos id).
            token_type_ids: ``(batch, prompt_len)`` token types for models that embed them (GPT-2); each
                new token repeats its row's last type, as in transformers. Other models refuse them
                (``ArgumentError``), as transformers' ``generate`` does.
            tokenizer: the tokenizer ``stop_strings`` are matched with.
            generator: a ``torch.Generator`` for sampling (lmport's addition; default: torch's global one).

        Returns:
            The token ids, or with ``return_dict_in_generate=True`` an output with ``sequences``,
            ``scores``/``logits`` (one ``(batch, vocab)`` tensor per step, when asked), and ``cache``.

        Raises:
            UnsupportedFeatureError: beam search (``num_beams > 1``), assisted decoding and other
                settings lmport cannot honour, each named.
            ArgumentError: a keyword that is neither a generation setting nor a model input.
            GenerationSettingError: an invalid value (a ``ValueError``, as in transformers).
        """
        refused = {
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "assistant_model": assistant_model,
            "assistant_tokenizer": kwargs.pop("assistant_tokenizer", None),
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "custom_generate": custom_generate,
            "synced_gpus": synced_gpus or None,
        }
        if any(v is not None for v in refused.values()):
            raise UnsupportedFeatureError(
                f"generate: {', '.join(k for k, v in refused.items() if v is not None)} not supported by lmport"
            )
        kwargs.pop("trust_remote_code", None)  # only meaningful with custom_generate
        tokenizer = kwargs.pop("tokenizer", None)
        generator = kwargs.pop("generator", None)
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise ArgumentError("generate: pass the prompt once, as inputs or as input_ids")
        input_ids = inputs if inputs is not None else input_ids

        gc, model_kwargs, default_max_length = self._merged_generation_config(generation_config, kwargs)
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        if token_type_ids is not None and not getattr(getattr(self, "model", None), "embed_token_types", False):
            raise ArgumentError(  # transformers' generate refuses them too (its forward has no such parameter)
                f"generate: {type(self).__name__} does not use token_type_ids; only models with token types "
                "(GPT-2) take them"
            )
        attention_mask, position_ids = self._model_inputs(model_kwargs)
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

        device = _input_device(self)
        eos = _as_list(gc.eos_token_id)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
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
        if num_return > 1:
            input_ids, attention_mask, position_ids = (
                t.repeat_interleave(num_return, dim=0) for t in (input_ids, attention_mask, position_ids)
            )
            if token_type_ids is not None:
                token_type_ids = token_type_ids.repeat_interleave(num_return, dim=0)

        if streamer is not None:
            streamer.put(input_ids.cpu())
        prompt_len = input_ids.shape[1]
        if gc.max_new_tokens is not None:
            max_length = gc.max_new_tokens + prompt_len
        elif default_max_length or gc.max_length is None:
            max_length = (gc.max_length if gc.max_length is not None else DEFAULTS["max_length"]) + prompt_len
            limit = getattr(self.config, "max_position_embeddings", None)
            max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        else:
            max_length = gc.max_length
        min_length = gc.min_new_tokens + prompt_len if gc.min_new_tokens is not None else gc.min_length

        processors = self._logits_processors(gc, attention_mask, eos_t, prompt_len, min_length, logits_processor)
        criteria: list[Any] = []
        if gc.max_time is not None:
            criteria.append(gp.MaxTime(gc.max_time))
        if gc.stop_strings is not None:
            criteria.append(gp.StopStrings(gc.stop_strings, tokenizer))
        if eos_t is not None:
            criteria.append(gp.EosCriterion(eos_t))
        criteria.extend(stopping_criteria or [])

        return_dict = bool(gc.return_dict_in_generate)
        scores: tuple[torch.Tensor, ...] | None = () if return_dict and gc.output_scores else None
        raw_logits: tuple[torch.Tensor, ...] | None = () if return_dict and gc.output_logits else None
        hidden: tuple[Any, ...] | None = () if return_dict and gc.output_hidden_states else None
        use_cache = bool(gc.use_cache)
        cache = KVCache() if use_cache else None
        tokens = input_ids
        unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=device)
        while tokens.shape[1] < max_length:
            # token_type_ids: only when given (as transformers passes them), each new token repeating the last type
            types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            step = self.prepare_inputs_for_generation(
                tokens,
                past_key_values=cache,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **types,
            )
            step.setdefault("logits_to_keep", 1)
            step.update(output_hidden_states=hidden is not None, return_dict=True)
            out = self(**step)  # type: ignore[operator]
            if use_cache:  # the step may have dropped the cache and started a new one
                cache = out.past_key_values
            logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=device)
            next_scores = gp.apply(processors, tokens, logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (logits,)
            if hidden is not None:
                hidden += (out.hidden_states,)
            if gc.do_sample:
                probs = torch.nn.functional.softmax(next_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if eos_t is not None:  # finished rows emit pad
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            for criterion in criteria:
                unfinished = unfinished & ~torch.as_tensor(criterion(tokens, scores), device=device, dtype=torch.bool)
            if not bool(unfinished.any()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((tokens.shape[0], 1))], dim=-1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=-1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids, token_type_ids[:, -1:]], dim=-1)
        if streamer is not None:
            streamer.end()
        if not return_dict:
            return tokens
        from .generation_outputs import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(
            sequences=tokens, scores=scores, logits=raw_logits, hidden_states=hidden, cache=cache
        )

    def _merged_generation_config(
        self, generation_config: Any, kwargs: dict[str, Any]
    ) -> tuple[GenerationConfig, dict[str, Any], bool]:
        """The settings of one call, the keywords that are not settings, and whether ``max_length``
        is transformers' default (then it counts new tokens)."""
        try:
            model_config = GenerationConfig.from_any(self.generation_config)
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

    def _model_inputs(self, model_kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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

    @staticmethod
    def _logits_processors(
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


def _input_device(model: Any) -> torch.device:
    """Where prompts go: the input embedding's device (the first parameter's, failing that)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, StopIteration):
        device = model.device
    return torch.device("cpu") if device.type == "meta" else device
