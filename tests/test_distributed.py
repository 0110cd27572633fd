"""Distributed loading (issue 11): FSDP2, HSDP and tensor parallelism on torch.distributed, shard on read.

The multi-process tests run ``tests/distributed_worker.py`` under ``python -m torch.distributed.run``
(gloo, CPU) on tiny checkpoints transformers saved; every case compares, on each rank, the sharded
model with a one-process lmport model of the same checkpoint: logits, and after one SGD step on the
same global batch the loss and every updated weight. The launcher tests run
``examples/distributed_finetune.py`` under ``torchrun`` and ``accelerate launch``. The runs start
together (most of their time is imports) and each test waits for the one it reads. The Trainer test runs
``tests/distributed_trainer_worker.py`` (transformers' ``Trainer``) on a sharded and a one-process model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, save_hf, tiny_configs, tree_digest
from helpers import GRAD_RTOL, LOGITS_ATOL, LOSS_TOL, load_clean
from safetensors import safe_open

import lmport
from lmport.distributed import DistributedConfig, box_maps, distributed_request, resolve_layout
from lmport.errors import ArgumentError, DistributedError, UnsupportedFeatureError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
EXAMPLE = ROOT / "examples" / "distributed_finetune.py"
TRAINER_WORKER = ROOT / "tests" / "distributed_trainer_worker.py"
ACCELERATE_CONFIG = ROOT / "examples" / "distributed_fsdp2.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
TIMEOUT = 400
ODD_VOCAB = 127  # GPT-2's vocabulary here: neither FSDP nor tensor parallelism splits it evenly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str, nproc: int = 2, nodes: tuple[int, int] | None = None, port: int | None = None) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes is None:
        launch += ["--standalone"]
    else:
        launch += [f"--nnodes={nodes[1]}", f"--node_rank={nodes[0]}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    return [*launch, *args]


class Job:
    """Subprocesses started now, waited for when a test first reads them."""

    def __init__(self, commands: list[list[str]], out: Path | None = None) -> None:
        self.out = out
        self.procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       cwd=ROOT) for c in commands]  # fmt: skip
        self._outputs: list[str] | None = None

    def outputs(self) -> list[str]:
        if self._outputs is None:
            self._outputs = [p.communicate(timeout=TIMEOUT)[0] for p in self.procs]
            for proc, text in zip(self.procs, self._outputs):
                assert proc.returncode == 0, f"{' '.join(proc.args[-6:])} failed:\n{text[-4000:]}"
        return self._outputs

    def results(self) -> dict[str, list[dict[str, Any]]]:
        """Case name → every rank's record (rank order)."""
        self.outputs()
        assert self.out is not None
        by_case: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.out.glob("rank*.json"), key=lambda p: int(p.stem[4:])):
            for record in json.loads(path.read_text()):
                by_case.setdefault(record["case"], []).append(record)
        return by_case


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of every tensor stored in ``folder``'s safetensors files."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
    return total


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    configs = tiny_configs(**TOKENS)
    out = {arch: save_hf(root / arch, configs[arch]()) for arch in ("llama", "mistral")}
    gpt2 = configs["gpt2"]()
    gpt2.vocab_size = ODD_VOCAB  # shards of unequal size: 64 + 63 rows
    out["gpt2"] = save_hf(root / "gpt2", gpt2)
    out["llama-bf16"] = save_hf(root / "llama-bf16", configs["llama"](), seed=1, dtype=torch.bfloat16)
    return out


#: name → (checkpoint, what the worker passes, train, save); every case runs on 2 ranks.
CASES: dict[str, tuple[str, dict[str, Any], bool, bool]] = {
    "llama-fsdp": ("llama", {"config": {"fsdp_size": 2}}, True, True),
    "llama-hsdp-2x1": ("llama", {"config": {"dp_replicate_size": 2, "fsdp_size": 1}}, True, False),
    "llama-hsdp-1x2": ("llama", {"transformers_config": {"dp_replicate_size": 1, "fsdp_size": 2}}, True, False),
    "llama-tp": ("llama", {"kwargs": {"tp_plan": "auto"}}, True, True),
    "llama-mesh": ("llama", {"mesh": [[2], ["dp_shard"]]}, False, False),
    "llama-bf16-cast": ("llama-bf16", {"config": {}}, False, False),
    "gpt2-fsdp": ("gpt2", {"config": {}}, True, True),
    "gpt2-tp": ("gpt2", {"config": {"tp_size": 2}}, True, True),
    "mistral-fsdp": ("mistral", {"config": {"fsdp_size": 2}}, True, False),
    "mistral-tp": ("mistral", {"transformers_config": {"tp_size": 2}}, True, False),
    "llama-mixed-precision": ("llama", {"config": {"fsdp_mixed_precision": True}}, True, False),
    "llama-offload-on-cpu": ("llama", {"config": {"fsdp_cpu_offload": True}, "expect_error": True}, False, False),
}
SHARDED = ("fsdp", "hsdp-1x2", "mesh", "cast", "mixed")  # cases where every tensor is split over both ranks


