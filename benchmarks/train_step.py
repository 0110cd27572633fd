"""Training step: lmport vs transformers, side by side: tokens per second and peak memory.

For each architecture a checkpoint is saved once by transformers (default: Llama 3's
vocabulary of 128,256 tokens, hidden 512, 4 layers); both libraries load it (sdpa) and run
full training steps (forward with labels, backward, AdamW step) on 2 x 1024 tokens, eager and
under ``torch.compile`` (inductor; the optimizer step stays eager), in fp32 and bf16. lmport
runs with its defaults: in training with labels its loss is taken chunk by chunk, without
the full logits.

Each run is its own process (one model in memory at a time, peak memory measured cleanly).
Memory, from /proc/self/status: "fwd+bwd" is the peak resident size during forward and
backward minus the resident size before the step (the steady state: weights and AdamW state),
the issue's measure; "total" is the peak over the whole step (optimizer update included) minus
the resident size before the model was loaded, compared with ``lmport estimate``'s peak.
glibc is told (MALLOC_MMAP_THRESHOLD_) to return freed blocks over 1 MiB to the system at
once, so that the resident size follows live tensors for both libraries alike.
Compilation happens in the warm-up steps and is reported apart ("compile s").

    python benchmarks/train_step.py                          # llama, fp32 and bf16, eager and compiled
    python benchmarks/train_step.py --steps 3 --dtype fp32 --no-compile
    python benchmarks/train_step.py --arch gpt2 --vocab 8000 --seq 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)),
    "gpt2": ("GPT2Config", dict(n_embd=512, n_layer=4, n_head=8, n_positions=2048,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "mistral": ("MistralConfig", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, sliding_window=128,
                                      max_position_embeddings=2048)),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RUNS = ("transformers", "lmport", "transformers compiled", "lmport compiled")
MiB = 1 << 20


def make_checkpoint(arch: str, vocab: int, folder: Path) -> Path:
    import transformers

    config_name, values = PRESETS[arch]
    config = getattr(transformers, config_name)(vocab_size=vocab, **values)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# --- one run, in its own process -----------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def rss() -> int:
    """Resident bytes now."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def peak() -> int:
    """Peak resident bytes since the last :func:`reset_peak`."""
    return _status_kib("VmHWM") * 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, (compile,) and train ``spec["steps"]`` timed steps after ``spec["warmup"]``; times and memory."""
    library, compiled, dtype = spec["library"], spec["compiled"], DTYPES[spec["dtype"]]
    if library == "transformers":
        import transformers

        auto: Any = transformers.AutoModelForCausalLM
    else:
        import lmport

        auto = lmport.AutoModelForCausalLM
    gc.collect()
    baseline = rss()
    model = auto.from_pretrained(spec["folder"], dtype=dtype, attn_implementation="sdpa").train()
    call = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0))
    times, fwd_bwd, totals, losses = [], [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        gc.collect()
        before = rss()
        reset_peak()
        start = time.perf_counter()
        loss = call(input_ids=batch, labels=batch).loss
        loss.backward()
        after_backward = peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        del loss
        times.append(elapsed)
        if i >= spec["warmup"]:
            fwd_bwd.append(after_backward - before)
            totals.append(peak() - baseline)
    timed = times[spec["warmup"] :]
    median = statistics.median(timed)
    tokens = spec["batch"] * spec["seq"]
    return {
        "median_s": median,
        "tokens_per_s": tokens / median,
        "compile_s": times[0] - median if compiled else None,
        "fwd_bwd_peak_bytes": max(fwd_bwd),
        "total_peak_bytes": max(totals),
        "first_loss": losses[0],
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB), "MALLOC_TRIM_THRESHOLD_": str(MiB)}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"{spec['library']} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate(folder: Path, dtype: torch.dtype, batch: int, seq: int) -> int:
    """``lmport estimate``'s peak for full fine-tuning of ``folder`` (no checkpointing)."""
    import lmport
    from lmport.estimate import estimate_memory
    from lmport.registry import get_registry

    config = lmport.AutoConfig.from_pretrained(folder)
    get_registry().ensure(config.model_type)
    model_class = get_registry().hook.lmport_resolve_model_class(config=config)
    return estimate_memory(model_class, config, batch_size=batch, seq_len=seq, dtype=dtype).peak


