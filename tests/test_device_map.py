"""Device maps through accelerate: planned maps, explicit maps, ``max_memory``, disk offload, errors.

On this CPU-only machine a device map can use two places, ``"cpu"`` and ``"disk"``.
Checked, on tiny Llama, GPT-2 (tied head) and Mistral checkpoints saved by transformers:

- ``device_map`` "auto" / "balanced" / "balanced_low_0" / "sequential" with a small
  ``max_memory`` for "cpu" (ints and "300KB"-style strings): part of the model is
  offloaded to ``offload_folder``; the logits are bit-identical to the whole model in
  memory; transformers, given the very same arguments, plans the same placement for
  every module and gives the same logits (its own offloaded logits equal its in-memory
  ones too); the checkpoint folder is unchanged.
- Explicit dict maps interleaving "cpu" and "disk" layers (and, for GPT-2, the tied
  embedding and head on different sides): ``hf_device_map`` is the given map; every
  parameter under a cpu module is a real cpu tensor and only disk-offloaded ones are on
  meta; the offload folder holds exactly the disk modules' tensors, with the checkpoint's
  values; exact logits.
- The plugin's ``no_split_modules`` reaches accelerate: no decoder layer is ever split
  across devices, while emptying the plugin's list makes the same budget split one.
- A cpu-only device map trains: gradients equal the plain model's exactly.
- Errors: disk offload without ``offload_folder``, an unwritable ``offload_folder``,
  accelerate missing, a dict map that leaves tensors unplaced, a map value that is no device.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from accelerate.utils import load_offloaded_weight
from conftest import save_hf, save_hf_llama_random, tree_digest

import lmport
from lmport import errors

LOGITS_ATOL = 1e-5  # lmport vs transformers, fp32 (DESIGN.md); offloaded vs in-memory is exact
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))
INSIDE_LAYER = re.compile(r"model\.layers\.\d+\.")  # a device-map key below a decoder layer


@dataclass(frozen=True)
class Arch:
    """One architecture's tiny checkpoint and how its modules are named on both sides."""

    save: Callable[[Path], Path]
    #: lmport's top-level modules and layers (the units a device map places).
    modules: tuple[str, ...]
    #: A "cpu" budget (bytes) that keeps some modules in memory and offloads the rest.
    budget: int
    #: Budgets at which accelerate would cut a decoder layer in two if allowed to.
    split_budgets: tuple[int, ...]
    #: lmport module-name prefix -> transformers', where they differ.
    renames: tuple[tuple[str, str], ...] = ()

    def hf_name(self, name: str) -> str:
        for lm, hf in self.renames:
            if name == lm or name.startswith(lm + "."):
                return hf + name[len(lm) :]
        return name


LAYERS = ("model.layers.0", "model.layers.1", "model.layers.2")


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        save=lambda folder: save_hf_llama_random(folder, seed=1, num_hidden_layers=3),
        modules=("model.embed_tokens", *LAYERS, "model.norm", "lm_head"),
        budget=300_000,
        split_budgets=(200_000, 350_000),
    ),
    "gpt2": Arch(
        save=lambda folder: save_hf(
            folder,
            transformers.GPT2Config(
                vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            ),
            seed=2,
        ),
        modules=("model.embed_tokens", "model.embed_positions", *LAYERS, "model.norm", "lm_head"),
        budget=450_000,
        split_budgets=(300_000, 500_000),
        renames=(("model.embed_tokens", "transformer.wte"), ("model.embed_positions", "transformer.wpe"),
                 ("model.layers", "transformer.h"), ("model.norm", "transformer.ln_f")),  # fmt: skip
    ),
    "mistral": Arch(
        save=lambda folder: save_hf(
            folder,
            transformers.MistralConfig(
                vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
            ),  # fmt: skip
            seed=3,
        ),
        modules=("model.embed_tokens", *LAYERS, "model.norm", "lm_head"),
        budget=300_000,
        split_budgets=(200_000, 350_000),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device_map")
    return {name: arch.save(root / name) for name, arch in ARCHS.items()}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, tuple[Any, torch.Tensor, torch.Tensor]]:
    """Per architecture: the whole lmport model in memory, its logits, transformers' in-memory logits."""
    out = {}
    for name, folder in checkpoints.items():
        model = lmport.AutoModelForCausalLM.from_pretrained(folder)
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder)
        out[name] = (model, logits(model), logits(reference))
    return out


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def device_of(device_map: dict[str, Any], name: str) -> str:
    """Where ``device_map`` puts tensor or module ``name`` (the longest matching key wins)."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    assert keys, f"{name} is not placed by {device_map}"
    return str(device_map[max(keys, key=len)])


def check_placement(model: Any, device_map: dict[str, Any]) -> None:
    """Every parameter under a cpu module is a real cpu tensor; only disk-offloaded ones are on meta."""
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        where = device_of(device_map, name) if not name.startswith("model.rotary_emb") else "cpu"
        if where == "disk":
            assert tensor.device.type in ("meta", "cpu"), name  # a tied head may share its cpu source
        else:
            assert tensor.device == torch.device(where), f"{name} is on {tensor.device}, placed on {where}"
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert all(device_of(device_map, n) == "disk" for n in meta), meta


def check_offload_folder(folder: Path, whole: Any, device_map: dict[str, Any]) -> None:
    """The folder holds exactly the disk modules' tensors (tied names included), with the right values."""
    index = json.loads((folder / "index.json").read_text())
    expected = {n for n in whole.state_dict() if device_of(device_map, n) == "disk"}
    assert set(index) == expected
    assert {p.name for p in folder.iterdir()} == {"index.json"} | {f"{n}.dat" for n in expected}
    reference = whole.state_dict()
    for name, info in index.items():
        assert torch.equal(load_offloaded_weight(str(folder / f"{name}.dat"), info), reference[name]), name


