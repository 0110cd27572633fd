"""The distributions as pip installs them: wheels of ``lmport`` and ``lmport-llama`` in a fresh venv.

The wheels are built from a copy of the source tree (so the build leaves nothing in
the checkout), installed with ``--no-deps --no-index`` into a new venv, and the
runtime dependencies are made importable there through a ``.pth`` file pointing at
symlinks to this environment's site-packages minus everything lmport-related, so
the editable install cannot leak in. The venv then loads a transformers-saved
Llama checkpoint through the ``lmport.architectures`` entry point.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import lmport
from lmport.registry import reset_registry

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", "build", "dist", ".pytest_cache", ".bench", ".whl", ".gl", "*.egg-info", "*.pyc"
)
# Names in site-packages that belong to the editable lmport install.
LMPORT_NAMES = ("lmport*", "_lmport*", "__editable__*lmport*", "*lmport_llama*")
INPUT_IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [7, 7, 64, 12, 0, 127, 45, 8]])


def _run(args: list[str | os.PathLike[str]], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs  # type: ignore[call-overload]
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"lmport": wheel, "lmport-llama": wheel, "lmport-mistral": wheel}`` built from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE, symlinks=True)
    out = tmp / "wheels"
    for project in (src, src / "plugins_llama", src / "plugins_mistral"):
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out,
             project],
            timeout=120,
            cwd=tmp,
        )  # fmt: skip
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"lmport", "lmport_llama", "lmport_mistral"}, sorted(p.name for p in out.iterdir())
    return {
        "lmport": found["lmport"],
        "lmport-llama": found["lmport_llama"],
        "lmport-mistral": found["lmport_mistral"],
        "src": src,
    }


@pytest.fixture(scope="module")
def venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with both wheels installed and the runtime dependencies visible, lmport itself not."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], timeout=120)
    python = root / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
         wheels["lmport"], wheels["lmport-llama"]],
        timeout=120,
    )  # fmt: skip

    deps = tmp / "deps"
    deps.mkdir()
    outer = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for site_dir in sorted(outer):
        for entry in sorted(site_dir.iterdir()):
            name = entry.name
            if any(fnmatch.fnmatch(name.lower(), pat) for pat in LMPORT_NAMES) or name.endswith(".pth"):
                continue
            if not (deps / name).exists():
                (deps / name).symlink_to(entry)
    inner = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60).stdout.strip())
    assert inner.is_relative_to(root)
    (inner / "zz_outer_dependencies.pth").write_text(f"{deps}\n")
    return root


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _dist_file(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        [path] = [n for n in zf.namelist() if n.endswith(f".dist-info/{name}")]
        return zf.read(path).decode()


def _entry_points(wheel: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(_dist_file(wheel, "entry_points.txt"))
    return parser


def _requirements(wheel: Path) -> dict[str, Requirement]:
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in _dist_file(wheel, "METADATA").splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip
    return {r.name.lower().replace("_", "-"): r for r in reqs if r.marker is None}


def test_lmport_wheel_contents(wheels: dict[str, Path]) -> None:
    names = _members(wheels["lmport"])
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"lmport", "lmport-0.1.0.dist-info"}, tops  # no tests/, benchmarks/, plugins_llama/ ...
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/") or "__pycache__" in n]

    # Every module of core/ and plugins/ lands under lmport/ and lmport/plugins/.
    src = wheels["src"]
    expected = {"lmport/" + p.relative_to(src / "core").as_posix() for p in (src / "core").rglob("*.py")}
    expected |= {"lmport/plugins/" + p.relative_to(src / "plugins").as_posix() for p in (src / "plugins").rglob("*.py")}
    assert expected <= set(names), sorted(expected - set(names))
    for required in ("lmport/__init__.py", "lmport/registry.py", "lmport/hookspecs.py", "lmport/modeling/base.py",
                     "lmport/plugins/__init__.py", "lmport/plugins/attention.py", "lmport/plugins/safetensors_format.py",
                     "lmport/plugins/torch_bin_format.py", "lmport/plugins/local_source.py", "lmport/py.typed"):  # fmt: skip
        assert required in names
    assert not [n for n in names if n.startswith("lmport_llama")]

    eps = _entry_points(wheels["lmport"])
    assert dict(eps["console_scripts"]) == {"lmport": "lmport.cli:main"}
    assert "lmport.architectures" not in eps  # core knows no architecture
    reqs = _requirements(wheels["lmport"])
    assert {"torch", "pluggy", "safetensors", "importlib-metadata", "huggingface-hub", "numpy"} <= set(reqs)
    assert "transformers" not in reqs  # a test dependency only


def test_lmport_llama_wheel_contents(wheels: dict[str, Path]) -> None:
    names = _members(wheels["lmport-llama"])
    assert {n.split("/", 1)[0] for n in names} == {"lmport_llama", "lmport_llama-0.1.0.dist-info"}
    assert {"lmport_llama/__init__.py", "lmport_llama/config.py", "lmport_llama/model.py"} <= set(names)
    eps = _entry_points(wheels["lmport-llama"])
    assert eps.sections() == ["lmport.architectures"]
    assert dict(eps["lmport.architectures"]) == {"llama": "lmport_llama:plugin"}
    req = _requirements(wheels["lmport-llama"])["lmport"]
    assert req.specifier.contains("0.1.0") and not req.specifier.contains("0.2.0")
    assert "Name: lmport-llama" in _dist_file(wheels["lmport-llama"], "METADATA").splitlines()


def test_lmport_mistral_wheel_depends_on_llama(wheels: dict[str, Path]) -> None:
    """MistralConfig extends lmport_llama's LlamaConfig: the distribution requires lmport-llama."""
    names = _members(wheels["lmport-mistral"])
    assert {n.split("/", 1)[0] for n in names} == {"lmport_mistral", "lmport_mistral-0.1.0.dist-info"}
    assert dict(_entry_points(wheels["lmport-mistral"])["lmport.architectures"]) == {"mistral": "lmport_mistral:plugin"}
    reqs = _requirements(wheels["lmport-mistral"])
    assert set(reqs) == {"lmport", "lmport-llama"}
    for req in reqs.values():
        assert req.specifier.contains("0.1.0") and not req.specifier.contains("0.2.0")


