"""Atomic saves (issue 9): a save killed at any moment, or raced by loads, never yields a mix of two saves.

``save_pretrained`` writes into a fresh folder beside the target and swaps it in whole
(lmport.atomic). The proofs:

- kill trials: a saver subprocess forks one child per trial; the child counts its file
  operations (write, fsync, create, link, rename, unlink, mkdir, rmdir, the folder exchange,
  each shard written) and SIGKILLs itself right after the Nth, for every N, then at random
  moments; single, sharded, ``.bin`` and format switches (safetensors -> bin and back, shard
  counts), with the Linux exchange, the rename-aside fallback and the in-place fallback. After
  each kill the folder loads as exactly the old model or the new one (logits of both compared;
  the two also differ in ``rms_norm_eps``, so old config + new weights is neither), or with a
  typed error where the mode allows one; the tokenizer, training state, README and subfolder
  beside the weights are intact; leftovers never sit where a loader or Trainer looks, and
  the next save removes them.
- race: loads run while the saver re-saves in alternating layouts: every load is the old
  model, the new one, or a typed error.
- single cases: stale files of another format never win, other files are kept (hard-linked),
  a model memory-mapped from the folder it is saved over keeps its values, ``is_main_process=
  False`` writes nothing, entries written into the old folder during the swap survive.

``LMPORT_ATOMIC_LONG=1`` runs many more random kills and a longer race.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SIGKILL and renameat2: Linux")

LONG = os.environ.get("LMPORT_ATOMIC_LONG", "") not in ("", "0")
RANDOM_KILLS = 40 if LONG else 3
RACE_SAVES = 300 if LONG else 40
IDS = torch.tensor([[1, 5, 9, 22, 40, 77, 3, 100, 64, 2]])
SMALL = "80KB"  # 5 shards of the tiny Llama
MEDIUM = "150KB"  # 3
EXTRAS = ("README.md", "training_args.bin", "sub/notes.txt", "tokenizer.json", "link.md")


# --- the saver subprocess -------------------------------------------------------------------------
# Runs this file as a script: loads the models once, then one forked child per trial.


def _instrument(mode: str, kill_after: int | None) -> list[int]:
    """In the forked child: count file operations, SIGKILL after the ``kill_after``-th; pick the swap mode."""
    import lmport.atomic as atomic
    import lmport.plugins.safetensors_format as safetensors_format

    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            tick()
            return result

        return wrapper

    for name in ("write", "link", "symlink", "rename", "replace", "unlink", "remove", "mkdir", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    # fsync is a kill point but skipped: it guards against power loss; after a SIGKILL the page cache
    # holds every write anyway, so it changes nothing a kill leaves (and costs most of a save's time)
    os.fsync = counted(lambda fd: None)
    real_open = os.open

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT:
            tick()
        return fd

    os.open = os_open  # type: ignore[assignment]
    safetensors_format.save_file = counted(safetensors_format.save_file)  # a whole safetensors shard
    torch.save = counted(torch.save)  # a whole .bin shard
    if mode == "rename":
        atomic._exchange = lambda a, b: False  # type: ignore[assignment]  # as where renameat2 is missing
    elif mode == "inplace":

        def cannot(*args: Any) -> Any:
            raise atomic._CannotSwap("forced by the test")

        atomic._swap_in = cannot  # type: ignore[assignment]
    else:
        atomic._exchange = counted(atomic._exchange)
    return count


def _trial(models: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: save, report the operation count, exit without cleanup
        os.close(read_end)
        code = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                count = _instrument(cmd["mode"], cmd.get("kill_after"))
                models[cmd["model"]].save_pretrained(cmd["target"], **cmd["kwargs"])
            n = count[0]
            os.write(write_end, str(n).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(write_end)
    deadline = start + (cmd["kill_at_s"] if cmd.get("kill_at_s") is not None else 120.0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0002)
    seconds = time.monotonic() - start
    out = os.read(read_end, 64)
    os.close(read_end)
    if os.WIFSIGNALED(status):
        return {"result": "killed", "seconds": seconds}
    return {"result": "ok" if os.WEXITSTATUS(status) == 0 else "failed", "ops": int(out or 0), "seconds": seconds}


def _saves(models: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    import lmport.atomic as atomic

    exchange = atomic._exchange
    if cmd["mode"] == "rename":
        atomic._exchange = lambda a, b: False  # type: ignore[assignment]
    start = time.monotonic()
    pauses = random.Random(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for model, kwargs in cmd["plan"]:
                models[model].save_pretrained(cmd["target"], **kwargs)
                time.sleep(pauses.uniform(0, 0.03))  # back to back, every load would overlap a save
    finally:
        atomic._exchange = exchange  # type: ignore[assignment]
    return {"result": "ok", "seconds": time.monotonic() - start}


def _serve(sources: list[str]) -> None:
    import lmport

    torch.set_num_threads(1)
    models = {key: lmport.AutoModelForCausalLM.from_pretrained(src) for key, src in zip("ab", sources)}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        reply = _trial(models, cmd) if cmd["op"] == "trial" else _saves(models, cmd)
        print(json.dumps(reply), flush=True)


class Saver:
    """The pytest side of the saver subprocess."""

    def __init__(self, a_src: Path, b_src: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", str(a_src), str(b_src)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        assert json.loads(self.reply(120))["ready"]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ready(self) -> bool:
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def reply(self, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"saver did not answer in {timeout}s; its log:\n{self.log.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        assert line, f"saver died; its log:\n{self.log.read_text()[-3000:]}"
        return line

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        reply = json.loads(self.reply())
        assert reply["result"] != "failed", f"the save failed; saver log:\n{self.log.read_text()[-3000:]}"
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


# --- fixtures and checks --------------------------------------------------------------------------


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two tiny Llamas ("a" old, "b" new: other weights and other rms_norm_eps), their logits, a saver."""
    import lmport
    from conftest import save_hf_llama_random

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs would cost far more than they compute
    root = tmp_path_factory.mktemp("atomic")
    a_src = save_hf_llama_random(root / "a_src", seed=0)
    b_src = save_hf_llama_random(root / "b_src", seed=1, rms_norm_eps=1e-2)
    models = {k: lmport.AutoModelForCausalLM.from_pretrained(src) for k, src in (("a", a_src), ("b", b_src))}
    expected = {k: logits(m) for k, m in models.items()}
    assert (expected["a"] - expected["b"]).abs().max() > 1.0
    saver = Saver(a_src, b_src, root / "saver.log")
    try:
        yield {"root": root, "models": models, "logits": expected, "saver": saver}
    finally:
        saver.close()
        torch.set_num_threads(threads)


