#!/usr/bin/env python
"""Load-time and peak-memory benchmark: lmport vs transformers, side by side, in one run.

Both libraries load the same checkpoint (written by transformers' own
``save_pretrained``) through ``AutoModelForCausalLM.from_pretrained``. Every
measurement runs in a fresh Python process, so its peak RSS is that load's alone;
libraries are interleaved (and their order alternates between repeats) so that
drifting background load hits both alike, and medians over ``--repeats`` are
reported.

What one measurement is (in the child process):

1. import torch and the library under test, then record the baseline RSS and reset
   the kernel's RSS high-water mark (``/proc/self/clear_refs``), so transient peaks
   of the imports do not count;
2. time ``from_pretrained(path, dtype=...)`` and then a pass that reads one element in
   every 4 KiB page of every parameter, so weights left lazily memory-mapped (both
   libraries do this when no cast is needed) are paid for too;
3. read the peak RSS (``VmHWM`` from ``/proc/self/status``, which the reset above makes
   the load's own peak; ``ru_maxrss`` is recorded too).

Time is that whole span ("total"); "call" is ``from_pretrained`` alone. RSS counts
file-backed pages too: a weight that is a view into the mmap'd checkpoint shows up
as ``RssFile`` rather than ``RssAnon`` (both reported at the end of the load).

Usage::

    python benchmarks/load.py                       # 1b preset, 3 repeats
    python benchmarks/load.py --size tiny --repeats 1
    python benchmarks/load.py --json out.json

A preset is plain data (see :data:`PRESETS`): a ``model_type``, the config fields
and the transformers classes that build and save it. Adding one is one entry in that dict.

The parent process imports neither torch nor either library: it only orchestrates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("lmport", "transformers")
DTYPES = ("auto", "float32")
#: Targets printed alongside the results.
TARGET_TIME_RATIO = 0.7  # lmport load time <= 0.7x transformers'
TARGET_RSS_OVER_MODEL = 1.1  # lmport peak RSS delta <= 1.1x the loaded model's bytes

CHILD_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


# --- presets: plain data -----------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A synthetic checkpoint to benchmark on.

    Attributes:
        model_type: the ``model_type`` written into config.json (chooses the lmport plugin).
        config: fields passed to ``config_class`` (beyond ``model_type``).
        config_class: dotted path of the transformers config class.
        model_class: dotted path of the transformers model class whose
            ``save_pretrained`` writes the checkpoint.
        dtype: the dtype the checkpoint is saved in (what ``dtype="auto"`` loads).
        description: one line for the report.
    """

    model_type: str
    config: dict[str, Any]
    config_class: str
    model_class: str
    dtype: str = "bfloat16"
    description: str = ""

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_LLAMA_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_bias": False,
    "mlp_bias": False,
}

