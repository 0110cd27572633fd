"""Supervised fine-tuning with a LoRA adapter: TRL's SFTTrainer on a model loaded by lmport.

    python examples/sft_lora.py path/to/checkpoint --output-dir out/sft-lora

The checkpoint folder holds ``config.json``, the weights and the tokenizer (with a chat
template). The data is a short conversational set written below, or a JSON-lines file
(``--data``) with a ``messages`` or a ``text`` field per line. Runs offline. What it
writes to ``--output-dir`` is a standard peft adapter: ``PeftModel.from_pretrained`` loads
it onto the base model whichever library loaded that (lmport or transformers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

import lmport

CONVERSATIONS = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Red, yellow or blue."),
    ("What is 2 + 2?", "4."),
    ("Say hello in Spanish.", "Hola."),
    ("Which planet is closest to the sun?", "Mercury."),
    ("How many legs does a spider have?", "Eight."),
    ("What do bees make?", "Honey."),
    ("Spell 'cat' backwards.", "tac"),
]


def load_data(path: str | None) -> Dataset:
    """The training set: ``path`` (JSON lines) or the conversations above in the ``messages`` format."""
    if path is not None:
        return load_dataset("json", data_files=path, split="train")
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in CONVERSATIONS
            ]
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder with config.json, weights and tokenizer")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", help="JSON-lines file with 'messages' or 'text' per line")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names")
    parser.add_argument("--packing", action="store_true", help="pack examples into padding-free rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = lmport.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        packing=args.packing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )
    # --target-modules all-linear works too: it leaves out the output head as on transformers' models.
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear" if args.target_modules == "all-linear" else args.target_modules.split(","),
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_data(args.data),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the adapter (adapter_config.json + adapter_model.safetensors)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"losses": losses, "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0]}
    Path(args.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
