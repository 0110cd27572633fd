"""Training-step throughput: lmport vs transformers, side by side, same checkpoint and data.

For each architecture a checkpoint is saved once by transformers; both libraries
load it (fp32, sdpa) and run full training steps (forward, backward, AdamW step).
Steps alternate between the two libraries so drift on the machine hits both.

    python benchmarks/train_step.py                    # llama, gpt2, mistral
    python benchmarks/train_step.py --arch llama --steps 20 --seq 512
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


def bench(arch: str, folder: Path, steps: int, warmup: int, batch_size: int, seq: int) -> dict[str, Any]:
    import transformers

    models = {
        "transformers": transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa"),
        "lmport": lmport.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa"),
    }  # fmt: skip
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    for m in models.values():
        m.train()
    vocab = PRESETS[arch][1]["vocab_size"]
    batch = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name in (("transformers", "lmport") if i % 2 == 0 else ("lmport", "transformers")):
            t = step(models[name], optimizers[name], batch)
            if i >= warmup:
                times[name].append(t)
    tokens = batch_size * seq
    result: dict[str, Any] = {"arch": arch, "tokens_per_step": tokens}
    for name, ts in times.items():
        result[name] = {"median_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts)}
    result["ratio"] = result["lmport"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=sorted(PRESETS), help="repeatable; default: all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(f"batch {args.batch} x seq {args.seq}, fp32, sdpa, AdamW, {args.steps} timed steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'arch':<8} {'transformers tok/s':>19} {'lmport tok/s':>13} {'ratio':>7}  (target >= 1.00)")
    for arch in args.arch or sorted(PRESETS):
        with tempfile.TemporaryDirectory() as tmp:
            r = bench(arch, make_checkpoint(arch, Path(tmp) / arch), args.steps, args.warmup, args.batch, args.seq)
        results.append(r)
        print(f"{arch:<8} {r['transformers']['tokens_per_s']:>19.0f} {r['lmport']['tokens_per_s']:>13.0f} {r['ratio']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
