"""``lmport.testing``: the conformance kit that an architecture plugin's own tests call.

Given a ``model_type`` and a few config variants (``config.json`` values), it checks the
plugin in one of two modes:

- **reference** (transformers installed and implementing the ``model_type``): on checkpoints
  saved by transformers' own ``save_pretrained`` (random weights with std 0.2, so every
  parameter matters), for each attention kernel: fp32 logits (within 1e-5), loss and every
  gradient (through the plugin's weight map), left- and right-padded batches, greedy
  generation token for token, bf16 logits and loss bit for bit, and the save round trip
  (lmport's save loads cleanly in transformers with identical numbers, and back);
- **contract** (always; alone without transformers): the entry point resolves to an
  :class:`lmport.Architecture`, the config parses the variants and round-trips ``to_dict``,
  the weight map is reversible, ``tiny_config`` builds and trains, and a model built from
  its class saves, reloads and generates the same.

In a plugin's tests::

    import pytest
    import lmport.testing

    VARIANTS = {"tied": {"tie_word_embeddings": True}, "untied": {}}

    @pytest.mark.parametrize("case", lmport.testing.conformance_cases("mymodel", VARIANTS), ids=str)
    def test_conformance(case, tmp_path):
        lmport.testing.check_case(case, tmp_path)

or in one call: ``lmport.testing.check_architecture("mymodel", VARIANTS, tmp_path)``. The
single checks (:func:`check_fp32`, :func:`check_weight_map`, ...) are public too, for tests
that add their own assertions on the same models. transformers is imported lazily, by the
reference checks only; ``import lmport`` never imports this package.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError
from .compare import (
    GRAD_RTOL,
    LOGITS_ATOL,
    LOSS_TOL,
    MOVED,
    VOCAB,
    ConformanceError,
    assert_bf16_parity,
    assert_grads_close,
    assert_logits_close,
    assert_loss_equal,
    assert_padded_logits_close,
    assert_same_outputs,
    assert_same_training_step,
    batch_of_two,
    checkpoint_weight_map,
    eval_mode,
    folder_digest,
    generation_positions,
    left_padded_prompts,
    load_clean,
    load_lmport,
    loss_and_grads,
    max_change,
    perturb_parameters,
    require,
    tensors_of,
)
from .contract import (
    architecture_of,
    check_config,
    check_entry_point,
    check_generation_cache,
    check_padding_invariance,
    check_save_reload,
    check_tiny_config,
    check_trains,
    check_weight_map,
)
from .reference import (
    check_bf16,
    check_fp32,
    check_generation,
    check_tied,
    load_pair,
    randomize_parameters,
    reference_available,
    require_reference,
    save_reference_checkpoint,
)
from .round_trip import assert_saved_like_transformers, check_save_round_trip, reference_config

#: The attention kernels reference cases run by default.
ATTENTION = ("eager", "sdpa")


@dataclasses.dataclass(frozen=True)
class ConformanceCase:
    """One unit of conformance checking, run by :func:`check_case`; ``str(case)`` is its test id.

    Attributes:
        model_type: the architecture checked.
        kind: ``"plugin"`` (entry point and ``tiny_config``), ``"contract"`` (one variant, lmport
            alone) or ``"reference"`` (one variant and one attention kernel, against transformers).
        variant: the variant's name (``None`` for ``"plugin"``).
        values: the variant's ``config.json`` values.
        attn: the attention kernel of a ``"reference"`` case.
        base: ``config.json`` values the variant is laid over; ``None`` for the plugin's ``tiny_config``.
    """

    model_type: str
    kind: str
    variant: str | None = None
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    attn: str | None = None
    base: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def id(self) -> str:
        """``model_type-plugin``, ``model_type-variant-contract`` or ``model_type-variant-attn``."""
        tail = self.attn if self.kind == "reference" else self.kind
        return "-".join(str(p) for p in (self.model_type, self.variant, tail) if p is not None)

    def __str__(self) -> str:
        return self.id

    def config_values(self) -> dict[str, Any]:
        """The full ``config.json`` values of the variant: :attr:`values` over :attr:`base`."""
        base = self.base if self.base is not None else (architecture_of(self.model_type).tiny_config or {})
        return {**base, **self.values}


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`check_architecture` checked, and the figures it measured.

    Attributes:
        model_type: the architecture checked.
        mode: ``"reference"`` or ``"contract"``.
        cases: case id → its figures (see :func:`check_case`).
    """

    model_type: str
    mode: str
    cases: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def worst(self, figure: str) -> float:
        """The largest value of ``figure`` (``"logits_max_abs_diff"``...) over every case that measured it."""
        values = [c[figure] for c in self.cases.values() if figure in c]
        if not values:
            raise KeyError(figure)
        return max(values)


