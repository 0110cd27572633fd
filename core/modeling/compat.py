"""The part of transformers' ``PreTrainedModel`` interface that fine-tuning libraries call.

Trainer, TRL, peft, accelerate and ``pipeline`` call these on any model they are handed;
docs/compat.md lists each item with the library that needs it. Duck-typed: nothing
here imports transformers.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.multivariate_normal import MultivariateNormal

from ..errors import ArgumentError, UnsupportedFeatureError
from ..quantization import QuantizedModelAttributes

#: The causal-LM entries of transformers' ``LOSS_MAPPING``, searched in the class name as it does.
_LOSS_TYPE = re.compile("ForCausalLM|ForConditionalGeneration")


class TransformersCompat(QuantizedModelAttributes):
    """Mixed into :class:`~lmport.modeling.base.PreTrainedCausalLM`. Quantization attributes
    (``is_quantized``, ``is_loaded_in_4bit``, ...): :class:`~lmport.quantization.QuantizedModelAttributes`."""

    config: Any

    # --- model card and structure (TRL, peft) ------------------------------------------------

    #: Hub model-card tags; ``None`` until :meth:`add_model_tags` (TRL adds ``"trl"``, ``"sft"``).
    model_tags: list[str] | None = None

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add ``tags`` (one or a list) to :attr:`model_tags`, keeping order and skipping ones already there."""
        if isinstance(tags, str):
            tags = [tags]
        if self.model_tags is None:
            self.model_tags = []
        for tag in tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    @property
    def base_model(self) -> Any:
        """The model body without the head: the module named by ``base_model_prefix`` (``"model"``)."""
        return getattr(self, getattr(self, "base_model_prefix", "model"), self)

    # --- Trainer: loss, token counting, checkpoints ---------------------------------------------

    #: Trainer passes ``num_items_in_batch`` to forward (the loss is then summed over the
    #: accumulated batch and divided by it) and does not divide by the accumulation steps again.
    accepts_loss_kwargs: ClassVar[bool] = True
    #: Checkpoint names a save may leave out (Trainer reads it after ``load_state_dict``); none.
    _keys_to_ignore_on_save: ClassVar[frozenset[str]] = frozenset()

    @property
    def loss_type(self) -> str | None:
        """The loss family, as transformers names it from the class name: ``"ForCausalLM"`` or ``None``.

        Trainer counts ``num_items_in_batch`` over shifted labels (``labels[..., 1:]``) only when
        this is a causal-LM loss type; transformers' ``GPT2LMHeadModel`` has ``None``, so Trainer
        counts its unshifted labels, and lmport's class of the same name does the same. Settable.
        """
        if "_loss_type" in self.__dict__:
            return self.__dict__["_loss_type"]
        found = _LOSS_TYPE.search(type(self).__name__)
        return found.group(0) if found else None

    @loss_type.setter
    def loss_type(self, value: str | None) -> None:
        self.__dict__["_loss_type"] = value

    # --- utilities fine-tuning code calls (resize, footprint, hub) ---------------------------------

    #: The attribute holding the model body (transformers' ``base_model_prefix``; peft and TRL read it).
    base_model_prefix: ClassVar[str] = "model"

    @classmethod
    def can_generate(cls) -> bool:
        """Whether :meth:`generate` works: always, for a causal LM (``pipeline`` and peft ask)."""
        return True

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (tied ones once) and, with ``return_buffers``, the buffers."""
        mem = sum(p.nelement() * p.element_size() for p in self.parameters())  # type: ignore[attr-defined]
        if return_buffers:
            mem += sum(b.nelement() * b.element_size() for b in self.buffers())  # type: ignore[attr-defined]
        return mem

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Give the input embeddings (and the head) ``new_num_tokens`` rows; returns the input embedding.

        As transformers: the first ``min(old, new)`` rows are kept unchanged; added rows are
        drawn around the old rows' mean (``mean_resizing``: a multivariate normal with the
        old rows' covariance scaled by 1e-9; else normal(0, ``initializer_range``)), using the
        global torch RNG in the same order as transformers, so one seed gives both libraries
        the same rows. ``pad_to_multiple_of`` rounds the size up. A tied head stays tied; an
        untied one is resized the same way. ``config.vocab_size`` follows. Both calls with
        ``None`` return the embedding unchanged.
        """
        embeddings = self.get_input_embeddings()  # type: ignore[attr-defined]
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        if pad_to_multiple_of is not None:
            if type(pad_to_multiple_of) is not int or pad_to_multiple_of < 1:
                raise ArgumentError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            if new_num_tokens is None:
                new_num_tokens = embeddings.weight.shape[0]
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if type(new_num_tokens) is not int or new_num_tokens < 1:
            raise ArgumentError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")
        if not isinstance(embeddings, nn.Embedding):
            raise UnsupportedFeatureError(
                f"resize_token_embeddings: the input embedding is a {type(embeddings).__name__}, not an nn.Embedding"
            )
        head = self.get_output_embeddings()  # type: ignore[attr-defined]
        tied = head is not None and head.weight is embeddings.weight
        with torch.no_grad():
            if embeddings.weight.shape[0] != new_num_tokens:
                weight = embeddings.weight
                fresh = nn.Embedding(new_num_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
                self._fill_added_rows(embeddings, fresh, mean_resizing)
                embeddings.weight.data = fresh.weight.data
            embeddings.num_embeddings = new_num_tokens
            if embeddings.padding_idx is not None and embeddings.padding_idx >= new_num_tokens:
                embeddings.padding_idx = None
            if head is not None and not tied and head.weight.shape[0] != new_num_tokens:
                if not isinstance(head, nn.Linear):
                    raise UnsupportedFeatureError(
                        f"resize_token_embeddings: the output head is a {type(head).__name__}, not an nn.Linear"
                    )
                fresh_head = nn.Linear(
                    head.in_features,
                    new_num_tokens,
                    bias=head.bias is not None,
                    device=head.weight.device,
                    dtype=head.weight.dtype,
                )
                self._fill_added_rows(head, fresh_head, mean_resizing)
                head.weight.data = fresh_head.weight.data
                if head.bias is not None:
                    head.bias.data = fresh_head.bias.data
            if head is not None:
                head.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.vocab_size = new_num_tokens
        self.tie_weights()  # type: ignore[attr-defined]
        return self.get_input_embeddings()  # type: ignore[attr-defined,no-any-return]

    def _fill_added_rows(self, old: nn.Module, new: nn.Module, mean_resizing: bool) -> None:
        """Fill ``new`` (an embedding or head with more or fewer rows) from ``old`` as transformers does."""
        old_rows, new_rows = old.weight.shape[0], new.weight.shape[0]
        added = new_rows - old_rows
        if added > 0 and not mean_resizing:
            self._init_module(new)  # type: ignore[attr-defined]
        elif added > 0:
            new.weight.data[-added:] = _mean_rows(old.weight.data, added)
            if getattr(old, "bias", None) is not None:
                bias_mean = torch.mean(old.bias.data, dim=0, dtype=torch.float32)
                bias_std = torch.std(old.bias.data, dim=0).to(torch.float32)
                new.bias.data[-added:].normal_(mean=bias_mean.item(), std=1e-9 * bias_std.item())
        keep = min(old_rows, new_rows)
        new.weight.data[:keep] = old.weight.data[:keep]
        if getattr(old, "bias", None) is not None:
            new.bias.data[:keep] = old.bias.data[:keep]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | str | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> Any:
        """Save the model (weights, ``config.json``, a model card) and upload it to hub repository ``repo_id``.

        As transformers' ``push_to_hub``: the repository is created if needed, ``tags`` join
        :attr:`model_tags` on the card, the files go up in one commit (a pull request with
        ``create_pr``). Returns huggingface_hub's ``CommitInfo``. Offline (``HF_HUB_OFFLINE=1``)
        raises :class:`~lmport.errors.OfflineError`; hub failures raise other
        :class:`~lmport.errors.HubError` subclasses.
        """
        from ..hub_upload import push

        if isinstance(tags, str):
            tags = [tags]
        all_tags = list(self.model_tags or [])
        all_tags += [t for t in tags or [] if t not in all_tags]

        def save(folder: Any) -> None:
            self.save_pretrained(  # type: ignore[attr-defined]
                folder, max_shard_size=max_shard_size or "50GB", safe_serialization=safe_serialization, variant=variant
            )

        return push(
            self,
            repo_id,
            save,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=all_tags or None,
        )


def _mean_rows(old: torch.Tensor, added: int) -> torch.Tensor:
    """``added`` rows drawn from N(mean, 1e-9 * covariance) of the rows of ``old`` (the mean alone when that
    covariance is not positive definite), in ``old``'s dtype: transformers' ``mean_resizing``."""
    weight = old.to(torch.float32)
    mean = torch.mean(weight, dim=0)
    centered = weight - mean
    covariance = centered.T @ centered / old.shape[0]
    epsilon = 1e-9
    if constraints.positive_definite.check(epsilon * covariance).all():
        dist = MultivariateNormal(mean, covariance_matrix=epsilon * covariance)
        return dist.sample(sample_shape=(added,)).to(old.dtype)
    return mean[None, :].repeat(added, 1).to(old.dtype)