def classify(folder: Path, expected: dict[str, torch.Tensor]) -> str:
    """``a`` / ``b`` (the model the folder loads as), ``error:`` and a typed error's class, or ``MIXED ...``.

    Any other exception propagates (and fails the test)."""
    import lmport

    try:
        model = lmport.AutoModelForCausalLM.from_pretrained(folder)
    except lmport.LmportError as exc:
        return f"error:{type(exc).__name__}"
    got = logits(model)
    for key, want in expected.items():
        if got.shape == want.shape and (got - want).abs().max().item() <= 1e-6:
            return key
    diffs = {k: (got - w).abs().max().item() for k, w in expected.items() if got.shape == w.shape}
    return f"MIXED {diffs}"


def add_extras(folder: Path) -> None:
    """What Trainer and users put beside the weights."""
    from helpers import make_tokenizer

    make_tokenizer(folder)
    (folder / "README.md").write_text("my model card")
    (folder / "training_args.bin").write_bytes(os.urandom(300))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("kept")
    (folder / "link.md").symlink_to("README.md")


def extras(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in EXTRAS}


def leftovers(parent: Path, folder: Path) -> list[str]:
    beside = [p.name for p in parent.iterdir() if ".lmport-" in p.name]
    inside = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".lmport-" in p.name]
    return beside + inside


SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (old layout, new layout)
    "single": ({}, {}),
    "sharded": ({"max_shard_size": SMALL}, {"max_shard_size": MEDIUM}),
    "bin": ({"safe_serialization": False, "max_shard_size": MEDIUM}, {"safe_serialization": False}),
    "st_to_bin": ({"max_shard_size": SMALL}, {"safe_serialization": False, "max_shard_size": MEDIUM}),
    "bin_to_st": ({"safe_serialization": False}, {"max_shard_size": SMALL}),
}
MODES = [(s, "exchange") for s in SCENARIOS]
MODES += [("sharded", "rename"), ("st_to_bin", "rename"), ("bin_to_st", "inplace")]
#: Load outcomes each mode may give after a kill, besides the old and the new model.
ALLOWED_ERRORS = {"exchange": set(), "rename": {"error:SourceError"}, "inplace": {"error:ConfigError"}}


