#!/usr/bin/env python
"""Quantized-load benchmark: lmport vs transformers loading a bf16 checkpoint in 4-bit nf4.

Both libraries load the same checkpoint (the cache of ``benchmarks/load.py``, written
by transformers' ``save_pretrained``) through ``AutoModelForCausalLM.from_pretrained(
path, quantization_config=BitsAndBytesConfig(...))``, each with its own
``BitsAndBytesConfig`` class and the same settings: QLoRA's nf4, double quantization,
bf16 compute (``--no-double-quant``, ``--compute-dtype`` change that). The
measurement is the one of ``load.py`` (whose helpers this script imports): a fresh
process per load, imports first, then the RSS high-water mark is reset, then
``from_pretrained`` plus one read per 4 KiB page of every parameter is timed and the
peak RSS taken.

What is reported, per library (medians over ``--repeats``):

- load time (``from_pretrained``, and with the page-touching pass);
- peak RSS delta (peak minus the RSS after imports): the load's own memory cost;
- the quantized model's bytes: every tensor of its state dict (packed 4-bit codes,
  quantization statistics, the unquantized embeddings, norms and head);
- delta / quantized bytes, and delta / the checkpoint's bf16 bytes;
- RSS at the end split into anonymous memory and file-backed pages (weights left as
  views into the memory-mapped checkpoint, such as an unquantized bf16 embedding).

Usage::

    python benchmarks/quantize.py                    # 1b preset (TinyLlama-1.1B shape), 1 repeat
    python benchmarks/quantize.py --size tiny        # smoke run
    python benchmarks/quantize.py --repeats 3 --json out.json
    python benchmarks/quantize.py --child-env MALLOC_MMAP_THRESHOLD_=65536

bitsandbytes' CPU backend is used on a machine without CUDA (and its CUDA kernels
where a GPU is present: both libraries alike). The parent process imports neither
torch nor either library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as bench  # noqa: E402  - the shared checkpoint cache and measuring helpers

LIBRARIES = bench.LIBRARIES


# --- child process: one measurement ---------------------------------------------------------


def child_measure(library: str, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    import resource

    import bitsandbytes  # noqa: F401  - imported before the baseline, by both libraries alike
    import torch

    if library == "lmport":
        from lmport import AutoModelForCausalLM, BitsAndBytesConfig
    elif library == "transformers":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    else:
        raise SystemExit(f"unknown library {library!r}")
    config = BitsAndBytesConfig(**settings)

    baseline = bench._current_rss()
    reset = bench._reset_peak_rss()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config)
    t1 = time.perf_counter()
    checksum = 0.0
    with torch.no_grad():
        for p in model.parameters():
            checksum += bench._touch(p)
    t2 = time.perf_counter()

    maxrss = bench._maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    status = bench._proc_status()
    peak = status.get("VmHWM", maxrss)
    seen: set[int] = set()
    model_bytes = 0
    for tensor in model.state_dict().values():  # codes, statistics, unquantized tensors
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            model_bytes += tensor.nbytes
    kinds = sorted({type(m).__name__ for m in model.modules() if "bit" in type(m).__name__.lower()})
    return {
        "library": library,
        "quantized_modules": kinds,
        "num_quantized": sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")),
        "call_s": t1 - t0,
        "touch_s": t2 - t1,
        "total_s": t2 - t0,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "ru_maxrss": maxrss,
        "peak_reset": reset,
        "delta_rss": peak - baseline,
        "end_rss_anon": status.get("RssAnon", 0),
        "end_rss_file": status.get("RssFile", 0),
        "model_bytes": model_bytes,
        "checksum": checksum,
        "torch_threads": torch.get_num_threads(),
    }


# --- parent ---------------------------------------------------------------------------------


def measure(library: str, folder: Path, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    try:
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child-measure", library, str(folder),
             json.dumps(settings), str(out)],
            env=bench._child_env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{library} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(bench.PRESETS), default="1b", help="checkpoint preset (default: 1b)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per library (default: 1)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="no double quantization of the statistics")
    parser.add_argument("--compute-dtype", default="bfloat16", help="bnb_4bit_compute_dtype (default: bfloat16)")
    parser.add_argument("--cache", type=Path, default=bench.REPO_ROOT / ".bench", help="checkpoint cache (load.py's)")
    parser.add_argument("--json", type=Path, help="also write raw runs and medians to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process")
    parser.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every measuring process, both libraries alike; repeatable")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    for item in args.child_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--child-env expects KEY=VALUE, got {item!r}")
        bench.CHILD_ENV[key] = value

    settings = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": args.quant_type,
        "bnb_4bit_use_double_quant": not args.no_double_quant,
        "bnb_4bit_compute_dtype": args.compute_dtype,
    }
    preset = bench.PRESETS[args.size]
    folder = bench.ensure_checkpoint(args.size, preset, args.cache, args.timeout)
    warmed = bench.warm_page_cache(folder)
    source_bytes = checkpoint_bytes(folder)
    print(f"checkpoint: {folder} ({preset.description}); page cache warmed ({bench._fmt_bytes(warmed)})")
    print(f"settings: {settings}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} repeat(s), fresh process per load")

    summaries = {lib: bench.Summary(lib, "4bit") for lib in args.libraries}
    for r in range(args.repeats):
        order = list(args.libraries) if r % 2 == 0 else list(reversed(args.libraries))
        for lib in order:
            run = measure(lib, folder, settings, args.timeout)
            summaries[lib].runs.append(run)
            print(
                f"  [{r + 1}/{args.repeats}] {lib:<12} call {run['call_s']:6.2f}s total {run['total_s']:6.2f}s  "
                f"delta RSS {bench._fmt_bytes(run['delta_rss'])}  model {bench._fmt_bytes(run['model_bytes'])}",
                flush=True,
            )

    counts = {lib: s.runs[0]["num_quantized"] for lib, s in summaries.items()}
    if len(set(counts.values())) > 1:
        print(f"WARNING: the libraries quantized different numbers of layers: {counts}")

    header = ["library", "call s", "total s", "peak RSS", "baseline", "delta RSS", "quantized bytes",
              "delta/quantized", "delta/bf16 ckpt", "end anon", "end file"]  # fmt: skip
    rows = []
    for lib, s in summaries.items():
        delta, model = s.median("delta_rss"), s.median("model_bytes")
        rows.append([
            lib, f"{s.median('call_s'):.2f}", f"{s.median('total_s'):.2f}", bench._fmt_bytes(s.median("peak_rss")),
            bench._fmt_bytes(s.median("baseline_rss")), bench._fmt_bytes(delta), bench._fmt_bytes(model),
            f"{delta / model:.2f}x", f"{delta / source_bytes:.2f}x",
            bench._fmt_bytes(s.median("end_rss_anon")), bench._fmt_bytes(s.median("end_rss_file")),
        ])  # fmt: skip
    print()
    print(f"medians; bf16 checkpoint: {bench._fmt_bytes(source_bytes)}; 'delta RSS' = peak RSS - RSS after imports")
    print(bench._table(rows, header))
    ratios: dict[str, float] = {}
    if {"lmport", "transformers"} <= set(summaries):
        lm, tf = summaries["lmport"], summaries["transformers"]
        ratios = {
            "time_ratio": lm.median("total_s") / tf.median("total_s"),
            "delta_rss_ratio": lm.median("delta_rss") / tf.median("delta_rss"),
            "model_bytes_ratio": lm.median("model_bytes") / tf.median("model_bytes"),
        }
        print()
        print(
            f"lmport/transformers: time {ratios['time_ratio']:.2f}x, delta RSS {ratios['delta_rss_ratio']:.2f}x, "
            f"quantized bytes {ratios['model_bytes_ratio']:.2f}x"
        )
    if args.json:
        payload = {
            "preset": args.size,
            "checkpoint": str(folder),
            "checkpoint_bytes": source_bytes,
            "settings": settings,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "child_env": bench.CHILD_ENV,
            "results": [
                {"library": s.library, "medians": {k: s.median(k) for k in ("call_s", "total_s", "peak_rss",
                                                                            "delta_rss", "model_bytes")},
                 "runs": s.runs}
                for s in summaries.values()
            ],  # fmt: skip
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-measure":
        library, folder, settings, out = sys.argv[2:6]
        Path(out).write_text(json.dumps(child_measure(library, Path(folder), json.loads(settings))))
        sys.exit(0)
    sys.exit(main())
