"""Fuzz worker: loads checkpoint folders with lmport under a memory cap, one JSON line of verdict per folder.

Run by :class:`Worker` (used by ``tests/test_fuzz.py``), never by pytest itself. The
process reads one JSON request per line on stdin::

    {"id": 7, "folder": "/tmp/.../case", "watch": "/tmp/.../7", "reference": "/tmp/.../base",
     "oracle": true}

and answers on stdout with one JSON line per request (``"phase": "oracle"`` first, when
the transformers oracle is about to run, so a hang is attributed to the right library)::

    {"id": 7, "outcome": "typed" | "untyped" | "loaded" | "forward-failed", "error": "CorruptWeightsError",
     "message": "...", "where": "core/loading.py:123", "wrote": false, "finite": true,
     "same": true | false | null, "oracle": {...}, "seconds": 0.03}

Every load runs with the address space capped (``RLIMIT_AS``, set once the process is
warm: torch, lmport, transformers imported and a reference model loaded), so a config or
header that makes lmport allocate gigabytes fails with ``MemoryError`` (an untyped
outcome, reported) instead of exhausting the machine. A loaded model must run a forward
pass and a two-token ``generate`` (the config's token ids); its logits are compared with
lmport's load of the unmutated checkpoint (``same``) and with transformers' load of the
same folder (``oracle``). A hang is the caller's to detect: it times out the reply and
kills the process (each request arms ``faulthandler`` so the stacks land in stderr first).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, TextIO

#: The prompt every loaded model runs (ids below every tiny vocabulary).
PROMPT = [[1, 5, 9, 17, 33, 65, 100, 127]]
#: Tolerance between lmport and transformers logits on the same (fp32) checkpoint.
ORACLE_ATOL = 1e-5


# --- the worker process ------------------------------------------------------------------------


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path → sha256 (files), ``link:<target>`` (symlinks) or ``dir`` for everything under ``folder``."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback inside the repository (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    root = str(Path(__file__).resolve().parent.parent)
    inside = [f for f in frames if f.filename.startswith(root) and "/.venv/" not in f.filename]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    name = frame.filename[len(root) + 1 :] if frame.filename.startswith(root) else Path(frame.filename).name
    return f"{name}:{frame.lineno}"


class Loader:
    """What the worker does for one request."""

    def __init__(self, oracle: bool) -> None:
        import torch

        import lmport

        torch.set_num_threads(1)
        self.torch = torch
        self.lmport = lmport
        self.transformers: Any = None
        if oracle:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            self.transformers = transformers
        self.references: dict[str, Any] = {}

    def positions(self, model: Any) -> int:
        """How many positions the model takes (learned position embeddings end there)."""
        return int(getattr(model.config, "max_position_embeddings", None) or len(PROMPT[0]))

    def logits(self, model: Any) -> Any:
        torch = self.torch
        vocab = int(getattr(model.config, "vocab_size", 128))
        ids = torch.tensor([[min(i, vocab - 1) for i in PROMPT[0][: self.positions(model)]]])
        with torch.no_grad():
            return model(ids).logits.float()

    def reference(self, folder: str, kwargs: dict[str, Any] | None = None) -> Any:
        """Logits of lmport's load of the unmutated ``folder`` with the same arguments (cached)."""
        key = folder + json.dumps(kwargs or {}, sort_keys=True)
        if key not in self.references:
            model = self.lmport.AutoModelForCausalLM.from_pretrained(folder, **(kwargs or {}))
            self.references[key] = self.logits(model)
        return self.references[key]

    def handle(self, request: dict[str, Any], reply: TextIO) -> dict[str, Any]:
        torch = self.torch
        folder = Path(request["folder"])
        watch = Path(request.get("watch") or folder)
        result: dict[str, Any] = {"id": request["id"]}
        kwargs = request.get("kwargs", {})
        reference = self.reference(request["reference"], kwargs) if request.get("reference") else None
        before = folder_digest(watch)
        start = time.perf_counter()
        model = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if request.get("sabotage"):  # the harness's own test: a load that misbehaves on purpose
                    exec(request["sabotage"], {})
                model = self.lmport.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
            result["outcome"] = "loaded"
        except self.lmport.LmportError as exc:
            result.update(outcome="typed", error=type(exc).__name__, message=str(exc)[:400], where=_where(exc))
        except BaseException as exc:  # noqa: BLE001 - the verdict: anything else escaped the hierarchy
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            result.update(
                outcome="untyped",
                error=type(exc).__name__,
                message=str(exc)[:400],
                where=_where(exc),
                traceback="".join(traceback.format_exception(exc)[-6:])[-2000:],
            )
        result["seconds"] = round(time.perf_counter() - start, 4)
        if model is not None:
            try:
                logits = self.logits(model)
                result["finite"] = bool(torch.isfinite(logits).all())
                with warnings.catch_warnings(), torch.no_grad():  # the config's token ids and generation settings
                    warnings.simplefilter("ignore")
                    if self.positions(model) >= 5:
                        prompt = torch.tensor([PROMPT[0][:3]]).clamp(max=logits.shape[-1] - 1)
                        model.generate(prompt, max_new_tokens=2, do_sample=False)
                result["dtype"] = str(next(model.parameters()).dtype)
                if reference is not None:
                    result["same"] = logits.shape == reference.shape and bool(torch.equal(logits, reference))
                if self.transformers is not None and request.get("oracle"):
                    reply.write(json.dumps({"id": request["id"], "phase": "oracle"}) + "\n")
                    reply.flush()
                    result["oracle"] = self.oracle(folder, logits, result["dtype"], kwargs)
            except BaseException as exc:  # noqa: BLE001 - a loaded model must run
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                result.update(
                    outcome="forward-failed",
                    error=type(exc).__name__,
                    message=str(exc)[:400],
                    where=_where(exc),
                    traceback="".join(traceback.format_exception(exc)[-6:])[-2000:],
                )
        del model
        result["wrote"] = folder_digest(watch) != before
        return result

    def oracle(self, folder: Path, logits: Any, dtype: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """transformers' load of the same folder (same arguments): ``status`` ok (with ``max_diff``, float32
        models only) or why it cannot judge."""
        torch = self.torch
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = self.transformers.AutoModelForCausalLM.from_pretrained(
                    str(folder), output_loading_info=True, **(kwargs or {})
                )
        except BaseException as exc:  # noqa: BLE001 - transformers refusing is not lmport's failure
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return {"status": "refused", "error": type(exc).__name__, "message": str(exc)[:200]}
        incomplete = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if incomplete:
            return {"status": "incomplete", "info": str(incomplete)[:200]}
        theirs_dtype = str(next(model.parameters()).dtype)
        if theirs_dtype != dtype or dtype != "torch.float32":
            return {"status": "dtype", "theirs": theirs_dtype, "ours": dtype}
        try:
            theirs = self.logits(model)
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return {"status": "forward-refused", "error": type(exc).__name__, "message": str(exc)[:200]}
        if theirs.shape != logits.shape:
            return {"status": "ok", "max_diff": math.inf, "shapes": [list(theirs.shape), list(logits.shape)]}
        both_nan = torch.isnan(theirs) & torch.isnan(logits)
        diff = (theirs - logits).abs().masked_fill(both_nan, 0.0)
        same_inf = torch.isinf(theirs) & (theirs == logits)
        diff = diff.masked_fill(same_inf, 0.0).nan_to_num(nan=math.inf)
        return {"status": "ok", "max_diff": float(diff.max()), "finite": bool(torch.isfinite(theirs).all())}


def serve(warm_folders: list[str], cap_mb: int, oracle: bool) -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by a library goes to stderr, never into the protocol
    loader = Loader(oracle)
    for folder in warm_folders:  # every code path a load takes is imported before the cap
        loader.reference(folder)
        if loader.transformers is not None:
            loader.oracle(Path(folder), loader.reference(folder), "torch.float32")
    baseline = _vm_size()
    limit = baseline + cap_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    protocol.write(json.dumps({"ready": True, "baseline_mb": baseline >> 20, "limit_mb": limit >> 20}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("stack_after"):  # a hang leaves every thread's stack in stderr for the report
            faulthandler.dump_traceback_later(request["stack_after"], exit=False)
        result = loader.handle(request, protocol)
        faulthandler.cancel_dump_traceback_later()
        protocol.write(json.dumps(result) + "\n")


# --- the caller's side ---------------------------------------------------------------------------


class Worker:
    """A fuzz worker process, restarted whenever it dies or hangs.

    Args:
        warm_folders: valid checkpoints, each loaded once before the memory cap is set.
        cap_mb: address space allowed above the warm baseline.
        timeout_s: seconds one load (plus the oracle) may take before it counts as a hang.
        oracle: also load each successfully loaded folder with transformers and compare.
    """

    def __init__(
        self, warm_folders: list[Path], *, cap_mb: int = 768, timeout_s: float = 30.0, oracle: bool = True
    ) -> None:
        self.warm_folders = [str(f) for f in warm_folders]
        self.cap_mb = cap_mb
        self.timeout_s = timeout_s
        self.use_oracle = oracle
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = tempfile.TemporaryFile("w+")
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self._buffer = b""

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            MALLOC_ARENA_MAX="2",  # bounded virtual reservations per thread, so the cap measures real use
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        tests = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = tests + os.pathsep + env.get("PYTHONPATH", "")
        oracle = "1" if self.use_oracle else "0"
        argv = [sys.executable, __file__, json.dumps(self.warm_folders), str(self.cap_mb), oracle]
        self._buffer = b""
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            start_new_session=True,
        )
        ready = self._read(120.0)
        if ready is None or not ready.get("ready"):
            tail = self.stderr_tail()
            self.stop()
            raise RuntimeError(f"fuzz worker did not start: {ready!r}\n{tail}")
        self.info = ready

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def stderr_tail(self, n: int = 3000) -> str:
        self.stderr.flush()
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - n))
        return self.stderr.read()

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON line, ``None`` at EOF; raises ``TimeoutError`` after ``timeout`` seconds.

        Reads the pipe's descriptor directly (a buffered reader could hold the next line
        where ``select`` does not see it).
        """
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def run(self, request: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request; its verdict, or ``outcome`` ``hang`` (past ``timeout_s``, by default the worker's) or
        ``crash`` (the worker is then restarted)."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        phase = "lmport"
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write(json.dumps({"stack_after": max(1.0, timeout_s - 2), **request}) + "\n")
            self.proc.stdin.flush()
            while True:
                reply = self._read(max(0.0, deadline - time.monotonic()))
                if reply is None:
                    break
                if reply.get("phase"):
                    phase = reply["phase"]
                    continue
                return reply
        except TimeoutError:
            time.sleep(0.5)
            self.stop()
            self.restarts += 1
            stacks = self.stderr_tail(6000)
            stacks = stacks[stacks.rfind("Timeout (") :] if "Timeout (" in stacks else ""
            return {"id": request["id"], "outcome": "hang", "phase": phase, "seconds": timeout_s,
                    "stderr": stacks}  # fmt: skip
        except BrokenPipeError:
            pass
        assert self.proc is not None
        code = self.proc.wait()
        tail = self.stderr_tail(1500)
        self.proc = None
        self.restarts += 1
        return {"id": request["id"], "outcome": "crash", "phase": phase, "returncode": code, "stderr": tail}


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
