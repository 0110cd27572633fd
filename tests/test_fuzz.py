"""Fuzzing in the suite: safetensors headers, config.json, index files and ``.bin`` pickles.

Each generated case is a copy of a valid tiny checkpoint (made once per session, saved by
transformers) with one thing mutated (a few for config.json). A worker process
(``tests/fuzz_worker.py``) loads it under an address-space cap and a timeout, and every
case must end in one of:

* a typed error (a subclass of :class:`lmport.LmportError`);
* a model whose logits are bit-for-bit those of the unmutated checkpoint, where the
  mutation cannot change the weights (``same``: padding, metadata, re-ordered data,
  float64 copies, non-contiguous or shared-storage tensors, ...) — there a typed error
  is a failure too, unless the mutation may legitimately be refused (``same_or_error``);
* otherwise a model that runs a forward pass (and a two-token ``generate``) with finite
  logits (non-finite ones are accepted only where the mutation wrote raw bytes into the
  weights) and, where transformers loads the same folder completely, logits within 1e-5
  of transformers'.

and in every case: no hang, no crash, no ``MemoryError`` under the cap, no file written,
changed or created under the case's folder. Failures are collected over the whole run and
reported grouped by signature (outcome, error class, raising line), one example each.

Hypothesis generates the cases, derandomized (the same cases in every run). The default
run is bounded for CI; a longer one is asked for with ``LMPORT_FUZZ_EXAMPLES=<cases per
target>`` (and ``LMPORT_FUZZ_SEED=<n>`` for cases other than the default ones).
``LMPORT_FUZZ_REPORT=<path>`` writes every failure and outcome counts as JSON.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import shutil
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA, WINDOW, save_hf, save_hf_llama_random
from fuzz_worker import ORACLE_ATOL, Worker
from safetensors.torch import load_file, save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ST = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

#: Cases per target in the default run (all four together stay under a minute on 2 cores).
DEFAULT_EXAMPLES = {"safetensors": 250, "config": 300, "index": 200, "bin": 250}
LONG = os.environ.get("LMPORT_FUZZ_EXAMPLES")
SEED = os.environ.get("LMPORT_FUZZ_SEED")
REPORT = os.environ.get("LMPORT_FUZZ_REPORT")
#: Address space a load may use above the worker's warm baseline, and seconds before a hang.
CAP_MB = int(os.environ.get("LMPORT_FUZZ_CAP_MB", "768"))
TIMEOUT_S = float(os.environ.get("LMPORT_FUZZ_TIMEOUT_S", "30"))

SAME, SAME_OR_ERROR, ANY = "same", "same_or_error", "any"


def fuzz_settings(target: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    examples = int(LONG) if LONG else DEFAULT_EXAMPLES[target]

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        fn = settings(
            max_examples=examples,
            deadline=None,
            derandomize=SEED is None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.generate],
        )(fn)
        return hypothesis.seed(int(SEED))(fn) if SEED is not None else fn

    return decorate


# --- the valid tiny checkpoints every case starts from -----------------------------------------


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints saved by transformers (random weights large enough to matter): single safetensors for
    Llama, GPT-2 and Mistral, a sharded Llama (safetensors and .bin) and a single-file .bin Llama."""
    import transformers

    root = tmp_path_factory.mktemp("fuzz_bases")
    out = {
        "llama": save_hf_llama_random(root / "llama", seed=11),
        "gpt2": save_hf(root / "gpt2", transformers.GPT2Config(**TINY_GPT2), seed=12),
        "mistral": save_hf(root / "mistral", transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW), seed=13),
    }
    state = load_file(str(out["llama"] / ST))
    for name, fmt in (("llama_sharded", "safetensors"), ("llama_bin_sharded", "bin")):
        folder = root / name
        shutil.copytree(out["llama"], folder, ignore=shutil.ignore_patterns(ST))
        write_shards(folder, state, fmt, parts=3)
        out[name] = folder
    folder = root / "llama_bin"
    shutil.copytree(out["llama"], folder, ignore=shutil.ignore_patterns(ST))
    torch.save(state, folder / BIN)
    out["llama_bin"] = folder
    return out


def write_shards(folder: Path, state: dict[str, torch.Tensor], fmt: str, parts: int) -> dict[str, str]:
    names = list(state)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for k in range(parts):
        file = f"{stem}-{k + 1:05d}-of-{parts:05d}.{ext}"
        chunk = {n: state[n] for n in names[k::parts]}
        if fmt == "safetensors":
            save_file(chunk, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(chunk, folder / file)
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / (ST_INDEX if fmt == "safetensors" else BIN_INDEX)).write_text(json.dumps(index, indent=2))
    return weight_map


@pytest.fixture(scope="module")
def worker(bases: dict[str, Path]) -> Any:
    w = Worker(
        [bases[k] for k in ("llama", "gpt2", "mistral", "llama_bin")], cap_mb=CAP_MB, timeout_s=TIMEOUT_S
    )
    w.start()
    yield w
    w.stop()


# --- running cases and judging them -------------------------------------------------------------


class Campaign:
    """Runs one target's cases through the worker and collects every failure (never stops at the first)."""

    def __init__(self, target: str, worker: Worker, bases: dict[str, Path], root: Path) -> None:
        self.target = target
        self.worker = worker
        self.bases = bases
        self.root = root
        self.count = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        #: Loads that passed without transformers' confirmation (it refused, or loaded incompletely): for review.
        self.notable: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.started = time.perf_counter()

    def run(self, base: str, spec: Any, mutate: Callable[[Path], str], **kwargs: Any) -> dict[str, Any]:
        """Copy ``base``, apply ``mutate`` (returns the expectation: SAME, SAME_OR_ERROR or ANY, with ``+raw``
        when weights may hold arbitrary bytes), load it in the worker and judge the verdict."""
        self.count += 1
        case = self.root / f"{self.target}-{self.count}"
        folder = case / "ckpt"
        shutil.copytree(self.bases[base], folder)
        try:
            expect = mutate(folder)
            verdict = self.worker.run(
                {
                    "id": self.count,
                    "folder": str(folder),
                    "watch": str(case),
                    "reference": str(self.bases[base]),
                    "oracle": True,
                    "kwargs": kwargs,
                }
            )
        finally:
            _remove(case)
        label = _outcome_label(verdict)
        self.outcomes[label] += 1
        if label.startswith("loaded") and not label.endswith("oracle=ok)") and len(self.notable[label]) < 30:
            self.notable[label].append({"base": base, "spec": _short(spec), "oracle": verdict.get("oracle")})
        problem = judge(verdict, expect)
        if problem is not None:
            self.failures[problem].append({"base": base, "spec": _short(spec), "verdict": verdict})
        return verdict

    def report(self) -> str:
        lines = [
            f"{self.target}: {self.count} cases, {sum(map(len, self.failures.values()))} failures in "
            f"{len(self.failures)} signatures ({time.perf_counter() - self.started:.1f} s; outcomes "
            f"{dict(self.outcomes.most_common())}; worker restarts {self.worker.restarts})"
        ]
        for signature, cases in sorted(self.failures.items(), key=lambda kv: -len(kv[1])):
            example = min(cases, key=lambda c: len(c["spec"]))
            verdict = {k: v for k, v in example["verdict"].items() if k in ("error", "message", "where", "oracle",
                       "phase", "returncode", "stderr", "traceback")}  # fmt: skip
            lines.append(f"  [{len(cases)}x] {signature}\n      base={example['base']} spec={example['spec']}\n"
                         f"      {_short(verdict, 1200)}")  # fmt: skip
        return "\n".join(lines)

    def finish(self) -> None:
        text = self.report()
        print(text)
        if REPORT:
            path = Path(REPORT)
            data = json.loads(path.read_text()) if path.exists() else {}
            data[self.target] = {
                "cases": self.count,
                "seconds": round(time.perf_counter() - self.started, 1),
                "outcomes": dict(self.outcomes),
                "failures": {k: v[:20] for k, v in self.failures.items()},
                "failure_counts": {k: len(v) for k, v in self.failures.items()},
                "notable": self.notable,
            }
            path.write_text(json.dumps(data, indent=1, default=str))
        assert self.count > 0
        assert not self.failures, text


