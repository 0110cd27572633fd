"""Fine-tune an lmport model sharded over torch.distributed ranks (FSDP2, HSDP or tensor parallel), then save it.

    torchrun --nproc_per_node=2 examples/distributed_finetune.py CHECKPOINT --output-dir OUT
    accelerate launch --config_file examples/distributed_fsdp2.yaml examples/distributed_finetune.py \\
        CHECKPOINT --output-dir OUT --accelerate

Every rank builds the model on the meta device and reads from CHECKPOINT only the bytes of the
shards it owns (``distributed_config=DistributedConfig(...)``). The loop trains on a few token
sequences (a plain-text file with ``--data``, tokenized by the checkpoint's tokenizer, else seeded
random tokens), each data-parallel rank on its slice of the global batch. ``save_pretrained`` then
gathers the shards one tensor at a time into a Hugging Face checkpoint that transformers loads;
with ``--accelerate`` the model goes through ``accelerator.prepare`` (it is already FSDP2-sharded,
so accelerate keeps it) and is saved as accelerate documents (``get_state_dict`` + ``save_pretrained``).
Rank 0 prints one JSON line: the loss of every step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

import lmport
from lmport.distributed import DistributedConfig


def token_batches(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    """The global batch, ``(batch_size, seq_len)`` token ids (the same on every rank)."""
    if args.data:
        from transformers import AutoTokenizer  # only to read the checkpoint's tokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        texts = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = tokenizer(texts[: args.batch_size], padding="max_length", truncation=True, max_length=args.seq_len,
                        return_tensors="pt")["input_ids"]  # fmt: skip
        return ids
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Hugging Face checkpoint folder (config.json + weights)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data", help="plain-text file, one example per line (needs a tokenizer in the checkpoint)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch (split over data-parallel ranks)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--dp-replicate-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerate", action="store_true", help="prepare, backward and save through accelerate")
    args = parser.parse_args()

    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator()  # initialises the process group from `accelerate launch`'s environment
    config = DistributedConfig(tp_size=args.tp_size, dp_replicate_size=args.dp_replicate_size)  # fsdp: the rest
    model = lmport.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, distributed_config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)

    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = rank // args.tp_size, world // args.tp_size  # tensor-parallel ranks share a slice
    batch = token_batches(args, model.config.vocab_size)
    rows = batch.shape[0] // dp_size
    local = batch[dp_rank * rows : (dp_rank + 1) * rows]

    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=local, labels=local).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    model.eval()
    if accelerator is not None:
        state = accelerator.get_state_dict(model)  # gathered on rank 0 (accelerate's FSDP2 recipe)
        accelerator.unwrap_model(model).save_pretrained(
            args.output_dir, state_dict=state, is_main_process=accelerator.is_main_process
        )
        accelerator.wait_for_everyone()
    else:
        model.save_pretrained(args.output_dir)  # every rank takes part; rank 0 writes
    if rank == 0:
        print(json.dumps({"losses": losses, "world_size": world, "model": type(model).__name__}), flush=True)
    dist.barrier()
    if accelerator is None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
