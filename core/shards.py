"""Checkpoint files: shard indexes, variant names, path safety (which files a format reads: :mod:`lmport.formats`).

Symlink policy
--------------
Every file a load opens from a checkpoint folder (``config.json``,
``generation_config.json``, the single weight file, the index file and every shard
it names) is checked by :func:`checked_file` before it is opened:

* A plain file must be a regular file (not a folder, FIFO or device).
* A symbolic link is followed to its final target with every link in the chain
  resolved (``os.path.realpath``; the folder is resolved the same way). The target
  must be a regular file inside the checkpoint folder, or, when the folder is a
  snapshot of a huggingface_hub cache, a regular file directly inside the ``blobs/``
  folder of the *same* cached repository. A folder is such a snapshot when its
  resolved path is ``<cache>/models--<org>--<name>/snapshots/<commit>[/<subfolder>]``
  and ``<cache>/models--<org>--<name>/blobs`` is a real folder, not itself a link:
  the test is on where the files really are, not on the names a link spells.
* Anything else is refused with :class:`~lmport.errors.UnsafePathError` naming the
  file: a link leaving the folder, a ``blobs`` that is a link, a link loop. A name
  read from an index file must moreover be a plain relative path (no ``..``, no
  absolute path, no backslash, no NUL, at most 255 bytes per part and 4096 in all).
  A dangling link counts as an absent file.

The checkpoint folder itself may be reached through links (``~/models`` linked to
another disk): the policy applies to where it resolves. Hard links are not links in
this sense (nothing distinguishes a hard-linked file from the original).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CorruptWeightsError, LmportError, MissingShardError, UnsafePathError

#: Bounds on a file name taken from a checkpoint (POSIX NAME_MAX and PATH_MAX on Linux).
NAME_MAX = 255
PATH_MAX = 4096


def add_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` → ``model.fp16.safetensors``, as transformers names variants."""
    if not variant:
        return filename
    parts = filename.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def _hub_blobs(root: str) -> str | None:
    """The ``blobs/`` folder of the huggingface_hub cache repository whose snapshot ``root`` (resolved) lies in.

    ``None`` unless ``root`` is ``.../models--*/snapshots/<commit>[/...]`` and that repository's
    ``blobs`` is a real folder (not a link).
    """
    path = Path(root)
    for p in [path, *path.parents]:
        snapshots = p.parent
        if snapshots.name != "snapshots" or p == snapshots:
            continue
        repo = snapshots.parent
        if not repo.name.startswith("models--"):
            return None
        blobs = repo / "blobs"
        try:
            st = os.lstat(blobs)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(blobs) != str(blobs):
            return None
        return str(blobs)
    return None


def _inside(target: str, root: str) -> bool:
    return os.path.commonpath([target, root]) == root and target != root


def checked_file(
    folder: Path,
    path: Path,
    *,
    referrer: Path | None = None,
    unreadable: type[LmportError] = CorruptWeightsError,
) -> Path | None:
    """``path`` (a file of the checkpoint ``folder``) if it is present and the symlink policy allows it.

    Args:
        folder: the checkpoint folder.
        path: the file, as ``folder / name``.
        referrer: the file that named ``path`` (an index file), for messages.
        unreadable: the error raised when ``path`` cannot even be examined (permissions, ...).

    Returns:
        ``path`` unchanged (the name as the checkpoint gives it, not its link target), or
        ``None`` when there is no regular file there (absent, a folder, a dangling link).

    Raises:
        UnsafePathError: ``path`` is a link loop, or a link whose target lies outside the
            folder (and outside the same repository's hub-cache ``blobs/``).
    """
    try:
        name = path.relative_to(folder).as_posix()
    except ValueError:
        name = path.name
    where = f"{referrer}: {name!r} ({path})" if referrer is not None else str(path)
    try:
        lst = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link loop among the folders on the way
            raise UnsafePathError(f"{where}: a symbolic link loop; remove or fix the link") from exc
        raise unreadable(f"{where}: cannot be examined: {exc}") from exc
    except ValueError as exc:  # an embedded NUL
        raise UnsafePathError(f"{where}: not a valid file name: {exc}") from exc
    root = os.path.realpath(folder)
    if not stat.S_ISLNK(lst.st_mode) and os.path.realpath(path.parent) == root:
        return path if stat.S_ISREG(lst.st_mode) else None
    try:
        target = os.path.realpath(path, strict=True)
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return None  # a dangling link: an absent file
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{where}: a symbolic link loop; remove or fix the link") from exc
        raise unreadable(f"{where}: cannot be examined: {exc}") from exc
    if _inside(target, root):
        return path if stat.S_ISREG(st.st_mode) else None
    blobs = _hub_blobs(root)
    if blobs is not None and os.path.dirname(target) == blobs:
        return path if stat.S_ISREG(st.st_mode) else None
    raise UnsafePathError(
        f"{where}: a link to {target}, outside the checkpoint folder {folder}. lmport follows links only to "
        "files inside the checkpoint folder, or into the huggingface_hub cache's blobs/ of the same repository; "
        "copy the file into the folder instead"
    )


