"""Crash-safe, reader-atomic writes: one file, or a whole checkpoint folder swapped in at once.

:func:`replace_folder` writes a save into a fresh hidden folder beside the target
(``.NAME.lmport-new-PID-ID``, on the same file system), fsyncs its files and the folder,
hard-links into it every entry of the target the save does not own (a tokenizer,
``training_args.bin``, a README, ``checkpoint-*`` folders, ...), and swaps the two folders
with one ``renameat2(RENAME_EXCHANGE)`` (Linux), or, where that is unavailable, with two
renames (the target aside, the new folder in). A reader sees the old folder or the new one,
never a mix; a process killed at any moment leaves the old checkpoint or the new one whole
(killed between the two fallback renames, the target is missing until the next save of it
puts the new folder in place). Replaced files are unlinked, never overwritten, so a model
memory-mapped from them keeps its values. Entries another process creates in the old folder
while the swap happens are moved into the new one.

Leftovers of a killed save are hidden: folders ``.NAME.lmport-{new,old}-*`` beside the
target and ``.FILE.XXXXXXXX.tmp`` files in it. Nothing loads them; the next save of that
folder removes them. Saves in one parent folder are serialised with ``flock`` on it.

Where the folder cannot be swapped (a mount point, a parent that is not writable, an entry
that can be neither linked nor copied), the save is written in place with a warning, with
``config.json`` removed first and written last: killed midway, the folder holds the old
checkpoint, the new one, or no ``config.json`` (a typed error on load).

Loads run in :func:`load_attempts`, which notes the folders read (:func:`note_folder`)
and loads again when a save replaced one of them meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path

from .atomic_fs import (
    _INPLACE_STAGING,
    _CannotSwap,
    _carry_over,
    _clean_leftovers,
    _copy_mode,
    _cwd_inside,
    _drain,
    _exchange,
    _fsync_dir,
    _fsync_file,
    _is_temp_of,
    _locked,
    _remove,
)
from .atomic_load import LOAD_ATTEMPTS, LoadAttempt, load_attempts, note_folder
from .errors import SaveError


# --- single files -------------------------------------------------------------------------------


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data``, durably; a reader sees the old file or the new one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


# --- whole folders --------------------------------------------------------------------------------


def replace_folder(
    target: str | os.PathLike[str],
    write: Callable[[Path], object],
    owned: Callable[[str], bool],
    *,
    marker: str = "config.json",
) -> list[str]:
    """Make ``target`` hold what ``write(folder)`` writes into an empty folder, in one atomic step.

    Args:
        target: the checkpoint folder (created with its parents if absent; a link to a folder
            is followed).
        write: writes the new files (flat, no subfolders) into the folder it is given.
        owned: names of ``target``'s top-level entries the save replaces or removes (weight
            files, indexes, configs); every other entry is kept.
        marker: the file written last (and removed first) when the folder is saved in place.

    Returns:
        The names ``write`` wrote, sorted.

    Raises:
        SaveError: the folder could not be written; ``target`` is left as it was.
    """
    real = Path(os.path.realpath(target))
    parent = real.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"save_pretrained: cannot create {parent}: {exc}") from exc
    with _locked(parent) as locked:
        _clean_leftovers(real, locked)
        try:
            return _swap_in(real, write, owned)
        except _CannotSwap as why:
            warnings.warn(
                f"save_pretrained: {target} cannot be replaced as a whole ({why}); saving into it in place. "
                f"Until the save ends the folder has no {marker} (loads fail with an error), and a save killed "
                "midway leaves it so.",
                UserWarning,
                stacklevel=4,
            )
            return _write_in_place(real, write, owned, marker)


def _swap_in(real: Path, write: Callable[[Path], object], owned: Callable[[str], bool]) -> list[str]:
    parent = real.parent
    if real == parent or os.path.ismount(real):
        raise _CannotSwap(f"{real} is a mount point")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = parent / f".{real.name}.lmport-new-{tag}"
    try:
        os.mkdir(staging)
    except OSError as exc:
        raise _CannotSwap(f"no folder can be created beside it in {parent}: {exc.strerror}") from exc
    linked: dict[str, int] = {}
    keep_staging = False
    try:
        names = _write_staged(staging, write)
        existed = real.is_dir()
        if existed:
            _carry_over(real, staging, owned, linked)
            _copy_mode(real.stat(), staging)
        _fsync_dir(staging)
        cwd = _cwd_inside(real)
        if not existed:
            try:
                os.rename(staging, real)  # replaces an empty folder made meanwhile, too
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                _carry_over(real, staging, owned, linked)  # it appeared, not empty, while the save was written
                _fsync_dir(staging)
            else:
                _fsync_dir(parent)
                return names
        if _exchange(staging, real):
            old = staging  # the name now holds the previous folder
        else:
            old = parent / f".{real.name}.lmport-old-{tag}"
            try:
                os.rename(real, old)
            except OSError as exc:
                raise _CannotSwap(f"it cannot be renamed: {exc.strerror}") from exc
            try:
                os.rename(staging, real)
            except OSError as exc:
                try:
                    os.rename(old, real)
                except OSError:
                    keep_staging = True
                    raise SaveError(
                        f"save_pretrained: {real} could not be replaced and is missing: the previous version is "
                        f"{old}, the new one {staging}; the next save of {real} puts the new one in place ({exc})"
                    ) from exc
                raise
    except BaseException as exc:
        if not keep_staging:
            _remove(staging)
        if isinstance(exc, OSError) and not isinstance(exc, SaveError):
            raise SaveError(f"save_pretrained: writing {real} failed, the folder is unchanged: {exc}") from exc
        raise
    try:
        _fsync_dir(parent)
    except OSError as exc:
        raise SaveError(f"save_pretrained: {real} is replaced, but the change could not be flushed: {exc}") from exc
    if cwd is not None:
        with contextlib.suppress(OSError):
            os.chdir(cwd)  # the process was inside the replaced folder: enter the new one
    try:
        _drain(old, real, owned, linked, "")
    except OSError as exc:
        warnings.warn(
            f"save_pretrained: {real} is saved, but its previous version could not be removed ({exc}); "
            f"{old} is removed by the next save",
            UserWarning,
            stacklevel=5,
        )
    return names


def _write_in_place(
    real: Path, write: Callable[[Path], object], owned: Callable[[str], bool], marker: str
) -> list[str]:
    try:
        real.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(real):
            if _INPLACE_STAGING.fullmatch(entry.name) or _is_temp_of(entry.name, owned):
                _remove(Path(entry.path))
        inner = real / f".lmport-new-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(inner)
        try:
            names = _write_staged(inner, write)
        except BaseException:
            _remove(inner)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(real / marker)  # from here until the end the folder loads as nothing
        _fsync_dir(real)
        for entry in os.scandir(real):
            if owned(entry.name) and entry.name not in names:
                _remove(Path(entry.path))
        for name in sorted(names, key=lambda n: n == marker):
            os.replace(inner / name, real / name)
        _fsync_dir(real)
        os.rmdir(inner)
    except OSError as exc:
        raise SaveError(f"save_pretrained: writing into {real} failed: {exc}") from exc
    return names


def _write_staged(folder: Path, write: Callable[[Path], object]) -> list[str]:
    write(folder)
    names = sorted(entry.name for entry in os.scandir(folder))
    for name in names:
        _fsync_file(folder / name)
    return names


__all__ = [
    "LOAD_ATTEMPTS",
    "LoadAttempt",
    "load_attempts",
    "note_folder",
    "replace_folder",
    "write_bytes",
    "write_text",
]
