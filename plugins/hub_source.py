"""Source plugin: a Hugging Face Hub repository id, fetched into (or read from) the standard HF cache.

Everything goes through huggingface_hub's own client (``HfApi.resolve_revision``,
``HfApi.model_info``, ``hf_hub_download``, ``snapshot_download``,
``try_to_load_from_cache``), so the cache is the one transformers reads and writes:
files either library downloaded are reused by the other.

A load fetches only what it needs, all at one commit:

1. the revision (branch, tag, or ``main``) is resolved to one commit hash first;
2. ``config.json`` (in ``subfolder`` if given);
3. ``generation_config.json`` when the repository has one;
4. one weight format, chosen as a local load chooses (:mod:`lmport.formats`: the registered
   formats, most preferred first, as ``use_safetensors`` and ``variant`` allow): for a format,
   its single file if the repository has one (as transformers prefers it), else its index
   file and only the shards it lists. No other format is requested.

With ``gguf_file=``, steps 2 and 4 fetch that one GGUF file instead: it holds the config and the weights.

Offline (``local_files_only=True``, or ``HF_HUB_OFFLINE=1``) the same choice is made
from the cache alone and no request is sent. Failures raise
:class:`~lmport.errors.HubError` subclasses that say what to do.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from lmport.errors import (
    ArgumentError,
    AuthenticationError,
    CorruptWeightsError,
    GatedRepoError,
    HubError,
    HubFileNotFoundError,
    LmportError,
    MissingShardError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceError,
    UnsafePathError,
    UnsupportedFeatureError,
    WeightsNotFoundError,
)
from lmport.formats import candidates, looked_for, weight_extensions
from lmport.hookspecs import hookimpl
from lmport.options import LoadOptions, SourceOptions
from lmport.shards import read_weight_map, resolve_inside

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_TRUE = {"1", "ON", "YES", "TRUE"}
#: Errors whose message already shows the name was taken as a repo id (no "not a local folder" note needed).
_NAME_IS_CLEAR = (RepoNotFoundError, RevisionNotFoundError, ArgumentError)
_LOGIN = "pass token='hf_...' to from_pretrained, or log in once with `hf auth login` (`huggingface-cli login`)"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is something this source serves: a valid hub repo id that is not a local path."""
    try:
        local = Path(name).expanduser().exists()
    except (OSError, ValueError):  # not a usable path (too long): local_source reports it
        return False
    if not name or local:
        return False  # a local folder always wins (and a local file is local_source's to report)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline_mode() -> tuple[bool, str]:
    """Whether huggingface_hub is in offline mode, read now (its constant, or the environment)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return True, f"{var}={os.environ[var]} is set"
    if getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
        return True, "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    return False, ""


@hookimpl(trylast=True)
def lmport_resolve_source(name_or_path: str, options: SourceOptions) -> Path | None:
    if not is_repo_id(name_or_path):
        return None
    return HubFetch(name_or_path, options).run()


class HubFetch:
    """One resolution of a repo id into a snapshot folder of the Hugging Face cache."""

    def __init__(self, repo_id: str, options: SourceOptions) -> None:
        import huggingface_hub
        from huggingface_hub import HfApi, constants

        from lmport import __version__

        if not hasattr(HfApi, "resolve_revision"):
            raise UnsupportedFeatureError(
                f"loading hub repositories needs huggingface_hub with HfApi.resolve_revision (2.x); "
                f"installed: {huggingface_hub.__version__}. Upgrade it: pip install -U huggingface_hub"
            )
        self.repo_id = repo_id
        self.options = options
        self.subfolder = _clean_subfolder(options.subfolder)
        offline, why = offline_mode()
        self.offline = offline or options.local_files_only
        self.offline_reason = "local_files_only=True was passed" if options.local_files_only else why
        self.cache_dir = options.cache_dir
        self.endpoint = constants.ENDPOINT
        self.cache_label = str(Path(options.cache_dir or constants.HF_HUB_CACHE).expanduser())
        self.library = {"library_name": "lmport", "library_version": __version__}
        self.api = HfApi(token=options.token, **self.library)  # endpoint read now: HF_ENDPOINT / constants.ENDPOINT
        self.revision: Any = None
        self.commit: str | None = None
        self.step = "resolving the revision"
        if self.offline and options.force_download:
            raise ArgumentError(
                f"force_download=True needs the network, but {self.offline_reason}: {repo_id!r} can only come "
                "from the cache"
            )
        if options.proxies:
            warnings.warn(
                "proxies= is ignored: huggingface_hub >= 1.0 has no per-request proxies. Set HTTPS_PROXY / "
                "HTTP_PROXY, or install a client with huggingface_hub.set_client_factory(...).",
                UserWarning,
                stacklevel=2,
            )

    # --- the steps ---------------------------------------------------------------------------

    def run(self) -> Path:
        with self.translate_errors():
            self.revision = self.api.resolve_revision(
                self.repo_id,
                revision=self.options.revision,
                cache_dir=self.cache_dir,
                local_files_only=self.offline,
                token=self.options.token,
            )
            self.commit = str(self.revision.resolved)
            listing = None if self.offline else self.list_files()
            gguf = self.options.gguf_file
            if gguf is not None:  # a GGUF file is the config and the weights: nothing else is fetched
                if not gguf or os.path.isabs(gguf) or "\\" in gguf or ".." in gguf.split("/"):
                    raise UnsafePathError(f"gguf_file={gguf!r}: must name a file inside the repository (a relative name)")
                if listing is not None and self.full(gguf) not in listing:
                    self.missing(gguf, listing)
                folder = self.download(gguf)
                for _ in Path(gguf).parts:
                    folder = folder.parent
            else:
                if listing is not None and self.full(CONFIG_NAME) not in listing:
                    self.missing(CONFIG_NAME, listing)
                config_path = self.download(CONFIG_NAME)
                folder = config_path.parent
                if self.options.config_only:
                    return folder
                index, single = self.choose_weights(listing)
                if index is not None:
                    self.fetch_shards(folder, self.download(index), listing)
                elif single is not None:
                    self.download(single)
            exists = (lambda n: self.full(n) in listing) if listing is not None else self.cached
            if exists(GENERATION_CONFIG_NAME):
                self.download(GENERATION_CONFIG_NAME)
            return folder

    def list_files(self) -> set[str] | None:
        """Every file of the repository at the resolved commit (one API call).

        ``None`` when the hub cannot be reached (network down, server error): the load then
        goes on from the cache alone, as transformers does.
        """
        from huggingface_hub import errors as hf

        self.step = "listing the repository's files"
        try:
            info = self.api.model_info(self.repo_id, revision=self.commit, token=self.options.token)
        except Exception as exc:
            server_down = isinstance(exc, hf.HfHubHTTPError) and (_status(exc) or 0) >= 500
            if not (server_down or _is_transport_error(exc) or isinstance(exc, hf.OfflineModeIsEnabled)):
                raise
            self.offline = True
            self.offline_reason = f"{self.endpoint} could not be reached ({type(exc).__name__})"
            return None
        return {s.rfilename for s in info.siblings or []}

    def download(self, name: str) -> Path:
        """``name`` (relative to ``subfolder``) at the resolved commit: from the cache, or downloaded into it."""
        from huggingface_hub import hf_hub_download

        self.step = f"fetching {self.full(name)}"
        path = hf_hub_download(
            self.repo_id,
            name,
            subfolder=self.subfolder or None,
            revision=self.revision,
            cache_dir=self.cache_dir,
            token=self.options.token,
            force_download=self.options.force_download,
            local_files_only=self.offline,
            **self.library,
        )
        return Path(path)

    def cached(self, name: str) -> bool:
        """Whether ``name`` (relative to ``subfolder``) is in the cache at the resolved commit."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, self.full(name), cache_dir=self.cache_dir, revision=self.commit)
        return isinstance(found, str)

    def choose_weights(self, listing: set[str] | None) -> tuple[str | None, str | None]:
        """(index, None) or (None, single file): the one format to fetch, as the format plugins would choose."""
        choice = LoadOptions(variant=self.options.variant, use_safetensors=self.options.use_safetensors)
        exists = (lambda n: self.full(n) in listing) if listing is not None else self.cached
        for names in candidates(choice):
            if names.single is not None and exists(names.single):  # the single file wins over an index
                return None, names.single
            if names.index is not None and exists(names.index):
                return names.index, None
        looked = looked_for(choice)
        where = self.where()
        if listing is None:
            raise OfflineError(
                f"{where}: no weights in the Hugging Face cache at {self.cache_label} (looked for "
                f"{', '.join(looked)}), and they cannot be downloaded: {self.offline_reason}. {self.offline_hint()}"
            )
        present = sorted(f for f in listing if f.endswith(weight_extensions()))
        raise WeightsNotFoundError(
            f"{where}: no weight files lmport reads (looked for {', '.join(self.full(n) for n in looked)}); the "
            f"repository has {', '.join(present) if present else 'no weight files'}"
        )

    def fetch_shards(self, folder: Path, index_path: Path, listing: set[str] | None) -> None:
        """Fetch exactly the shards ``index_path`` lists (names checked to stay inside the checkpoint)."""
        from huggingface_hub import snapshot_download

        shards = _shard_names(index_path)
        for shard in shards:
            resolve_inside(folder, shard, index_path)  # raises UnsafePathError before anything is requested
            if listing is not None and self.full(shard) not in listing:
                raise MissingShardError(
                    f"{self.where()}: {index_path.name} lists shard {shard!r}, which the repository does not have"
                )
        if self.offline:
            for shard in shards:
                self.download(shard)
            return
        todo = [s for s in shards if self.options.force_download or not self.cached(s)]
        if todo:
            self.step = f"fetching {len(todo)} shard(s) listed in {index_path.name}"
            snapshot_download(
                self.repo_id,
                revision=self.revision,
                cache_dir=self.cache_dir,
                token=self.options.token,
                force_download=self.options.force_download,
                allow_patterns=[glob.escape(self.full(s)) for s in todo],
                **self.library,
            )
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise MissingShardError(f"{self.where()}: shard(s) {', '.join(absent)} were not downloaded into {folder}")

    # --- naming and errors ---------------------------------------------------------------------

    def full(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def where(self) -> str:
        revision = self.options.revision or "main"
        at = f" at commit {self.commit}" if self.commit and self.commit != revision else ""
        sub = f", subfolder {self.subfolder!r}" if self.subfolder else ""
        return f"hub repository {self.repo_id!r} (revision {revision!r}{at}{sub})"

    def offline_hint(self) -> str:
        hint = "Load it once with network access (lmport or transformers, same cache_dir) to cache it"
        var = next((v for v in ("TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE") if v in self.offline_reason), None)
        return hint + (f", or unset {var}." if var else ".")

    def missing(self, name: str, listing: set[str]) -> NoReturn:
        shown = ", ".join(sorted(listing)[:12]) or "no files"
        raise HubFileNotFoundError(f"{self.where()} has no {self.full(name)} (it has: {shown})")

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn huggingface_hub's exceptions into lmport's typed errors with advice."""
        try:
            yield
        except LmportError:
            raise
        except Exception as exc:
            converted = self.convert(exc)
            if converted is None:
                raise
            if self.commit is None and not isinstance(converted, _NAME_IS_CLEAR):
                # before the revision resolves, the name may as well be a mistyped local path: say it is not one
                converted = type(converted)(f"{converted} ({self.repo_id!r} is not a local folder either.)")
            raise converted from exc

    def convert(self, exc: BaseException) -> LmportError | None:
        """The lmport error for a huggingface_hub exception, or ``None`` for one that is not the hub's."""
        from huggingface_hub import errors as hf

        status = _status(exc)
        if isinstance(exc, hf.GatedRepoError):
            return GatedRepoError(
                f"{self.where()} is gated and this request has no access to it ({_first_line(exc)}). Request access "
                f"at {self.endpoint}/{self.repo_id}, then {_LOGIN}."
            )
        if isinstance(exc, hf.RepositoryNotFoundError) and status != 401:
            return RepoNotFoundError(
                f"{self.repo_id!r} is not a local folder, and {self.endpoint} has no repository {self.repo_id!r} "
                f"(HTTP {status}). Check the name or the path; if the repository is private, {_LOGIN}."
            )
        if isinstance(exc, hf.RevisionNotFoundError):
            revision = self.options.revision or "main"
            return RevisionNotFoundError(
                f"revision {revision!r} does not exist in {self.repo_id!r} on {self.endpoint}: pass a branch, a tag "
                "or a commit id of that repository"
            )
        if isinstance(exc, hf.RemoteEntryNotFoundError):
            return HubFileNotFoundError(f"{self.where()}: {self.step}: the file does not exist there")
        if isinstance(exc, (hf.LocalEntryNotFoundError, hf.RevisionResolutionError, hf.OfflineModeIsEnabled)):
            if self.offline:
                return OfflineError(
                    f"{self.where()} is not in the Hugging Face cache at {self.cache_label} ({self.step}), and "
                    f"it cannot be downloaded: {self.offline_reason}. {self.offline_hint()}"
                )
            return OfflineError(
                f"{self.where()}: {self.step}: {self.endpoint} could not be reached and the files are not in the "
                f"cache at {self.cache_label}: {_first_line(exc)}"
            )
        if isinstance(exc, hf.LocalTokenNotFoundError):  # token=True without a stored login
            return AuthenticationError(f"{self.where()}: token=True, but no token is stored: {exc}. {_LOGIN}.")
        if isinstance(exc, hf.HfHubHTTPError):
            if status in (401, 403):
                return self.unauthorized(exc)
            return HubError(f"{self.where()}: {self.step}: {self.endpoint} answered {_first_line(exc)}")
        if _is_transport_error(exc):
            return HubError(
                f"{self.where()}: {self.step}: could not reach {self.endpoint}: {type(exc).__name__}: {exc}"
            )
        if isinstance(exc, ValueError):
            # huggingface_hub wraps a failed forced download in a ValueError: report the cause
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, ValueError):
                converted = self.convert(cause)
                if converted is not None:
                    return converted
            return ArgumentError(f"{self.where()}: {self.step}: {exc}")  # its argument checks (HFValidationError)
        if isinstance(exc, OSError):  # cache folder not writable, disk full, ...
            return HubError(f"{self.where()}: {self.step}: {type(exc).__name__}: {exc}")
        return None

    def unauthorized(self, exc: BaseException) -> AuthenticationError:
        status = _status(exc)
        reason = (
            "refused the token" if self.options.token not in (None, False) or status == 403 else "needs credentials"
        )
        return AuthenticationError(
            f"{self.endpoint} {reason} for {self.repo_id!r} (HTTP {status}: {_first_line(exc)}). The repository is "
            f"private or gated (or does not exist). If you have access, {_LOGIN}; for a gated repository, request "
            f"access at {self.endpoint}/{self.repo_id} first."
        )


