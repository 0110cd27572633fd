"""Reading ``config.json``: the file's size, nesting and integer limits, and its decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_NAME = "config.json"

#: Deepest JSON nesting in config.json (released configs nest 3-5 levels).
MAX_JSON_DEPTH = 64
#: Most digits of one JSON integer (an int64 has 19).
MAX_INT_DIGITS = 100
#: Largest config.json read (released configs are a few KB; label maps reach a few MB).
MAX_CONFIG_BYTES = 16 << 20


class _IntegerTooLong(Exception):
    def __init__(self, digits: str) -> None:
        self.digits = digits


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _IntegerTooLong(text)
    return int(text)


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


# A JSON string, possessive (linear time), also ending at the end of the text if unterminated.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.S)
# Byte -> nesting step as int8: +1 for [ and {, -1 for ] and }, 0 otherwise.
_NESTING_STEP = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects more than ``limit`` deep (brackets in strings ignored).

    Linear in the text's length (a running sum over 4 MiB chunks), so a large hostile file costs
    a fraction of a second, never a recursion.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    import torch

    data = bytearray(_JSON_STRING.sub("", text).encode("utf-8").translate(_NESTING_STEP))
    depth, chunk = 0, 1 << 22
    for start in range(0, len(data), chunk):
        steps = torch.frombuffer(data, dtype=torch.int8, offset=start, count=min(chunk, len(data) - start))
        running = steps.cumsum(0, dtype=torch.int32) + depth
        if int(running.max()) > limit:
            return True
        depth = int(running[-1])
    return False


def read_config_json(folder: Path) -> dict[str, Any]:
    """Read and decode ``folder/config.json``, raising :class:`ConfigError` naming the file.

    The file may be at most :data:`MAX_CONFIG_BYTES`, nest at most :data:`MAX_JSON_DEPTH`
    levels and hold integers of at most :data:`MAX_INT_DIGITS` digits.
    """
    from .shards import checked_file  # the symlink policy (lmport.shards)

    path = Path(folder) / CONFIG_NAME
    if checked_file(Path(folder), path, unreadable=ConfigError) is None:
        raise ConfigError(f"{path}: no {CONFIG_NAME} in checkpoint folder {folder}")
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
        if len(blob) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a model config")
        text = blob.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    text = text.removeprefix("\ufeff")
    if _nesting_exceeds(text, MAX_JSON_DEPTH):
        raise ConfigError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a model config")
    try:
        raw = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except _IntegerTooLong as exc:
        pos = max(text.find(exc.digits), 0)
        line, col = _line_col(text, pos)
        key = re.search(r'"((?:[^"\\]|\\.)*)"\s*:\s*$', text[max(0, pos - 1000) : pos])
        where = f"key {key.group(1)!r}" if key else "a value"
        raise ConfigError(
            f"{path}: {where} (line {line}, column {col}) is an integer of {len(exc.digits)} digits; "
            f"at most {MAX_INT_DIGITS} are accepted"
        ) from None
    except (RecursionError, ValueError) as exc:  # ValueError: a limit of the decoder itself
        raise ConfigError(f"{path}: cannot be decoded: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw

