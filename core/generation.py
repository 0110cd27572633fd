"""``generate()``: greedy and sampled decoding with the KV cache, driven by a :class:`GenerationConfig`.

Settings come from transformers' places in transformers' order of priority (keyword arguments,
then a ``generation_config`` argument, then ``model.generation_config`` — read from the
checkpoint's ``generation_config.json`` — then transformers' defaults), and the logits
processors and stopping criteria run in transformers' order with its arithmetic
(:mod:`lmport.generation_processors`), so greedy output is token-identical to transformers'
``generate`` and seeded sampling draws the same tokens. Beam search and the other decoding
strategies raise :class:`~lmport.errors.UnsupportedFeatureError`. The settings and inputs of one
call are derived in :mod:`lmport.generation_setup`; here is the decoding loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import generation_processors as gp
from . import generation_setup as setup
from .cache import KVCache
from .errors import ArgumentError
from .generation_config import GenerationConfig
from .generation_setup import NO_EFFECT, SAMPLING_ONLY, SUPPORTED, DecodingInputs, filter_logits, unsupported_settings


@dataclass
class _Decoding:
    """One ``generate`` call, ready to run: its settings, inputs, limits, processors and criteria."""

    gc: GenerationConfig
    inputs: DecodingInputs
    eos: torch.Tensor | None
    pad: int | None
    max_length: int
    processors: list[gp.Processor]
    criteria: list[Any]
    generator: torch.Generator | None
    streamer: Any
    device: torch.device

    def next_tokens(self, scores: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
        """The token each row emits, sampled or greedy from the processed ``scores``; pad for finished rows."""
        if self.gc.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if self.eos is not None:  # finished rows emit pad
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, self.pad))
        return next_tokens

    def still_running(self, unfinished: torch.Tensor, scores: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """``unfinished`` less the rows a stopping criterion ends after the token just added."""
        tokens = self.inputs.input_ids
        for criterion in self.criteria:
            unfinished = unfinished & ~torch.as_tensor(criterion(tokens, scores), device=self.device, dtype=torch.bool)
        return unfinished


class _StepRecord:
    """What ``return_dict_in_generate`` keeps of each step (a field is ``None`` when not asked for)."""

    def __init__(self, gc: GenerationConfig) -> None:
        self.return_dict = bool(gc.return_dict_in_generate)
        self.scores: tuple[torch.Tensor, ...] | None = () if self.return_dict and gc.output_scores else None
        self.logits: tuple[torch.Tensor, ...] | None = () if self.return_dict and gc.output_logits else None
        self.hidden: tuple[Any, ...] | None = () if self.return_dict and gc.output_hidden_states else None

    def add(self, scores: torch.Tensor, logits: torch.Tensor, out: Any) -> None:
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.hidden is not None:
            self.hidden += (out.hidden_states,)

    def output(self, tokens: torch.Tensor, cache: KVCache | None) -> Any:
        """The token ids, or with ``return_dict_in_generate`` the output holding them and the records."""
        if not self.return_dict:
            return tokens
        from .generation_outputs import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(
            sequences=tokens, scores=self.scores, logits=self.logits, hidden_states=self.hidden, cache=cache
        )


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
        setup.refuse_arguments(refused)
        kwargs.pop("trust_remote_code", None)  # only meaningful with custom_generate
        tokenizer = kwargs.pop("tokenizer", None)
        generator = kwargs.pop("generator", None)
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise ArgumentError("generate: pass the prompt once, as inputs or as input_ids")
        input_ids = inputs if inputs is not None else input_ids

        gc, model_kwargs, default_max_length = setup.merged_settings(self, generation_config, kwargs)
        token_type_ids = setup.token_types(self, model_kwargs)
        attention_mask, position_ids = setup.model_inputs(model_kwargs)
        setup.check_settings(gc, tokenizer)
        device = setup.input_device(self)
        eos, eos_t, pad = setup.eos_and_pad(gc, device)
        prompt = setup.prompt_inputs(gc, input_ids, attention_mask, position_ids, token_type_ids, pad, eos, device)
        if streamer is not None:
            streamer.put(prompt.input_ids.cpu())
        prompt_len = prompt.input_ids.shape[1]
        max_length, min_length = setup.length_bounds(gc, prompt_len, default_max_length, self.config)
        processors = setup.logits_processors(gc, prompt.attention_mask, eos_t, prompt_len, min_length, logits_processor)
        criteria = setup.stopping_criteria(gc, tokenizer, eos_t, stopping_criteria)
        run = _Decoding(gc, prompt, eos_t, pad, max_length, processors, criteria, generator, streamer, device)
        return self._decode(run)

    def _decode(self, run: _Decoding) -> Any:
        """The decoding loop: one forward per new token, until every row stopped or ``max_length`` is reached."""
        record = _StepRecord(run.gc)
        use_cache = bool(run.gc.use_cache)
        cache = KVCache() if use_cache else None
        inputs = run.inputs
        unfinished = torch.ones(inputs.input_ids.shape[0], dtype=torch.bool, device=run.device)
        while inputs.input_ids.shape[1] < run.max_length:
            out = self._decode_step(inputs, cache, use_cache, output_hidden_states=record.hidden is not None)
            if use_cache:  # the step may have dropped the cache and started a new one
                cache = out.past_key_values
            logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=run.device)
            next_scores = gp.apply(run.processors, inputs.input_ids, logits)
            record.add(next_scores, logits, out)
            next_tokens = run.next_tokens(next_scores, unfinished)
            inputs.append(next_tokens)
            if run.streamer is not None:
                run.streamer.put(next_tokens.cpu())
            unfinished = run.still_running(unfinished, record.scores)
            if not bool(unfinished.any()):
                break
            inputs.extend_masks()
        if run.streamer is not None:
            run.streamer.end()
        return record.output(inputs.input_ids, cache)

    def _decode_step(
        self, inputs: DecodingInputs, cache: KVCache | None, use_cache: bool, output_hidden_states: bool
    ) -> Any:
        """One forward over the tokens ``cache`` has not seen, arguments from :meth:`prepare_inputs_for_generation`."""
        # token_type_ids: only when given (as transformers passes them), each new token repeating the last type
        types = {} if inputs.token_type_ids is None else {"token_type_ids": inputs.token_type_ids}
        step = self.prepare_inputs_for_generation(
            inputs.input_ids,
            past_key_values=cache,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=use_cache,
            **types,
        )
        step.setdefault("logits_to_keep", 1)
        step.update(output_hidden_states=output_hidden_states, return_dict=True)
        return self(**step)  # type: ignore[operator]


__all__ = ["NO_EFFECT", "SAMPLING_ONLY", "SUPPORTED", "GenerationMixin", "filter_logits", "unsupported_settings"]
