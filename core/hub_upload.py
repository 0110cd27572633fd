"""``push_to_hub``: upload a saved model or config to a Hugging Face Hub repository.

Everything goes through huggingface_hub's client, as transformers' ``PushToHubMixin``
does: ``create_repo(exist_ok=True)`` first, then a model card (the repository's own
``README.md`` if it has one, else a new one) tagged with the model's tags, then one
``create_commit`` of the files. Failures raise the typed errors of the hub source
(:mod:`lmport.plugins.hub_source`), whose translation of huggingface_hub's exceptions
this module reuses; offline (``HF_HUB_OFFLINE=1``) raises :class:`~lmport.errors.OfflineError`
before any request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmport.plugins.hub_source import HubFetch, _first_line, _status, offline_mode

from .errors import ArgumentError, AuthenticationError, LmportError, OfflineError, RepoNotFoundError
from .options import SourceOptions

#: ``create_repo`` arguments that ``save_pretrained(push_to_hub=True, ...)`` passes through, as transformers does.
CREATE_REPO_ARGS = ("private", "visibility", "resource_group_id", "region")
#: Upload arguments ``save_pretrained(push_to_hub=True, ...)`` takes besides ``token``.
UPLOAD_ARGS = ("repo_id", "commit_message", "commit_description", "revision", "create_pr")

_CARD_TEXT = (
    "This model was pushed to the Hub with [lmport](https://pypi.org/project/lmport/). Its files are in the "
    "Hugging Face format: it loads with `transformers` and with `lmport`."
)


def default_commit_message(obj: object) -> str:
    """transformers' default commit message for ``obj`` ("Upload model", "Upload config", ...)."""
    name = type(obj).__name__
    for word, what in (("Model", "model"), ("Config", "config"), ("Tokenizer", "tokenizer")):
        if word in name:
            return f"Upload {what}"
    return f"Upload {name}"


