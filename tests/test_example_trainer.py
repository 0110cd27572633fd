"""examples/trainer.py (the README's Trainer example) run as a user runs it, on lmport's and on transformers' model.

Both runs (subprocesses, offline, on one checkpoint transformers saved, with gradient
accumulation 2 and padding) must log the same losses and ``eval_loss``; every checkpoint
lmport's run writes must hold ``config.json`` and load in transformers and lmport to the
logits of transformers' run's checkpoint of the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_hf, tiny_configs
from helpers import assert_logits_close, load_clean, load_lmport, make_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer.py"
LOSS_RTOL = 1e-5  # fp32, relative (issue 8)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "OMP_NUM_THREADS": "1"}  # fmt: skip
IDS = torch.tensor([[1, 40, 41, 42, 4, 50, 60, 70], [1, 9, 8, 7, 6, 5, 4, 3]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_example_matches_transformers(tmp_path: Path, arch: str) -> None:
    import transformers

    checkpoint = save_hf(tmp_path / "ckpt", tiny_configs(bos_token_id=1, eos_token_id=2, pad_token_id=0)[arch]())
    make_tokenizer(checkpoint)
    procs = {
        library: subprocess.Popen(
            [sys.executable, str(EXAMPLE), str(checkpoint), "--output-dir", str(tmp_path / library),
             "--library", library],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for library in ("lmport", "transformers")
    }
    results = {}
    for library, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"examples/trainer.py --library {library} failed:\n{stderr[-3000:]}"
        results[library] = json.loads(stdout.strip().splitlines()[-1])
    ours, ref = results["lmport"], results["transformers"]
    assert len(ours["losses"]) == len(ref["losses"]) == 4
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), rtol=LOSS_RTOL, atol=0)
    assert ours["eval_loss"] == pytest.approx(ref["eval_loss"], rel=LOSS_RTOL)
    assert ours["losses"][-1] < ours["losses"][0]  # it trained

    for sub in ("checkpoint-2", "checkpoint-4", "."):
        folder, theirs = tmp_path / "lmport" / sub, tmp_path / "transformers" / sub
        assert (folder / "config.json").is_file() and (folder / "generation_config.json").is_file()
        expected = load_clean(transformers.AutoModelForCausalLM, theirs).eval()
        with torch.no_grad():
            want = expected(IDS).logits
            assert_logits_close(load_clean(transformers.AutoModelForCausalLM, folder).eval()(IDS).logits, want)
            assert_logits_close(load_lmport(folder)(IDS).logits, want)
