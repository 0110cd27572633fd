"""A config as files: read through :class:`lmport.AutoConfig`, written as ``config.json``, uploaded to the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .config_json import CONFIG_NAME
from .errors import ArgumentError, ConfigError

if TYPE_CHECKING:
    from .config import PretrainedConfig

C = TypeVar("C", bound="PretrainedConfig")


class ConfigFilesMixin:
    """Mixed into :class:`~lmport.config.PretrainedConfig`: its ``from_pretrained``, ``save_pretrained``
    and ``push_to_hub``, as transformers' config classes have them."""

    if TYPE_CHECKING:
        model_type: ClassVar[str]

        def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_pretrained(cls: type[C], name_or_path: str | os.PathLike[str], **kwargs: Any) -> C:
        """A checkpoint's config, as transformers' config classes offer it (peft calls this).

        Takes the arguments of :meth:`lmport.AutoConfig.from_pretrained`; the checkpoint's
        ``model_type`` must be this class's (any type on the base class).
        """
        from .auto import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if not isinstance(config, cls) or (cls.model_type and config.model_type != cls.model_type):
            raise ConfigError(
                f"{name_or_path}: its config is a {type(config).__name__} ({config.model_type!r}), not a {cls.__name__}"
            )
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write ``config.json`` into ``save_directory`` (atomically); returns its path.

        ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the folder's name), taking
        ``token`` and the hub arguments :meth:`PreTrainedCausalLM.save_pretrained` takes, as
        transformers' config does.
        """
        from .atomic import write_text
        from .hub_upload import HubUpload, default_commit_message, split_hub_kwargs

        folder = Path(save_directory)
        upload = upload_args = None
        if push_to_hub:
            token = kwargs.pop("token", None)
            upload_args, create_args = split_hub_kwargs(kwargs, f"{type(self).__name__}.save_pretrained")
            repo_id = upload_args.pop("repo_id", None) or folder.resolve().name
            upload = HubUpload(repo_id, token=token, create_repo_kwargs=create_args)
        elif kwargs:
            raise ArgumentError(f"{type(self).__name__}.save_pretrained got unexpected argument(s) {sorted(kwargs)}")
        folder.mkdir(parents=True, exist_ok=True)
        path = write_text(folder / CONFIG_NAME, self.to_json_string())  # atomic and fsynced (lmport.atomic)
        if upload is not None and upload_args is not None:
            message = upload_args.pop("commit_message", None) or default_commit_message(self)
            upload.commit(folder, [CONFIG_NAME], commit_message=message, model_card=False, **upload_args)
        return path

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
        tags: list[str] | str | None = None,
    ) -> Any:
        """Upload ``config.json`` (and a model card) to hub repository ``repo_id``, created if needed.

        As transformers' ``push_to_hub``; returns huggingface_hub's ``CommitInfo``. Offline
        (``HF_HUB_OFFLINE=1``) raises :class:`~lmport.errors.OfflineError`; hub failures raise
        other :class:`~lmport.errors.HubError` subclasses.
        """
        from .hub_upload import push

        return push(
            self,
            repo_id,
            self.save_pretrained,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
        )
