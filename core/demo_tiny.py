"""``lmport demo --all``: tiny checkpoints of every installed architecture, offline.

Each is written by lmport, loaded through its plugin's entry point, fine-tuned a few steps,
saved and reloaded; the reload must give the same logits.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .registry import get_registry


def run_demo(
    architectures: Sequence[str] | None, steps: int, output: Path | None, log: Any = print
) -> list[dict[str, Any]]:
    """For each installed architecture: write a tiny checkpoint, load it through its entry point,
    fine-tune a few steps, save and reload. Returns one result dict per architecture.

    Checkpoints are kept in ``output`` when given; otherwise they go to a temporary folder
    that is removed before returning (also on error).
    """
    if output is not None:
        results = _run_demo(architectures, steps, output, log)
        log(f"checkpoints in {output}")
        return results
    with tempfile.TemporaryDirectory(prefix="lmport-demo-") as tmp:
        return _run_demo(architectures, steps, Path(tmp), log)


def _run_demo(architectures: Sequence[str] | None, steps: int, root: Path, log: Any) -> list[dict[str, Any]]:
    import torch

    from .auto import AutoModelForCausalLM

    registry = get_registry()
    model_types = list(architectures) if architectures else registry.model_types()
    results = []
    for model_type in model_types:
        plugin = registry.architecture(model_type)
        tiny = getattr(plugin, "tiny_config", None)
        if not tiny:
            log(f"{model_type}: plugin {registry.provider(model_type)} offers no tiny_config; skipped")
            continue
        config = plugin.config_class.from_dict({**tiny, "model_type": model_type})
        base, tuned = root / model_type / "base", root / model_type / "tuned"
        AutoModelForCausalLM.from_config(config, seed=0).save_pretrained(base)

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        load_s = time.perf_counter() - start
        generator = torch.Generator().manual_seed(0)
        pattern = torch.randint(0, config.vocab_size, (16,), generator=generator)
        batch = pattern.repeat(4, 4)  # (4, 64): a repeating sequence the model can learn
        model.train()
        model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        model.save_pretrained(tuned)
        reloaded = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
        with torch.no_grad():
            diff = (model(batch).logits - reloaded(batch).logits).abs().max().item()
        result = {
            "model_type": model_type,
            "plugin": registry.provider(model_type),
            "class": type(model).__name__,
            "parameters": model.num_parameters(),
            "load_s": load_s,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "reload_max_abs_diff": diff,
            "ok": losses[-1] < losses[0] and diff == 0.0,
        }
        results.append(result)
        log(
            f"{model_type:>8}  {result['class']:<18} {result['parameters']:>9,} params  "
            f"loaded in {load_s * 1000:.0f} ms  loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
            f"reload diff {diff:.1e}  {'ok' if result['ok'] else 'FAILED'}"
        )
    return results


__all__ = ["run_demo"]
