"""``generate()``: greedy and sampled decoding with the KV cache, batched prompts with left padding."""

from __future__ import annotations

from typing import Any

import torch

from .cache import KVCache


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering, as transformers orders them.

    Filtered-out entries become ``-inf``; the result is ready for ``softmax``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use do_sample=False for greedy")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class GenerationMixin:
    """Adds :meth:`generate` to a causal LM whose forward takes ``past_key_values``/``use_cache``."""

    config: Any

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward arguments of one decoding step (what peft and transformers-style loops call)."""
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, seen:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", past_key_values is not None),
        }
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            inputs["position_ids"] = position_ids[:, seen:]
        return inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each prompt; returns ``(batch, prompt + new)`` token ids.

        Args:
            input_ids: ``(batch, prompt_len)`` prompts, left-padded when lengths differ.
            attention_mask: 1 for prompt tokens, 0 for padding (inferred from
                ``pad_token_id`` when it differs from every eos id).
            max_new_tokens: tokens to add (default 20); or ``max_length`` in total.
            do_sample: sample from the filtered distribution instead of taking the argmax.
            temperature, top_k, top_p: sampling filters (ignored when greedy).
            eos_token_id: stop a row once it emits one of these (default: the config's).
            pad_token_id: what finished rows emit (default: the config's, else the first eos).
            use_cache: reuse keys and values of earlier positions (else recompute).
            generator: the random generator for sampling.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if max_new_tokens is None:
            max_new_tokens = 20 if max_length is None else max_length - input_ids.shape[1]
        if max_new_tokens <= 0:
            return input_ids
        eos = _as_list(eos_token_id if eos_token_id is not None else getattr(self.config, "eos_token_id", None))
        if pad_token_id is None:
            pad_token_id = getattr(self.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
            if pad_token_id not in eos and bool((input_ids == pad_token_id).any()):
                attention_mask = (input_ids != pad_token_id).long()
        attention_mask = attention_mask.to(input_ids.device).long()
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)

        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = KVCache() if use_cache else None
        step_ids, step_pos = input_ids, position_ids
        for _ in range(max_new_tokens):
            out = self(  # type: ignore[operator]
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :].float()
            if do_sample:
                probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_tokens = logits.argmax(-1)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            if eos_t.numel():
                finished = finished | torch.isin(next_tokens, eos_t)
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens[:, None])], dim=-1)
            next_pos = position_ids[:, -1:] + 1
            position_ids = torch.cat([position_ids, next_pos], dim=-1)
            if use_cache:
                step_ids, step_pos = next_tokens[:, None], next_pos
            else:
                step_ids, step_pos = tokens, position_ids
        return tokens