def _resolve_reference(model_type: str, reference: bool | None) -> bool:
    if reference is None:
        return reference_available(model_type)
    if reference:
        require_reference(model_type)  # raises a typed error naming what is missing
    return bool(reference)


def conformance_cases(
    model_type: str,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    reference: bool | None = None,
    attn: Iterable[str] = ATTENTION,
    base: Mapping[str, Any] | None = None,
) -> list[ConformanceCase]:
    """The cases that together check ``model_type``, for ``pytest.mark.parametrize(..., ids=str)``.

    Args:
        model_type: the architecture to check.
        variants: name → ``config.json`` values, each laid over ``base`` (default: one variant,
            ``"tiny"``, of no extra values).
        reference: compare with transformers (``True``), check the contract alone (``False``), or
            compare whenever transformers is installed and implements ``model_type`` (``None``).
        attn: the attention kernels of reference cases.
        base: the values every variant is laid over; ``None`` for the plugin's ``tiny_config``.

    Returns:
        One ``"plugin"`` case, one ``"contract"`` case per variant, and with ``reference`` one
        ``"reference"`` case per variant and kernel.

    Raises:
        UnsupportedFeatureError: ``reference=True`` but transformers is missing or lacks ``model_type``.
        ArgumentError: no variants, or no kernels for reference cases.
    """
    variants = {"tiny": {}} if variants is None else dict(variants)
    kernels = tuple(attn)
    if not variants:
        raise ArgumentError("conformance_cases: give at least one variant")
    with_reference = _resolve_reference(model_type, reference)
    if with_reference and not kernels:
        raise ArgumentError("conformance_cases: give at least one attention kernel for the reference checks")
    cases = [ConformanceCase(model_type, "plugin", base=base)]
    for name, values in variants.items():
        cases.append(ConformanceCase(model_type, "contract", name, dict(values), base=base))
        if with_reference:
            cases.extend(ConformanceCase(model_type, "reference", name, dict(values), a, base) for a in kernels)
    return cases


def check_case(
    case: ConformanceCase,
    tmp_path: str | Path,
    *,
    atol: float = LOGITS_ATOL,
    grad_rtol: float = GRAD_RTOL,
    loss_tol: float = LOSS_TOL,
    bf16_grads: bool = False,
) -> dict[str, Any]:
    """Run one case of :func:`conformance_cases`.

    - ``"plugin"``: :func:`check_entry_point`, :func:`check_tiny_config`.
    - ``"contract"``: :func:`check_config`, :func:`check_weight_map`, :func:`check_save_reload`.
    - ``"reference"``: a checkpoint saved by transformers in fp32, loaded by both libraries:
      :func:`check_fp32`, :func:`check_generation`, :func:`check_save_round_trip`; then one
      saved in bf16, loaded with ``dtype="auto"``: :func:`check_bf16`.

    Args:
        case: the case.
        tmp_path: a folder of its own for checkpoints (created).
        atol: fp32 logits' largest absolute difference.
        grad_rtol: fp32 gradients' largest difference, relative to each reference gradient's largest entry.
        loss_tol: fp32 loss tolerance (absolute and relative).
        bf16_grads: also require bit-identical bf16 gradients (see :func:`check_bf16`).

    Returns:
        The figures measured: for reference cases ``logits_max_abs_diff``, ``loss_max_abs_diff``,
        ``grad_max_rel_diff`` (fp32) and ``generation_equal``, ``bf16_bit_identical``,
        ``save_round_trip`` (all ``True`` when returned); ``{"checked": [...]}`` otherwise.

    Raises:
        ConformanceError: a check failed (an ``AssertionError``).
    """
    work = Path(tmp_path)
    work.mkdir(parents=True, exist_ok=True)
    if case.kind == "plugin":
        check_entry_point(case.model_type)
        check_tiny_config(case.model_type, work / "tiny")
        return {"checked": ["entry_point", "tiny_config"]}
    values = case.config_values()
    if case.kind == "contract":
        config = check_config(case.model_type, values, work / "config")
        check_weight_map(config)
        check_save_reload(config, work, atol=atol)
        return {"checked": ["config", "weight_map", "save_reload", "padding_invariance", "generation_cache"]}
    if case.kind != "reference":
        raise ArgumentError(f"unknown conformance case kind {case.kind!r}")
    folder = save_reference_checkpoint(case.model_type, values, work / "fp32")
    ours, ref = load_pair(folder, case.attn or "sdpa")
    figures: dict[str, Any] = check_fp32(ours, ref, atol=atol, grad_rtol=grad_rtol, loss_tol=loss_tol)
    check_generation(ours, ref)
    figures["generation_equal"] = True
    del ref
    check_save_round_trip(ours, folder, work / "round_trip")
    figures["save_round_trip"] = True
    folder16 = save_reference_checkpoint(case.model_type, values, work / "bf16", dtype=torch.bfloat16)
    ours16, ref16 = load_pair(folder16, case.attn or "sdpa", dtype="auto")
    check_bf16(ours16, ref16, grads=bf16_grads)
    figures["bf16_bit_identical"] = True
    return figures


