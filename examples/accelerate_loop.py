"""A plain training loop with accelerate: prepare, accumulate, backward, step, then save for any library.

    python examples/accelerate_loop.py path/to/checkpoint --output-dir out/finetuned
    accelerate launch examples/accelerate_loop.py path/to/checkpoint --output-dir out/finetuned

The checkpoint folder holds ``config.json``, the weights and a tokenizer. The text is a few
sentences written below, or a plain-text file (``--data``, one example per line). Runs
offline. The saved folder is a Hugging Face checkpoint: ``transformers`` and lmport both
load it. ``--library transformers`` runs the same loop on transformers' model instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
    "Fortune favours the bold.",
    "Where there is a will, there is a way.",
    "Actions speak louder than words.",
    "Knowledge is power.",
    "Time and tide wait for no one.",
]


def collate(tokenizer: Any, max_length: int) -> Any:
    """Pad a list of texts into a batch whose labels ignore (-100) the padding."""

    def fn(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return dict(batch)

    return fn


def load_model(checkpoint: str, library: str) -> Any:
    if library == "transformers":
        from transformers import AutoModelForCausalLM
    else:
        from lmport import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder with config.json, weights and tokenizer")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", help="plain-text file, one example per line")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", choices=("lmport", "transformers"), default="lmport")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = Path(args.data).read_text().splitlines() if args.data else TEXTS
    texts = [t for t in texts if t.strip()]
    model = load_model(args.checkpoint, args.library)
    model.train()

    loader = DataLoader(texts, batch_size=args.batch_size, collate_fn=collate(tokenizer, args.max_length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses: list[float] = []
    for _ in range(args.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()  # a no-op until the last micro-batch of each accumulation window
                optimizer.zero_grad()
            losses.append(loss.item())
            accelerator.print(f"micro-batch {len(losses)}: loss {losses[-1]:.4f}")

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        Path(args.output_dir, "train_losses.json").write_text(json.dumps(losses))
    accelerator.print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
