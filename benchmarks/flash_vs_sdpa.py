"""flash_attention_2 vs sdpa on one CUDA GPU: logits parity and forward+backward time.

For Llama and Mistral (sliding window shorter than the sequence), a checkpoint is written
once in bf16 and loaded three times through ``lmport.AutoModelForCausalLM.from_pretrained``:
bf16 with ``attn_implementation="flash_attention_2"``, bf16 with ``"sdpa"``, and float32
with ``"sdpa"`` as the reference. Then:

- **Parity**, per case (causal, left padding, right padding, packed documents with
  ``position_ids`` restarting at 0, cached decoding after a left-padded prefill): the
  largest logit error of each bf16 kernel against the fp32 reference, at real tokens.
  flash passes when its error is at most ``2 x sdpa's + 1e-3 x max|logit|`` (both run the
  same bf16 layers around attention, so a correct kernel lands next to sdpa). Each case
  also runs sdpa with the feature switched off (padding ignored, no document boundaries,
  no window) and reports how far that lands: a check is only "sharp" when a kernel
  that ignored the feature would have failed it.
- **Timing**: forward + backward (loss on all tokens) for a causal batch and for the same
  tokens packed into one row, median of CUDA-event timings, with peak memory.

Weights are random with fan-in scaling (std ``fan_in ** -0.5``, unit embeddings), so
attention is far from uniform and masks change the logits by O(1).

    python benchmarks/flash_vs_sdpa.py                  # medium (~1B parameters), < 5 min on an H200
    python benchmarks/flash_vs_sdpa.py --size small     # ~0.1B, seconds
    python benchmarks/flash_vs_sdpa.py --dry-run        # CPU, fp32, eager standing in for flash: checks this script

Exit status: 0 when every parity check passes, 1 when one fails, 2 when this machine
cannot run it (no CUDA device, or flash-attn missing or broken).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

import lmport  # noqa: E402
from lmport.cache import KVCache  # noqa: E402
from lmport.plugins import flash_attention  # noqa: E402
from lmport.registry import get_registry  # noqa: E402

FLASH = "flash_attention_2"

#: size -> (config fields shared by both architectures, batch, sequence length)
SIZES: dict[str, tuple[dict[str, Any], int, int]] = {
    "tiny": (dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2), 2, 256),
    "small": (dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4), 4, 1024),
    "medium": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=8), 4, 2048),
}  # fmt: skip


def cannot_run() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    reason = flash_attention.availability(torch.device("cuda"), torch.bfloat16)
    if reason is not None:
        return f"flash_attention_2 {reason}"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # installed but broken (ABI mismatch with torch, say)
        return f"flash_attn is installed but does not import: {type(exc).__name__}: {exc}"
    return None


# --- checkpoints -----------------------------------------------------------------------------------


def make_checkpoint(arch: str, fields: dict[str, Any], folder: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """Write a random ``arch`` checkpoint with lmport's own save_pretrained (the Hugging Face layout)."""
    plugin = get_registry().architecture(arch)
    config = plugin.config_class.from_dict({**fields, "model_type": arch, "max_position_embeddings": 65536})
    model = lmport.AutoModelForCausalLM.from_config(config, device=device, seed=0)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0) if "norm" in name else param.zero_()
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=generator)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
    model.to(dtype).save_pretrained(folder)
    return folder


# --- cases -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A forward to compare: keyword arguments, which positions are real, and the same with the feature off."""

    name: str
    kwargs: dict[str, torch.Tensor]
    real: torch.Tensor  # (batch, seq) bool
    without: dict[str, torch.Tensor] | None = None  # the forward with the feature switched off
    no_window: bool = False  # "without" means: sliding window off


