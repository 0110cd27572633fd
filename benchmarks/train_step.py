"""Training-step throughput: lmport vs transformers, side by side, same checkpoint and data.

For each architecture a checkpoint is saved once by transformers; both libraries
load it (fp32, sdpa) and run full training steps (forward, backward, AdamW step),
each library twice: eager, and ``torch.compile(model)`` (inductor; the optimizer step
stays eager). Steps rotate between the four runs so drift on the machine hits all.
Compilation happens in the warm-up steps and is reported apart ("compile s": the
first step's time minus the median step's).

    python benchmarks/train_step.py                    # llama, gpt2, mistral
    python benchmarks/train_step.py --arch llama --steps 20 --seq 512
    python benchmarks/train_step.py --no-compile       # eager columns only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import lmport  # noqa: E402

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)),
    "gpt2": ("GPT2Config", dict(vocab_size=8000, n_embd=512, n_layer=4, n_head=8, n_positions=2048,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "mistral": ("MistralConfig", dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, sliding_window=128,
                                      max_position_embeddings=2048)),
}  # fmt: skip


def make_checkpoint(arch: str, folder: Path) -> Path:
    import transformers

    config_name, values = PRESETS[arch]
    config = getattr(transformers, config_name)(**values)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def step(model: Any, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def load(library: str, folder: Path) -> Any:
    import transformers

    auto = transformers.AutoModelForCausalLM if library == "transformers" else lmport.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").train()


def bench(
    arch: str, folder: Path, steps: int, warmup: int, batch_size: int, seq: int, compiled: bool = True
) -> dict[str, Any]:
    """Median step time and tokens/s of each run (``lmport``, ``transformers`` and, with ``compiled``,
    ``lmport compiled`` and ``transformers compiled``: separate models, so no run trains another's weights)."""
    torch._dynamo.reset()
    libraries = ("transformers", "lmport")
    models: dict[str, Any] = {name: load(name, folder) for name in libraries}
    if compiled:
        for name in libraries:
            models[f"{name} compiled"] = torch.compile(load(name, folder))
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    vocab = PRESETS[arch][1]["vocab_size"]
    batch = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    first: dict[str, float] = {}
    names = list(models)
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order every step
            t = step(models[name], optimizers[name], batch)
            first.setdefault(name, t)
            if i >= warmup:
                times[name].append(t)
    tokens = batch_size * seq
    result: dict[str, Any] = {"arch": arch, "tokens_per_step": tokens}
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {"median_s": median, "tokens_per_s": tokens / median}
        if name.endswith("compiled"):
            result[name]["compile_s"] = first[name] - median
    speed = {name: result[name]["tokens_per_s"] for name in models}
    result["ratio"] = speed["lmport"] / speed["transformers"]
    if compiled:
        result["compiled_ratio"] = speed["lmport compiled"] / speed["transformers compiled"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=sorted(PRESETS), help="repeatable; default: all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(f"batch {args.batch} x seq {args.seq}, fp32, sdpa, AdamW, {args.steps} timed steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    compiled = not args.no_compile
    header = f"{'arch':<8} {'transformers tok/s':>19} {'lmport tok/s':>13} {'ratio':>7}"
    if compiled:
        header += f" | {'transformers compiled':>21} {'lmport compiled':>15} {'ratio':>7}"
        header += f" | {'compile s (tf / lmport)':>23}"
    print(header + "  (target: ratios >= 1.00)")
    for arch in args.arch or sorted(PRESETS):
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_checkpoint(arch, Path(tmp) / arch)
            r = bench(arch, folder, args.steps, args.warmup, args.batch, args.seq, compiled)
        results.append(r)
        tf, ours = r["transformers"], r["lmport"]
        line = f"{arch:<8} {tf['tokens_per_s']:>19.0f} {ours['tokens_per_s']:>13.0f} {r['ratio']:>7.3f}"
        if compiled:
            tf, ours = r["transformers compiled"], r["lmport compiled"]
            compile_s = f"{tf['compile_s']:.1f} / {ours['compile_s']:.1f}"
            line += f" | {tf['tokens_per_s']:>21.0f} {ours['tokens_per_s']:>15.0f} {r['compiled_ratio']:>7.3f}"
            line += f" | {compile_s:>23}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
