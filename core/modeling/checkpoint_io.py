"""A causal LM's tensors in checkpoint layout: the tensors a checkpoint holds, ``load_state_dict`` of
checkpoint names and layouts, and ``save_pretrained``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch


class CheckpointIOMixin:
    """Mixed into :class:`~lmport.modeling.PreTrainedCausalLM` ahead of ``nn.Module``, whose
    ``_load_from_state_dict`` it extends."""

    config: Any
    tied_weights: ClassVar[dict[str, str]]

    def named_checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Module tensors that belong in a checkpoint (persistent, untied)."""
        tied = self.tied_parameter_names()
        for name, tensor in self.state_dict().items():
            if name not in tied:
                yield name, tensor

    # --- state dicts in checkpoint layout ---------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Let ``load_state_dict`` take checkpoint names and layouts as well as module names.

        Trainer resumes (and loads its best model) by ``load_state_dict`` of the safetensors
        file in a checkpoint, which :meth:`save_pretrained` wrote in the Hugging Face layout.
        Each name that is not one of this module's state keys goes through the weight map
        (renamed, split, transposed); names it cannot place stay as they are and are reported
        as unexpected, and a tied parameter is taken from the tensor it is tied to.
        """
        self._to_module_layout(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _to_module_layout(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rewrite, in place, the checkpoint-named entries of ``state_dict`` under ``prefix`` as module tensors."""
        own = self.state_dict(keep_vars=True).keys()
        foreign = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in own]
        if foreign:
            from ..hooks import weight_map_for

            weight_map = weight_map_for(self.config, type(self))
            for key in foreign:
                name = key[len(prefix) :]
                if weight_map.ignored(name):  # dropped as from_pretrained drops it
                    del state_dict[key]
                    continue
                parts = weight_map.to_module(name, state_dict[key])
                if all(part in own for part, _ in parts):
                    del state_dict[key]
                    state_dict.update((prefix + part, tensor) for part, tensor in parts)
        for target in self.tied_parameter_names():
            source = prefix + self.tied_weights[target]
            if prefix + target not in state_dict and source in state_dict:
                state_dict[prefix + target] = state_dict[source]

    # --- saving -----------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        token: str | bool | None = None,
        save_peft_format: bool = True,
        save_original_format: bool = True,
        distributed_checkpoint: bool = False,
        *,
        safe_serialization: bool = True,
        save_function: Any = None,
        **kwargs: Any,
    ) -> Path:
        """Write ``config.json`` and weights in the Hugging Face layout; returns the folder.

        Takes transformers' arguments. Weights go through the weight map backwards, so
        transformers (and lmport) load the folder. Shards are ``model-0000i-of-0000n.safetensors``
        with an index when the weights exceed ``max_shard_size``; ``safe_serialization=False``
        writes ``pytorch_model.bin`` with ``save_function`` (``torch.save`` by default).
        ``push_to_hub=True`` then uploads what the save wrote (and a model card) to ``repo_id``
        (default: the folder's name), with ``commit_message``, ``commit_description``,
        ``revision``, ``create_pr``, ``token`` and ``create_repo``'s ``private``, ``visibility``,
        ``resource_group_id``, ``region`` from ``kwargs``. ``save_peft_format`` has no effect
        (peft saves its own adapters). Other arguments raise :class:`~lmport.errors.ArgumentError`.
        """
        from ..saving import save_model

        return save_model(
            self,
            Path(save_directory),
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            max_shard_size=max_shard_size,
            variant=variant,
            token=token,
            safe_serialization=safe_serialization,
            save_function=save_function,
            save_peft_format=save_peft_format,
            save_original_format=save_original_format,
            distributed_checkpoint=distributed_checkpoint,
            **kwargs,
        )