@pytest.mark.parametrize(("scenario", "mode"), MODES, ids=[f"{s}-{m}" for s, m in MODES])
def test_killed_save_leaves_old_or_new(env: dict[str, Any], tmp_path: Path, scenario: str, mode: str) -> None:
    import lmport.atomic as atomic

    old_layout, new_layout = SCENARIOS[scenario]
    template = tmp_path / "template"
    env["models"]["a"].save_pretrained(template, **old_layout)
    add_extras(template)
    kept = extras(template)
    parent = tmp_path / "parent"
    parent.mkdir()
    target = parent / "ckpt"
    saver: Saver = env["saver"]

    def reset() -> None:  # the old checkpoint, and no leftovers: every trial makes the same operations
        for path in parent.iterdir():
            shutil.rmtree(path)
        shutil.copytree(template, target, symlinks=True)

    def trial(**kill: Any) -> tuple[str, dict[str, Any]]:
        reset()
        reply = saver.call(op="trial", mode=mode, model="b", target=str(target), kwargs=new_layout, **kill)
        if not target.exists() and mode == "rename":
            # killed between moving the old folder aside and the new one in: a typed error now,
            # and the next save of the folder puts the (whole) new one in place
            outcome = classify(target, env["logits"])
            atomic._clean_leftovers(target, locked=True)
            assert classify(target, env["logits"]) == "b", "the interrupted swap was not completed"
            assert extras(target) == kept
            return outcome, reply
        outcome = classify(target, env["logits"])
        assert extras(target) == kept, f"files beside the weights changed ({reply})"
        return outcome, reply

    outcome, reply = trial()  # a full save: its operation count and duration
    assert outcome == "b" and reply["result"] == "ok"
    assert leftovers(parent, target) == []
    ops, seconds = reply["ops"], reply["seconds"]
    assert ops >= 8

    outcomes: Counter[str] = Counter()
    for n in range(1, ops + 1):
        outcome, reply = trial(kill_after=n)
        assert reply["result"] == "killed", f"the child was to be killed after operation {n} of {ops}"
        outcomes[outcome] += 1
        assert outcome in {"a", "b"} | ALLOWED_ERRORS[mode], f"killed after operation {n}/{ops}: {outcome}"
    rng = random.Random(f"{scenario}-{mode}")
    for _ in range(RANDOM_KILLS):
        outcome, reply = trial(kill_at_s=rng.uniform(0, seconds * 1.2))
        outcomes[f"random:{outcome}"] += 1
        assert outcome in {"a", "b"} | ALLOWED_ERRORS[mode], f"killed at a random moment: {outcome}"
    assert outcomes["a"] and outcomes["b"], outcomes  # kills landed both before and after the swap

    # the leftovers of a kill are removed by the next save
    reset()
    saver.call(op="trial", mode=mode, model="b", target=str(target), kwargs=new_layout, kill_after=ops // 2)
    saver.call(op="trial", mode=mode, model="b", target=str(target), kwargs=new_layout)
    assert leftovers(parent, target) == [] and classify(target, env["logits"]) == "b"
    print(f"{scenario}/{mode}: {ops} operations, {sum(outcomes.values())} kills: {dict(outcomes)}")


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_loads_racing_resaves(env: dict[str, Any], tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads while another process re-saves, alternating models and layouts: each is one whole save."""
    import lmport.atomic as atomic

    target = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(target)
    add_extras(target)
    layouts = [{"max_shard_size": SMALL}, {"safe_serialization": False}, {"max_shard_size": MEDIUM}, {}]
    plan = [("ab"[i % 2], layouts[(i // 2) % len(layouts)]) for i in range(RACE_SAVES)]
    runs = Counter[str]()
    attempts = atomic.load_attempts

    def counting() -> Iterator[Any]:
        for attempt in attempts():
            runs["runs"] += 1
            yield attempt

    monkeypatch.setattr(atomic, "load_attempts", counting)
    saver: Saver = env["saver"]
    saver.send(op="saves", mode=mode, target=str(target), plan=plan)
    outcomes: Counter[str] = Counter()
    start = time.monotonic()
    while not saver.ready():
        outcomes[classify(target, env["logits"])] += 1
        assert time.monotonic() - start < 120
    reply = json.loads(saver.reply())
    assert reply["result"] == "ok"
    assert all(k in ("a", "b") or k.startswith("error:") for k in outcomes), outcomes
    assert outcomes["a"] + outcomes["b"] >= 5, outcomes
    assert runs["runs"] > sum(outcomes.values()), "no load overlapped a save: the race was not run"
    if mode == "exchange":
        assert set(outcomes) <= {"a", "b", "error:FolderChangedError"}, outcomes
    assert extras(target)["README.md"] == b"my model card"
    assert leftovers(target.parent, target) == []
    loads = sum(outcomes.values())
    print(f"race/{mode}: {len(plan)} saves in {reply['seconds']:.1f}s, {loads} loads: {dict(outcomes)}, "
          f"{runs['runs'] - loads} runs repeated because a save replaced the folder")  # fmt: skip


# --- single cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"safe_serialization": False}),  # issue 9 finding 3: the stale model.safetensors won
        ({"safe_serialization": False, "max_shard_size": SMALL}, {}),
        ({"max_shard_size": SMALL}, {"max_shard_size": MEDIUM}),
        ({"max_shard_size": SMALL, "safe_serialization": False}, {"max_shard_size": MEDIUM}),
    ],
    ids=["st_to_bin", "bin_sharded_to_st", "fewer_shards", "bin_shards_to_st_shards"],
)
def test_stale_files_never_win(
    env: dict[str, Any], tmp_path: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    import transformers

    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder, **first)
    env["models"]["b"].save_pretrained(folder, **second)
    names = {p.name for p in folder.iterdir()}
    fmt = "pytorch_model" if second.get("safe_serialization") is False else "model"
    assert all(n.startswith(fmt) or n in ("config.json", "generation_config.json") for n in names), names
    if "max_shard_size" in second:
        index = json.loads((folder / f"{fmt}.{'bin' if fmt != 'model' else 'safetensors'}.index.json").read_text())
        assert names == set(index["weight_map"].values()) | {index_name(fmt), "config.json", "generation_config.json"}
    assert classify(folder, env["logits"]) == "b"
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder)  # transformers too reads the new save
    assert (logits(ref) - env["logits"]["b"]).abs().max() < 1e-5


def index_name(stem: str) -> str:
    return "model.safetensors.index.json" if stem == "model" else "pytorch_model.bin.index.json"


def test_other_files_kept_linked_not_copied(env: dict[str, Any], tmp_path: Path) -> None:
    """Files that are not the checkpoint's stay, as the same inodes; other variants stay; no leftovers."""
    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder, max_shard_size=SMALL)
    env["models"]["a"].save_pretrained(folder, variant="ema")
    add_extras(folder)
    (folder / "sub" / "checkpoint-1").mkdir()
    (folder / "sub" / "checkpoint-1" / "optimizer.pt").write_bytes(b"\0" * 1000)
    inodes = {p.relative_to(folder): p.lstat().st_ino for p in folder.rglob("*") if not p.is_dir()}
    kept = extras(folder)
    env["models"]["b"].save_pretrained(folder, safe_serialization=False)
    assert extras(folder) == kept
    for rel, ino in inodes.items():
        if not (rel.name.startswith(("model", "pytorch_model")) and ".ema." not in rel.name) and rel.name not in (
            "config.json",
            "generation_config.json",
        ):
            assert (folder / rel).lstat().st_ino == ino, rel  # hard-linked, not copied
    assert (folder / "link.md").is_symlink() and (folder / "model.ema.safetensors").is_file()
    assert leftovers(tmp_path, folder) == []
    assert classify(folder, env["logits"]) == "b"


def test_memory_mapped_model_survives_saves_over_its_folder(env: dict[str, Any], tmp_path: Path) -> None:
    import lmport

    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder)
    mapped = lmport.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    maps = Path("/proc/self/maps").read_text()
    assert str(folder / "model.safetensors") in maps  # the test is about memory-mapped weights
    before = logits(mapped)
    assert (before - env["logits"]["a"]).abs().max() <= 1e-6
    env["models"]["b"].save_pretrained(folder, max_shard_size=SMALL)  # another model over it
    assert torch.equal(logits(mapped), before)
    mapped.save_pretrained(folder)  # itself, from its own mapped pages, over its own (replaced) folder
    assert torch.equal(logits(mapped), before)
    env["models"]["b"].save_pretrained(folder)
    assert torch.equal(logits(mapped), before)
    assert classify(folder, env["logits"]) == "b"