def check_name(relative: Any, referrer: Path, key: str) -> str:
    """``relative`` if it is a plain relative file name (as an index may give a shard), else a typed error.

    Raises:
        CorruptWeightsError: not a non-empty string, or too long to be a file name.
        UnsafePathError: absolute, with ``..``, a backslash or a NUL.
    """
    at = f"{referrer}: weight_map[{key!r}]"
    if not isinstance(relative, str) or not relative:
        raise CorruptWeightsError(f"{at} is {_short(relative)}, not a shard file name; fix or regenerate the index")
    if "\x00" in relative:
        raise UnsafePathError(f"{at} = {_short(relative)} contains a NUL character; fix or regenerate the index")
    if os.path.isabs(relative) or "\\" in relative:
        raise UnsafePathError(f"{at}: shard path {relative!r} is not a plain relative file name")
    if ".." in relative.split("/"):
        raise UnsafePathError(f"{at}: shard path {relative!r} escapes the checkpoint folder {referrer.parent}")
    encoded = relative.encode("utf-8", "surrogatepass")
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise CorruptWeightsError(
            f"{at} = {_short(relative)} is longer than a file name can be ({NAME_MAX} bytes a part, {PATH_MAX} "
            "in all); fix or regenerate the index"
        )
    return relative


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def resolve_inside(folder: Path, relative: Any, referrer: Path, key: str = "") -> Path:
    """Join ``relative`` (a name an index file gives) to ``folder``, refusing anything that would land outside it.

    ``folder / relative`` need not exist yet (the hub source checks names before
    downloading); where it exists, the symlink policy (module docstring) applies.

    Raises:
        UnsafePathError: ``relative`` is absolute, climbs out with ``..``, or is a link
            whose target lies elsewhere; the message names ``referrer``.
        CorruptWeightsError: ``relative`` is not a usable file name.
    """
    check_name(relative, referrer, key)
    path = folder / relative
    checked_file(folder, path, referrer=referrer)
    return path


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` object of a ``*.index.json`` file (tensor name → shard name), names checked by
    :func:`check_name` (not yet against the folder's links)."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptWeightsError(f"{index_path}: unreadable index file: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptWeightsError(f"{index_path}: no 'weight_map' object in index file")
    checked: set[str] = set()
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard in checked):
            checked.add(check_name(shard, index_path, name))
    return weight_map


def read_index(index_path: Path) -> dict[str, Path]:
    """Read a ``*.index.json`` file: tensor name → shard path (validated, existing)."""
    weight_map = read_weight_map(index_path)
    folder = index_path.parent
    resolved: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in checked:
            path = resolve_inside(folder, shard, index_path, name)
            if checked_file(folder, path, referrer=index_path) is None:
                raise MissingShardError(
                    f"{index_path}: shard {shard!r} (holding {name!r}) is listed but absent from {folder}"
                )
            checked[shard] = path
        resolved[name] = checked[shard]
    return resolved