PRESETS: dict[str, Preset] = {
    "1b": Preset(
        model_type="llama",
        config={
            **_LLAMA_COMMON,
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
        },
        config_class="transformers.LlamaConfig",
        model_class="transformers.LlamaForCausalLM",
        description="TinyLlama-1.1B shape (1.1B params), bf16",
    ),
    "tiny": Preset(
        model_type="llama",
        config={
            **_LLAMA_COMMON,
            "vocab_size": 32000,
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        config_class="transformers.LlamaConfig",
        model_class="transformers.LlamaForCausalLM",
        description="smoke-test Llama (4.2M params, ~8 MB), bf16",
    ),
    "gpt2-small": Preset(
        model_type="gpt2",
        config={
            "vocab_size": 50257,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "n_positions": 1024,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
        config_class="transformers.GPT2Config",
        model_class="transformers.GPT2LMHeadModel",
        description="GPT-2 small shape (124M params, tied head), bf16",
    ),
}


# --- child process: build a checkpoint ---------------------------------------------------


def _import_dotted(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def child_build(preset: Preset, folder: Path) -> None:
    """Write ``preset``'s checkpoint with transformers' save_pretrained, using ~1x the model's bytes.

    The model is built on the meta device, given uninitialised storage directly in the
    checkpoint dtype (no float32 copy), and filled in place with small random values.
    """
    import torch

    dtype = getattr(torch, preset.dtype)
    config = _import_dotted(preset.config_class)(**preset.config)
    config.dtype = preset.dtype
    with torch.device("meta"):
        model = _import_dotted(preset.model_class)(config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters appear once
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:  # norm weights
                param.fill_(1.0)
        # Non-persistent buffers (rotary tables) hold garbage after to_empty; they are not saved.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.save_pretrained(str(folder))


# --- child process: one measurement -----------------------------------------------------


def _proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status, in bytes (Linux only; {} elsewhere)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _current_rss() -> int:
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"]
    import resource

    return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _maxrss_bytes(value: int) -> int:
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _touch(p: Any) -> float:
    """Read one element in every 4 KiB page of ``p``: materialises lazily mapped weights fully.

    A full ``p.sum()`` would add seconds of arithmetic (bf16 sums are slow on CPU) that are
    the same for both libraries and only dilute the ratios; one read per page still faults
    in every page of a weight that is backed by a file mapping.
    """
    flat = p.detach().reshape(-1)  # a copy (which reads everything) if p is not contiguous
    step = max(1, 4096 // p.element_size())
    return float(flat[::step].float().sum())


def child_measure(library: str, dtype: str, folder: Path) -> dict[str, Any]:
    import resource

    import torch

    if library == "lmport":
        from lmport import AutoModelForCausalLM
    elif library == "transformers":
        from transformers import AutoModelForCausalLM
    else:
        raise SystemExit(f"unknown library {library!r}")
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)

    baseline = _current_rss()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    t1 = time.perf_counter()
    checksum = 0.0
    with torch.no_grad():
        for p in model.parameters():  # every (unique) parameter
            checksum += _touch(p)
    t2 = time.perf_counter()

    maxrss = _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    status = _proc_status()
    peak = status.get("VmHWM", maxrss)
    params = list(model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return {
        "library": library,
        "dtype": dtype,
        "loaded_dtypes": dtypes,
        "call_s": t1 - t0,
        "touch_s": t2 - t1,
        "total_s": t2 - t0,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "ru_maxrss": maxrss,
        "peak_reset": reset,
        "delta_rss": peak - baseline,
        "end_rss": status.get("VmRSS", 0),
        "end_rss_anon": status.get("RssAnon", 0),
        "end_rss_file": status.get("RssFile", 0),
        "model_bytes": sum(p.nbytes for p in params),
        "num_params": sum(p.numel() for p in params),
        "checksum": checksum,
        "torch_threads": torch.get_num_threads(),
    }


# --- parent: orchestration --------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    return env


def _run_child(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ensure_checkpoint(name: str, preset: Preset, cache: Path, timeout: float) -> Path:
    """The checkpoint folder for ``preset``: reused if complete and of the same preset, else built."""
    folder = cache / f"{name}-{preset.dtype}"
    marker = folder / ".lmport-bench.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == preset.fingerprint():
                return folder
        except (OSError, json.JSONDecodeError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file():
            old.unlink()
    print(f"building checkpoint {folder} ({preset.description}) ...", flush=True)
    t0 = time.perf_counter()
    spec = json.dumps(asdict(preset))
    result = _run_child(["--child-build", spec, str(folder)], timeout)
    if result.returncode != 0:
        raise SystemExit(f"building the checkpoint failed:\n{result.stderr[-4000:]}")
    marker.write_text(json.dumps({"preset": name, "fingerprint": preset.fingerprint(), **asdict(preset)}, indent=1))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    print(f"  done in {time.perf_counter() - t0:.1f}s, {_fmt_bytes(size)} on disk", flush=True)
    return folder


def warm_page_cache(folder: Path) -> int:
    """Read every file of ``folder`` once so that every load reads from the page cache."""
    total = 0
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def measure(library: str, dtype: str, folder: Path, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    try:
        result = _run_child(["--child-measure", library, dtype, str(folder), str(out)], timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{library} dtype={dtype} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


@dataclass
class Summary:
    library: str
    dtype: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:
        cells = (str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def report(summaries: dict[tuple[str, str], Summary], dtypes: list[str], libraries: list[str]) -> dict[str, Any]:
    header = ["library", "dtype", "loaded", "call s", "total s", "peak RSS", "baseline", "delta RSS", "model bytes",
              "delta/model", "end anon", "end file"]  # fmt: skip
    rows = []
    for dtype in dtypes:
        for lib in libraries:
            s = summaries[(lib, dtype)]
            model_bytes = s.median("model_bytes")
            rows.append([
                lib, dtype, ",".join(s.runs[0]["loaded_dtypes"]),
                f"{s.median('call_s'):.2f}", f"{s.median('total_s'):.2f}",
                _fmt_bytes(s.median("peak_rss")), _fmt_bytes(s.median("baseline_rss")),
                _fmt_bytes(s.median("delta_rss")), _fmt_bytes(model_bytes),
                f"{s.median('delta_rss') / model_bytes:.2f}x",
                _fmt_bytes(s.median("end_rss_anon")), _fmt_bytes(s.median("end_rss_file")),
            ])  # fmt: skip
    print()
    print("medians; 'total' = from_pretrained + touching every page of every parameter; "
          "'delta RSS' = peak RSS - RSS after imports; 'end anon/file' = RSS at the end by kind")
    print(_table(rows, header))

    ratios: dict[str, Any] = {}
    if {"lmport", "transformers"} <= set(libraries):
        print()
        rheader = ["dtype", "time lmport/tf", f"target <= {TARGET_TIME_RATIO}", "delta RSS lmport/tf",
                   "lmport delta/model", f"target <= {TARGET_RSS_OVER_MODEL}"]  # fmt: skip
        rrows = []
        for dtype in dtypes:
            lm, tf = summaries[("lmport", dtype)], summaries[("transformers", dtype)]
            time_ratio = lm.median("total_s") / tf.median("total_s")
            rss_ratio = lm.median("delta_rss") / tf.median("delta_rss")
            over_model = lm.median("delta_rss") / lm.median("model_bytes")
            ratios[dtype] = {
                "time_ratio": time_ratio,
                "delta_rss_ratio": rss_ratio,
                "lmport_delta_over_model": over_model,
                "time_target_met": time_ratio <= TARGET_TIME_RATIO,
                "rss_target_met": over_model <= TARGET_RSS_OVER_MODEL,
            }
            rrows.append([
                dtype, f"{time_ratio:.2f}", "PASS" if time_ratio <= TARGET_TIME_RATIO else "FAIL",
                f"{rss_ratio:.2f}", f"{over_model:.2f}", "PASS" if over_model <= TARGET_RSS_OVER_MODEL else "FAIL",
            ])  # fmt: skip
        print(_table(rrows, rheader))
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="1b", help="checkpoint preset (default: 1b)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per library and dtype (default: 3)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"dtypes to load in (default: {DTYPES})")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".bench", help="checkpoint cache (default: .bench/)")
    parser.add_argument("--json", type=Path, help="also write raw runs and medians to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process")
    parser.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every measuring process, both libraries alike "
                             "(e.g. THP_MEM_ALLOC_ENABLE=1); repeatable")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    for item in args.child_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--child-env expects KEY=VALUE, got {item!r}")
        CHILD_ENV[key] = value

    preset = PRESETS[args.size]
    folder = ensure_checkpoint(args.size, preset, args.cache, args.timeout)
    warmed = warm_page_cache(folder)
    print(f"checkpoint: {folder} ({preset.description}); page cache warmed ({_fmt_bytes(warmed)})")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} repeat(s), fresh process per load")

    summaries = {(lib, dt): Summary(lib, dt) for lib in args.libraries for dt in args.dtypes}
    for r in range(args.repeats):
        order = list(args.libraries) if r % 2 == 0 else list(reversed(args.libraries))
        for dtype in args.dtypes:
            for lib in order:
                run = measure(lib, dtype, folder, args.timeout)
                summaries[(lib, dtype)].runs.append(run)
                print(
                    f"  [{r + 1}/{args.repeats}] {lib:<12} {dtype:<8} total {run['total_s']:6.2f}s "
                    f"(call {run['call_s']:.2f}s)  delta RSS {_fmt_bytes(run['delta_rss'])}",
                    flush=True,
                )

    # Both libraries must have loaded the same thing, or the comparison means nothing.
    for dtype in args.dtypes:
        sizes = {lib: summaries[(lib, dtype)].runs[0]["model_bytes"] for lib in args.libraries}
        if len(set(sizes.values())) > 1:
            print(f"WARNING: dtype={dtype}: loaded model bytes differ between libraries: {sizes}")

    ratios = report(summaries, args.dtypes, args.libraries)
    if args.json:
        payload = {
            "preset": args.size,
            "preset_spec": asdict(preset),
            "checkpoint": str(folder),
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "child_env": CHILD_ENV,
            "targets": {"time_ratio": TARGET_TIME_RATIO, "delta_rss_over_model": TARGET_RSS_OVER_MODEL},
            "results": [
                {
                    "library": s.library,
                    "dtype": s.dtype,
                    "medians": {k: s.median(k) for k in ("call_s", "touch_s", "total_s", "baseline_rss", "peak_rss",
                                                         "delta_rss", "model_bytes")},  # fmt: skip
                    "runs": s.runs,
                }
                for s in summaries.values()
            ],
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def _child_main(argv: list[str]) -> int:
    if argv[0] == "--child-build":
        child_build(Preset(**json.loads(argv[1])), Path(argv[2]))
        return 0
    if argv[0] == "--child-measure":
        library, dtype, folder, out = argv[1:5]
        result = child_measure(library, dtype, Path(folder))
        Path(out).write_text(json.dumps(result))
        return 0
    raise SystemExit(f"unknown child command {argv[0]!r}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--child-"):
        sys.exit(_child_main(sys.argv[1:]))
    sys.exit(main())