def test_is_main_process_false_writes_nothing(env: dict[str, Any], tmp_path: Path) -> None:
    from conftest import tree_digest

    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder)
    before, listing = tree_digest(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    assert env["models"]["b"].save_pretrained(folder, is_main_process=False) == folder
    assert env["models"]["b"].save_pretrained(tmp_path / "new", is_main_process=False) == tmp_path / "new"
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_leftovers_removed_and_never_taken_for_checkpoints(env: dict[str, Any], tmp_path: Path) -> None:
    """A killed save's hidden folders and .tmp files: Trainer and loaders skip them, the next save removes them."""
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    folder = out / "checkpoint-5"
    env["models"]["a"].save_pretrained(folder)
    for stale in (".checkpoint-9.lmport-new-1-0123abcd", ".checkpoint-5.lmport-old-1-89abcdef"):
        shutil.copytree(folder, out / stale)
    (out / ".checkpoint-5.lmport-new-2-deadbeef").mkdir()  # killed before any file was written
    (folder / ".config.json.0123abcd.tmp").write_text("{")
    (folder / ".model.safetensors.tmp").write_bytes(b"x")  # as the previous lmport version named them
    (folder / ".lmport-new-3-01234567").mkdir()  # a killed in-place save
    (folder / ".notes.tmp").write_text("the user's own")  # not lmport's: kept
    assert get_last_checkpoint(str(out)) == str(folder)
    env["models"]["b"].save_pretrained(folder)
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint-9.lmport-new-1-0123abcd", "checkpoint-5"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".notes.tmp"]
    env["models"]["b"].save_pretrained(out / "checkpoint-9")  # its own leftovers go with its save
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "checkpoint-9"]