def _outcome_label(verdict: dict[str, Any]) -> str:
    outcome = verdict["outcome"]
    if outcome == "typed":
        return f"typed:{verdict['error']}"
    if outcome == "loaded":
        oracle = verdict.get("oracle", {}).get("status", "-")
        return f"loaded(same={verdict.get('same')},oracle={oracle})"
    return outcome


def judge(verdict: dict[str, Any], expect: str) -> str | None:
    """The failure signature of ``verdict`` under expectation ``expect``, or ``None`` if it passes."""
    outcome = verdict["outcome"]
    raw = expect.endswith("+raw")
    expect = expect.removesuffix("+raw")
    if outcome in ("hang", "crash"):
        return f"{outcome} (in {verdict.get('phase')})"
    if outcome in ("untyped", "forward-failed"):
        memory = verdict["error"] == "MemoryError" or "can't allocate" in verdict.get("message", "")
        kind = "memory cap" if memory else outcome
        return f"{kind}: {verdict['error']} at {verdict.get('where')}"
    if verdict.get("wrote"):
        return "the load wrote into the checkpoint folder"
    if outcome == "typed":
        return "a typed error for a mutation that changes nothing" if expect == SAME else None
    assert outcome == "loaded", verdict
    if expect in (SAME, SAME_OR_ERROR) and not verdict.get("same"):
        return "loaded a different model from a mutation that cannot change the weights"
    oracle = verdict.get("oracle") or {}
    if oracle.get("status") == "ok" and not oracle["max_diff"] <= ORACLE_ATOL:
        return "logits differ from transformers' on the same folder"
    if oracle.get("status") == "dtype" and oracle["theirs"] != oracle["ours"]:
        return "loaded in another dtype than transformers loads the same folder in"
    if not verdict.get("finite"):
        if raw and oracle.get("status") == "ok":
            return None  # the bytes written are non-finite weights, loaded exactly as transformers loads them
        if not raw:
            return "loaded a model with non-finite logits"
    return None


def _short(value: Any, n: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[: n - 40]}...({len(text)} chars)"


def _remove(path: Path) -> None:
    for root, dirs, _ in os.walk(path):  # a case may leave a folder without permissions
        for d in dirs:
            p = Path(root) / d
            if not p.is_symlink():
                p.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cases")


# --- value strategies -------------------------------------------------------------------------------

BIG_INTS = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**99, 10**100, 10**120]
ints = st.one_of(st.integers(-3, 300), st.sampled_from(BIG_INTS), st.integers())
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf, -math.inf]),
)
texts = st.one_of(st.text(max_size=12), st.sampled_from(["", "\x00", "../x", "a" * 300, "é", "NaN", "auto"]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(texts, c, max_size=4)), max_leaves=8
)


def plausible_number(original: Any) -> st.SearchStrategy[Any]:
    """Values near ``original`` (a number): scaled, shifted, sign-flipped, as int or float."""
    if isinstance(original, bool) or not isinstance(original, (int, float)):
        return json_values
    factors = st.sampled_from([0, 0.5, 2, 3, -1, 1e-3, 1e3, 1e30])
    deltas = st.integers(-3, 3)
    scaled = st.builds(lambda f, d: type(original)(original * f + d) if math.isfinite(original * f + d) else original,
                       factors, deltas)  # fmt: skip
    return st.one_of(scaled, ints, floats)


def dumps(value: Any) -> str:
    """JSON text of ``value``, NaN and infinities written as Python's json writes them."""
    return json.dumps(value, indent=2)


# --- target 1: safetensors headers ---------------------------------------------------------------

ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16",
             "U32", "U64", "C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "E8M0", "f32", "F32 "]  # fmt: skip
TORCH_DTYPES = {"F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
                "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                "I8": torch.int8, "U16": torch.uint16}  # fmt: skip


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_safetensors(path: Path, header: Any, data: bytes, *, header_len: int | None = None, text: str | None = None,
                      pad: int = 0) -> None:  # fmt: skip
    body = (json.dumps(header, separators=(",", ":")) if text is None else text).encode("utf-8", "surrogatepass")
    body += b" " * ((-len(body) % 8) + pad)
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n % 2**64) + body + data)


def entry_values(field: str) -> st.SearchStrategy[Any]:
    if field == "dtype":
        return st.one_of(st.sampled_from(ST_DTYPES), json_values)
    if field == "shape":
        return st.one_of(st.lists(ints, max_size=4), st.lists(st.integers(0, 200), max_size=4), json_values)
    return st.one_of(st.lists(ints, min_size=2, max_size=2), st.lists(st.integers(0, 400_000), max_size=3), json_values)


