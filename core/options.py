"""Typed option bundles that the loader hands to hook implementations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceOptions:
    """Arguments that locate a checkpoint (``resolve_source``)."""

    revision: str | None = None
    cache_dir: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    subfolder: str = ""
    force_download: bool = False
    proxies: dict[str, str] | None = None
    variant: str | None = None
    use_safetensors: bool | None = None
    #: Only ``config.json`` is needed (``AutoConfig``): a source need not fetch weights.
    config_only: bool = False
    #: A GGUF file (relative to the checkpoint) that holds the config and the weights: a source fetches it instead
    #: of ``config.json`` and another weight format.
    gguf_file: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    """Arguments that choose which weight files to read (``open_weights``)."""

    variant: str | None = None
    use_safetensors: bool | None = None
    #: A GGUF file inside the checkpoint to read weights (and config) from, for a format plugin that serves it.
    gguf_file: str | None = None