def bench(arch: str, folder: Path, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every run of ``RUNS`` (compiled ones unless ``--no-compile``) on ``folder`` in ``dtype``, and the estimate."""
    runs = [r for r in RUNS if not (args.no_compile and r.endswith("compiled"))]
    spec = dict(folder=str(folder), dtype=dtype, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup)
    result: dict[str, Any] = {"arch": arch, "dtype": dtype, "tokens_per_step": args.batch * args.seq}
    for name in runs:
        library, _, mode = name.partition(" ")
        result[name] = run_worker({**spec, "library": library, "compiled": mode == "compiled"})
    for suffix in ("", " compiled"):
        ours, theirs = result.get("lmport" + suffix), result.get("transformers" + suffix)
        if ours and theirs:
            key = "compiled_" if suffix else ""
            result[key + "speed_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            result[key + "memory_ratio"] = ours["fwd_bwd_peak_bytes"] / theirs["fwd_bwd_peak_bytes"]
    first = [result[name]["first_loss"] for name in runs]  # same weights, same batch: the same loss
    result["first_loss_spread"] = (max(first) - min(first)) / abs(first[0])
    result["estimate_peak_bytes"] = estimate(folder, DTYPES[dtype], args.batch, args.seq)
    result["estimate_error"] = result["estimate_peak_bytes"] / result["lmport"]["total_peak_bytes"] - 1
    return result


def print_row(r: dict[str, Any], compiled: bool) -> None:
    def cols(suffix: str) -> str:
        tf, ours = r["transformers" + suffix], r["lmport" + suffix]
        key = "compiled_" if suffix else ""
        w = (10, 8) if suffix else (8, 7)
        return (
            f"{tf['tokens_per_s']:>{w[0]}.0f} {ours['tokens_per_s']:>{w[0]}.0f} {r[key + 'speed_ratio']:>6.2f}  "
            f"{tf['fwd_bwd_peak_bytes'] / MiB:>{w[1]}.0f} {ours['fwd_bwd_peak_bytes'] / MiB:>{w[1]}.0f} "
            f"{r[key + 'memory_ratio']:>6.2f}"
        )

    line = f"{r['arch']:<8}{r['dtype']:<5} {cols('')}"
    if compiled:
        compile_s = f"{r['transformers compiled']['compile_s']:.0f}/{r['lmport compiled']['compile_s']:.0f}"
        line += f" | {cols(' compiled')} {compile_s:>9}"
    measured = r["lmport"]["total_peak_bytes"] / MiB
    line += f" | {r['estimate_peak_bytes'] / MiB:>6.0f} {measured:>6.0f} {100 * r['estimate_error']:>+5.1f}%"
    line += f"  (first-step losses agree within {r['first_loss_spread']:.1e})"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=sorted(PRESETS), help="repeatable; default: llama")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default: fp32, bf16")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    compiled = not args.no_compile
    print(f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, sdpa, AdamW, {args.steps} timed steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; tok/s: tokens per second; "
          "MiB: peak fwd+bwd memory over the steady state; est/meas: lmport estimate's peak vs the measured "
          "peak of the whole step (eager lmport)")  # fmt: skip
    head = f"{'tf tok/s':>8} {'lm tok/s':>8} {'ratio':>6}  {'tf MiB':>7} {'lm MiB':>7} {'ratio':>6}"
    header = f"{'arch':<8}{'':<5} {head}"
    if compiled:
        compiled_head = f"{'tf c tok/s':>10} {'lm c tok/s':>10} {'ratio':>6}  {'tf c MiB':>8} {'lm c MiB':>8} {'ratio':>6}"
        header += f" | {compiled_head} {'compile s':>9}"
    print(header + f" | {'est':>6} {'meas':>6} {'err':>6}")
    print("targets: speed ratio >= 1.00, memory ratio <= 0.30, estimate within 15%")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ["llama"]:
            folder = make_checkpoint(arch, args.vocab, Path(tmp) / arch)
            for dtype in args.dtype or ["fp32", "bf16"]:
                r = bench(arch, folder, dtype, args)
                results.append(r)
                print_row(r, compiled)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
