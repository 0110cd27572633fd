"""Finding a checkpoint's weight files: single files, sharded indexes, variants, path safety."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CorruptWeightsError, MissingShardError, UnsafePathError


def add_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` → ``model.fp16.safetensors``, as transformers names variants."""
    if not variant:
        return filename
    parts = filename.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repository ``folder`` is a snapshot of, if it is one."""
    for p in [folder, *folder.parents]:
        if p.parent.name == "snapshots" and (p.parent.parent / "blobs").is_dir():
            return (p.parent.parent / "blobs").resolve()
    return None


def resolve_inside(folder: Path, relative: str, referrer: Path) -> Path:
    """Join ``relative`` to ``folder``, refusing anything that would land outside it.

    A link is followed only to a file inside ``folder``, or, for a snapshot of the
    Hugging Face cache, inside that repository's ``blobs/`` (where the cache keeps
    the files its snapshots link to).

    Raises:
        UnsafePathError: ``relative`` is absolute, climbs out with ``..``, or is a
            link whose target lies elsewhere; the message names ``referrer``.
    """
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        raise UnsafePathError(f"{referrer}: shard path {relative!r} is not a plain relative file name")
    if ".." in relative.split("/"):
        raise UnsafePathError(f"{referrer}: shard path {relative!r} escapes the checkpoint folder {folder}")
    root = folder.resolve()
    target = (folder / relative).resolve()
    if root in target.parents or ((blobs := _hub_blobs(folder)) is not None and blobs in target.parents):
        return folder / relative  # the name as the checkpoint gives it (a cache link, not its blob)
    raise UnsafePathError(
        f"{referrer}: shard path {relative!r} is a link to {target}, outside the checkpoint folder {folder}"
    )


def read_weight_map(index_path: Path) -> dict[str, Any]:
    """The ``weight_map`` object of a ``*.index.json`` file (tensor name → shard name), unvalidated names."""
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptWeightsError(f"{index_path}: unreadable index file: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptWeightsError(f"{index_path}: no 'weight_map' object in index file")
    return weight_map


def read_index(index_path: Path) -> dict[str, Path]:
    """Read a ``*.index.json`` file: tensor name → shard path (validated, existing)."""
    weight_map = read_weight_map(index_path)
    folder = index_path.parent
    resolved: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in checked:
            path = resolve_inside(folder, shard, index_path)
            if not path.is_file():
                raise MissingShardError(
                    f"{index_path}: shard {shard!r} (holding {name!r}) is listed but absent from {folder}"
                )
            checked[shard] = path
        resolved[name] = checked[shard]
    return resolved


def find_weight_files(folder: Path, single: str, index: str, variant: str | None) -> tuple[list[Path], Path | None]:
    """The files of one format in ``folder``: (files in reading order, index path or None).

    Returns ``([], None)`` when the format has no files there.
    """
    index_path = folder / add_variant(index, variant)
    if index_path.is_file():
        shards = read_index(index_path)
        return sorted(set(shards.values())), index_path
    single_path = folder / add_variant(single, variant)
    if single_path.is_file():
        return [single_path], None
    return [], None
