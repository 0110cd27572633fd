"""The ``lmport`` command: ``plugins``, ``inspect PATH``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LmportError
from .registry import ARCHITECTURES_GROUP, PLUGINS_GROUP, get_registry


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins from metadata alone (nothing is imported)."""
    from lmport import __version__

    registry = get_registry()
    archs = registry.entry_points(ARCHITECTURES_GROUP)
    caps = registry.entry_points(PLUGINS_GROUP)
    if args.json:
        print(json.dumps({
            "architectures": [a.__dict__ for a in archs],
            "plugins": [c.__dict__ for c in caps],
            "builtin": BUILTIN_PLUGINS,
        }, indent=2))  # fmt: skip
        return 0
    print("Architectures (entry point group lmport.architectures):")
    rows = [[a.name, a.distribution, a.version, a.value] for a in archs]
    print(_table(rows, ["model_type", "distribution", "version", "entry point"]) if rows else "  none installed")
    print("\nCapability plugins (entry point group lmport.plugins):")
    rows = [[c.name, c.distribution, c.version, c.value] for c in caps]
    print(_table(rows, ["name", "distribution", "version", "entry point"]) if rows else "  none installed")
    print(f"\nBuiltin (lmport {__version__}): {', '.join(BUILTIN_PLUGINS)}")
    return 0


BUILTIN_PLUGINS = [
    "local-source",
    "hub-source",
    "safetensors-format",
    "torch-bin-format",
    "attention:eager,sdpa,flash_attention_2",
    "bitsandbytes-quantizer",
    "accelerate-placement",
]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a checkpoint: its architecture, plugin, class, parameters and weight files."""
    from .loading import load_config, open_weights, resolve_folder
    from .modeling.base import build_on_meta
    from .options import LoadOptions, SourceOptions
    from .weights import dtype_bytes

    folder = resolve_folder(
        args.path, SourceOptions(subfolder=args.subfolder or "", revision=args.revision, cache_dir=args.cache_dir)
    )
    config = load_config(folder)
    registry = get_registry()
    model_class = registry.hook.lmport_resolve_model_class(config=config)
    model = build_on_meta(model_class, config)
    n_params = sum(p.numel() for p in model.parameters())
    source = open_weights(folder, LoadOptions())
    try:
        infos = list(source.infos())
        files = [(f.name, f.stat().st_size) for f in source.files]
    finally:
        source.close()
    report: dict[str, Any] = {
        "folder": str(folder),
        "model_type": config.model_type,
        "plugin": registry.provider(config.model_type) or "hook override",
        "class": f"{model_class.__module__}.{model_class.__qualname__}",
        "parameters": n_params,
        "checkpoint_tensors": len(infos),
        "bytes_per_dtype": dtype_bytes(infos),
        "weight_files": [{"name": n, "bytes": s} for n, s in files],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key in ("folder", "model_type", "plugin", "class"):
        print(f"{key:>18}: {report[key]}")
    print(f"{'parameters':>18}: {n_params:,}")
    print(f"{'checkpoint tensors':>18}: {len(infos)}")
    for dtype, nbytes in report["bytes_per_dtype"].items():
        print(f"{'bytes ' + dtype:>18}: {nbytes:,}")
    for name, size in files:
        print(f"{'file':>18}: {name} ({size:,} bytes)")
    return 0


def run_demo(architectures: Sequence[str] | None, steps: int, output: Path | None, log: Any = print) -> list[dict[str, Any]]:
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


def cmd_demo(args: argparse.Namespace) -> int:
    archs = args.architectures.split(",") if args.architectures else None
    results = run_demo(archs, args.steps, Path(args.output) if args.output else None)
    if not results:
        print("no architecture plugin with a tiny_config is installed; pip install lmport-llama", file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmport", description="Plugin-based loader for causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed architectures and capability plugins (no imports)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("inspect", help="describe a checkpoint folder")
    p.add_argument("path")
    p.add_argument("--subfolder")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--cache-dir", help="Hugging Face cache folder for a repo id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="offline: tiny checkpoints → load via plugins → fine-tune → save → reload")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--architectures", help="comma-separated model_types (default: all installed)")
    p.add_argument("--output", help="keep the checkpoints in this folder")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LmportError as exc:
        print(f"lmport: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