def left_right_masks(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [seq] + [int(x) for x in torch.randint(seq // 8, seq - seq // 8, (batch - 1,), generator=generator)]
    left = torch.zeros(batch, seq, dtype=torch.long)
    right = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        left[row, seq - n :] = 1
        right[row, :n] = 1
    return left, right


def packed_positions(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of rows holding several documents each (restarting at 0), as DataCollatorWithFlattening makes."""
    rows = []
    for _ in range(batch):
        positions: list[int] = []
        while len(positions) < seq:
            n = int(torch.randint(seq // 16, seq // 3, (1,), generator=generator))
            positions.extend(range(min(n, seq - len(positions))))
        rows.append(torch.tensor(positions))
    return torch.stack(rows)


def cases(vocab: int, batch: int, seq: int, windowed: bool, device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    left, right = left_right_masks(batch, seq, g)
    pos_left = (left.cumsum(-1) - 1).clamp(min=0)
    packed = packed_positions(batch, seq, g)
    everything = torch.ones(batch, seq, dtype=torch.bool)
    out = [
        Case("causal", {"input_ids": ids}, everything, {"input_ids": ids} if windowed else None, no_window=windowed),
        Case("left_padding", {"input_ids": ids, "attention_mask": left, "position_ids": pos_left}, left.bool(),
             {"input_ids": ids, "attention_mask": torch.ones_like(left), "position_ids": pos_left}),
        # Right pads follow every real token, so ignoring them changes no real position: no feature-off run.
        # What this case checks is the unpadding itself (varlen lengths and offsets of uneven rows).
        Case("right_padding", {"input_ids": ids, "attention_mask": right}, right.bool()),
        Case("packed", {"input_ids": ids, "position_ids": packed}, everything, {"input_ids": ids}),
    ]  # fmt: skip
    if windowed:
        out.append(Case("packed_window", {"input_ids": ids, "position_ids": packed}, everything,
                        {"input_ids": ids, "position_ids": packed}, no_window=True))  # fmt: skip
    for case in out:
        case.kwargs = {k: v.to(device) for k, v in case.kwargs.items()}
        case.real = case.real.to(device)
        if case.without is not None:
            case.without = {k: v.to(device) for k, v in case.without.items()}
    return out


@torch.no_grad()
def run_case(model: Any, case: Case, off: bool = False) -> torch.Tensor:
    """Float32 logits at the real positions (with the feature off when ``off``)."""
    kwargs = case.without if off else case.kwargs
    assert kwargs is not None
    saved = model.model.sliding_window
    if off and case.no_window:
        model.model.sliding_window = None
    try:
        logits = model(**kwargs).logits
    finally:
        model.model.sliding_window = saved
    return logits[case.real].float()


@torch.no_grad()
def decode(model: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Left-padded prefill, then ``steps`` tokens one at a time through the KV cache (teacher-forced)."""
    prompt = ids.shape[1] - steps
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache()
    model(ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt], past_key_values=cache)
    logits = []
    for i in range(prompt, ids.shape[1]):
        out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], position_ids=positions[:, i : i + 1],
                    past_key_values=cache)  # fmt: skip
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


# --- timing ------------------------------------------------------------------------------------------


def time_fwd_bwd(model: Any, kwargs: dict[str, torch.Tensor], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median milliseconds of forward + backward with labels, and peak memory in GiB."""
    model.train()
    labels = kwargs["input_ids"]
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 2):  # two warm-up steps
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**kwargs, labels=labels).loss.backward()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model(**kwargs, labels=labels).loss.backward()
            elapsed = (time.perf_counter() - t0) * 1000
        if i >= 2:
            times.append(elapsed)
    model.zero_grad(set_to_none=True)
    model.eval()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


# --- the run -----------------------------------------------------------------------------------------


def bench_arch(arch: str, args: argparse.Namespace, root: Path, device: torch.device, log: Callable[[str], None]) -> bool:
    fields, batch, seq = SIZES[args.size]
    fields = dict(fields)
    windowed = arch == "mistral"
    if windowed:
        fields["sliding_window"] = seq // 4
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    kernel = "eager" if args.dry_run else FLASH
    t0 = time.perf_counter()
    folder = make_checkpoint(arch, fields, root / arch, device, dtype)
    load = lambda attn, dt: lmport.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        folder, attn_implementation=attn, dtype=dt, device_map=str(device)
    )
    models = {kernel: load(kernel, dtype), "sdpa": load("sdpa", dtype)}
    reference = load("sdpa", torch.float32)
    assert models[kernel].attn_implementation == kernel and models["sdpa"].attn_implementation == "sdpa"
    params = sum(p.numel() for p in reference.parameters())
    window = f", sliding_window {fields['sliding_window']}" if windowed else ""
    log(f"\n## {arch}: {params / 1e6:.0f}M parameters, {str(dtype).removeprefix('torch.')}, batch {batch} x {seq}{window} "
        f"(checkpoint + 3 loads: {time.perf_counter() - t0:.1f} s)")  # fmt: skip

    header = f"{'case':<16} {kernel + ' err':>22} {'sdpa err':>10} {'bound':>10} {'feature-off err':>16}  verdict"
    log(header)
    log("-" * len(header))
    ok = True
    all_cases = cases(fields["vocab_size"], batch, seq, windowed, device)
    for case in all_cases:
        ref = run_case(reference, case)
        scale = ref.abs().max().item()
        err = {name: (run_case(m, case) - ref).abs().max().item() for name, m in models.items()}
        bound = 2 * err["sdpa"] + 1e-3 * scale
        off = (run_case(models["sdpa"], case, off=True) - ref).abs().max().item() if case.without else float("nan")
        passed = err[kernel] <= bound
        sharp = "" if case.without is None else (" (sharp)" if off > bound else " (NOT sharp: feature-off also within bound)")
        ok &= passed
        log(f"{case.name:<16} {err[kernel]:>22.4g} {err['sdpa']:>10.4g} {bound:>10.4g} {off:>16.4g}  "
            f"{'ok' if passed else 'FAIL'}{sharp}")  # fmt: skip

    # Cached decoding after a left-padded prefill (kv_len > q_len, padding, and the window for Mistral).
    steps = 16
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, fields["vocab_size"], (batch, seq // 2 + steps), generator=g).to(device)
    mask, _ = left_right_masks(batch, ids.shape[1], g)
    mask = mask.to(device)
    ref = decode(reference, ids, mask, steps)
    scale = ref.abs().max().item()
    err = {name: (decode(m, ids, mask, steps) - ref).abs().max().item() for name, m in models.items()}
    bound = 2 * err["sdpa"] + 1e-3 * scale
    off = (decode(models["sdpa"], ids, torch.ones_like(mask), steps) - ref).abs().max().item()
    passed = err[kernel] <= bound
    ok &= passed
    log(f"{'cached_decode':<16} {err[kernel]:>22.4g} {err['sdpa']:>10.4g} {bound:>10.4g} {off:>16.4g}  "
        f"{'ok' if passed else 'FAIL'}{' (sharp)' if off > bound else ' (NOT sharp)'}")  # fmt: skip
    del reference

    # Forward + backward: a causal batch, and the same tokens packed as documents.
    causal = next(c for c in all_cases if c.name == "causal").kwargs
    packed = next(c for c in all_cases if c.name == "packed").kwargs
    log(f"\n{'forward+backward':<18} {'kernel':<20} {'ms':>9} {'tokens/s':>12} {'peak GiB':>9}")
    for label, kwargs in (("causal", causal), ("packed", packed)):
        for name, model in models.items():
            ms, peak = time_fwd_bwd(model, kwargs, args.repeats, device)
            log(f"{label:<18} {name:<20} {ms:>9.2f} {batch * seq / ms * 1000:>12,.0f} {peak:>9.2f}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: medium; tiny with --dry-run)")
    parser.add_argument("--arch", choices=["llama", "mistral"], action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward steps per measurement")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on CPU in fp32 with the eager kernel standing in for flash (checks this script)")
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if args.dry_run else "medium")

    if args.dry_run:
        device = torch.device("cpu")
    else:
        reason = cannot_run()
        if reason is not None:
            print(f"flash_vs_sdpa: this machine cannot run the benchmark: {reason}.\n"
                  "Run it on a CUDA GPU with `pip install 'lmport[flash]'`; `--dry-run` checks the script on CPU.",
                  file=sys.stderr)  # fmt: skip
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
        torch.backends.cudnn.allow_tf32 = False
        import flash_attn

        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, flash_attn {flash_attn.__version__}, "
              f"lmport {lmport.__version__}")  # fmt: skip
    if args.dry_run:
        print(f"# dry run on CPU: eager stands in for {FLASH}; torch {torch.__version__}, lmport {lmport.__version__}")

    start = time.perf_counter()
    ok = True
    with tempfile.TemporaryDirectory(prefix="lmport-flash-bench-") as tmp:
        for arch in args.arch or ["llama", "mistral"]:
            ok &= bench_arch(arch, args, Path(tmp), device, lambda line: print(line, flush=True))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'all parity checks passed' if ok else 'SOME PARITY CHECKS FAILED'} ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