# --- planned maps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_planned_map_offloads_to_disk_like_transformers(
    arch: str, strategy: str, checkpoints: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    folder, spec = checkpoints[arch], ARCHS[arch]
    whole, expected, hf_expected = references[arch]
    digest = tree_digest(folder)
    max_memory = {"cpu": spec.budget if strategy != "sequential" else f"{spec.budget // 1000}KB"}

    model = lmport.AutoModelForCausalLM.from_pretrained(
        folder, device_map=strategy, max_memory=max_memory, offload_folder=tmp_path / "lmport"
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=strategy, max_memory=max_memory, offload_folder=tmp_path / "hf"
    )

    plan = dict(model.hf_device_map)
    assert set(plan.values()) == {"cpu", "disk"}, plan  # the budget splits the model between both
    for name in spec.modules:
        assert device_of(plan, name) == device_of(reference.hf_device_map, spec.hf_name(name)), (name, plan)
    check_placement(model, plan)
    check_offload_folder(tmp_path / "lmport", whole, plan)

    got = logits(model)
    assert torch.equal(got, expected)  # offloading changes where weights live, not one bit of the result
    hf_got = logits(reference)
    assert torch.equal(hf_got, hf_expected)
    torch.testing.assert_close(got, hf_got, rtol=0, atol=LOGITS_ATOL)
    assert torch.equal(logits(model), expected)  # a second call still finds every weight
    assert tree_digest(folder) == digest


def test_planned_map_with_room_for_everything_stays_in_memory(
    checkpoints: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    _, expected, _ = references["llama"]
    model = lmport.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], device_map="auto", offload_folder=tmp_path / "offload"
    )
    assert dict(model.hf_device_map) == {"": "cpu"}
    assert not (tmp_path / "offload").exists() or not any((tmp_path / "offload").iterdir())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # nothing to move: no hooks
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(logits(model), expected)


# --- explicit maps ------------------------------------------------------------------------------------

EXPLICIT: dict[str, list[dict[str, str]]] = {
    "llama": [
        {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "disk",
         "model.norm": "cpu", "lm_head": "disk"},
        {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "disk", "lm_head": "cpu"},
    ],
    "mistral": [
        {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.norm": "disk", "lm_head": "disk"},
    ],
    "gpt2": [  # the head is tied to the embedding: every way of splitting the pair
        {"model.embed_tokens": "cpu", "model.embed_positions": "disk", "model.layers.0": "disk",
         "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"},
        {"model.embed_tokens": "disk", "model.embed_positions": "cpu", "model.layers": "cpu", "model.norm": "cpu",
         "lm_head": "cpu"},
        {"model.embed_tokens": "disk", "model.embed_positions": "disk", "model.layers": "disk", "model.norm": "disk",
         "lm_head": "disk"},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "device_map"),
    [pytest.param(arch, dm, id=f"{arch}-{i}") for arch, maps in EXPLICIT.items() for i, dm in enumerate(maps)],
)
def test_explicit_map_between_cpu_and_disk(
    arch: str, device_map: dict[str, str], checkpoints: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    folder = checkpoints[arch]
    whole, expected, hf_expected = references[arch]
    digest = tree_digest(folder)
    model = lmport.AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "o")
    assert dict(model.hf_device_map) == device_map
    check_placement(model, device_map)
    check_offload_folder(tmp_path / "o", whole, device_map)
    assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), expected)
    assert tree_digest(folder) == digest
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied or device_of(device_map, "model.embed_tokens") == device_of(device_map, "lm_head"):
        # transformers (5.x) itself fails on a tied head split from its embedding (its offload
        # index lacks the head, or the head stays on meta); everywhere else it must agree.
        hf_map = {ARCHS[arch].hf_name(k): v for k, v in device_map.items()}
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map=hf_map, offload_folder=tmp_path / "hf"
        )
        hf_got = logits(reference)
        assert torch.equal(hf_got, hf_expected)
        torch.testing.assert_close(logits(model), hf_got, rtol=0, atol=LOGITS_ATOL)


