#!/usr/bin/env python
"""Distributed load benchmark: lmport vs transformers loading straight into an FSDP2 model, side by side.

Both libraries load the same checkpoint (written by transformers' ``save_pretrained``; the ``1b``
preset is the TinyLlama-1.1B shape in bf16, shared with ``benchmarks/load.py``'s cache) with

    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                         distributed_config=DistributedConfig(fsdp_size=N))

under ``torchrun --standalone --nproc_per_node=N`` (gloo on CPU, NCCL on GPUs). What one rank measures:

1. import torch, ``torch.distributed.fsdp``/``tensor`` and the library, join the process group (both
   libraries would otherwise do it inside the call), record the baseline RSS and reset the kernel's
   RSS high-water mark (``/proc/self/clear_refs``); on a GPU, reset CUDA's peak statistics;
2. time ``from_pretrained`` and a pass that reads one element in every 4 KiB page of each local shard
   (weights left memory-mapped are paid for too), ended by a barrier: "time" is the slowest rank's;
3. read the peak RSS growth (``VmHWM`` - baseline) and, on a GPU, ``max_memory_allocated``.

The first ``DTensor`` a process makes imports ``torch._dynamo`` (torch decorates DTensor's constructor
with ``torch._disable_dynamo``): about 1-2 s on a small CPU, paid inside ``from_pretrained`` by both
libraries and once by any FSDP2 job. ``--warm-torch`` imports it before timing, in both libraries' runs,
to compare the loaders' own work.

The ratios that matter: per-rank peak RSS growth / the whole model's bytes (ideal 1/N), and lmport's
time / transformers'. Libraries alternate, each run is a fresh ``torchrun``, medians over ``--repeats``.

Usage::

    python benchmarks/distributed_load.py                     # 1b preset, 2 ranks, 3 repeats
    python benchmarks/distributed_load.py --size tiny --repeats 1
    python benchmarks/distributed_load.py --warm-torch          # torch._dynamo imported before timing
    python benchmarks/distributed_load.py --nproc 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import CHILD_ENV, PRESETS, ensure_checkpoint, warm_page_cache  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("lmport", "transformers")
TARGET_RSS_OVER_MODEL = 0.55  # per-rank peak RSS growth <= 0.55x the model's bytes at 2 ranks
TARGET_TIME_RATIO = 0.5  # lmport's time <= 0.5x transformers'


# --- child: one rank of one measurement ----------------------------------------------------------


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(library: str, folder: Path, out: Path, warm: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401 - imported by both libraries; not the load's cost
    import torch.distributed.tensor  # noqa: F401

    if warm:  # torch's one-time cost of the first DTensor in a process (any FSDP2 job pays it once)
        import torch._dynamo  # noqa: F401

    if library == "lmport":
        from lmport import AutoModelForCausalLM
        from lmport.distributed import DistributedConfig
    else:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dist.barrier()
    baseline = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the imports' peaks do not count
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, distributed_config=DistributedConfig(fsdp_size=world)
    )
    t1 = time.perf_counter()
    local_bytes = total_bytes = 0
    checksum = 0.0
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local_bytes += local.numel() * local.element_size()
            total_bytes += p.numel() * p.element_size()
            if local.numel():
                flat = local.reshape(-1)
                checksum += float(flat[:: max(1, 4096 // local.element_size())].float().sum())
    dist.barrier()
    t2 = time.perf_counter()
    status = _status()
    result = {
        "library": library,
        "rank": rank,
        "world": world,
        "call_s": t1 - t0,
        "total_s": t2 - t0,
        "delta_rss": status["VmHWM"] - baseline,
        "end_rss_anon": status["RssAnon"],
        "end_rss_file": status["RssFile"],
        "local_bytes": local_bytes,
        "model_bytes": total_bytes,
        "sharded": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "checksum": checksum,
    }
    (out / f"{library}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --- parent ---------------------------------------------------------------------------------------


def measure(library: str, folder: Path, nproc: int, timeout: float, warm: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--child", library, str(folder), tmp] + ["--warm-torch"] * warm  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"{library} run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return [json.loads((Path(tmp) / f"{library}-rank{r}.json").read_text()) for r in range(nproc)]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes) to shard over")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".bench", help="checkpoint cache (default: .bench/)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    parser.add_argument(
        "--warm-torch",
        action="store_true",
        help="import torch._dynamo before timing, in both libraries' runs: torch's one-time cost of a process's first "
        "DTensor (seconds on a small CPU) then counts for neither",
    )
    parser.add_argument("--child", nargs=3, metavar=("LIBRARY", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.warm_torch)
        return 0

    preset = PRESETS[args.size]
    folder = ensure_checkpoint(args.size, preset, args.cache, args.timeout)
    warm_page_cache(folder)
    print(f"checkpoint: {folder} ({preset.description}); {args.nproc} ranks, {os.cpu_count()} CPUs"
          + (", torch._dynamo imported before timing" if args.warm_torch else ""), flush=True)  # fmt: skip
    runs: dict[str, list[list[dict[str, Any]]]] = {lib: [] for lib in LIBRARIES}
    for repeat in range(args.repeats):
        for library in LIBRARIES if repeat % 2 == 0 else LIBRARIES[::-1]:
            ranks = measure(library, folder, args.nproc, args.timeout, args.warm_torch)
            runs[library].append(ranks)
            print(f"  {library:12s} run {repeat + 1}: {max(r['total_s'] for r in ranks):6.2f} s, peak RSS growth "
                  f"per rank {gib(max(r['delta_rss'] for r in ranks))}", flush=True)  # fmt: skip

    summary: dict[str, dict[str, Any]] = {}
    for library, repeats in runs.items():
        model_bytes = repeats[0][0]["model_bytes"]
        summary[library] = {
            "time_s": statistics.median(max(r["total_s"] for r in ranks) for ranks in repeats),
            "call_s": statistics.median(max(r["call_s"] for r in ranks) for ranks in repeats),
            "rss_per_rank": statistics.median(max(r["delta_rss"] for r in ranks) for ranks in repeats),
            "gpu_per_rank": (statistics.median(max(r["gpu_peak"] for r in ranks) for ranks in repeats)
                             if repeats[0][0]["gpu_peak"] is not None else None),  # fmt: skip
            "model_bytes": model_bytes,
            "local_bytes": max(r["local_bytes"] for r in repeats[0]),
            "sharded_params": repeats[0][0]["sharded"],
        }
        summary[library]["rss_over_model"] = summary[library]["rss_per_rank"] / model_bytes
    ours, ref = summary["lmport"], summary["transformers"]
    print(f"\nmodel: {gib(ours['model_bytes'])}; each rank's shards: {gib(ours['local_bytes'])}")
    print(f"{'library':14s}{'time':>10s}{'from_pretrained':>17s}{'peak RSS growth/rank':>22s}{'x model':>9s}"
          + (f"{'GPU/rank':>12s}" if ours["gpu_per_rank"] is not None else ""))  # fmt: skip
    for library, s in summary.items():
        gpu = f"{gib(s['gpu_per_rank']):>12s}" if s["gpu_per_rank"] is not None else ""
        print(f"{library:14s}{s['time_s']:9.2f}s{s['call_s']:16.2f}s{gib(s['rss_per_rank']):>22s}"
              f"{s['rss_over_model']:9.2f}{gpu}")  # fmt: skip
    time_ratio = ours["time_s"] / ref["time_s"]
    print(f"\nlmport / transformers: time {time_ratio:.2f}x (target <= {TARGET_TIME_RATIO}), peak RSS growth per rank "
          f"{ours['rss_per_rank'] / ref['rss_per_rank']:.2f}x; lmport's per-rank peak = {ours['rss_over_model']:.2f}x the "
          f"model (target <= {TARGET_RSS_OVER_MODEL} at 2 ranks, ideal {1 / args.nproc:.2f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "time_ratio": time_ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
