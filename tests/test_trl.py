"""TRL's trainers, unchanged, on lmport models; the forward keyword arguments trainers and tokenizers pass.

On tiny fp32 checkpoints saved by transformers, each TRL run is made twice, on lmport's model
and on transformers' model of the same folder, with the same seed and data; the logged
losses must agree within 1e-5 relative (bf16 autocast, TRL's default: within bf16 tolerance):

- ``SFTTrainer`` on a plain-text and on a conversational dataset, with its default gradient
  checkpointing (and TRL's other defaults, bf16 autocast included);
- ``packing=True``: padding-free rows with ``cu_seq_lens_*``/``max_length_*``/``seq_idx``; the
  packed loss equals the documents run alone (GPT-2's learned positions and Mistral's sliding
  window too);
- a peft ``LoraConfig``: the adapter trains, the base weights stay; ``DPOTrainer`` with LoRA;
- examples/sft_lora.py run as a script: its adapter loads onto transformers' model and
  lmport's to the same logits.

Forward keyword arguments: ``token_type_ids`` (GPT-2 embeds them, Llama ignores them, as in
transformers), ``return_dict=False``, ``output_attentions``, ``cache_position``, the varlen
arguments (checked against ``position_ids``) and unknown names, each as transformers reads
them or a typed error. Model/config items TRL calls: ``get_text_config``, ``add_model_tags``,
``model_tags``, ``base_model``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import save_hf, tiny_configs
from helpers import LOGITS_ATOL, assert_logits_close, load_lmport, make_tokenizer, one_intraop_thread

import lmport
from lmport.errors import ArgumentError, LmportError, UnsupportedFeatureError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_lora.py"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "OMP_NUM_THREADS": "1",  # tiny matmuls: more threads only contend with the other runs
}
LOSS_RTOL = 1e-5  # fp32, relative (issue 8)
BF16_RTOL = 2**-8  # one bf16 rounding
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
TEXTS = [
    "hello world, this is a test.",
    "the quick brown fox",
    "jumps over the lazy dog!!",
    "lorem ipsum dolor sit amet",
    "abc",
    "a short one here",
    "packing keeps documents apart",
    "zz",
]
LIBRARIES = ("lmport", "transformers")
ARCHS = ("llama", "gpt2", "mistral")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tiny Llama, GPT-2 and Mistral folders (weights, tokenizer with a chat template) saved by transformers; the
    example script is started on the Llama folder at once, to run beside the in-process trainers."""
    root = tmp_path_factory.mktemp("trl")
    configs = tiny_configs(**TOKENS)
    folders = {arch: save_hf(root / arch, configs[arch]()) for arch in ARCHS}
    for folder in folders.values():
        make_tokenizer(folder)
    out = root / "example-out"
    args = [sys.executable, str(EXAMPLE), str(folders["llama"]), "--output-dir", str(out), "--max-steps", "3",
            "--batch-size", "2", "--max-length", "64", "--lora-r", "4", "--learning-rate", "1e-2"]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield {**folders, "example": (proc, out)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def load(library: str, folder: Path) -> Any:
    auto = lmport.AutoModelForCausalLM if library == "lmport" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32)


def record_forward_kwargs(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every call's keyword arguments to ``model`` (as trainers pass them), recorded in order."""
    calls: list[dict[str, Any]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


def text_data() -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"text": TEXTS})


def chat_data() -> Any:
    from datasets import Dataset

    turns = [[{"role": "user", "content": t[:6]}, {"role": "assistant", "content": t[6:] or "ok"}] for t in TEXTS]
    return Dataset.from_dict({"messages": turns})


def sft(library: str, folder: Path, dataset: Any, tmp: Path, peft: bool = False, **overrides: Any) -> dict[str, Any]:
    """One SFTTrainer run (3 steps) on ``library``'s model of ``folder``: its losses, trainer, model, forward calls."""
    from trl import SFTConfig, SFTTrainer

    model = load(library, folder)
    calls = record_forward_kwargs(model)
    options = dict(output_dir=str(tmp / f"sft-{library}"), max_steps=3, per_device_train_batch_size=2,
                   learning_rate=1e-3, logging_steps=1, max_length=32, seed=0, save_strategy="no",
                   report_to="none", use_cpu=True, bf16=False, dataloader_drop_last=True)  # fmt: skip
    config = SFTConfig(**{**options, **overrides})
    torch.manual_seed(0)  # LoRA's initialisation draws from the global generator before Trainer seeds it
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=make_tokenizer(),
        peft_config=lora_config() if peft else None,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    return {"losses": losses, "trainer": trainer, "model": model, "calls": calls}


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def assert_losses_close(ours: list[float], ref: list[float], rtol: float = LOSS_RTOL) -> None:
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=rtol, atol=0)  # fmt: skip


