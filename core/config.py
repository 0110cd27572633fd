"""Typed model configs: the base dataclass that every architecture's config extends."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from .errors import ArgumentError, ConfigError

C = TypeVar("C", bound="PretrainedConfig")

CONFIG_NAME = "config.json"


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read and decode ``folder/config.json``, raising :class:`ConfigError` naming the file."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no {CONFIG_NAME} in checkpoint folder {folder}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a decoded JSON value fits a type hint (ints fit floats, bools fit nothing else)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


@dataclasses.dataclass
class PretrainedConfig:
    """Fields every causal LM shares; subclasses add their own as dataclass fields.

    Keys of ``config.json`` that are not fields are kept in :attr:`extra` and
    written back by :meth:`to_dict`, so a load/save round trip loses nothing.
    """

    model_type: ClassVar[str] = ""
    #: The Hugging Face class name written to ``architectures`` on save.
    hf_architecture: ClassVar[str] = ""
    #: Field name → the key ``config.json`` uses for it, where they differ (GPT-2's ``n_embd``).
    json_names: ClassVar[dict[str, str]] = {}

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    dtype: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any], source: str = CONFIG_NAME) -> C:
        """Build a config from a decoded ``config.json``; wrong types raise :class:`ConfigError`."""
        raw = dict(raw)
        raw = cls._upgrade_legacy(raw)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        for key, value in raw.items():
            if key in names:
                if not _matches(value, hints[key]):
                    raise ConfigError(
                        f"{source}: key {key!r} must be {_type_name(hints[key])}, "
                        f"got {type(value).__name__} {value!r}"
                    )
                kwargs[key] = value
            elif key != "model_type":
                extra[key] = value
        try:
            config = cls(**kwargs, extra=extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return config

    @classmethod
    def from_pretrained(cls: type[C], name_or_path: str | os.PathLike[str], **kwargs: Any) -> C:
        """A checkpoint's config, as transformers' config classes offer it (peft calls this).

        Takes the arguments of :meth:`lmport.AutoConfig.from_pretrained`; the checkpoint's
        ``model_type`` must be this class's (any type on the base class).
        """
        from .auto import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if not isinstance(config, cls):
            raise ConfigError(
                f"{name_or_path}: its config is a {type(config).__name__} ({config.model_type!r}), not a {cls.__name__}"
            )
        return config

    @classmethod
    def _upgrade_legacy(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Rewrite older spellings of fields into current ones (subclasses extend)."""
        if "dtype" not in raw and "torch_dtype" in raw:
            raw["dtype"] = raw.pop("torch_dtype")
        for name, key in cls.json_names.items():
            if key in raw:
                raw[name] = raw.pop(key)
        return raw

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check cross-field constraints; raise ``ValueError`` with a readable message."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # --- access --------------------------------------------------------------------

    def update(self, overrides: dict[str, Any]) -> None:
        """Set fields from keyword overrides (``from_pretrained(..., hidden_act=...)``).

        Raises:
            ArgumentError: an override names no field, has the wrong type, or leaves the
                config inconsistent (the overrides are arguments, not ``config.json``).
        """
        hints = typing.get_type_hints(type(self))
        for key, value in overrides.items():
            if not self.has_field(key):
                raise ArgumentError(f"{type(self).__name__} has no field {key!r}")
            if not _matches(value, hints[key]):
                raise ArgumentError(f"override {key}={value!r} must be {_type_name(hints[key])}")
            setattr(self, key, value)
        try:
            self.validate()
        except ValueError as exc:
            raise ArgumentError(f"after overrides {sorted(overrides)}: {exc}") from exc

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The config of the text model: this config itself, as transformers returns for text-only models.

        ``decoder``/``encoder`` select a side of composite (multimodal, encoder-decoder)
        configs in transformers; a causal LM has one side, so both give this config.
        """
        return self

    @classmethod
    def has_field(cls, name: str) -> bool:
        """Whether ``name`` is a settable field of this config."""
        return name != "extra" and name in {f.name for f in dataclasses.fields(cls)}

    def __getattr__(self, name: str) -> Any:
        # Keys carried over from config.json read as attributes, as in transformers.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        for field_name, key in type(self).json_names.items():
            if key == name:
                return getattr(self, field_name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # --- serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config in the Hugging Face ``config.json`` form."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        for name, key in self.json_names.items():
            out[key] = out.pop(name)
        out["model_type"] = self.model_type
        if self.hf_architecture:
            out["architectures"] = [self.hf_architecture]
        out.pop("torch_dtype", None)  # written once, as "dtype" (transformers 5 reads both)
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):  # a torch.dtype set by user code
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write ``config.json`` into ``save_directory`` (atomically); returns its path.

        ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the folder's name), taking
        ``token`` and the hub arguments :meth:`PreTrainedCausalLM.save_pretrained` takes, as
        transformers' config does.
        """
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
        path = folder / CONFIG_NAME
        tmp = folder / f".{CONFIG_NAME}.tmp"
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, path)
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

    # --- transformers aliases ------------------------------------------------------------

    @property
    def torch_dtype(self) -> Any:
        """``dtype`` as a ``torch.dtype`` (``None`` if unset): transformers 5 keeps this alias of ``dtype``.

        Setting it (a ``torch.dtype`` or its name) sets ``dtype``; ``config.json`` holds ``dtype`` only.
        """
        if self.dtype is None:
            return None
        import torch

        value = self.dtype if not isinstance(self.dtype, str) else getattr(torch, self.dtype, None)
        if not isinstance(value, torch.dtype):
            raise ConfigError(f"{type(self).__name__}.dtype {self.dtype!r} is not a torch dtype")
        return value

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        import torch

        if value is None:
            self.dtype = None
            return
        name = str(value).removeprefix("torch.")
        if not isinstance(value, (str, torch.dtype)) or not isinstance(getattr(torch, name, None), torch.dtype):
            raise ArgumentError(f"torch_dtype must be a torch.dtype or its name, got {value!r}")
        self.dtype = name
