"""One rank of tests/test_distributed.py: run under ``python -m torch.distributed.run`` (gloo, CPU).

``distributed_worker.py SPEC OUT``: SPEC is a JSON list of cases; for each, every rank loads the checkpoint
sharded (``from_pretrained`` with the case's distributed arguments) and a one-process reference (plain
``from_pretrained``), and records into ``OUT/rank<r>.json``:

- ``logits``: max |distributed logits - reference logits| on one batch (every rank the same batch);
- ``loss``/``ref_loss`` and ``weights``: after one SGD step on the same global batch (each data-parallel
  rank its slice of it, tensor-parallel ranks the same slice), the loss and the max |updated weight -
  reference updated weight| over every parameter (gathered with ``full_tensor``); ``moved``: how far the
  reference weights moved;
- ``bytes_read`` / ``full_reads``: what this rank read from the checkpoint through ``read_slice`` during
  the load, and how many whole tensors it read;
- with ``expect_error``: the error's class and message instead (the load must fail);
- with ``save``: the stepped model is saved there by ``save_pretrained`` (from the shards) and rank 0
  writes its logits beside it (``sharded_logits.pt``) for the test to compare against transformers
  loading the saved folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

torch.set_num_threads(1)

import lmport  # noqa: E402
from lmport.distributed import DistributedConfig  # noqa: E402
from lmport.plugins.safetensors_format import SafetensorsSource  # noqa: E402

COUNT = {"bytes": 0, "full": 0}
_read_slice = SafetensorsSource.read_slice
_read_as = SafetensorsSource.read_as


def counting_read_slice(self: Any, info: Any, index: Any, dtype: Any, **kwargs: Any) -> torch.Tensor:
    n = 1
    for s in index:
        n *= s.stop - s.start
    COUNT["bytes"] += n * info.dtype.itemsize
    return _read_slice(self, info, index, dtype, **kwargs)


def counting_read_as(self: Any, info: Any, dtype: Any, **kwargs: Any) -> torch.Tensor:
    COUNT["full"] += 1
    return _read_as(self, info, dtype, **kwargs)


SafetensorsSource.read_slice = counting_read_slice  # type: ignore[method-assign]
SafetensorsSource.read_as = counting_read_as  # type: ignore[method-assign]


def batch(vocab: int, rows: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def distributed_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(case.get("kwargs", {}))
    if "config" in case:
        kwargs["distributed_config"] = DistributedConfig(**case["config"])
    if "mesh" in case:  # a mesh of the caller's own, with torchtitan's dim names
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = case["mesh"]
        kwargs["device_mesh"] = init_device_mesh("cpu", tuple(shape), mesh_dim_names=tuple(names))
    if "transformers_config" in case:
        from transformers.distributed import DistributedConfig as HFDistributedConfig

        kwargs["distributed_config"] = HFDistributedConfig(**case["transformers_config"])
    return kwargs


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, case.get("dtype", "float32"))
    COUNT.update(bytes=0, full=0)
    start = time.perf_counter()
    model = lmport.AutoModelForCausalLM.from_pretrained(case["ckpt"], dtype=dtype, **distributed_kwargs(case))
    seconds = time.perf_counter() - start
    read = dict(COUNT)
    ref = lmport.AutoModelForCausalLM.from_pretrained(case["ckpt"], dtype=dtype)
    out: dict[str, Any] = {"case": case["name"], "rank": rank, "seconds": seconds, "bytes_read": read["bytes"],
                           "full_reads": read["full"], "model_class": type(model).__name__}  # fmt: skip
    out["total_bytes"] = sum(
        p.numel() * p.element_size() for n, p in ref.state_dict().items() if n not in ref.tied_parameter_names()
    )
    out["dtensors"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = ref(ids).logits
    out["logits_dtype"] = str(logits.dtype).removeprefix("torch.")
    out["logits"] = (logits.float() - ref_logits.float()).abs().max().item()
    group = model._get_fsdp_state()._fsdp_param_group if hasattr(model, "_get_fsdp_state") else None
    if group is not None:  # the root unit's policies, as fully_shard was given them
        out["offload_policy"] = type(group.offload_policy).__name__
        out["param_dtype"] = str(group.mp_policy.param_dtype).removeprefix("torch.")
    if case.get("train", False):
        tp = getattr(model, "tp_size", 1)
        dp_rank, dp_size = rank // tp, world // tp
        rows = ids.shape[0] // dp_size
        local = ids[dp_rank * rows : (dp_rank + 1) * rows]
        model.train()
        ref.train()
        optim = torch.optim.SGD(model.parameters(), lr=1.0)
        ref_optim = torch.optim.SGD(ref.parameters(), lr=1.0)
        loss = model(local, labels=local).loss
        loss.backward()
        optim.step()
        ref_loss = ref(ids, labels=ids).loss
        ref_loss.backward()
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ref_optim.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        out["loss"] = global_loss.item() / world
        out["ref_loss"] = ref_loss.item()
        ref_params = dict(ref.named_parameters())
        diffs, moved = [], []
        for name, param in model.named_parameters():
            diffs.append((full(param.detach()) - ref_params[name].detach()).abs().max().item())
            moved.append((ref_params[name].detach() - before[name]).abs().max().item())
        out["weights"] = max(diffs); out["worst"] = [n for n, _ in model.named_parameters()][diffs.index(max(diffs))]
        out["moved"] = max(moved)
        out["params"] = len(diffs)
        model.eval()
        ref.eval()
    if case.get("save"):
        model.save_pretrained(case["save"])
        with torch.no_grad():
            logits = model(batch(model.config.vocab_size, seed=1)).logits
        if rank == 0:
            torch.save(logits, Path(case["save"]) / "sharded_logits.pt")
        dist.barrier()
    return out


def main() -> None:
    spec, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    results = []
    for case in spec:
        try:
            results.append(run_case(case))
        except Exception as exc:  # recorded for the test; every rank fails alike (the checks are deterministic)
            results.append({"case": case["name"], "rank": dist.get_rank(), "error": type(exc).__name__,
                            "message": str(exc)})  # fmt: skip
            if not case.get("expect_error"):
                raise
        finally:
            (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
