"""The lmport error hierarchy: every error lmport raises derives from :class:`LmportError`."""

from __future__ import annotations


class LmportError(Exception):
    """Base class of every error raised by lmport."""


# --- plugins ---------------------------------------------------------------


class PluginError(LmportError):
    """A plugin is broken, missing or ambiguous."""


class PluginImportError(PluginError):
    """An installed plugin failed to import; names its distribution and the cause."""

    def __init__(self, distribution: str, entry_point: str, cause: BaseException) -> None:
        self.distribution = distribution
        self.entry_point = entry_point
        self.cause = cause
        super().__init__(
            f"plugin {entry_point!r} from distribution {distribution!r} failed to import: "
            f"{type(cause).__name__}: {cause}. Reinstall or uninstall {distribution!r}."
        )


class UnknownModelTypeError(PluginError):
    """No installed plugin provides the checkpoint's ``model_type``."""


class PluginConflictError(PluginError):
    """Two plugins claim the same ``model_type`` and none was chosen."""


class RemoteCodeError(PluginError):
    """The checkpoint needs code from its repository, which lmport never runs."""


# --- sources and configs ---------------------------------------------------


class SourceError(LmportError):
    """The checkpoint could not be located."""


class FolderChangedError(SourceError):
    """A save replaced the checkpoint folder each time it was being loaded (see ``lmport.atomic``)."""


class ConfigError(LmportError):
    """``config.json`` is missing, unreadable or invalid."""


# --- weights -----------------------------------------------------------------


class WeightsError(LmportError):
    """The checkpoint's weights are missing, corrupt or do not fit the model."""


class WeightsNotFoundError(WeightsError):
    """The folder holds no weight file of a supported format."""


class CorruptWeightsError(WeightsError):
    """A weight file is truncated, has a lying header, or is otherwise unreadable."""


class DuplicateTensorError(CorruptWeightsError):
    """A tensor name is stored in more than one shard (which copy is meant cannot be known)."""


class WeightsChangedError(CorruptWeightsError):
    """A weight file was deleted, replaced or truncated while the load was reading it."""


class MissingShardError(WeightsError):
    """A shard named in the index file is absent."""


class UnsafePathError(WeightsError):
    """A file a load opens (weights, index, ``config.json``, ...) is a symbolic link the symlink policy refuses
    (its target is outside the checkpoint folder, or it loops), or an index names a path outside the folder."""


class UnsupportedTensorError(WeightsError):
    """A checkpoint tensor's dtype or layout cannot serve the parameter it loads into: integers or booleans where
    floats are needed, float8 with no quantizer to serve it, complex, sparse or torch-quantized tensors."""


class UnsafePickleError(WeightsError):
    """A ``.bin`` file holds pickled objects that are not plain tensors."""


class ShapeMismatchError(WeightsError):
    """A checkpoint tensor's shape differs from the model parameter it loads into."""


class ModelSizeError(ConfigError, ShapeMismatchError):
    """The config describes a model far larger than the checkpoint's tensors: refused before allocating."""


class MissingWeightsError(WeightsError):
    """Parameters of the model have no tensor in the checkpoint."""


# --- arguments and runtime ---------------------------------------------------


class ArgumentError(LmportError, TypeError):
    """An argument to ``from_pretrained`` is unknown or has an invalid value."""


class GenerationSettingError(LmportError, ValueError):
    """A ``generate`` setting has an invalid value or combination (where transformers raises ``ValueError``)."""


class UnsupportedFeatureError(LmportError):
    """A valid request this installation cannot serve (missing package, device, dtype)."""


class AttentionKernelError(UnsupportedFeatureError):
    """The requested attention kernel is unknown or cannot run here."""


class UnsupportedQuantizationError(UnsupportedFeatureError):
    """A checkpoint stored quantized (``quantization_config`` in ``config.json``) that no installed quantizer
    plugin serves, or whose stored quantized layout cannot be loaded into the model exactly."""


class OffloadError(LmportError):
    """Weights to be offloaded to disk have no usable ``offload_folder``."""


class DistributedError(LmportError):
    """A distributed load or save cannot run as asked: the process group, the device mesh, the sizes of
    ``distributed_config`` or a tensor/FSDP plan do not fit the world or the model (the message says which)."""


class SaveError(LmportError, OSError):
    """``save_pretrained`` could not write the checkpoint folder; the message says what state it is in."""


# --- the hub source (plugins/hub_source.py) -------------------------------------


class HubError(SourceError):
    """A Hugging Face Hub repository could not be resolved or downloaded."""


class RepoNotFoundError(HubError):
    """The name is neither a local folder nor a repository on the hub (HTTP 404)."""


class AuthenticationError(HubError):
    """The hub refused the request for lack of valid credentials (HTTP 401, or 403 without gating)."""


class GatedRepoError(AuthenticationError):
    """The repository is gated and this token has not been granted access."""


class RevisionNotFoundError(HubError):
    """The repository has no such branch, tag or commit."""


class HubFileNotFoundError(HubError):
    """A file the load needs is absent from the repository at the resolved commit."""


class OfflineError(HubError):
    """The hub cannot be used: files that must come from the local cache (offline, ``local_files_only``, hub
    unreachable) are not there, or an upload (``push_to_hub``) was asked for in offline mode."""