def spec(cases: dict[str, tuple[str, dict[str, Any], bool, bool]], ckpts: dict[str, Path], out: Path) -> Path:
    entries = []
    for name, (ckpt, extra, train, save) in cases.items():
        entry = {"name": name, "ckpt": str(ckpts[ckpt]), "train": train, **extra}
        if save:
            entry["save"] = str(out / f"saved-{name}")
        if ckpt == "llama-bf16":
            entry["dtype"] = "float32"  # read as bf16, cast on the way
        entries.append(entry)
    path = out / "spec.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def digests(checkpoints: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Each checkpoint folder's digest before any run."""
    return {name: tree_digest(folder) for name, folder in checkpoints.items()}


@pytest.fixture(scope="module")
def jobs(
    checkpoints: dict[str, Path], digests: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Job]:
    """The 2-rank worker run and both launcher runs, started together."""
    out = tmp_path_factory.mktemp("ranks")
    runs = tmp_path_factory.mktemp("launchers")
    llama = str(checkpoints["llama"])
    return {
        "worker": Job([torchrun(str(WORKER), str(spec(CASES, checkpoints, out)), str(out))], out),
        "torchrun": Job([torchrun(str(EXAMPLE), llama, "--output-dir", str(runs / "torchrun"))], runs / "torchrun"),
        "accelerate": Job(
            [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
              "--main_process_port", str(free_port()), str(EXAMPLE), llama, "--output-dir", str(runs / "accelerate"),
              "--accelerate"]],
            runs / "accelerate",
        ),  # fmt: skip
    }


def check_case(name: str, records: list[dict[str, Any]], world: int, train: bool) -> None:
    assert len(records) == world, records
    for r in records:
        assert "error" not in r, f"{name} rank {r['rank']}: {r.get('error')}: {r.get('message')}"
        assert r["dtensors"] > 0, f"{name}: no parameter is a DTensor"
        assert r["full_reads"] == 0, f"{name}: rank {r['rank']} read {r['full_reads']} whole tensor(s)"
        assert r["logits"] <= LOGITS_ATOL, f"{name} rank {r['rank']}: logits differ by {r['logits']}"
        if train:
            assert abs(r["loss"] - r["ref_loss"]) <= LOSS_TOL, (name, r["loss"], r["ref_loss"])
            assert r["moved"] > 1e-2  # the step changed the weights: the comparison has teeth
            assert r["weights"] <= GRAD_RTOL * r["moved"], f"{name}: {r['worst']} differs by {r['weights']}"


@pytest.mark.parametrize("name", [n for n in CASES if "mixed" not in n and "offload" not in n])
def test_sharded_model_equals_one_process_model(jobs: dict[str, Job], name: str) -> None:
    check_case(name, jobs["worker"].results()[name], 2, CASES[name][2])


@pytest.mark.parametrize("name", [n for n in CASES if any(s in n for s in SHARDED) and "offload" not in n])
def test_each_rank_reads_only_its_half(jobs: dict[str, Job], checkpoints: dict[str, Path], name: str) -> None:
    records = jobs["worker"].results()[name]
    total = checkpoint_bytes(checkpoints[CASES[name][0]])
    assert sum(r["bytes_read"] for r in records) == total  # every byte once: nothing twice, nothing skipped
    for r in records:
        assert r["bytes_read"] <= 0.51 * total, (name, r["rank"], r["bytes_read"], total)


@pytest.mark.parametrize("name", ["llama-tp", "gpt2-tp", "mistral-tp"])
def test_tensor_parallel_ranks_share_only_the_replicated_norms(
    jobs: dict[str, Job], checkpoints: dict[str, Path], name: str
) -> None:
    records = jobs["worker"].results()[name]
    total = checkpoint_bytes(checkpoints[CASES[name][0]])
    for r in records:  # linears and embeddings halved; norms (and GPT-2's positions) read whole by both
        assert 0.5 * total <= r["bytes_read"] <= 0.6 * total, (name, r["bytes_read"], total)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[3]])