def check_architecture(
    model_type: str,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    tmp_path: str | Path | None = None,
    *,
    reference: bool | None = None,
    attn: Iterable[str] = ATTENTION,
    atol: float = LOGITS_ATOL,
    base: Mapping[str, Any] | None = None,
    bf16_grads: bool = False,
) -> ConformanceReport:
    """Every check of :func:`conformance_cases` for ``model_type``, in one call.

    Args:
        model_type: the architecture to check.
        variants: name → ``config.json`` values laid over ``base`` (see :func:`conformance_cases`).
        tmp_path: a folder for checkpoints; a temporary one, removed afterwards, when ``None``.
        reference: ``True``, ``False``, or ``None`` to compare with transformers when it can.
        attn: the attention kernels of the reference checks.
        atol: fp32 logits' largest absolute difference.
        base: the values every variant is laid over; ``None`` for the plugin's ``tiny_config``.
        bf16_grads: also require bit-identical bf16 gradients.

    Returns:
        A :class:`ConformanceReport` with the mode used and each case's figures.

    Raises:
        ConformanceError: a check failed (an ``AssertionError``; the message names the check).
        UnsupportedFeatureError: ``reference=True`` but transformers cannot serve as the reference.
    """
    cases = conformance_cases(model_type, variants, reference=reference, attn=attn, base=base)
    mode = "reference" if any(c.kind == "reference" for c in cases) else "contract"
    report = ConformanceReport(model_type, mode)
    with tempfile.TemporaryDirectory(prefix="lmport-conformance-") as scratch:
        root = Path(tmp_path) if tmp_path is not None else Path(scratch)
        for case in cases:
            report.cases[case.id] = check_case(case, root / case.id, atol=atol, bf16_grads=bf16_grads)
    return report


__all__ = [
    "ATTENTION",
    "GRAD_RTOL",
    "LOGITS_ATOL",
    "LOSS_TOL",
    "MOVED",
    "VOCAB",
    "ConformanceCase",
    "ConformanceError",
    "ConformanceReport",
    "architecture_of",
    "assert_bf16_parity",
    "assert_grads_close",
    "assert_logits_close",
    "assert_loss_equal",
    "assert_padded_logits_close",
    "assert_same_outputs",
    "assert_same_training_step",
    "assert_saved_like_transformers",
    "batch_of_two",
    "check_architecture",
    "check_bf16",
    "check_case",
    "check_config",
    "check_entry_point",
    "check_fp32",
    "check_generation",
    "check_generation_cache",
    "check_padding_invariance",
    "check_save_reload",
    "check_save_round_trip",
    "check_tied",
    "check_tiny_config",
    "check_trains",
    "check_weight_map",
    "checkpoint_weight_map",
    "conformance_cases",
    "eval_mode",
    "folder_digest",
    "generation_positions",
    "left_padded_prompts",
    "load_clean",
    "load_lmport",
    "load_pair",
    "loss_and_grads",
    "max_change",
    "perturb_parameters",
    "randomize_parameters",
    "reference_available",
    "reference_config",
    "require",
    "require_reference",
    "save_reference_checkpoint",
    "tensors_of",
]