def _clean_subfolder(subfolder: str) -> str:
    sub = (subfolder or "").strip("/")
    if sub and (os.path.isabs(subfolder) or "\\" in sub or ".." in sub.split("/")):
        raise SourceError(f"subfolder {subfolder!r} must be a relative path inside the repository")
    return sub


def _shard_names(index_path: Path) -> list[str]:
    """The distinct shard names of an index file, in first-listed order."""
    names: dict[str, None] = {}
    for shard in read_weight_map(index_path).values():
        if not isinstance(shard, str):
            raise CorruptWeightsError(f"{index_path}: shard name {shard!r} is not a string")
        names.setdefault(shard)
    return list(names)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # huggingface_hub messages start with "401 Client Error." and put the detail on the next lines
    return " ".join(lines[:2]) if len(lines[0]) < 30 and len(lines) > 1 else lines[0]


def _is_transport_error(exc: BaseException) -> bool:
    """A network failure of huggingface_hub's HTTP client (httpx2 in 2.x, httpx in 1.x, requests before)."""
    for module in ("httpx2", "httpx", "requests"):
        mod = sys.modules.get(module)
        base = getattr(mod, "TransportError", None) or getattr(mod, "RequestException", None)
        if isinstance(base, type) and isinstance(exc, base):
            return True
    return False