def test_save_from_shards_loads_in_transformers(jobs: dict[str, Job], name: str) -> None:
    import transformers

    results = jobs["worker"].results()
    check_case(name, results[name], 2, True)
    saved = Path(jobs["worker"].out or ".") / f"saved-{name}"
    model = load_clean(transformers.AutoModelForCausalLM, saved, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    expected = torch.load(saved / "sharded_logits.pt")  # the sharded model that saved it
    assert (logits - expected).abs().max().item() <= LOGITS_ATOL
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["model.safetensors"]


def test_training_leaves_the_checkpoints_unchanged(
    jobs: dict[str, Job], checkpoints: dict[str, Path], digests: dict[str, dict[str, str]]
) -> None:
    """Shards mapped from the files are copy-on-write: optimizer steps never reach the checkpoint."""
    for job in jobs.values():
        job.outputs()
    assert {name: tree_digest(folder) for name, folder in checkpoints.items()} == digests


def test_fsdp_mixed_precision_computes_in_bfloat16(jobs: dict[str, Job]) -> None:
    for r in jobs["worker"].results()["llama-mixed-precision"]:
        assert "error" not in r, r
        assert r["param_dtype"] == "bfloat16" and r["offload_policy"] == "OffloadPolicy"
        assert r["logits_dtype"] == "bfloat16"
        assert 0 < r["logits"] < 0.5  # bf16 compute: close to, not equal to, fp32
        assert abs(r["loss"] - r["ref_loss"]) < 1e-2
        assert r["weights"] < 0.1 * r["moved"]  # fp32 master weights stepped with bf16 gradients


def test_cpu_offload_without_accelerator_is_refused(jobs: dict[str, Job]) -> None:
    for r in jobs["worker"].results()["llama-offload-on-cpu"]:
        assert r["error"] == "UnsupportedFeatureError" and "fsdp_cpu_offload" in r["message"]


# --- launchers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launcher_fine_tunes_and_saves(jobs: dict[str, Job], checkpoints: dict[str, Path], launcher: str) -> None:
    import transformers

    job = jobs[launcher]
    report = json.loads([line for line in job.outputs()[0].splitlines() if line.startswith('{"losses"')][-1])
    losses = report["losses"]
    assert report["world_size"] == 2 and report["model"].startswith("FSDP")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses  # one repeated batch: memorised
    assert job.out is not None
    tuned = load_clean(transformers.AutoModelForCausalLM, job.out, dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the example's batch (seed 0): the fine-tuned model's loss is the last step's or lower
        loss = tuned(ids, labels=ids).loss.item()
        before = original(ids, labels=ids).loss.item()
    assert abs(before - losses[0]) <= 1e-5
    assert loss < losses[-1] + 1e-3


def test_both_launchers_train_alike(jobs: dict[str, Job]) -> None:
    runs = [json.loads([ln for ln in jobs[k].outputs()[0].splitlines() if ln.startswith('{"losses"')][-1])["losses"]
            for k in ("torchrun", "accelerate")]  # fmt: skip
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=1e-5, atol=0)


def test_trainer_on_a_sharded_model_trains_and_saves_like_one_process(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """transformers' Trainer, 2 steps on an FSDP2-sharded model (2 ranks) and on a one-process model with the
    same global batches: the same logged losses and trained logits, and ``save_model`` writes a checkpoint
    transformers loads to the sharded model's logits."""
    import transformers

    llama = str(checkpoints["llama"])
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    Job([torchrun(str(TRAINER_WORKER), llama, str(sharded), "--sharded"),
         [sys.executable, str(TRAINER_WORKER), llama, str(single)]]).outputs()  # fmt: skip
    runs = {run: json.loads((run / "losses.json").read_text()) for run in (sharded, single)}
    assert runs[sharded]["model"].startswith("FSDP") and len(runs[sharded]["losses"]) == 2
    losses = [torch.tensor(runs[run]["losses"], dtype=torch.float64) for run in (sharded, single)]
    torch.testing.assert_close(losses[0], losses[1], rtol=LOSS_TOL, atol=LOSS_TOL)  # the kit's loss tolerance
    trained = torch.load(sharded / "logits.pt")
    assert (trained - torch.load(single / "logits.pt")).abs().max().item() <= LOGITS_ATOL
    saved = load_clean(transformers.AutoModelForCausalLM, sharded / "model", dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the worker's batch
        logits, before = saved(ids).logits, original(ids).logits
    assert (logits - trained).abs().max().item() <= LOGITS_ATOL
    assert (before - trained).abs().max().item() > 1e-2  # training moved the model: the comparison has teeth
    assert sorted(p.name for p in (sharded / "model").iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "config.json", "generation_config.json", "model.safetensors"]  # fmt: skip


# --- 4 processes: 2 "nodes" x 2 on loopback ----------------------------------------------------


@pytest.mark.slow
def test_two_nodes_of_two(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "llama-hsdp-2x2": ("llama", {"config": {"dp_replicate_size": 2, "fsdp_size": 2}}, True, False),
        "gpt2-fsdp2-tp2": ("gpt2", {"config": {"tp_size": 2}}, True, True),
    }
    path, port = spec(cases, checkpoints, tmp_path), free_port()
    nodes = [torchrun(str(WORKER), str(path), str(tmp_path), nodes=(i, 2), port=port) for i in (0, 1)]
    results = Job(nodes, tmp_path).results()
    for name, (_, _, train, _) in cases.items():
        check_case(name, results[name], 4, train)
    total = checkpoint_bytes(checkpoints["llama"])
    assert sum(r["bytes_read"] for r in results["llama-hsdp-2x2"]) == 2 * total  # two replicas, each read once
    for r in results["gpt2-fsdp2-tp2"]:  # FSDP over TP: about a quarter each
        assert r["bytes_read"] <= 0.3 * checkpoint_bytes(checkpoints["gpt2"])


# --- in one process --------------------------------------------------------------------------------


def test_transformers_distributed_config_is_read() -> None:
    from transformers.distributed import DistributedConfig as HFConfig

    ours = DistributedConfig.from_any(HFConfig(fsdp_size=4, dp_replicate_size=2, fsdp_cpu_offload=True))
    assert (ours.fsdp_size, ours.dp_replicate_size, ours.tp_size, ours.fsdp_cpu_offload) == (4, 2, 1, True)
    with pytest.raises(UnsupportedFeatureError, match="pp_size=2"):
        DistributedConfig.from_any(HFConfig(pp_size=2))
    with pytest.raises(ArgumentError, match="unknown field"):
        DistributedConfig.from_any({"fsdp_size": 2, "sequence_parallel": True})


def test_sizes_resolve_against_the_world() -> None:
    layout = resolve_layout(DistributedConfig(), 4)
    assert (layout.dp_replicate, layout.fsdp, layout.tp) == (1, 4, 1)
    layout = resolve_layout(DistributedConfig(tp_size=2), 8)
    assert (layout.dp_replicate, layout.fsdp, layout.tp) == (1, 4, 2)
    layout = resolve_layout(DistributedConfig(tp_plan="auto", fsdp_size=2), 8)
    assert (layout.fsdp, layout.tp) == (2, 4)
    with pytest.raises(DistributedError, match=r"2 × 2 × 1 = 4, but the job has 2"):
        resolve_layout(DistributedConfig(dp_replicate_size=2, fsdp_size=2), 2)
    with pytest.raises(DistributedError, match="not a multiple"):
        resolve_layout(DistributedConfig(tp_size=3), 4)
    with pytest.raises(ArgumentError, match="fsdp_size must be a positive int"):
        DistributedConfig(fsdp_size=0)


def test_arguments_refused_with_distributed_loading(checkpoints: dict[str, Path], monkeypatch: Any) -> None:
    path = checkpoints["llama"]
    load = lmport.AutoModelForCausalLM.from_pretrained
    with pytest.raises(ArgumentError, match="not both"):
        load(path, distributed_config=DistributedConfig(), tp_plan="auto")
    with pytest.raises(ArgumentError, match="mutually exclusive"):
        load(path, distributed_config=DistributedConfig(fsdp_size=2), device_map="cpu")
    with pytest.raises(UnsupportedFeatureError, match="quantization"):
        load(path, tp_plan="auto", quantization_config=lmport.BitsAndBytesConfig(load_in_8bit=True))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="launch with torchrun"):
        load(path, distributed_config=DistributedConfig(fsdp_size=2))
    # Sizes all 1: a plain load, as transformers does.
    model = load(path, distributed_config=DistributedConfig(fsdp_size=1, tp_size=1))
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert distributed_request() is None


def test_plans_are_checked_against_the_model() -> None:
    from lmport.distributed.plan import check_tp, expand, merged_plan

    from lmport.modeling.base import build_on_meta
    from lmport_llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict({"model_type": "llama", **TINY_LLAMA})  # 4 heads, 2 key/value heads
    model = build_on_meta(LlamaForCausalLM, config)
    plan = expand(model, merged_plan(LlamaForCausalLM.tp_plan, "auto", "tp_plan"), "tp_plan", ("colwise", "rowwise",
                  "colwise_gather_output", "embedding_rowwise"))  # fmt: skip
    assert plan["model.layers.1.mlp.down_proj"] == "rowwise" and plan["lm_head"] == "colwise_gather_output"
    check_tp(model, plan, 2)
    with pytest.raises(DistributedError, match="does not divide the 2 key/value heads"):
        check_tp(model, plan, 4)
    with pytest.raises(DistributedError, match=r"rule\(s\) \['model.layers.\*.mlp.w1'\] match no module"):
        expand(model, {"model.layers.*.mlp.w1": "colwise"}, "tp_plan", ("colwise",), strict=["model.layers.*.mlp.w1"])
    with pytest.raises(DistributedError, match="unknown style"):
        expand(model, {"lm_head": "diagonal"}, "tp_plan", ("colwise",))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_box_maps_locate_module_slices_in_checkpoint_tensors(checkpoints: dict[str, Path], arch: str) -> None:
    """Every module tensor's box in its checkpoint tensor (GPT-2: transposed, fused c_attn) is exact."""
    from lmport import hooks
    from lmport.formats import open_checkpoint
    from lmport.options import LoadOptions

    config = lmport.AutoConfig.from_pretrained(checkpoints[arch])
    weight_map = hooks.weight_map_for(config, hooks.model_class_for(config))
    source = open_checkpoint(checkpoints[arch], LoadOptions())
    g = torch.Generator().manual_seed(0)
    try:
        for info in source.infos():
            whole = source.read(info)
            maps = box_maps(weight_map, info)
            for name, part in weight_map.to_module(info.name, whole):
                boxmap = maps[name]
                assert boxmap is not None, name
                box = []
                for n in part.shape:
                    a = int(torch.randint(0, n, (1,), generator=g))
                    box.append(slice(a, int(torch.randint(a + 1, n + 1, (1,), generator=g))))
                index = boxmap.checkpoint_box(tuple(box))
                got = boxmap.to_module(source.read_slice(info, index, None), tuple(s.stop - s.start for s in box))
                assert torch.equal(got, part[tuple(box)]), (info.name, name, box)
    finally:
        source.close()


def test_sharded_save_streams_an_indexed_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The streaming writer of a sharded save, in one process: several files and an index, as transformers reads."""
    import transformers

    from lmport.distributed.save import save_model_sharded

    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    save_model_sharded(model, tmp_path, None, limit=60_000, variant=None, safe_serialization=True, save_function=None)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_clean(transformers.AutoModelForCausalLM, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_source_that_cannot_slice_is_read_whole_once(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """``.bin`` files cannot be read in part: each tensor is read once and sliced (here: the whole box)."""
    from lmport import hooks
    from lmport.distributed import load_shards
    from lmport.formats import open_checkpoint
    from lmport.modeling.base import build_on_meta
    from lmport.options import LoadOptions

    ref = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    ref.save_pretrained(tmp_path, safe_serialization=False)
    source = open_checkpoint(tmp_path, LoadOptions(use_safetensors=False))
    reads: list[str] = []
    read = source.read
    source.read = lambda info: reads.append(info.name) or read(info)  # type: ignore[method-assign]
    model = build_on_meta(hooks.model_class_for(ref.config), ref.config)
    model.to_empty(device="cpu")
    try:
        infos = list(source.infos())
        report = load_shards(model, source, hooks.weight_map_for(ref.config, type(model)), infos,
                             dtype=torch.float32, tied=model.tied_parameter_names())  # fmt: skip
    finally:
        source.close()
    assert sorted(reads) == sorted(i.name for i in infos) and report.bytes_read > 0  # each once
    model.tie_weights()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