def test_explicit_map_need_not_place_computed_buffers(checkpoints: dict[str, Path], references: dict[str, Any]) -> None:
    """Rotary tables are computed, never loaded: a map naming only loaded modules is complete (as in transformers)."""
    _, expected, _ = references["llama"]
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], device_map=device_map)
    assert torch.equal(logits(model), expected)


# --- layers stay whole ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_no_split_modules_come_from_the_plugin(
    arch: str, checkpoints: dict[str, Path], references: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, spec = checkpoints[arch], ARCHS[arch]
    _, expected, _ = references[arch]
    model_class = type(references[arch][0])
    assert model_class.no_split_modules == ("DecoderLayer",)

    def plan(budget: int) -> dict[str, Any]:
        model = lmport.AutoModelForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / str(budget)
        )
        assert torch.equal(logits(model), expected)
        return dict(model.hf_device_map)

    for budget in spec.split_budgets:
        whole_layers = plan(budget)
        assert not [k for k in whole_layers if INSIDE_LAYER.match(k)], whole_layers
        assert set(whole_layers.values()) == {"cpu", "disk"}

    # The same budgets cut a layer in two once the plugin no longer names its layer class.
    monkeypatch.setattr(model_class, "no_split_modules", ())
    for budget in spec.split_budgets:
        assert [k for k in plan(budget) if INSIDE_LAYER.match(k)]


# --- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", {"model": "cpu", "lm_head": "cpu"}], ids=["auto", "dict"])
def test_training_step_on_a_cpu_device_map(
    device_map: Any, checkpoints: dict[str, Path], references: dict[str, Any]
) -> None:
    whole = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], device_map=device_map)
    grads = []
    for m in (whole, model):
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    before = model.lm_head.weight.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(model.lm_head.weight, before)


# --- errors -----------------------------------------------------------------------------------------


def raises(error: type[Exception], *fragments: str) -> Any:
    """Exactly ``error``, with every fragment in its message."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.mark.parametrize(
    "kwargs",
    [dict(device_map="auto", max_memory={"cpu": 50_000}), dict(device_map={"": "disk"}),
     dict(device_map={"model": "cpu", "lm_head": "disk"})],
    ids=["auto", "all-disk", "dict"],
)  # fmt: skip
def test_disk_offload_without_offload_folder(kwargs: dict[str, Any], checkpoints: dict[str, Path]) -> None:
    with raises(errors.OffloadError, "offload_folder", "disk"):
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], **kwargs)


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_unwritable_offload_folder(where: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    # Tests may run as root, for whom a read-only folder is still writable: a path through
    # a regular file cannot be created by anyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    folder = blocker if where == "file" else blocker / "offload"
    with raises(errors.OffloadError, "offload_folder", str(folder), "cannot be written"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], device_map={"model": "cpu", "lm_head": "disk"}, offload_folder=folder
        )
    assert blocker.read_text() == "a file, not a folder"


def test_accelerate_missing(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "accelerate" else real(name, *a, **k)
    )
    with raises(errors.UnsupportedFeatureError, "accelerate", "pip install"):
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], device_map="auto")
    model = lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], device_map="cpu")  # needs no accelerate
    assert model.lm_head.weight.device.type == "cpu"


@pytest.mark.parametrize(
    ("device_map", "unplaced"),
    [({"model.embed_tokens": "cpu", "model.layers": "cpu"}, "lm_head.weight"),
     ({"model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}, "model.embed_tokens.weight"),
     ({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.2": "cpu", "model.norm": "cpu",
       "lm_head": "cpu"}, "model.layers.1.")],
)  # fmt: skip
def test_dict_map_leaving_tensors_unplaced(
    device_map: dict[str, str], unplaced: str, checkpoints: dict[str, Path]
) -> None:
    with raises(errors.ArgumentError, "device_map does not place", unplaced):
        lmport.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], device_map=device_map)


def test_dict_map_value_that_is_no_device(checkpoints: dict[str, Path]) -> None:
    with raises(errors.ArgumentError, "device_map value", "'toaster'"):
        lmport.AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"], device_map={"model": "cpu", "lm_head": "toaster"}
        )
