"""Weight maps: the rules between a checkpoint's tensor names and layouts and a model's modules.

A :class:`WeightMap` is plain data on a model class, run forward on load and backward on save.
Patterns use ``*`` for one dotted segment and ``**`` for any run of segments; the placeholders
of a rule's two sides correspond in order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# --- patterns ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    for part in re.split(r"(\*\*|\*)", pattern):
        if part == "**":
            out.append(r"(.+)")
        elif part == "*":
            out.append(r"([^.]+)")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z")


def _fill(template: str, groups: Sequence[str]) -> str:
    it = iter(groups)
    return re.sub(r"\*\*|\*", lambda _m: next(it), template)


def match(pattern: str, name: str) -> tuple[str, ...] | None:
    """The placeholder values if ``name`` fits ``pattern``, else ``None``."""
    m = _compile(pattern).match(name)
    return m.groups() if m else None


def translate(name: str, source: str, target: str) -> str | None:
    """Rewrite ``name`` from the ``source`` pattern to the ``target`` pattern, or ``None``."""
    groups = match(source, name)
    return None if groups is None else _fill(target, groups)


# --- rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    """A checkpoint name pattern and the module name pattern it corresponds to."""

    checkpoint: str
    module: str


@dataclass(frozen=True)
class Transpose:
    """Module tensors (by pattern) that the checkpoint stores transposed (last two dims)."""

    module: str


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor that holds several module tensors concatenated along ``dim``.

    ``sizes`` gives each part's length along ``dim``; ``None`` splits into equal parts.
    """

    checkpoint: str
    module: tuple[str, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class WeightMap:
    """Rules between checkpoint tensors and module tensors, kept as data.

    Attributes:
        aliases: load-only renames from older checkpoint spellings to the canonical
            checkpoint names (first match wins), applied before everything else.
        rename: tried in order on load (checkpoint → module), first match wins;
            reversed on save, again first match wins. Unmatched names are kept.
        transpose: module tensors stored transposed in the checkpoint.
        split: checkpoint tensors that become several module tensors (fused on save).
        ignore: checkpoint names dropped on load without being reported as unexpected.
    """

    aliases: tuple[Rename, ...] = ()
    rename: tuple[Rename, ...] = ()
    transpose: tuple[Transpose, ...] = ()
    split: tuple[Split, ...] = ()
    ignore: tuple[str, ...] = ()

    def canonical(self, checkpoint_name: str) -> str:
        """The checkpoint name with a legacy spelling replaced by the canonical one."""
        for rule in self.aliases:
            out = translate(checkpoint_name, rule.checkpoint, rule.module)
            if out is not None:
                return out
        return checkpoint_name

    def ignored(self, checkpoint_name: str) -> bool:
        name = self.canonical(checkpoint_name)
        return any(match(p, name) is not None for p in self.ignore)

    def to_module_name(self, checkpoint_name: str) -> str:
        checkpoint_name = self.canonical(checkpoint_name)
        for rule in self.rename:
            out = translate(checkpoint_name, rule.checkpoint, rule.module)
            if out is not None:
                return out
        return checkpoint_name

    def to_checkpoint_name(self, module_name: str) -> str:
        for rule in self.rename:
            out = translate(module_name, rule.module, rule.checkpoint)
            if out is not None:
                return out
        return module_name

    def _split_for(self, module_name: str) -> tuple[Split, tuple[str, ...]] | None:
        for rule in self.split:
            groups = match(rule.checkpoint, module_name)
            if groups is not None:
                return rule, groups
        return None

    def _transposed(self, module_name: str) -> bool:
        return any(match(t.module, module_name) is not None for t in self.transpose)

    def rewrites_layout(self, checkpoint_name: str) -> bool:
        """Whether loading ``checkpoint_name`` splits or transposes it (its module tensors are copies)."""
        if self.ignored(checkpoint_name):
            return False
        name = self.to_module_name(checkpoint_name)
        found = self._split_for(name)
        if found is not None:
            return True
        return self._transposed(name)

    def plan(self, checkpoint_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """The module tensors (name, shape) that ``checkpoint_name`` becomes; [] if ignored."""
        if self.ignored(checkpoint_name):
            return []
        name = self.to_module_name(checkpoint_name)
        found = self._split_for(name)
        if found is None:
            parts = [(name, shape)]
        else:
            rule, groups = found
            sizes = _split_sizes(rule, shape)
            parts = []
            for template, size in zip(rule.module, sizes):
                part_shape = list(shape)
                part_shape[rule.dim] = size
                parts.append((_fill(template, groups), tuple(part_shape)))
        return [(n, _swap(s) if self._transposed(n) else s) for n, s in parts]

    def to_module(self, checkpoint_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Turn one checkpoint tensor into its module tensors (views where possible)."""
        if self.ignored(checkpoint_name):
            return []
        name = self.to_module_name(checkpoint_name)
        found = self._split_for(name)
        if found is None:
            parts = [(name, tensor)]
        else:
            rule, groups = found
            chunks = torch.split(tensor, list(_split_sizes(rule, tuple(tensor.shape))), dim=rule.dim)
            parts = [(_fill(t, groups), c) for t, c in zip(rule.module, chunks)]
        return [(n, t.transpose(-1, -2) if self._transposed(n) else t) for n, t in parts]

    def to_checkpoint(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn a module state dict into checkpoint tensors (the reverse of :meth:`to_module`)."""
        out: dict[str, torch.Tensor] = {}
        consumed: set[str] = set()
        for rule in self.split:
            for name in state:
                groups = match(rule.module[0], name)
                if groups is None:
                    continue
                members = [_fill(t, groups) for t in rule.module]
                tensors = [self._untranspose(m, state[m]) for m in members]
                fused_module_name = _fill(rule.checkpoint, groups)
                out[self.to_checkpoint_name(fused_module_name)] = torch.cat(tensors, dim=rule.dim)
                consumed.update(members)
        for name, tensor in state.items():
            if name not in consumed:
                out[self.to_checkpoint_name(name)] = self._untranspose(name, tensor)
        return out

    def _untranspose(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(-1, -2).contiguous() if self._transposed(name) else tensor


def _swap(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else shape


def _split_sizes(rule: Split, shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.sizes is not None:
        return rule.sizes
    n = len(rule.module)
    return (shape[rule.dim] // n,) * n


IDENTITY = WeightMap()


__all__ = ["IDENTITY", "Rename", "Split", "Transpose", "WeightMap", "match", "translate"]
