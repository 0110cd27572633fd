"""lmport's post-import patches (``lmport.integrations``) with the real peft.

peft's ``target_modules="all-linear"`` leaves out the output head only for a transformers
``PreTrainedModel``. With lmport's patch, ``get_peft_model`` on an lmport model wraps the
same kinds of modules as on transformers' model of the same checkpoint (Llama: q/k/v/o,
gate/up/down; never ``lm_head``; GPT-2: every projection but ``lm_head``), whether peft
was imported before lmport or after (fresh processes, also through VeRA, a tuner that
imports the function by name); ``LMPORT_PEFT_INTEGRATION=0`` and ``LMPORT_INTEGRATIONS=0``
turn the patch off; installing twice changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import transformers
from conftest import save_hf, tiny_configs

import lmport
from lmport import integrations

LLAMA_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
GPT2_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}  # lmport's names (c_attn split)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    configs = tiny_configs(bos_token_id=1, eos_token_id=2)
    return {arch: save_hf(tmp_path_factory.mktemp(arch), configs[arch]()) for arch in ("llama", "gpt2")}


def lora_kinds(model: object) -> set[str]:
    """The last name component of every module ``get_peft_model`` gave a LoRA adapter (all-linear)."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    lora = peft.tuners.lora.LoraLayer
    return {name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if isinstance(module, lora)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_leaves_out_the_head(checkpoints: dict[str, Path], arch: str) -> None:
    ours = lmport.AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch])

    # peft's own function, unpatched, targets lmport's head: what the patch is for
    original = peft.tuners.tuners_utils._maybe_include_all_linear_layers.__wrapped__
    assert "lm_head" in original(peft.LoraConfig(target_modules="all-linear"), ours).target_modules

    theirs = lora_kinds(ref)
    assert "lm_head" not in theirs
    if arch == "llama":
        assert lora_kinds(ours) == theirs == LLAMA_KINDS
    else:  # transformers' GPT-2 has fused Conv1D projections under other names
        assert theirs == {"c_attn", "c_proj", "c_fc"}
        assert lora_kinds(ours) == GPT2_KINDS

    # explicit target lists are untouched
    config = peft.LoraConfig(target_modules=["lm_head", "q_proj"])
    expanded = peft.tuners.tuners_utils._maybe_include_all_linear_layers(config, ours)
    assert expanded.target_modules == {"lm_head", "q_proj"}


def test_install_is_idempotent() -> None:
    function = peft.tuners.tuners_utils._maybe_include_all_linear_layers
    assert getattr(function, "__lmport_wrapped__", False)
    integrations.install()
    integrations.patch_peft(peft.tuners.tuners_utils)
    assert peft.tuners.tuners_utils._maybe_include_all_linear_layers is function
    assert peft.tuners.vera.model._maybe_include_all_linear_layers is function  # imported by name


# In a fresh process: import peft and lmport in the given order, then target "all-linear" with LoRA and
# with VeRA (whose module imported the function by name); print the kinds each wrapped.
SCRIPT = """
import json, sys
first, folder = sys.argv[1], sys.argv[2]
if first == "peft":
    import peft, lmport
else:
    import lmport
    assert "peft" not in sys.modules and "transformers" not in sys.modules  # lmport imports neither
    import peft
def kinds(config):
    model = peft.get_peft_model(lmport.AutoModelForCausalLM.from_pretrained(folder), config)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)})
print(json.dumps([kinds(peft.LoraConfig(r=4, target_modules="all-linear")),
                  kinds(peft.VeraConfig(r=4, target_modules="all-linear"))]))
"""


def run_fresh(first: str, folder: Path, **env: str) -> subprocess.Popen[str]:
    environ = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **env}
    for name in (integrations.ENV, "LMPORT_PEFT_INTEGRATION"):
        environ.setdefault(name, "1")
    args = [sys.executable, "-c", SCRIPT, first, str(folder)]
    return subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_import_orders_and_switches(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["llama"]
    runs = {
        "peft first": run_fresh("peft", folder),
        "lmport first": run_fresh("lmport", folder),
        "peft switch off": run_fresh("lmport", folder, LMPORT_PEFT_INTEGRATION="0"),
        "all switched off": run_fresh("peft", folder, **{integrations.ENV: "0"}),
    }
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {err}"
        results[name] = [set(kinds) for kinds in json.loads(out.strip().splitlines()[-1])]
    assert results["peft first"] == results["lmport first"] == [LLAMA_KINDS, LLAMA_KINDS]
    assert results["peft switch off"] == results["all switched off"] == [LLAMA_KINDS | {"lm_head"}] * 2
