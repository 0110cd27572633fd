"""examples/accelerate_loop.py: an accelerate loop (prepare, accumulate, backward, unwrap + save) on lmport's model.

The example runs as a user runs it (a subprocess, offline) on checkpoints transformers saved,
once on lmport's model and once, with ``--library transformers``, on transformers' own: the
micro-batch losses (gradient accumulation 2, so later ones follow optimizer steps) must
agree, and the folder lmport's run saves must load in transformers and in lmport to the
logits of the folder transformers' run saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_hf, tiny_configs
from helpers import MOVED, assert_logits_close, load_clean, load_lmport, make_tokenizer, max_change

import lmport

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"
LOSS_RTOL = 1e-5  # fp32, relative (issue 8)
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "OMP_NUM_THREADS": "1",  # tiny matmuls: more threads only contend with the other runs
}
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = ("llama", "gpt2")  # gpt2: the save runs the weight map backwards (split q/k/v → c_attn, transposes)


def run_example(checkpoint: Path, out: Path, library: str) -> subprocess.Popen[str]:
    args = [sys.executable, str(EXAMPLE), str(checkpoint), "--output-dir", str(out), "--library", library,
            "--learning-rate", "1e-3", "--batch-size", "2", "--gradient-accumulation-steps", "2"]  # fmt: skip
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> list[float]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"example failed:\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])["losses"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per architecture: the checkpoint, and each library's run of the example (losses, output folder)."""
    root = tmp_path_factory.mktemp("accelerate")
    configs = tiny_configs(**TOKENS)
    procs = {}
    for arch in ARCHS:
        checkpoint = save_hf(root / arch, configs[arch]())
        make_tokenizer(checkpoint)
        for library in ("lmport", "transformers"):  # all four runs at once: most of their time is imports
            out = root / f"{arch}-{library}"
            procs[arch, library] = (run_example(checkpoint, out, library), out)
    result: dict[str, dict[str, Any]] = {}
    for (arch, library), (proc, out) in procs.items():
        result.setdefault(arch, {"checkpoint": root / arch})[library] = {"losses": finish(proc), "out": out}
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_equal_transformers_loop(runs: dict[str, dict[str, Any]], arch: str) -> None:
    ours, ref = runs[arch]["lmport"]["losses"], runs[arch]["transformers"]["losses"]
    assert len(ours) == len(ref) == 4  # 8 texts, batches of 2: 4 micro-batches, 2 optimizer steps
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=LOSS_RTOL, atol=0)
    assert json.loads((runs[arch]["lmport"]["out"] / "train_losses.json").read_text()) == ours


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_loads_in_transformers_with_same_logits(runs: dict[str, dict[str, Any]], arch: str) -> None:
    import transformers

    out_ours, out_ref = runs[arch]["lmport"]["out"], runs[arch]["transformers"]["out"]
    assert (out_ours / "config.json").is_file() and (out_ours / "tokenizer.json").is_file()
    ids = make_tokenizer()(["Knowledge is power, said the fox."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs_of_ours = load_clean(transformers.AutoModelForCausalLM, out_ours, dtype=torch.float32)(ids).logits
        ours_of_ours = load_lmport(out_ours)(ids).logits
        theirs_of_theirs = transformers.AutoModelForCausalLM.from_pretrained(out_ref, dtype=torch.float32)(ids).logits
        before = lmport.AutoModelForCausalLM.from_pretrained(runs[arch]["checkpoint"])(ids).logits
    assert_logits_close(theirs_of_ours, ours_of_ours)  # one folder, both libraries
    assert_logits_close(theirs_of_ours, theirs_of_theirs)  # lmport's loop trained what transformers' trained
    assert max_change(theirs_of_ours, before) > MOVED, "the saved model is the checkpoint: nothing was trained"
