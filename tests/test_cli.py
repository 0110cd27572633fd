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
