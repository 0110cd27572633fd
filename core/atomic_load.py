"""Loads that a save may race: the folders a load reads are pinned, and the load runs again when a
save replaced one of them meanwhile (see :mod:`lmport.atomic`)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FolderChangedError

#: How many times :func:`load_attempts` runs a load of a folder that saves keep replacing before it gives up.
LOAD_ATTEMPTS = 5


class _Pin:
    """A folder as it was when a load began: its identity, held open so that it cannot be reused."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None
        try:
            self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            st = os.fstat(self.fd)
        except OSError:
            st = os.stat(folder)
        self.key = (st.st_dev, st.st_ino)

    def replaced(self) -> bool:
        try:
            st = os.stat(self.folder)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.key

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_WATCHED: contextvars.ContextVar[list[_Pin] | None] = contextvars.ContextVar("lmport_watched_folders", default=None)


def note_folder(folder: str | os.PathLike[str]) -> None:
    """Record that the running load (see :func:`load_attempts`) reads ``folder``."""
    pins = _WATCHED.get()
    if pins is not None:
        with contextlib.suppress(OSError):
            pins.append(_Pin(Path(folder)))


class LoadAttempt:
    """One run of a load, as a context manager: notes the folders read (:func:`note_folder`); on exit,
    :attr:`consistent` says whether none of them was replaced meanwhile. An error raised by a run that
    overlapped a save is swallowed (the run is made again); any other propagates."""

    def __init__(self) -> None:
        self.pins: list[_Pin] = []
        self.consistent = False
        self.changed: list[Path] = []
        self.error: BaseException | None = None
        self._token: contextvars.Token[list[_Pin] | None] | None = None

    def __enter__(self) -> LoadAttempt:
        self._token = _WATCHED.set(self.pins)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        try:
            self.changed = [pin.folder for pin in self.pins if pin.replaced()]
        finally:
            if self._token is not None:
                _WATCHED.reset(self._token)
            for pin in self.pins:
                pin.close()
        self.consistent = not self.changed
        self.error = exc
        return bool(self.changed) and isinstance(exc, Exception)


def load_attempts() -> Iterator[LoadAttempt]:
    """Runs of a load, until one was not raced by a save (the caller stops there)::

        for attempt in load_attempts():
            with attempt:
                model = load()
            if attempt.consistent:
                return model

    The loop body keeps the caller's frame depth (warnings' ``stacklevel`` stay right). After
    :data:`LOAD_ATTEMPTS` runs that each overlapped a save, raises
    :class:`~lmport.errors.FolderChangedError`.
    """
    attempt = LoadAttempt()
    for _ in range(LOAD_ATTEMPTS):
        attempt = LoadAttempt()
        yield attempt
    raise FolderChangedError(
        f"{attempt.changed[0] if attempt.changed else 'the checkpoint folder'}: replaced by a save "
        f"(save_pretrained) while it was being loaded, {LOAD_ATTEMPTS} times in a row; load it again once the "
        "saves have finished"
    ) from attempt.error