safetensors_specs = st.one_of(
    st.fixed_dictionaries({"op": st.just("header_len"), "delta": st.one_of(st.integers(-16, 16), ints)}),
    st.fixed_dictionaries({"op": st.just("entry"), "i": st.integers(0, 99), "field": st.sampled_from(
        ["dtype", "shape", "data_offsets"])}).flatmap(  # fmt: skip
        lambda s: st.fixed_dictionaries({**{k: st.just(v) for k, v in s.items()}, "value": entry_values(s["field"])})
    ),
    st.fixed_dictionaries({"op": st.just("entry_shape_permuted"), "i": st.integers(0, 99),
                           "how": st.sampled_from(["reverse", "flatten", "unsqueeze", "split2"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("entry_dtype_same_width"), "i": st.integers(0, 99),
                           "dtype": st.sampled_from(["I32", "U32", "F32", "F16", "BF16", "I16", "U16", "F8_E4M3",
                                                     "U8", "BOOL", "I8", "F64", "I64", "C64"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("swap_offsets"), "i": st.integers(0, 99), "j": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("entry_field"), "i": st.integers(0, 99),
                           "action": st.sampled_from(["delete_dtype", "delete_shape", "delete_data_offsets", "extra",
                                                      "replace"]), "value": json_values}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("rename"), "i": st.integers(0, 99),
                           "to": st.one_of(texts, st.integers(0, 99))}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("delete_entry"), "i": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("add_entry"), "name": texts, "entry": json_values}),
    st.fixed_dictionaries({"op": st.just("add_tensor"), "name": st.sampled_from(["extra.x", "model.layers.9.w",
                           "lm_head.bias", "model.norm.bias"]), "shape": st.lists(st.integers(0, 5), max_size=3),
                           "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("metadata"), "value": json_values}),
    st.fixed_dictionaries({"op": st.just("metadata_strings"), "value": st.dictionaries(texts, texts, max_size=5)}),
    st.fixed_dictionaries({"op": st.just("truncate"), "at": st.floats(0, 1)}),
    st.fixed_dictionaries({"op": st.just("append"), "data": st.binary(min_size=1, max_size=64)}),
    st.fixed_dictionaries({"op": st.just("flip_data"), "at": st.floats(0, 1), "byte": st.integers(0, 255),
                           "count": st.integers(1, 8)}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("flip_header"), "at": st.floats(0, 1), "byte": st.integers(0, 255)}),
    st.fixed_dictionaries({"op": st.just("reorder"), "seed": st.integers(0, 1000)}),
    st.fixed_dictionaries({"op": st.just("retype"), "i": st.integers(0, 99), "dtype": st.sampled_from(
        sorted(TORCH_DTYPES))}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("pad"), "spaces": st.integers(1, 64)}),
    st.fixed_dictionaries({"op": st.just("whole_header"), "value": json_values}),
    st.fixed_dictionaries({"op": st.just("header_text"), "text": st.one_of(
        st.text(max_size=40),
        st.sampled_from(["{", "[" * 5000, '{"a":' * 3000, "{}" + "x", "\ufeff{}"]))}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("duplicate_key"), "i": st.integers(0, 99), "j": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("raw"), "data": st.binary(max_size=64)}),
)


def mutate_safetensors(spec: dict[str, Any]) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        path = folder / ST
        header, data = read_safetensors(path)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[spec.get("i", 0) % len(names)]
        op = spec["op"]
        if op == "header_len":
            body = json.dumps(header, separators=(",", ":"))
            n = len(body) + (-len(body) % 8)
            write_safetensors(path, header, data, header_len=n + spec["delta"])
            return SAME if spec["delta"] == 0 else ANY
        if op == "entry":
            header[name][spec["field"]] = spec["value"]
        elif op == "entry_shape_permuted":
            shape = header[name]["shape"]
            how = spec["how"]
            if how == "reverse":
                shape = shape[::-1]
            elif how == "flatten":
                shape = [math.prod(shape)]
            elif how == "unsqueeze":
                shape = [1, *shape]
            elif shape and shape[0] % 2 == 0:
                shape = [2, shape[0] // 2, *shape[1:]]
            header[name]["shape"] = shape
            write_safetensors(path, header, data)
            return ANY
        elif op == "entry_dtype_same_width":
            header[name]["dtype"] = spec["dtype"]  # byte length kept only where widths match; else refused
            write_safetensors(path, header, data)
            return ANY + "+raw"
        elif op == "swap_offsets":
            other = names[spec["j"] % len(names)]
            header[name]["data_offsets"], header[other]["data_offsets"] = (
                header[other]["data_offsets"], header[name]["data_offsets"])  # fmt: skip
        elif op == "entry_field":
            action = spec["action"]
            if action.startswith("delete_"):
                del header[name][action.removeprefix("delete_")]
            elif action == "extra":
                header[name]["extra"] = spec["value"]
            else:
                header[name] = spec["value"]
        elif op == "rename":
            to = spec["to"]
            header[names[to % len(names)] if isinstance(to, int) else to] = header.pop(name)
        elif op == "delete_entry":
            del header[name]
        elif op == "add_entry":
            header[spec["name"]] = spec["entry"]
        elif op == "add_tensor":
            tensor = torch.ones(spec["shape"], dtype=_st_torch(spec["dtype"]))
            state = load_file(str(path))
            state[spec["name"]] = tensor
            save_file(state, str(path), metadata={"format": "pt"})
            extra = spec["name"] in ("extra.x", "model.layers.9.w") and spec["dtype"] in ("F32", "F16")
            return SAME if extra else ANY
        elif op == "metadata":
            header["__metadata__"] = spec["value"]
            write_safetensors(path, header, data)
            return SAME_OR_ERROR
        elif op == "metadata_strings":
            header["__metadata__"] = {"format": "pt", **spec["value"]}
            write_safetensors(path, header, data)
            return SAME
        elif op == "truncate":
            blob = path.read_bytes()
            path.write_bytes(blob[: int(spec["at"] * (len(blob) - 1))])
            return ANY
        elif op == "append":
            path.write_bytes(path.read_bytes() + spec["data"])
            return ANY
        elif op == "flip_data":
            blob = bytearray(data)
            at = int(spec["at"] * (len(blob) - spec["count"]))
            blob[at : at + spec["count"]] = bytes([spec["byte"]]) * spec["count"]
            write_safetensors(path, header, bytes(blob))
            return ANY + "+raw"
        elif op == "flip_header":
            blob = bytearray(path.read_bytes())
            (n,) = struct.unpack("<Q", blob[:8])
            blob[8 + int(spec["at"] * (n - 1))] = spec["byte"]
            path.write_bytes(bytes(blob))
            return ANY + "+raw"
        elif op == "reorder":
            import random

            order = names[:]
            random.Random(spec["seed"]).shuffle(order)
            chunks, offset, new = [], 0, {"__metadata__": header.get("__metadata__", {})}
            for n in order:
                a, b = header[n]["data_offsets"]
                chunks.append(data[a:b])
                new[n] = {**header[n], "data_offsets": [offset, offset + b - a]}
                offset += b - a
            write_safetensors(path, new, b"".join(chunks))
            return SAME
        elif op == "retype":
            state = load_file(str(path))
            state[name] = state[name].to(TORCH_DTYPES[spec["dtype"]])
            save_file(state, str(path), metadata={"format": "pt"})
            return SAME if spec["dtype"] == "F64" else ANY
        elif op == "pad":
            write_safetensors(path, header, data, pad=spec["spaces"])
            return SAME
        elif op == "whole_header":
            write_safetensors(path, spec["value"], data)
            return ANY
        elif op == "header_text":
            write_safetensors(path, None, data, text=spec["text"])
            return ANY
        elif op == "duplicate_key":
            other = names[spec["j"] % len(names)]
            text = json.dumps(header, separators=(",", ":"))
            text = text[:-1] + "," + json.dumps(name) + ":" + json.dumps(header[other]) + "}"
            write_safetensors(path, None, data, text=text)
            return ANY + "+raw"
        elif op == "raw":
            path.write_bytes(spec["data"])
            return ANY
        write_safetensors(path, header, data)
        return ANY

    return apply


def _st_torch(label: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "BOOL": torch.bool, "U8": torch.uint8}
    return table[label]


def test_fuzz_safetensors_headers(worker: Worker, bases: dict[str, Path], cases_root: Path) -> None:
    campaign = Campaign("safetensors", worker, bases, cases_root)

    @fuzz_settings("safetensors")
    @given(spec=safetensors_specs, base=st.sampled_from(["llama", "llama", "gpt2", "mistral"]))
    def fuzz_safetensors(spec: dict[str, Any], base: str) -> None:
        campaign.run(base, spec, mutate_safetensors(spec))

    fuzz_safetensors()
    campaign.finish()


# --- target 2: config.json ----------------------------------------------------------------------

COMMON_KEYS = ["vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
               "initializer_range", "use_cache", "dtype", "torch_dtype", "attn_implementation", "model_type",
               "architectures", "quantization_config", "transformers_version", "auto_map", "_name_or_path"]  # fmt: skip
ROPE_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling",
             "rope_theta", "attention_dropout", "attention_bias", "mlp_bias", "pretraining_tp"]  # fmt: skip
ARCH_KEYS = {
    "llama": COMMON_KEYS + ROPE_KEYS,
    "mistral": COMMON_KEYS + ROPE_KEYS + ["sliding_window"],
    "gpt2": COMMON_KEYS + ["n_embd", "n_layer", "n_head", "n_positions", "n_inner", "n_ctx", "activation_function",
                           "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "scale_attn_weights",
                           "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
                           "hidden_size", "num_attention_heads"],  # fmt: skip
}
ACTIVATIONS = ["silu", "gelu", "gelu_new", "relu", "gelu_pytorch_tanh", "quick_gelu", "swish", "tanh", "sigmoid",
               "gelu_fast", "relu2", "mish", "linear", "leaky_relu", "gelu_10", "laplace", "SiLU", "nope"]  # fmt: skip
DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int8", "float8_e4m3fn", "float4_e2m1fn_x2", "auto",
               "torch.float32", "bool", "complex64", "half", "float", "uint8", "foo"]  # fmt: skip