def both(run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``run(library)`` for lmport and transformers, asserting their losses agree; returns (ours, ref)."""
    ours, ref = (run(library) for library in LIBRARIES)
    assert_losses_close(ours["losses"], ref["losses"])
    return ours, ref


# --- SFTTrainer ----------------------------------------------------------------------------------


def test_sft_plain_text_default_gradient_checkpointing(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    ours, ref = both(lambda lib: sft(lib, checkpoints["llama"], text_data(), tmp_path))
    model = ours["model"]
    assert ours["trainer"].args.gradient_checkpointing  # TRL's default, left on
    assert model.is_gradient_checkpointing
    assert "attention_mask" in ours["calls"][0] and "labels" in ours["calls"][0]
    assert set(model.model_tags) >= {"trl", "sft"} and model.model_tags == ref["model"].model_tags
    assert model.config.pad_token_id == 0  # TRL sets it through config.get_text_config()


def test_sft_conversational(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    ours, _ = both(lambda lib: sft(lib, checkpoints["llama"], chat_data(), tmp_path))
    first = ours["calls"][0]
    tokenizer = make_tokenizer()
    text = tokenizer.decode(first["input_ids"][0][first["attention_mask"][0].bool()])
    assert text.startswith("<s>user: ") and "</s><s>assistant: " in text  # the chat template was applied


def test_sft_bf16_autocast_defaults(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """TRL's own precision default (bf16 autocast, even on CPU): within bf16 tolerance of transformers'."""
    from trl import SFTConfig

    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16
    ours, ref = (sft(lib, checkpoints["llama"], text_data(), tmp_path, bf16=True) for lib in LIBRARIES)
    assert_losses_close(ours["losses"], ref["losses"], rtol=BF16_RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_packing_padding_free(checkpoints: dict[str, Any], tmp_path: Path, arch: str) -> None:
    ours, _ = both(lambda lib: sft(lib, checkpoints[arch], text_data(), tmp_path, packing=True))
    first = ours["calls"][0]
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"} <= set(first)
    assert "attention_mask" not in first
    ids, labels, positions = first["input_ids"], first["labels"], first["position_ids"]
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    assert ids.shape[0] == 1 and len(starts) >= 3, "the packed row should hold several documents"
    bounds = list(zip(starts, starts[1:] + [ids.shape[1]]))

    # The first step's loss (before any update) is the documents' losses, each document run alone.
    fresh = load("lmport", checkpoints[arch]).eval()
    with torch.no_grad():
        total = sum(fresh(ids[:, a:b], labels=labels[:, a:b], num_items_in_batch=1).loss for a, b in bounds)
        count = sum(int((labels[:, a + 1 : b] != -100).sum()) for a, b in bounds)
        alone_logits = torch.cat([fresh(ids[:, a:b]).logits for a, b in bounds], dim=1)
        varlen = {k: first[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")}
        packed_logits = fresh(ids, position_ids=positions, **varlen).logits
    assert_losses_close([ours["losses"][0]], [float(total) / count])
    assert_logits_close(packed_logits, alone_logits)


def test_sft_lora(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    before = {n: p.detach().clone() for n, p in load("lmport", checkpoints["llama"]).named_parameters()}
    ours, ref = both(lambda lib: sft(lib, checkpoints["llama"], text_data(), tmp_path, peft=True))
    assert ours["trainer"].args.gradient_checkpointing and ours["model"].is_gradient_checkpointing
    assert_adapter_trained_base_unchanged(ours["trainer"].model, before)


def assert_adapter_trained_base_unchanged(peft_model: Any, before: dict[str, torch.Tensor]) -> None:
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().max() > 0 for p in lora_b.values()), "LoRA B starts at zero: it must have moved"
    base = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
            for n, p in peft_model.named_parameters() if "lora_" not in n}  # fmt: skip
    assert base.keys() == before.keys()
    for name, p in base.items():
        assert not p.requires_grad and torch.equal(p, before[name]), f"base weight {name} changed"


def test_dpo_lora(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict({
        "prompt": ["hi, ", "what is 2+2? ", "name a colour: ", "say yes: "],
        "chosen": ["hello there", "four", "blue", "yes"],
        "rejected": ["go away", "five", "table", "no"],
    })  # fmt: skip
    before = {n: p.detach().clone() for n, p in load("lmport", checkpoints["llama"]).named_parameters()}

    def dpo(library: str) -> dict[str, Any]:
        model = load(library, checkpoints["llama"])
        config = DPOConfig(output_dir=str(tmp_path / f"dpo-{library}"), max_steps=3, per_device_train_batch_size=2,
                           learning_rate=1e-2, logging_steps=1, max_length=32, seed=0, save_strategy="no",
                           report_to="none", use_cpu=True, bf16=False)  # fmt: skip
        torch.manual_seed(0)
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=data, processing_class=make_tokenizer(), peft_config=lora_config()
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return {"losses": losses, "trainer": trainer}

    ours, ref = both(dpo)
    assert len(ours["losses"]) == 3 and all(math.isfinite(x) for x in ours["losses"])
    assert ours["losses"][0] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference at step 1
    assert all(abs(x - math.log(2)) > 1e-4 for x in ours["losses"][1:]), "the policy never left the reference"
    assert_adapter_trained_base_unchanged(ours["trainer"].model, before)


# --- the example script ------------------------------------------------------------------------


def test_example_sft_lora(checkpoints: dict[str, Any]) -> None:
    from peft import PeftModel

    proc, out = checkpoints["example"]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"examples/sft_lora.py failed:\n{stderr[-3000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) for x in summary["losses"])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    ids = make_tokenizer()(["<s>user: What is 2 + 2?</s>"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = load("transformers", checkpoints["llama"])(ids).logits
        theirs = PeftModel.from_pretrained(load("transformers", checkpoints["llama"]), out).eval()(ids).logits
        ours = PeftModel.from_pretrained(load("lmport", checkpoints["llama"]), out).eval()(ids).logits
    assert_logits_close(ours, theirs)
    assert (theirs - plain).abs().max() > 10 * LOGITS_ATOL, "the adapter changes nothing: it was not trained"


# --- forward keyword arguments ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(checkpoints: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """lmport's and transformers' model (fp32, eval) of the Llama and GPT-2 folders."""
    return {arch: (load_lmport(checkpoints[arch]), load("transformers", checkpoints[arch])) for arch in ARCHS[:2]}


PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
PACKED_VARLEN = dict(
    cu_seq_lens_q=torch.tensor([0, 4, 7, 10], dtype=torch.int32),
    cu_seq_lens_k=torch.tensor([0, 4, 7, 10], dtype=torch.int32),
    max_length_q=4,
    max_length_k=4,
    seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]], dtype=torch.int32),
)


def ids_of(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_type_ids_as_transformers(pairs: dict[str, tuple[Any, Any]], arch: str) -> None:
    """GPT-2 adds ``wte(token_type_ids)`` to its embeddings; Llama ignores them: as in transformers."""
    ours, ref = pairs[arch]
    ids, types = ids_of((2, 9)), torch.randint(0, 3, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_types = ours(ids, token_type_ids=types).logits
        assert_logits_close(with_types, ref(ids, token_type_ids=types).logits)
        moved = (with_types - ours(ids).logits).abs().max().item()
    assert moved > 1e-3 if arch == "gpt2" else moved == 0.0
    with torch.no_grad():  # the decoder body alone (TRL's fused head calls model.base_model)
        assert_logits_close(
            ours.base_model(ids, token_type_ids=types).last_hidden_state,
            ref.base_model(ids, token_type_ids=types).last_hidden_state,
        )


def test_return_dict_false_gives_transformers_tuple(pairs: dict[str, tuple[Any, Any]]) -> None:
    ours, ref = pairs["llama"]
    ids = ids_of((2, 7))
    with torch.no_grad():
        mine = ours(ids, labels=ids, use_cache=False, return_dict=False)
        theirs = ref(ids, labels=ids, use_cache=False, return_dict=False)
        body = ours.base_model(ids, return_dict=False)
    assert isinstance(mine, tuple) and len(mine) == len(theirs) == 2
    assert torch.equal(mine[0], ours(ids, labels=ids).loss) and torch.allclose(mine[0], theirs[0], rtol=LOSS_RTOL)
    assert_logits_close(mine[1], theirs[1])
    assert isinstance(body, tuple) and torch.equal(body[0], ours.base_model(ids).last_hidden_state)
    assert isinstance(ours(ids, return_dict=True).logits, torch.Tensor)


def test_varlen_arguments_agree_with_position_ids(pairs: dict[str, tuple[Any, Any]]) -> None:
    """TRL's padding-free batch: cu_seq_lens/max_length/seq_idx that agree with position_ids are accepted and
    mean what position_ids mean (documents apart, as transformers computes); a contradiction is an error."""
    ours, ref = pairs["llama"]
    ids = ids_of((1, 10))
    with torch.no_grad():
        packed = ours(ids, position_ids=PACKED_POSITIONS, **PACKED_VARLEN).logits
        assert_logits_close(packed, ref(ids, position_ids=PACKED_POSITIONS, use_cache=False, **PACKED_VARLEN).logits)
        alone = torch.cat([ours(ids[:, a:b]).logits for a, b in ((0, 4), (4, 7), (7, 10))], dim=1)
    assert_logits_close(packed, alone)
    ours(ids, position_ids=PACKED_POSITIONS, **{**PACKED_VARLEN, "max_length_q": 9})  # an upper bound is fine
    contradictions = [
        dict(cu_seq_lens_q=torch.tensor([0, 5, 10])),  # other boundaries
        dict(cu_seq_lens_k=torch.tensor([0, 4, 10])),  # fewer documents
        dict(max_length_q=3),  # shorter than the longest document
        dict(seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]])),
    ]
    for bad in contradictions:
        with pytest.raises(ArgumentError, match="position_ids|longest document"):
            ours(ids, position_ids=PACKED_POSITIONS, **{**PACKED_VARLEN, **bad})
    with pytest.raises(ArgumentError, match="disagrees"):  # several documents, but positions run on: contradiction
        ours(ids, **PACKED_VARLEN)
    ours(ids, cu_seq_lens_q=torch.tensor([0, 10]), max_length_q=10)  # one document, default positions: agrees
    with pytest.raises(UnsupportedFeatureError, match="padding"):
        ours(ids, attention_mask=torch.tensor([[1] * 8 + [0, 0]]), cu_seq_lens_q=torch.tensor([0, 8]))


def test_other_forward_arguments(pairs: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = pairs["llama"]
    ids = ids_of((1, 6))
    with torch.no_grad():
        plain = ours(ids).logits
        for ok in (dict(output_attentions=False), dict(output_attentions=None), dict(cache_position=torch.arange(6)),
                   dict(is_causal=True), dict(output_router_logits=False)):  # fmt: skip
            assert torch.equal(ours(ids, **ok).logits, plain), ok
        with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
            ours(ids, output_attentions=True)
        with pytest.raises(UnsupportedFeatureError, match="is_causal"):
            ours(ids, is_causal=False)
        with pytest.raises(ArgumentError, match="cache_position"):
            ours(ids, cache_position=torch.arange(1, 7))
        with pytest.raises(ArgumentError, match="no_such_argument") as info:
            ours(ids, no_such_argument=1)
        assert isinstance(info.value, TypeError) and isinstance(info.value, LmportError)
        with pytest.raises(ArgumentError, match="no_such_argument"):
            ours.base_model(ids, no_such_argument=1)


# --- model and config items TRL calls -------------------------------------------------------------


def test_text_config_tags_and_base_model_as_transformers(
    pairs: dict[str, tuple[Any, Any]], checkpoints: dict[str, Any]
) -> None:
    for ours, ref in pairs.values():
        for kwargs in ({}, {"decoder": True}, {"encoder": True}):
            assert ours.config.get_text_config(**kwargs) is ours.config
            assert ref.config.get_text_config(**kwargs) is ref.config  # transformers, for the same model
        assert ours.base_model is ours.model and ours.base_model_prefix == "model"
        assert ref.base_model is getattr(ref, ref.base_model_prefix)
    models = [load(lib, checkpoints["llama"]) for lib in LIBRARIES]
    for model in models:
        assert model.model_tags is None
        model.add_model_tags("trl")
        model.add_model_tags(["sft", "trl", "lora"])
    assert models[0].model_tags == models[1].model_tags == ["trl", "sft", "lora"]
    assert load("lmport", checkpoints["llama"]).model_tags is None  # tags belong to one model, not its class
