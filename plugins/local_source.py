"""Source plugin: a checkpoint that is already a folder on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from lmport.errors import SourceError
from lmport.hookspecs import hookimpl
from lmport.options import SourceOptions


@hookimpl(trylast=True)
def lmport_resolve_source(name_or_path: str, options: SourceOptions) -> Path | None:
    path = Path(name_or_path).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, ValueError) as exc:  # a name too long for a path, a NUL
        raise SourceError(f"{name_or_path!r}"[:200] + f" is not a usable path: {exc}"[:200]) from exc
    if not is_dir:
        if exists:
            raise SourceError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return None
    if options.subfolder:
        try:
            sub = Path(os.path.realpath(path / options.subfolder))
            root = Path(os.path.realpath(path))
            sub_is_dir = sub.is_dir()
        except (OSError, ValueError) as exc:
            raise SourceError(f"subfolder {options.subfolder!r} of {path} is not a usable path: {exc}"[:300]) from exc
        if root not in sub.parents:
            raise SourceError(f"subfolder {options.subfolder!r} escapes {path}")
        if not sub_is_dir:
            raise SourceError(f"{path} has no subfolder {options.subfolder!r}")
        return sub
    return path
