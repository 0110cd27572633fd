"""Source plugin: a checkpoint that is already a folder on this machine."""

from __future__ import annotations

from pathlib import Path

from lmport.errors import SourceError
from lmport.hookspecs import hookimpl
from lmport.options import SourceOptions


@hookimpl(trylast=True)
def lmport_resolve_source(name_or_path: str, options: SourceOptions) -> Path | None:
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if path.exists():
            raise SourceError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return None
    if options.subfolder:
        sub = (path / options.subfolder).resolve()
        if path.resolve() not in sub.parents:
            raise SourceError(f"subfolder {options.subfolder!r} escapes {path}")
        if not sub.is_dir():
            raise SourceError(f"{path} has no subfolder {options.subfolder!r}")
        return sub
    return path