def test_entries_written_during_the_swap_are_kept(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (a Trainer rank writing rng_state_1.pth) writes into the old folder just before the swap."""
    import lmport.atomic as atomic

    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder)
    (folder / "trainer_state.json").write_text("old")
    exchange = atomic._exchange

    def late_writer(a: Path, b: Path) -> bool:
        (folder / "rng_state_1.pth").write_bytes(b"late")  # a new file
        tmp = folder / "state.tmp"
        tmp.write_text("new")
        os.replace(tmp, folder / "trainer_state.json")  # a file replaced after it was linked
        (folder / "late_dir").mkdir()
        (folder / "late_dir" / "f").write_text("f")
        return exchange(a, b)

    monkeypatch.setattr(atomic, "_exchange", late_writer)
    env["models"]["b"].save_pretrained(folder)
    assert (folder / "rng_state_1.pth").read_bytes() == b"late"
    assert (folder / "trainer_state.json").read_text() == "new"
    assert (folder / "late_dir" / "f").read_text() == "f"
    assert leftovers(tmp_path, folder) == [] and classify(folder, env["logits"]) == "b"


def test_cwd_and_links_to_the_folder(env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process inside the folder stays inside the new one; a link to the folder stays a link."""
    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder)
    add_extras(folder)
    (tmp_path / "alias").symlink_to(folder)
    monkeypatch.chdir(folder / "sub")
    env["models"]["b"].save_pretrained("..")
    assert Path("notes.txt").read_text() == "kept" and Path("../config.json").is_file()
    assert os.path.samefile(os.getcwd(), folder / "sub")
    env["models"]["a"].save_pretrained(tmp_path / "alias")
    assert (tmp_path / "alias").is_symlink() and classify(folder, env["logits"]) == "a"
    assert leftovers(tmp_path, folder) == []


def test_in_place_fallback(env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the folder cannot be swapped (a mount point): in place, with a warning, stale files still removed."""
    import lmport.atomic as atomic

    folder = tmp_path / "ckpt"
    env["models"]["a"].save_pretrained(folder, max_shard_size=SMALL)
    add_extras(folder)
    kept = extras(folder)
    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: os.fspath(p) == str(folder))
    with pytest.warns(UserWarning, match="cannot be replaced as a whole.*mount point"):
        env["models"]["b"].save_pretrained(folder, safe_serialization=False)
    assert extras(folder) == kept and not (folder / "model.safetensors.index.json").exists()
    assert classify(folder, env["logits"]) == "b" and leftovers(tmp_path, folder) == []


def test_config_saves_are_atomic_files(env: dict[str, Any], tmp_path: Path) -> None:
    """config.json / generation_config.json saved alone: replaced whole (new inode), no .tmp left."""
    model = env["models"]["a"]
    folder = tmp_path / "cfg"
    path = model.config.save_pretrained(folder)
    first = path.stat().st_ino
    model.config.save_pretrained(folder)
    gen = model.generation_config.save_pretrained(folder)
    assert path.stat().st_ino != first and gen.is_file()
    assert json.loads(path.read_text())["model_type"] == "llama"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json"]


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2:])