def split_hub_kwargs(kwargs: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(upload, create_repo)`` arguments of ``save_pretrained``'s ``kwargs``; others raise :class:`ArgumentError`."""
    unknown = sorted(set(kwargs) - set(UPLOAD_ARGS) - set(CREATE_REPO_ARGS))
    if unknown:
        raise ArgumentError(
            f"{where} got unexpected argument(s) {unknown}; with push_to_hub=True it takes "
            f"{', '.join(UPLOAD_ARGS + CREATE_REPO_ARGS)} and token"
        )
    upload = {k: v for k, v in kwargs.items() if k in UPLOAD_ARGS}
    create = {k: v for k, v in kwargs.items() if k in CREATE_REPO_ARGS}
    return upload, create


class HubUpload:
    """One push: the repository is created (or found) on construction, files go up with :meth:`commit`.

    Args:
        repo_id: ``"namespace/name"``, or ``"name"`` for the token's own namespace.
        token: as huggingface_hub takes it (a string, ``True``/``None`` for the stored login, ``False`` for none).
        create_repo_kwargs: more ``HfApi.create_repo`` arguments (``private``, ``visibility``, ...).
    """

    def __init__(
        self, repo_id: str, *, token: str | bool | None = None, create_repo_kwargs: dict[str, Any] | None = None
    ) -> None:
        if not isinstance(repo_id, str) or not repo_id:
            raise ArgumentError(f"push_to_hub: repo_id must be a non-empty string, got {repo_id!r}")
        offline, why = offline_mode()
        if offline:
            raise OfflineError(
                f"push_to_hub to {repo_id!r} needs the network, but {why}; nothing was saved or uploaded. Unset "
                "it to upload."
            )
        self.token = token
        self.errors = _PushErrors(repo_id, token)
        with self.errors.during("creating the repository"):
            url = self.errors.api.create_repo(repo_id, token=token, exist_ok=True, **(create_repo_kwargs or {}))
        self.repo_id: str = url.repo_id
        self.errors.repo_id = self.repo_id

    def commit(
        self,
        folder: Path,
        files: list[str],
        *,
        commit_message: str,
        commit_description: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        model_card: bool = True,
    ) -> Any:
        """Upload ``files`` (names in ``folder``) in one commit, with a model card written into ``folder`` first.

        The card is the repository's ``README.md`` if it has one, else a new one; ``tags`` are
        added to it. Returns huggingface_hub's ``CommitInfo`` (``oid``, ``commit_url``, ``pr_url``).
        """
        from huggingface_hub import CommitOperationAdd

        self.errors.revision_label = revision
        wanted = set(files)
        if model_card:
            with self.errors.during("reading the repository's model card"):
                card = self._model_card(tags)
            card.save(str(folder / "README.md"))
            wanted.add("README.md")
        names = sorted(wanted)
        operations = [CommitOperationAdd(path_or_fileobj=str(folder / n), path_in_repo=n) for n in names]
        api = self.errors.api
        if revision is not None and not revision.startswith("refs/pr"):
            with self.errors.during(f"creating branch {revision!r}"):
                api.create_branch(self.repo_id, branch=revision, token=self.token, exist_ok=True)
        with self.errors.during(f"uploading {', '.join(names)}"):
            return api.create_commit(
                self.repo_id,
                operations,
                commit_message=commit_message,
                commit_description=commit_description,
                token=self.token,
                revision=revision,
                create_pr=create_pr,
            )

    def _model_card(self, tags: list[str] | None) -> Any:
        """The repository's ``README.md`` (or a new card), with ``tags`` added, as transformers does."""
        from huggingface_hub import ModelCard, ModelCardData
        from huggingface_hub.errors import EntryNotFoundError

        try:
            card = ModelCard.load(self.repo_id, token=self.token)
        except EntryNotFoundError:
            data = ModelCardData(tags=list(tags or []), library_name="transformers")
            card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {self.repo_id}\n\n{_CARD_TEXT}\n")
        if tags:
            if card.data.tags is None:
                card.data.tags = []
            for tag in tags:
                if tag not in card.data.tags:
                    card.data.tags.append(tag)
        return card


def push(
    obj: Any,
    repo_id: str,
    save: Any,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | str | None = None,
) -> Any:
    """``obj.push_to_hub(...)``: ``save(folder)`` into a temporary folder and upload all it wrote."""
    import tempfile

    if isinstance(tags, str):
        tags = [tags]
    upload = HubUpload(repo_id, token=token, create_repo_kwargs={"private": private})
    with tempfile.TemporaryDirectory(prefix="lmport-push-") as tmp:
        folder = Path(tmp)
        save(folder)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        return upload.commit(
            folder,
            files,
            commit_message=commit_message or default_commit_message(obj),
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
        )


class _PushErrors(HubFetch):
    """The hub source's translation of huggingface_hub's exceptions, worded for an upload."""

    def __init__(self, repo_id: str, token: str | bool | None) -> None:
        super().__init__(repo_id, SourceOptions(token=token))
        self.revision_label: str | None = None

    @contextmanager
    def during(self, step: str) -> Iterator[None]:
        self.step = step
        try:
            yield
        except LmportError:
            raise
        except Exception as exc:
            converted = self.convert(exc)
            if converted is None and exc.__cause__ is not None:  # huggingface_hub wraps LFS upload failures
                converted = self.convert(exc.__cause__)
            if converted is None:
                raise
            raise converted from exc

    def where(self) -> str:
        branch = f" (revision {self.revision_label!r})" if self.revision_label else ""
        return f"push_to_hub to hub repository {self.repo_id!r}{branch}"

    def convert(self, exc: BaseException) -> LmportError | None:
        from huggingface_hub import errors as hf

        if isinstance(exc, hf.RepositoryNotFoundError) and not isinstance(exc, hf.GatedRepoError):
            if _status(exc) != 401:
                return RepoNotFoundError(
                    f"{self.where()}: {self.step}: {self.endpoint} has no repository {self.repo_id!r} that this "
                    "token may write to. Check the name, and that the token has write access."
                )
        return super().convert(exc)

    def unauthorized(self, exc: BaseException) -> AuthenticationError:
        reason = "refused the token" if self.options.token not in (None, False) else "needs credentials"
        return AuthenticationError(
            f"{self.where()}: {self.step}: {self.endpoint} {reason} (HTTP {_status(exc)}: {_first_line(exc)}). "
            "Pass token='hf_...' (a token with write access) to push_to_hub / save_pretrained, or log in once "
            "with `hf auth login`."
        )