ROPE_TYPES = ["default", "linear", "dynamic", "llama3", "yarn", "longrope", "su", "ntk", "", "mrope"]
ROPE_SUBKEYS = ["rope_type", "type", "factor", "rope_theta", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
                "mscale_all_dim", "short_factor", "long_factor", "partial_rotary_factor", "truncate"]  # fmt: skip


def key_values(key: str) -> st.SearchStrategy[Any]:
    """Values for ``key``: the ones its type allows (plausible first) and anything JSON can hold."""
    special = {
        "hidden_act": st.sampled_from(ACTIVATIONS),
        "activation_function": st.sampled_from(ACTIVATIONS),
        "dtype": st.sampled_from(DTYPE_NAMES),
        "torch_dtype": st.sampled_from(DTYPE_NAMES),
        "attn_implementation": st.sampled_from(["eager", "sdpa", "flash_attention_2", "flex_attention", "x", ""]),
        "model_type": st.sampled_from(["llama", "gpt2", "mistral", "qwen2", "", "LLAMA"]),
        "quantization_config": st.fixed_dictionaries({"quant_method": st.sampled_from(
            ["bitsandbytes", "fp8", "gptq", "awq", "compressed-tensors", "", "x"])}),  # fmt: skip
        "rope_parameters": rope_dicts(),
        "rope_scaling": st.one_of(st.none(), rope_dicts()),
    }
    plausible = special.get(key)
    defaults = {"rms_norm_eps": 1e-6, "layer_norm_epsilon": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
                "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "sliding_window": 4,
                "head_dim": 16, "pretraining_tp": 1, "num_key_value_heads": 2, "intermediate_size": 96,
                "n_inner": 256, "hidden_size": 64, "n_embd": 64, "num_attention_heads": 4, "n_head": 4,
                "num_hidden_layers": 2, "n_layer": 2, "vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0}  # fmt: skip
    if plausible is None and key in defaults:
        plausible = plausible_number(defaults[key])
    if plausible is None:
        plausible = st.booleans()
    return st.one_of(plausible, plausible, json_values)


def rope_dicts() -> st.SearchStrategy[dict[str, Any]]:
    sub = st.sampled_from(ROPE_SUBKEYS).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(ROPE_TYPES) if k in ("rope_type", "type") else st.one_of(
            plausible_number({"factor": 2.0, "rope_theta": 10000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                              "partial_rotary_factor": 0.5}.get(k, 1.0)), json_values))  # fmt: skip
    )
    return st.lists(sub, max_size=5).map(dict)


config_op = st.one_of(
    st.fixed_dictionaries({"op": st.just("set"), "key": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("delete"), "key": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("rope_sub"), "sub": st.sampled_from(ROPE_SUBKEYS)}),
    st.fixed_dictionaries({"op": st.just("unknown_key"), "key": texts, "value": json_values}),
    # attention layouts that fit the tiny checkpoint's tensors (q: 64 rows, k/v: 32): loads both libraries compare
    st.fixed_dictionaries({"op": st.just("heads"), "head_dim": st.sampled_from([4, 8, 16, 32]),
                           "explicit": st.booleans()}),  # fmt: skip
)
config_specs = st.one_of(
    st.fixed_dictionaries({"arch": st.sampled_from(["llama", "gpt2", "mistral"]), "ops": st.lists(config_op,
                           min_size=1, max_size=3)}),  # fmt: skip
    st.fixed_dictionaries({"arch": st.sampled_from(["llama", "gpt2", "mistral"]), "text": st.sampled_from(
        ["truncate", "nest", "bom", "duplicate", "huge_int", "nan_literal", "top_level", "bytes", "empty", "deep_key",
         "long_string", "missing", "folder", "link_outside", "link_inside", "link_loop"]), "at": st.floats(0, 1),
        "value": json_values, "key": st.integers(0, 99)})  # fmt: skip
)


