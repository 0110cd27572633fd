"""transformers' ``Trainer`` on an lmport model, for tests/test_distributed.py.

``distributed_trainer_worker.py CKPT OUT [--sharded]``: loads CKPT with lmport (with ``--sharded``:
``distributed_config=DistributedConfig(fsdp_size=2)``, run under ``torchrun --nproc_per_node=2``), trains it
with ``Trainer`` for 2 steps on a global batch of 4 rows (sequential sampling, so a one-process run sees the
same batches), then, on the trained model, writes ``OUT/logits.pt`` (rank 0: the logits of a fixed batch) and
``OUT/losses.json`` (rank 0: the logged losses), and ``trainer.save_model(OUT/"model")``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402

import lmport  # noqa: E402
from lmport.distributed import DistributedConfig  # noqa: E402


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    sharded = "--sharded" in sys.argv[3:]
    kwargs = {"distributed_config": DistributedConfig(fsdp_size=2)} if sharded else {}
    model = lmport.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **kwargs)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, model.config.vocab_size, (8, 12), generator=g)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"), use_cpu=True, report_to="none", max_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=2 if sharded else 4, logging_steps=1, save_strategy="no",
        train_sampling_strategy="sequential", lr_scheduler_type="constant", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    if trainer.args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(logits, out / "logits.pt")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (out / "losses.json").write_text(json.dumps({"losses": losses, "model": type(trainer.model_wrapped).__name__}))
    trainer.save_model(str(out / "model"))


if __name__ == "__main__":
    main()
