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
import contextvars
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import FolderChangedError, SaveError


#: How many times :func:`load_attempts` runs a load of a folder that saves keep replacing before it gives up.
LOAD_ATTEMPTS = 5

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.lmport-(?P<kind>new|old)-(?P<pid>\d+)-(?P<id>[0-9a-f]{8})")
_INPLACE_STAGING = re.compile(r"\.lmport-new-\d+-[0-9a-f]{8}")
_TEMP = re.compile(r"\.(?P<base>.+?)(?:\.[0-9a-f]{8})?\.tmp")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


class _CannotSwap(Exception):
    """The target folder cannot be replaced as a whole; the save goes in place."""


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


def _dropped(name: str, owned: Callable[[str], bool]) -> bool:
    """Entries of the target a save does not carry over: its own files and leftovers of earlier saves."""
    return owned(name) or _is_temp_of(name, owned) or _INPLACE_STAGING.fullmatch(name) is not None


def _is_temp_of(name: str, owned: Callable[[str], bool]) -> bool:
    m = _TEMP.fullmatch(name)
    return m is not None and owned(m["base"])


def _carry_over(
    src: Path, dst: Path, owned: Callable[[str], bool] | None, linked: dict[str, int], rel: str = ""
) -> None:
    """Recreate ``src``'s entries in ``dst``: files as hard links (copies where links fail), folders anew."""
    for entry in os.scandir(src):
        if owned is not None and _dropped(entry.name, owned):
            continue
        target = dst / entry.name
        if os.path.lexists(target):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != os.lstat(src).st_dev:
                    raise _CannotSwap(f"{entry.path} is a mount point")
                os.mkdir(target)
                _carry_over(Path(entry.path), target, None, linked, f"{rel}{entry.name}/")
                _copy_mode(st, target)
                _fsync_dir(target)
            else:
                _link_or_copy(Path(entry.path), target, st)
            linked[rel + entry.name] = st.st_ino
        except FileNotFoundError:
            continue  # removed meanwhile


def _link_or_copy(src: Path, dst: Path, st: os.stat_result) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except FileNotFoundError:
        raise
    except (OSError, NotImplementedError) as exc:  # no hard links on this file system (or platform)
        link_error = exc
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(src, dst, follow_symlinks=False)
            _fsync_file(dst)
        else:
            raise OSError(f"a {stat.filemode(st.st_mode)[0]!r} entry, and linking failed: {link_error}")
    except OSError as exc:
        raise _CannotSwap(f"{src} can be neither linked nor copied into the new folder: {exc}") from exc


def _drain(old: Path, new: Path, owned: Callable[[str], bool] | None, linked: dict[str, int], rel: str) -> None:
    """Remove the previous folder ``old``, first moving into ``new`` what was written into it late."""
    for _ in range(1000):
        for entry in os.scandir(old):
            src, dst, key = Path(entry.path), new / entry.name, rel + entry.name
            try:
                if owned is not None and _dropped(entry.name, owned):
                    _remove(src)  # the previous save's files (unlinked: memory maps of them stay valid)
                    continue
                dst_st = _lstat(dst)
                if dst_st is None:
                    os.rename(src, dst)  # created while the new folder was put in place
                    continue
                src_st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(src_st.st_mode) and stat.S_ISDIR(dst_st.st_mode):
                    _drain(src, dst, None, linked, key + "/")
                elif (src_st.st_dev, src_st.st_ino) == (dst_st.st_dev, dst_st.st_ino):
                    os.unlink(src)
                elif linked.get(key) == dst_st.st_ino != src_st.st_ino and not stat.S_ISDIR(src_st.st_mode):
                    os.replace(src, dst)  # replaced in the old folder after it was linked: the newer one
                else:
                    _remove(src)
            except FileNotFoundError:
                continue
        try:
            os.rmdir(old)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.ENOTEMPTY, "entries keep appearing", str(old))


def _clean_leftovers(real: Path, locked: bool) -> None:
    """Remove what killed saves of ``real`` left beside it; finish a swap killed between its two renames."""
    parent = real.parent
    groups: dict[str, dict[str, Path]] = {}
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        if m is None or m["name"] != real.name or (not locked and _alive(int(m["pid"]))):
            continue
        groups.setdefault(m["id"], {})[m["kind"]] = Path(entry.path)
    if not os.path.lexists(real):
        for group in groups.values():
            if "old" in group and "new" in group:  # the new folder was whole before the old one moved aside
                os.rename(group.pop("new"), real)
                _fsync_dir(parent)
                break
    for group in groups.values():
        for path in group.values():
            _remove(path)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder`` (``False`` where none can be had)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            got = True
        except OSError:
            got = False
        yield got
    finally:
        os.close(fd)


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step; ``False`` (nothing done) where the system cannot."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _cwd_inside(folder: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if cwd == str(folder) or cwd.startswith(str(folder) + os.sep) else None


def _copy_mode(st: os.stat_result, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, st.st_uid, st.st_gid)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync_file(path: Path) -> None:
    if not path.is_file() or path.is_symlink():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if os.name == "nt":
            return  # folders cannot be opened (nor fsynced) there
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# --- loads that a save may race -------------------------------------------------------------------


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


__all__ = [
    "LOAD_ATTEMPTS",
    "LoadAttempt",
    "load_attempts",
    "note_folder",
    "replace_folder",
    "write_bytes",
    "write_text",
]
