"""The file-system steps of :func:`lmport.atomic.replace_folder`: carrying entries over, draining the
previous folder, removing a killed save's leftovers, the swap itself, locks and fsyncs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.lmport-(?P<kind>new|old)-(?P<pid>\d+)-(?P<id>[0-9a-f]{8})")
_INPLACE_STAGING = re.compile(r"\.lmport-new-\d+-[0-9a-f]{8}")
_TEMP = re.compile(r"\.(?P<base>.+?)(?:\.[0-9a-f]{8})?\.tmp")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class _CannotSwap(Exception):
    """The target folder cannot be replaced as a whole; the save goes in place."""


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