@st.composite
def config_cases(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(config_specs)
    # the load's own arguments, mostly none: sizes that do not fit are initialised afresh, under the memory cap
    kwargs = draw(st.sampled_from([{}] * 6 + [{"ignore_mismatched_sizes": True}, {"dtype": "bfloat16"}]))
    if "ops" not in spec:
        return {**spec, "kwargs": kwargs}
    keys = ARCH_KEYS[spec["arch"]]
    ops = []
    for op in spec["ops"]:
        op = dict(op)
        if op["op"] in ("set", "delete"):
            op["key"] = keys[op["key"] % len(keys)]
            if op["op"] == "set":
                op["value"] = draw(key_values(op["key"]))
        elif op["op"] == "rope_sub":
            if spec["arch"] == "gpt2":
                op = {"op": "set", "key": "n_inner", "value": draw(key_values("n_inner"))}
            else:
                op["value"] = draw(rope_dicts().map(lambda d: d.get(op["sub"], None)) | json_values)
                op["rope_type"] = draw(st.sampled_from(ROPE_TYPES))
        ops.append(op)
    return {"arch": spec["arch"], "ops": ops, "kwargs": kwargs}


def mutate_config(spec: dict[str, Any]) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        if spec.get("text") in ("missing", "folder", "link_outside", "link_inside", "link_loop"):
            return _config_file(path, spec["text"])
        if "text" in spec:
            path.write_text(config_text(spec, path.read_text(), raw), encoding="utf-8", errors="surrogatepass")
            return SAME_OR_ERROR if spec["text"] in ("bom", "duplicate") else ANY
        benign = True
        for op in spec["ops"]:
            if op["op"] == "set":
                raw[op["key"]] = op["value"]
                benign = benign and op["key"] in ("transformers_version", "_name_or_path", "use_cache")
            elif op["op"] == "delete":
                raw.pop(op["key"], None)
                benign = False
            elif op["op"] == "heads":
                if spec["arch"] == "gpt2":
                    raw["n_head"] = 64 // op["head_dim"]
                else:
                    raw.update(num_attention_heads=64 // op["head_dim"], num_key_value_heads=32 // op["head_dim"])
                    raw["head_dim"] = op["head_dim"] if op["explicit"] else None
                benign = False
            elif op["op"] == "rope_sub":
                rope = raw.get("rope_parameters")
                rope = dict(rope) if isinstance(rope, dict) else {"rope_theta": 10000.0}
                rope["rope_type"] = op["rope_type"]
                rope[op["sub"]] = op["value"]
                raw["rope_parameters"] = rope
                benign = False
            else:
                raw[op["key"]] = op["value"]
                benign = False  # an unknown key may be one a plugin reads (e.g. a legacy spelling)
        path.write_text(dumps(raw), encoding="utf-8", errors="surrogatepass")
        return SAME_OR_ERROR if benign else ANY

    return apply


def _config_file(path: Path, how: str) -> str:
    if how == "link_inside":
        path.rename(path.parent / "real-config.json")
        path.symlink_to("real-config.json")
        return SAME
    if how == "link_outside":
        path.rename(path.parent.parent / "config.json")
        path.symlink_to(path.parent.parent / "config.json")
    elif how == "link_loop":
        path.unlink()
        path.symlink_to("config.json")
    else:
        path.unlink()
        if how == "folder":
            path.mkdir()
    return ANY


def config_text(spec: dict[str, Any], text: str, raw: dict[str, Any]) -> str:
    kind = spec["text"]
    keys = sorted(raw)
    key = keys[spec["key"] % len(keys)]
    if kind == "truncate":
        return text[: int(spec["at"] * (len(text) - 1))]
    if kind == "nest":
        depth = int(spec["at"] * 200_000)
        return "[" * depth + text + "]" * depth
    if kind == "bom":
        return "\ufeff" + text
    if kind == "duplicate":
        return text.rstrip().removesuffix("}") + f',\n  "{key}": {json.dumps(raw[key])}\n}}'
    if kind == "huge_int":
        digits = 1 + int(spec["at"] * 6000)
        return text.rstrip().removesuffix("}") + f',\n  "{key}": {"9" * digits}\n}}' if key != "model_type" else text
    if kind == "nan_literal":
        literal = ["NaN", "Infinity", "-Infinity"][int(spec["at"] * 2.99)]
        raw[key] = None
        return json.dumps(raw).replace(f'"{key}": null', f'"{key}": {literal}')
    if kind == "top_level":
        return json.dumps(spec["value"])
    if kind == "bytes":
        return text[: int(spec["at"] * len(text))] + "\udcff" + text[int(spec["at"] * len(text)) :]
    if kind == "empty":
        return ""
    if kind == "deep_key":
        value: Any = raw[key]
        for _ in range(1 + int(spec["at"] * 5000)):
            value = {"x": value}
        raw[key] = value
        return json.dumps(raw) if int(spec["at"] * 5000) < 900 else _deep_json(raw, key, int(spec["at"] * 5000))
    raw[key] = "x" * int(spec["at"] * 5_000_000)
    return json.dumps(raw)


def _deep_json(raw: dict[str, Any], key: str, depth: int) -> str:
    """``raw`` with ``raw[key]`` nested ``depth`` objects deep, written without recursion."""
    inner = dict(raw)
    inner[key] = None
    return json.dumps(inner).replace(f'"{key}": null', f'"{key}": ' + '{"x": ' * depth + "1" + "}" * depth)


def test_fuzz_config_json(worker: Worker, bases: dict[str, Path], cases_root: Path) -> None:
    campaign = Campaign("config", worker, bases, cases_root)

    @fuzz_settings("config")
    @given(spec=config_cases())
    def fuzz_config(spec: dict[str, Any]) -> None:
        campaign.run(spec["arch"], spec, mutate_config(spec), **spec.get("kwargs", {}))

    fuzz_config()
    campaign.finish()


# --- target 3: index files -------------------------------------------------------------------------

index_op = st.one_of(
    st.fixed_dictionaries({"op": st.just("value"), "i": st.integers(0, 99), "value": st.one_of(
        st.sampled_from(["<other>", "<missing>", "../<same>", "/<same>", "./<same>", "<same>/", "sub/<same>",
                         "<same>\x00", "<same>\\x", "<same>" + "a" * 300, "<config>", ".", "", "<index>"]),
        json_values)}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("delete_key"), "i": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("add_key"), "name": st.one_of(texts, st.just("model.norm.weight")),
                           "value": st.sampled_from(["<same>", "<other>", "<missing>"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("rename_key"), "i": st.integers(0, 99), "to": texts}),
    st.fixed_dictionaries({"op": st.just("metadata"), "value": json_values}),
    st.fixed_dictionaries({"op": st.just("metadata_total"), "value": ints}),
    st.fixed_dictionaries({"op": st.just("top_level_extra"), "key": texts, "value": json_values}),
    st.fixed_dictionaries({"op": st.just("weight_map"), "value": json_values}),
    st.fixed_dictionaries({"op": st.just("top_level"), "value": json_values}),
    st.fixed_dictionaries({"op": st.just("remove_shard"), "k": st.integers(0, 9)}),
    st.fixed_dictionaries({"op": st.just("stray_shard"), "k": st.integers(0, 9), "name": st.sampled_from(
        ["model-00004-of-00003.safetensors", "pytorch_model-00004-of-00003.bin", "model.safetensors",
         "pytorch_model.bin"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("duplicate_tensor"), "i": st.integers(0, 99), "k": st.integers(0, 9)}),
    st.fixed_dictionaries({"op": st.just("truncate"), "at": st.floats(0, 1)}),
    st.fixed_dictionaries({"op": st.just("shuffle"), "seed": st.integers(0, 1000)}),
    st.fixed_dictionaries({"op": st.just("duplicate_json_key"), "i": st.integers(0, 99),
                           "value": st.sampled_from(["<same>", "<other>", "<missing>"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("nest"), "depth": st.integers(1, 100_000)}),
    st.fixed_dictionaries({"op": st.just("symlink"), "k": st.integers(0, 9), "to": st.sampled_from(
        ["inside", "outside", "loop", "dangling", "folder", "index", "self_folder"])}),  # fmt: skip
)
index_specs = st.fixed_dictionaries({"fmt": st.sampled_from(["safetensors", "bin"]),
                                     "ops": st.lists(index_op, min_size=1, max_size=2)})  # fmt: skip

BENIGN_INDEX_OPS = {"metadata_total", "top_level_extra", "shuffle", "stray_shard", "symlink"}  # judged in place


def mutate_index(spec: dict[str, Any]) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        fmt = spec["fmt"]
        index_path = folder / (ST_INDEX if fmt == "safetensors" else BIN_INDEX)
        data = json.loads(index_path.read_text())
        weight_map: dict[str, Any] = data["weight_map"]
        original = dict(weight_map)
        names = sorted(weight_map)
        shards = sorted(set(weight_map.values()))
        text: str | None = None
        expect = SAME
        for op in spec["ops"]:
            kind = op["op"]
            name = names[op.get("i", 0) % len(names)]
            if kind not in BENIGN_INDEX_OPS and not (kind == "metadata" and isinstance(op["value"], dict)):
                expect = ANY
            if kind == "value" and isinstance(weight_map, dict):
                weight_map[name] = _shard_value(op["value"], weight_map.get(name), shards, index_path.name)
            elif kind == "delete_key" and isinstance(weight_map, dict):
                weight_map.pop(name, None)
            elif kind == "add_key" and isinstance(weight_map, dict):
                weight_map[op["name"]] = _shard_value(op["value"], shards[0], shards, index_path.name)
            elif kind == "rename_key" and isinstance(weight_map, dict) and name in weight_map:
                weight_map[op["to"]] = weight_map.pop(name)
            elif kind == "metadata" and isinstance(data, dict):
                data["metadata"] = op["value"]
            elif kind == "metadata_total" and isinstance(data, dict):
                data["metadata"] = {"total_size": op["value"]}
            elif kind == "top_level_extra":
                if op["key"] not in ("weight_map", "metadata") and isinstance(data, dict):
                    data[op["key"]] = op["value"]
            elif kind == "weight_map" and isinstance(data, dict):
                data["weight_map"] = weight_map = op["value"]
            elif kind == "top_level":
                data = op["value"]
            elif kind == "remove_shard":
                _drop(folder / shards[op["k"] % len(shards)])
            elif kind == "stray_shard":
                source = folder / shards[op["k"] % len(shards)]
                if not source.is_file() or (folder / op["name"]).exists():
                    continue
                shutil.copyfile(source, folder / op["name"])
                if op["name"] in (ST, BIN) or (fmt == "bin") == op["name"].endswith(".safetensors"):
                    expect = ANY if expect != SAME else SAME_OR_ERROR  # another format's file: preference rules
            elif kind == "duplicate_tensor":
                listed = original.get(name)  # the shard that holds it, whatever the index says by now
                others = [s for s in shards if s != listed and _plain(folder / s)]
                if isinstance(listed, str) and others and _plain(folder / listed):
                    target = folder / others[op["k"] % len(others)]
                    _add_tensor(target, name, _read_tensor(folder / listed, name, fmt), fmt)
            elif kind == "truncate":
                text = json.dumps(data, indent=2)
                text = text[: int(op["at"] * (len(text) - 1))]
            elif kind == "shuffle" and isinstance(weight_map, dict):
                import random

                items = list(weight_map.items())
                random.Random(op["seed"]).shuffle(items)
                weight_map.clear()
                weight_map.update(items)
            elif kind == "duplicate_json_key" and isinstance(data, dict):
                value = _shard_value(op["value"], weight_map.get(name) if isinstance(weight_map, dict) else "",
                                     shards, index_path.name)  # fmt: skip
                body = json.dumps(data, indent=2)
                text = body.replace('"weight_map": {', '"weight_map": {' + json.dumps(name) + ": " +
                                    json.dumps(value) + ", ", 1)  # fmt: skip
            elif kind == "symlink":
                shard = folder / shards[op["k"] % len(shards)]
                if shard.is_file() and not shard.is_symlink():
                    expect = _symlink(shard, op["to"], index_path) if expect == SAME else ANY
            elif kind == "nest":
                text = "[" * op["depth"] + json.dumps(data) + "]" * op["depth"]
            if text is not None:
                break
        index_path.write_text(text if text is not None else json.dumps(data, indent=2), encoding="utf-8",
                              errors="surrogatepass")  # fmt: skip
        return expect

    return apply


def _plain(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _drop(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _symlink(file: Path, to: str, index_path: Path) -> str:
    """Replace ``file`` by a symbolic link (the symlink policy's cases); returns the expectation."""
    moved = file.parent / f"real-{file.name}"
    if to == "inside":
        file.rename(moved)
        file.symlink_to(moved.name)
        return SAME
    if to == "outside":
        file.rename(file.parent.parent / file.name)
        file.symlink_to(file.parent.parent / file.name)
    elif to == "loop":
        file.unlink()
        file.symlink_to(file.name)
    elif to == "dangling":
        file.unlink()
        file.symlink_to("nowhere")
    elif to == "folder":
        file.unlink()
        file.mkdir()
    elif to == "index":
        file.unlink()
        file.symlink_to(index_path.name)
    else:
        file.unlink()
        file.symlink_to(".")
    return ANY


def _shard_value(value: Any, same: Any, shards: list[str], index_name: str) -> Any:
    if not isinstance(value, str) or "<" not in value:
        return value
    same = same if isinstance(same, str) else shards[0]
    other = next(s for s in shards if s != same) if same in shards else shards[0]
    return (value.replace("<same>", same).replace("<other>", other).replace("<missing>", "model-99999.safetensors")
            .replace("<config>", "config.json").replace("<index>", index_name))  # fmt: skip


def _read_tensor(path: Path, name: str, fmt: str) -> torch.Tensor:
    state = load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)
    return state[name]


def _add_tensor(path: Path, name: str, tensor: torch.Tensor, fmt: str) -> None:
    if fmt == "safetensors":
        state = load_file(str(path))
        state[name] = tensor.clone()
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        state = torch.load(path, weights_only=True)
        state[name] = tensor.clone()
        torch.save(state, path)


def test_fuzz_index_files(worker: Worker, bases: dict[str, Path], cases_root: Path) -> None:
    campaign = Campaign("index", worker, bases, cases_root)

    @fuzz_settings("index")
    @given(spec=index_specs)
    def fuzz_index(spec: dict[str, Any]) -> None:
        base = "llama_sharded" if spec["fmt"] == "safetensors" else "llama_bin_sharded"
        campaign.run(base, spec, mutate_index(spec))

    fuzz_index()
    campaign.finish()


# --- target 4: .bin files --------------------------------------------------------------------------

BIN_DTYPES = ["float64", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool", "complex64",
              "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "complex128"]  # fmt: skip


class _Reduces:
    """Pickles to a call of ``fn(*args)``: unpickling would call it (``weights_only`` must refuse)."""

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


bin_specs = st.one_of(
    st.fixed_dictionaries({"op": st.just("dtype"), "i": st.integers(0, 99), "dtype": st.sampled_from(BIN_DTYPES)}),
    st.fixed_dictionaries({"op": st.just("layout"), "i": st.integers(0, 99), "layout": st.sampled_from(
        ["sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "qint8", "quint8", "qint32", "per_channel", "meta",
         "nested"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("same_values"), "i": st.integers(0, 99), "how": st.sampled_from(
        ["noncontiguous", "storage_offset", "parameter", "requires_grad", "shared_storage", "expanded_clone"])}),
    st.fixed_dictionaries({"op": st.just("shape"), "i": st.integers(0, 99), "how": st.sampled_from(
        ["flatten", "transpose", "unsqueeze", "slice", "scalar", "empty", "expand"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("container"), "how": st.sampled_from(
        ["nested", "list", "tuple", "ordered", "tensor", "none", "int", "str", "int_key", "tuple_key", "set",
         "state_dict_key"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("value"), "i": st.integers(0, 99), "value": st.one_of(
        scalars, st.sampled_from(["<size>", "<dtype>", "<device>", "<dict>", "<list>", "<reduce>", "<bytes>",
                                  "<storage>"]))}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("extra"), "name": texts, "value": st.sampled_from(
        ["tensor", "int_tensor", "scalar", "none", "string"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("delete"), "i": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("format"), "how": st.sampled_from(
        ["legacy", "protocol2", "protocol4", "protocol5", "legacy_protocol2"])}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("truncate"), "at": st.floats(0, 1), "legacy": st.booleans()}),
    st.fixed_dictionaries({"op": st.just("flip"), "at": st.floats(0, 1), "byte": st.integers(0, 255),
                           "legacy": st.booleans()}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("zip"), "how": st.sampled_from(
        ["extra_entry", "drop_data", "drop_pkl", "rename_prefix", "dup_entry", "empty_zip", "drop_byteorder",
         "byteorder_big", "data_grow", "data_shrink", "drop_version", "version_99"]), "k": st.integers(0, 99)}),
    st.fixed_dictionaries({"op": st.just("raw"), "data": st.one_of(st.binary(max_size=64), st.sampled_from(
        [b"PK\x03\x04", b"\x80\x02}q\x00.", b"\x80\x04\x95", b"\x80\x02]q\x00.", b"\x80\x05N."]))}),  # fmt: skip
    st.fixed_dictionaries({"op": st.just("malicious"), "how": st.sampled_from(
        ["open", "eval", "getattr", "system", "import"])}),  # fmt: skip
)


def _bin_state(bases: dict[str, Path]) -> dict[str, torch.Tensor]:
    return load_file(str(bases["llama"] / ST))


def mutate_bin(spec: dict[str, Any], base_state: dict[str, torch.Tensor]) -> Callable[[Path], str]:
    def apply(folder: Path) -> str:
        path = folder / BIN
        state: Any = {k: v.clone() for k, v in base_state.items()}
        names = list(state)
        name = names[spec.get("i", 0) % len(names)]
        op = spec["op"]
        save_kwargs: dict[str, Any] = {}
        expect = ANY
        if op == "dtype":
            state[name] = state[name].to(getattr(torch, spec["dtype"]))
            expect = SAME if spec["dtype"] == "float64" else ANY
        elif op == "layout":
            state[name] = _layout(state[name], spec["layout"])
        elif op == "same_values":
            state[name] = _same_values(state[name], spec["how"])
            expect = SAME
        elif op == "shape":
            state[name] = _reshape(state[name], spec["how"])
        elif op == "container":
            state = _container(state, spec["how"])
            expect = SAME if spec["how"] == "ordered" else ANY
        elif op == "value":
            state[name] = _value(spec["value"], folder)
        elif op == "extra":
            value = {"tensor": torch.ones(3), "int_tensor": torch.arange(3), "scalar": torch.tensor(1.5),
                     "none": None, "string": "x"}[spec["value"]]  # fmt: skip
            if spec["name"] not in state:
                state[spec["name"]] = value
        elif op == "delete":
            del state[name]
        elif op == "format":
            how = spec["how"]
            if how.startswith("legacy"):
                save_kwargs["_use_new_zipfile_serialization"] = False
            if "protocol" in how:
                save_kwargs["pickle_protocol"] = int(how[-1])
            # torch's weights_only unpickler reads only what torch.save writes by default (protocol 2)
            expect = SAME if how in ("legacy", "protocol2", "legacy_protocol2") else SAME_OR_ERROR
        elif op in ("truncate", "flip"):
            if spec["legacy"]:
                save_kwargs["_use_new_zipfile_serialization"] = False
        elif op == "malicious":
            state[name] = _malicious(spec["how"], folder)
        if op != "raw":
            torch.save(state, path, **save_kwargs)
        if op == "truncate":
            blob = path.read_bytes()
            path.write_bytes(blob[: int(spec["at"] * (len(blob) - 1))])
        elif op == "flip":
            blob = bytearray(path.read_bytes())
            blob[int(spec["at"] * (len(blob) - 1))] = spec["byte"]
            path.write_bytes(bytes(blob))
            expect = ANY + "+raw"
        elif op == "zip":
            expect = _zip_edit(path, spec["how"], spec["k"])
        elif op == "raw":
            path.write_bytes(spec["data"])
        return expect

    return apply


def _layout(t: torch.Tensor, layout: str) -> Any:
    if layout == "sparse_coo":
        return t.to_sparse()
    if t.dim() < 2 and layout in ("sparse_csr", "sparse_csc", "sparse_bsr", "per_channel"):
        return t.to_sparse()
    if layout == "sparse_csr":
        return t.to_sparse_csr()
    if layout == "sparse_csc":
        return t.to_sparse_csc()
    if layout == "sparse_bsr":
        return t.to_sparse_bsr((1, 1))
    if layout in ("qint8", "quint8", "qint32"):
        return torch.quantize_per_tensor(t, 0.01, 0 if layout != "quint8" else 128, getattr(torch, layout))
    if layout == "per_channel":
        return torch.quantize_per_channel(t, torch.full((t.shape[0],), 0.01), torch.zeros(t.shape[0], dtype=torch.long),
                                          0, torch.qint8)  # fmt: skip
    if layout == "meta":
        return t.to("meta")
    return torch.nested.nested_tensor([t.flatten()[:3], t.flatten()[3:8]])


def _same_values(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "noncontiguous" and t.dim() >= 2:
        return t.t().contiguous().t()
    if how in ("storage_offset", "shared_storage"):
        big = torch.cat([torch.full((7,), 3.0), t.flatten(), torch.full((5,), -2.0)])
        return big[7 : 7 + t.numel()].view(t.shape)
    if how == "parameter":
        return torch.nn.Parameter(t)
    if how == "requires_grad":
        return t.clone().requires_grad_(True)
    if how == "expanded_clone":
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _reshape(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "flatten":
        return t.flatten()
    if how == "transpose":
        return t.t().contiguous() if t.dim() == 2 else t.unsqueeze(0)
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "slice":
        return t[: max(1, t.shape[0] - 1)].clone()
    if how == "scalar":
        return t.flatten()[0].clone()
    if how == "empty":
        return torch.empty(0)
    return t.flatten()[:1].expand(t.shape)  # stride-0 view with the right shape and one value


def _container(state: dict[str, torch.Tensor], how: str) -> Any:
    first = next(iter(state))
    if how == "nested":
        return {"model": state}
    if how == "state_dict_key":
        return {"state_dict": state, "epoch": 3}
    if how == "list":
        return list(state.values())
    if how == "tuple":
        return tuple(state.items())
    if how == "ordered":
        return collections.OrderedDict(state)
    if how == "tensor":
        return state[first]
    if how == "none":
        return None
    if how == "int":
        return 7
    if how == "str":
        return "weights"
    if how == "int_key":
        return {**state, 3: torch.ones(1)}
    if how == "tuple_key":
        return {**state, ("a", 1): torch.ones(1)}
    return {**state, "a_set": {1, 2}}


def _value(value: Any, folder: Path) -> Any:
    special = {"<size>": torch.Size([2, 3]), "<dtype>": torch.float32, "<device>": torch.device("cpu"),
               "<dict>": {"a": torch.ones(2)}, "<list>": [torch.ones(2)], "<bytes>": b"\x00\x01",
               "<storage>": torch.ones(3).untyped_storage()}  # fmt: skip
    if value == "<reduce>":
        return _malicious("open", folder)
    return special.get(value, value) if isinstance(value, str) else value


def _malicious(how: str, folder: Path) -> Any:
    marker = str(folder / "PWNED")
    if how == "open":
        return _Reduces(open, (marker, "w"))
    if how == "eval":
        return _Reduces(eval, (f"open({marker!r}, 'w')",))
    if how == "getattr":
        return _Reduces(getattr, ("text", "upper"))
    if how == "system":
        return _Reduces(os.system, (f"touch {marker}",))
    return _Reduces(__import__, ("antigravity",))


def _zip_edit(path: Path, how: str, k: int) -> str:
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    prefix = entries[0][0].filename.split("/")[0]
    data_entries = [i for i, (info, _) in enumerate(entries) if "/data/" in info.filename]
    out: list[tuple[str, bytes]] = [(info.filename, blob) for info, blob in entries]
    expect = ANY
    if how == "extra_entry":
        out.append((f"{prefix}/extra.bin", b"\x00" * 16))
        expect = SAME_OR_ERROR
    elif how == "drop_data" and data_entries:
        del out[data_entries[k % len(data_entries)]]
    elif how == "drop_pkl":
        out = [(n, b) for n, b in out if not n.endswith("data.pkl")]
    elif how == "rename_prefix":
        out = [("other/" + n.split("/", 1)[1], b) for n, b in out]
        expect = SAME_OR_ERROR
    elif how == "dup_entry":
        out.append(out[k % len(out)])
        expect = SAME_OR_ERROR
    elif how == "empty_zip":
        out = []
    elif how == "drop_byteorder":
        out = [(n, b) for n, b in out if not n.endswith("byteorder")]
        expect = SAME_OR_ERROR
    elif how == "byteorder_big":
        out = [(n, b"big" if n.endswith("byteorder") else b) for n, b in out]
        expect = ANY + "+raw"
    elif how in ("data_grow", "data_shrink") and data_entries:
        i = data_entries[k % len(data_entries)]
        n, b = out[i]
        out[i] = (n, b + b"\x00" * 8 if how == "data_grow" else b[: len(b) // 2])
    elif how == "drop_version":
        out = [(n, b) for n, b in out if not n.endswith("/version")]
        expect = SAME_OR_ERROR
    elif how == "version_99":
        out = [(n, b"99\n" if n.endswith("/version") else b) for n, b in out]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, blob in out:
            z.writestr(name, blob)
    path.write_bytes(buffer.getvalue())
    return expect


def test_fuzz_bin_files(worker: Worker, bases: dict[str, Path], cases_root: Path) -> None:
    campaign = Campaign("bin", worker, bases, cases_root)
    base_state = _bin_state(bases)

    @fuzz_settings("bin")
    @given(spec=bin_specs)
    def fuzz_bin(spec: dict[str, Any]) -> None:
        campaign.run("llama_bin", spec, mutate_bin(spec, base_state))

    fuzz_bin()
    campaign.finish()


# --- every failure the fuzzers found, kept as fixed cases ----------------------------------------------

#: (target, spec, what the load must give now: an error class name, "loaded" (finite logits), or
#: "transformers" for a load whose logits equal transformers' on the same folder).
REGRESSIONS: list[tuple[str, dict[str, Any], str]] = [
    # torch.load returned a nested tensor (layout reads strided): RuntimeError listing its shape
    ("bin", {"op": "layout", "i": 4, "layout": "nested"}, "UnsupportedTensorError"),
    # a zip record shorter than its storage: torch.load(mmap=True) read the bytes after it, a wrong model
    ("bin", {"op": "zip", "how": "data_shrink", "k": 0}, "CorruptWeightsError"),
    ("bin", {"op": "zip", "how": "data_shrink", "k": 5}, "CorruptWeightsError"),
    # tie_word_embeddings: true over a checkpoint storing a different lm_head: the stored head was dropped
    ("config", {"arch": "llama", "ops": [{"op": "set", "key": "tie_word_embeddings", "value": True}]}, "transformers"),
    ("config", {"arch": "mistral", "ops": [{"op": "set", "key": "tie_word_embeddings", "value": True}]},
     "transformers"),  # fmt: skip
    # an integer past 64 bits for a float field: accepted by the check, then an OverflowError in the forward pass
    ("config", {"arch": "llama", "ops": [{"op": "set", "key": "rms_norm_eps", "value": 2**64}]}, "loaded"),
    ("config", {"arch": "gpt2", "ops": [{"op": "set", "key": "layer_norm_epsilon", "value": 2**64}]}, "loaded"),
    ("config", {"arch": "llama", "ops": [{"op": "rope_sub", "sub": "rope_theta", "value": 2**64,
                                          "rope_type": "default"}]}, "loaded"),  # fmt: skip
    ("config", {"arch": "mistral", "ops": [{"op": "rope_sub", "sub": "factor", "value": 2**64, "rope_type": "linear"}]},
     "loaded"),  # fmt: skip
    # GPT-2's n_head and transformers' alias num_attention_heads, disagreeing: each library took another
    ("config", {"arch": "gpt2", "ops": [{"op": "set", "key": "num_attention_heads", "value": 32}]}, "ConfigError"),
    ("config", {"arch": "gpt2", "ops": [{"op": "set", "key": "num_attention_heads", "value": 4}]}, "transformers"),
    # a learned position table shorter than the prompt is the prompt's fault, not the load's (the harness's own bug)
    ("config", {"arch": "gpt2", "ops": [{"op": "set", "key": "n_positions", "value": 1}],
                "kwargs": {"ignore_mismatched_sizes": True}}, "loaded"),  # fmt: skip
    # a token id past int64: accepted (outside the vocabulary, with a warning), then generate failed
    ("config", {"arch": "llama", "ops": [{"op": "set", "key": "eos_token_id", "value": 2**64}]}, "ConfigError"),
]


def _mutator(target: str, spec: dict[str, Any], bases: dict[str, Path]) -> tuple[str, Callable[[Path], str]]:
    if target == "bin":
        return "llama_bin", mutate_bin(spec, _bin_state(bases))
    if target == "config":
        return spec["arch"], mutate_config(spec)
    if target == "index":
        return ("llama_sharded" if spec["fmt"] == "safetensors" else "llama_bin_sharded"), mutate_index(spec)
    return "llama", mutate_safetensors(spec)


@pytest.mark.parametrize(("target", "spec", "must"), REGRESSIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_fuzz_findings_stay_fixed(
    worker: Worker, bases: dict[str, Path], cases_root: Path, target: str, spec: dict[str, Any], must: str
) -> None:
    campaign = Campaign(f"regression-{target}", worker, bases, cases_root)
    base, mutate = _mutator(target, spec, bases)
    verdict = campaign.run(base, spec, mutate, **spec.get("kwargs", {}))
    assert not campaign.failures, campaign.report()
    if must == "loaded":
        assert verdict["outcome"] == "loaded" and verdict["finite"], verdict
    elif must == "transformers":
        assert verdict["outcome"] == "loaded" and verdict["oracle"]["status"] == "ok", verdict
        assert verdict["oracle"]["max_diff"] <= ORACLE_ATOL, verdict
    else:
        assert verdict["outcome"] == "typed" and verdict["error"] == must, verdict


# --- the harness itself catches what it claims to catch ---------------------------------------------


def test_worker_reports_hang_crash_memory_and_writes(tmp_path: Path, bases: dict[str, Path]) -> None:
    """The harness must be able to fail: a hang, a crash, a blow-up past the cap and a write are each reported."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    worker = Worker([bases["llama"]], cap_mb=256, timeout_s=30.0, oracle=False)
    worker.start()
    try:
        folder = tmp_path / "ckpt"
        shutil.copytree(bases["llama"], folder)
        ok = worker.run({"id": 1, "folder": str(folder), "reference": str(bases["llama"])})
        assert ok["outcome"] == "loaded" and ok["same"] and ok["finite"] and not ok["wrote"], ok
        sabotage = {
            "hang": "import time; time.sleep(60)",
            "crash": "import os; os._exit(3)",
            "memory": "import torch; torch.empty(2**31, dtype=torch.float32).fill_(1)",
            "write": f"open({str(folder / 'x')!r}, 'w').close()",
        }
        for kind, code in sabotage.items():
            request = {"id": 2, "folder": str(folder), "watch": str(folder), "kwargs": {}, "sabotage": code}
            verdict = worker.run(request, timeout_s=3.0 if kind == "hang" else None)
            signature = judge(verdict, ANY)
            assert signature is not None, (kind, verdict)
            if kind == "memory":
                assert signature.startswith("memory cap"), signature
            elif kind == "write":
                assert signature == "the load wrote into the checkpoint folder", signature
            else:
                assert signature.startswith(kind), signature
            if kind == "hang":  # with every thread's stack, from faulthandler
                assert "most recent call first" in verdict["stderr"], verdict
            (folder / "x").unlink(missing_ok=True)
    finally:
        worker.stop()
