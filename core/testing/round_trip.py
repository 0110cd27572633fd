"""Save round trips against transformers: lmport's save loads in transformers and back, numbers unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .compare import (
    assert_same_outputs,
    batch_of_two,
    eval_mode,
    load_clean,
    perturb_parameters,
    require,
    tensors_of,
)
from .reference import PROVENANCE_KEYS, require_reference

def reference_config(folder: str | Path) -> dict[str, Any]:
    """transformers' reading of ``folder``'s config, without :data:`PROVENANCE_KEYS`."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    transformers = require_reference(raw["model_type"])
    config = transformers.AutoConfig.from_pretrained(folder).to_dict()
    return {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}


def assert_saved_like_transformers(
    ours: str | Path, ref: Any, theirs: str | Path, original: str | Path
) -> dict[str, torch.Tensor]:
    """transformers' ``ref`` saved to ``theirs`` holds exactly the names, shapes, dtypes and values of
    lmport's save in ``ours`` (and the names of the ``original`` checkpoint).

    Returns:
        lmport's saved tensors, by checkpoint name.
    """
    ref.save_pretrained(theirs)
    mine, theirs_tensors = tensors_of(Path(ours)), tensors_of(Path(theirs))
    original_names = tensors_of(Path(original)).keys()
    require(
        mine.keys() == theirs_tensors.keys() == original_names,
        f"saved names differ: lmport-only {sorted(mine.keys() - theirs_tensors.keys())}, transformers-only "
        f"{sorted(theirs_tensors.keys() - mine.keys())}, original {sorted(original_names ^ mine.keys())}",
    )
    for name, t in theirs_tensors.items():
        require(mine[name].shape == t.shape, f"{name}: saved shape {tuple(mine[name].shape)} != {tuple(t.shape)}")
        require(mine[name].dtype == t.dtype, f"{name}: saved dtype {mine[name].dtype} != {t.dtype}")
        require(torch.equal(mine[name], t), f"{name}: saved values differ from transformers' save")
    return mine


def check_save_round_trip(
    ours: Any, original: str | Path, work_dir: str | Path, *, perturb: bool = True
) -> dict[str, torch.Tensor]:
    """lmport's save loads in transformers, transformers' save loads in lmport, numbers unchanged.

    1. ``ours`` (first moved by :func:`perturb_parameters` with ``perturb``, as a fine-tune would:
       the save must carry the model's own state) is saved to ``work_dir/lmport``.
    2. transformers loads it with nothing missing, unexpected or mismatched, reads the same
       config as from ``original`` (save for provenance keys), and gives bit-identical logits and loss.
    3. transformers saves what it loaded to ``work_dir/transformers``: the same tensor names,
       shapes, dtypes and values as lmport's save, and the names of ``original``.
    4. lmport loads transformers' save and its own, cleanly, to bit-identical logits.

    Args:
        ours: lmport's model, loaded from ``original`` (a checkpoint transformers saved).
        original: that checkpoint.
        work_dir: where the saves go (created).

    Returns:
        lmport's saved tensors, by checkpoint name (for layout assertions).
    """
    import lmport

    work = Path(work_dir)
    ours_dir, theirs_dir = work / "lmport", work / "transformers"
    if perturb:
        perturb_parameters(ours)
    ours.save_pretrained(ours_dir)
    transformers = require_reference(ours.config.model_type)
    attn = {"attn_implementation": ours.attn_implementation}  # bit-identical needs the same kernel
    ref = load_clean(transformers.AutoModelForCausalLM, ours_dir, **attn)
    require(ref.dtype == ours.dtype, f"transformers read lmport's {ours.dtype} save as {ref.dtype}")
    got, want = reference_config(ours_dir), reference_config(original)
    changed = sorted(k for k in got.keys() | want.keys() if got.get(k, "<absent>") != want.get(k, "<absent>"))
    diffs = [(k, want.get(k), got.get(k)) for k in changed]
    require(not changed, f"config did not round-trip through lmport's save (key, original, saved): {diffs}")
    vocab = ours.config.vocab_size
    batch = batch_of_two(24, seed=1, padded=True, left_pad=3, vocab=vocab)
    with eval_mode(ours, ref):
        assert_same_outputs(ours, ref, batch)
    mine = assert_saved_like_transformers(ours_dir, ref, theirs_dir, original)
    for folder in (theirs_dir, ours_dir):
        again = load_clean(lmport.AutoModelForCausalLM, folder, **attn)
        require(type(again) is type(ours), f"{folder} loaded as {type(again).__name__}, not {type(ours).__name__}")
        with eval_mode(ours, again):
            assert_same_outputs(again, ours, batch)
    return mine


__all__ = ["assert_saved_like_transformers", "check_save_round_trip", "reference_config"]