LOAD_SCRIPT = r"""
import json, sys
import importlib_metadata, torch
import lmport, lmport_llama
ckpt, ids_path, out_path = sys.argv[1:]
model = lmport.AutoModelForCausalLM.from_pretrained(ckpt)
with torch.no_grad():
    torch.save(model(torch.load(ids_path)).logits, out_path)
dists = {}
for d in importlib_metadata.distributions():
    name = d.metadata["Name"]
    if "lmport" in name.lower():
        dists.setdefault(name, []).append(str(d.locate_file("")))
print(json.dumps({
    "lmport": lmport.__file__,
    "lmport_llama": lmport_llama.__file__,
    "registry": lmport.registry.__file__,
    "model_class": type(model).__module__ + "." + type(model).__qualname__,
    "provider": lmport.get_registry().provider("llama"),
    "entry_points": [[e.name, e.value, e.distribution] for e in lmport.get_registry().entry_points("lmport.architectures")],
    "dists": dists,
    "torch": torch.__file__,
    "prefix": sys.prefix,
}))
"""


def test_installed_wheels_load_llama_through_the_entry_point(
    venv: Path, hf_llama: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = hf_llama()
    assert Path(lmport.__file__).resolve().is_relative_to(REPO)  # this process uses the editable install
    reset_registry()
    try:
        with torch.no_grad():
            expected = lmport.AutoModelForCausalLM.from_pretrained(ckpt)(INPUT_IDS).logits
    finally:
        reset_registry()
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "logits.pt"
    torch.save(INPUT_IDS, ids_path)

    proc = _run([venv / "bin" / "python", "-c", LOAD_SCRIPT, ckpt, ids_path, out_path], timeout=180, cwd=tmp_path,
                env=_clean_env())  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    root = venv.resolve()
    for key in ("lmport", "lmport_llama", "registry"):
        assert Path(report[key]).resolve().is_relative_to(root), (key, report[key])
        assert not Path(report[key]).resolve().is_relative_to(REPO), (key, report[key])
    assert Path(report["prefix"]).resolve() == root
    assert not Path(report["torch"]).is_relative_to(root)  # dependencies come from outside, through the .pth
    assert report["model_class"] == "lmport_llama.model.LlamaForCausalLM"
    assert report["provider"] == "lmport-llama:llama"
    assert report["entry_points"] == [["llama", "lmport_llama:plugin", "lmport-llama"]]
    assert set(report["dists"]) == {"lmport", "lmport-llama"}
    for locations in report["dists"].values():
        assert len(locations) == 1 and Path(locations[0]).resolve().is_relative_to(root), report["dists"]

    got = torch.load(out_path)
    assert got.shape == (2, 8, 128)
    assert torch.equal(got, expected)


def test_console_script_is_installed(venv: Path, tmp_path: Path) -> None:
    script = venv / "bin" / "lmport"
    assert script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith(f"#!{venv / 'bin' / 'python'}") and "lmport.cli" in text
    proc = _run([script, "plugins", "--json"], timeout=120, cwd=tmp_path, env=_clean_env())
    listing = json.loads(proc.stdout)
    llama = [a for a in listing["architectures"] if a["name"] == "llama"]
    assert [(a["distribution"], a["value"]) for a in llama] == [("lmport-llama", "lmport_llama:plugin")]
