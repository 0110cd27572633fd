"""Causal-LM fine-tuning with transformers' Trainer on a model loaded by lmport.

    python examples/trainer.py path/to/checkpoint --output-dir out/trainer

The checkpoint folder holds ``config.json``, the weights and a tokenizer. The text is a few
sentences written below, or a plain-text file (``--data``, one example per line). Runs
offline. Apart from the import of ``AutoModelForCausalLM`` this is the script one writes
for transformers' own models (``--library transformers`` runs it on those): Trainer logs
the same losses, and every checkpoint it writes (``checkpoint-N/``, the final save) is a
Hugging Face checkpoint with ``config.json`` that lmport and transformers both load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

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
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", choices=("lmport", "transformers"), default="lmport")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = Path(args.data).read_text().splitlines() if args.data else TEXTS
    dataset = Dataset.from_dict({"text": [t for t in texts if t.strip()]})
    dataset = dataset.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])

    trainer = Trainer(
        model=load_model(args.checkpoint, args.library),
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            save_steps=args.save_steps,
            logging_steps=1,
            seed=args.seed,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # labels = ids, padding -100
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"losses": losses, "eval_loss": metrics["eval_loss"]}))


if __name__ == "__main__":
    main()
