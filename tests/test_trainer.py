"""transformers' ``Trainer``, unchanged, on lmport models: the same numbers and complete checkpoints.

On tiny fp32 checkpoints saved by transformers (Llama; GPT-2, whose checkpoint names, fused
``c_attn`` and tied head go through the weight map), the same seed and the same padded
rows (``-100`` labels on padding and prompts, so token counting matters):

- the logged training losses, step by step, with gradient accumulation 1 and 4, ``eval_loss``
  and ``predict()`` (predictions, label ids, ``test_loss``) equal transformers'; bf16 (autocast
  or a bf16-loaded model) within bf16 tolerance; ``gradient_checkpointing=True`` really
  recomputes layers and changes no loss;
- every checkpoint Trainer writes (``save_steps``, ``save_model``) holds ``config.json`` and
  weights in transformers' names, loads in lmport and transformers to identical logits; a run
  resumed from a checkpoint continues with the uninterrupted run's losses and weights;
  ``load_best_model_at_end`` restores the best checkpoint;
- ``load_state_dict`` takes checkpoint and module names and reports missing/unexpected keys;
- ``num_parameters`` counts as transformers does; the ``Trainer._save`` hook installs on import
  (either order), is idempotent, leaves other models alone, and is switched off by its variable.
"""

from __future__ import annotations

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
from helpers import LOGITS_ATOL, assert_grads_close, load_clean, loss_and_grads, one_intraop_thread, tensors_of

import lmport
from lmport import integrations

ARCHS = ("llama", "gpt2")
SEQ = 16
LOSS_RTOL = 1e-5  # fp32, relative (issue 8)
BF16_RTOL = 1e-2  # a few bf16 ulps (2**-8) on a mean of per-token losses


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_intraop_thread()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    configs = tiny_configs(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {arch: save_hf(tmp_path_factory.mktemp(arch), configs[arch]()) for arch in ARCHS}


class Rows(torch.utils.data.Dataset):
    """``n`` right-padded rows of :data:`SEQ` ids: 5..SEQ real tokens, 0-3 prompt tokens; -100 on both."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            ids = torch.randint(4, 128, (SEQ,), generator=g)
            real = int(torch.randint(5, SEQ + 1, (1,), generator=g))
            prompt = int(torch.randint(0, 4, (1,), generator=g))
            mask = (torch.arange(SEQ) < real).long()
            ids[real:] = 0
            labels = ids.masked_fill(mask == 0, -100)
            labels[:prompt] = -100
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def make_trainer(model: Any, out: Path, **overrides: Any) -> transformers.Trainer:
    args: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    args.update(overrides)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**args),
        train_dataset=Rows(32),
        eval_dataset=Rows(7, seed=1),
    )


def hf_model(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def our_model(folder: Path, dtype: torch.dtype | None = None) -> Any:
    return lmport.AutoModelForCausalLM.from_pretrained(folder, **({"dtype": dtype} if dtype else {}))


def logged_losses(trainer: transformers.Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def assert_losses_close(
    ours: dict[int, float], ref: dict[int, float], rtol: float, title: str, columns: str = "transformers  lmport"
) -> None:
    print(f"\n{title}\nstep  {columns}")  # the side-by-side table (pytest -s)
    for step in ref:
        print(f"{step:>4}  {ref[step]:.7f}  {ours.get(step, math.nan):.7f}")
    assert ours.keys() == ref.keys() and len(ref) > 1
    for step, loss in ref.items():
        assert math.isclose(ours[step], loss, rel_tol=rtol), f"step {step}: {ours[step]} != {loss}"


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-item list counting runs of ``module.forward`` (hooks do not see checkpoint recomputes)."""
    calls, forward = [0], module.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- the same numbers --------------------------------------------------------------------


@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_losses_eval_and_predict_equal_transformers(
    checkpoints: dict[str, Path], tmp_path: Path, arch: str, ga: int
) -> None:
    ref_model, ours_model = hf_model(checkpoints[arch]), our_model(checkpoints[arch])
    # Trainer counts num_items_in_batch over shifted labels only for a causal-LM loss_type;
    # transformers' GPT2LMHeadModel has none (its count includes position 0), Llama's has one.
    assert ours_model.loss_type == ref_model.loss_type == {"llama": "ForCausalLM", "gpt2": None}[arch]
    ref = make_trainer(ref_model, tmp_path / "ref", gradient_accumulation_steps=ga)
    ours = make_trainer(ours_model, tmp_path / "ours", gradient_accumulation_steps=ga)
    assert ours.label_names == ref.label_names == ["labels"]
    assert ours.model_accepts_loss_kwargs and ref.model_accepts_loss_kwargs
    ref.train()
    ours.train()
    assert_losses_close(logged_losses(ours), logged_losses(ref), LOSS_RTOL, f"{arch}, gradient accumulation {ga}")

    ref_eval, ours_eval = ref.evaluate(), ours.evaluate()
    print(f"eval_loss  {ref_eval['eval_loss']:.7f}  {ours_eval['eval_loss']:.7f}")
    assert math.isclose(ours_eval["eval_loss"], ref_eval["eval_loss"], rel_tol=LOSS_RTOL)

    ref_pred, ours_pred = ref.predict(Rows(5, seed=2)), ours.predict(Rows(5, seed=2))
    assert type(ours_pred.predictions) is type(ref_pred.predictions)
    assert ours_pred.predictions.shape == ref_pred.predictions.shape == (5, SEQ, 128)
    assert abs(ours_pred.predictions - ref_pred.predictions).max() <= LOGITS_ATOL
    assert (ours_pred.label_ids == ref_pred.label_ids).all()
    assert ours_pred.metrics.keys() == ref_pred.metrics.keys()
    assert math.isclose(ours_pred.metrics["test_loss"], ref_pred.metrics["test_loss"], rel_tol=LOSS_RTOL)


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_bf16_losses_equal_transformers(checkpoints: dict[str, Path], tmp_path: Path, mode: str) -> None:
    folder = checkpoints["llama"]
    dtype, overrides = (torch.float32, {"bf16": True}) if mode == "autocast" else (torch.bfloat16, {})
    ref = make_trainer(hf_model(folder, dtype), tmp_path / "ref", gradient_accumulation_steps=2, **overrides)
    ours = make_trainer(our_model(folder, dtype), tmp_path / "ours", gradient_accumulation_steps=2, **overrides)
    ref.train()
    ours.train()
    assert_losses_close(logged_losses(ours), logged_losses(ref), BF16_RTOL, f"llama, bf16 {mode}")
    assert math.isclose(ours.evaluate()["eval_loss"], ref.evaluate()["eval_loss"], rel_tol=BF16_RTOL)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_recomputes_and_keeps_losses(
    checkpoints: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    folder = checkpoints[arch]
    runs = {}
    for name, model, checkpointing in [
        ("transformers", hf_model(folder), True),
        ("plain", our_model(folder), False),
        ("checkpointed", our_model(folder), True),
    ]:
        trainer = make_trainer(model, tmp_path / name, max_steps=2, gradient_checkpointing=checkpointing)
        # a module inside the layer: transformers checkpoints inside its layers' forward
        layers = "h" if name == "transformers" and arch == "gpt2" else "layers"
        calls = count_calls(model.base_model.get_submodule(f"{layers}.0.mlp"))
        trainer.train()
        runs[name] = logged_losses(trainer), calls[0], model
    assert runs["checkpointed"][2].is_activation_checkpointing and not runs["plain"][2].is_activation_checkpointing
    # each step's layer forward runs again in backward, in both libraries
    assert runs["checkpointed"][1] == runs["transformers"][1] == 2 * runs["plain"][1] == 2 * 2
    assert_losses_close(runs["checkpointed"][0], runs["plain"][0], LOSS_RTOL, f"{arch}", "plain  checkpointed")
    assert_losses_close(runs["checkpointed"][0], runs["transformers"][0], LOSS_RTOL, f"{arch}, checkpointed")


def test_activation_checkpointing_every_n_layers(checkpoints: dict[str, Path]) -> None:
    model = our_model(checkpoints["llama"]).train()
    calls = [count_calls(layer) for layer in model.model.layers]
    batch = {k: v[None] for k, v in Rows(1)[0].items()}
    model.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    model(**batch).loss.backward()
    assert [c[0] for c in calls] == [2, 1]  # layer 0 checkpointed (run again in backward), layer 1 not
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    plain = loss_and_grads(model, batch)
    model.activation_checkpointing_enable(offload=True)
    offloaded = loss_and_grads(model, batch)
    assert calls[1][0] == 1 + 1 + 2  # every layer checkpointed
    assert torch.equal(offloaded[0], plain[0])
    assert_grads_close(offloaded[1], plain[1])
    with pytest.raises(lmport.ArgumentError):
        model.activation_checkpointing_enable(every_n_layers=0)


# --- complete checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_load_everywhere_and_resume(checkpoints: dict[str, Path], tmp_path: Path, arch: str) -> None:
    folder = checkpoints[arch]
    run = tmp_path / "run"
    settings: dict[str, Any] = dict(
        save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,  # the earlier, worse checkpoint is "best"
    )  # fmt: skip
    trainer = make_trainer(our_model(folder), run, **settings)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    names = tensors_of(folder).keys()  # transformers' own checkpoint names
    ids = Rows(2, seed=5)[0]["input_ids"][None]
    saved = {}
    for ckpt in (run / "checkpoint-2", run / "checkpoint-4", tmp_path / "final"):
        assert (ckpt / "config.json").is_file() and tensors_of(ckpt).keys() == names
        ours, ref = our_model(ckpt), load_clean(transformers.AutoModelForCausalLM, ckpt, dtype=torch.float32)
        saved[ckpt.name] = logits_of(ours, ids)
        assert torch.allclose(saved[ckpt.name], logits_of(ref, ids), atol=LOGITS_ATOL, rtol=0)
    # load_best_model_at_end put checkpoint-2's weights back into the model, and save_model saved them
    assert trainer.state.best_model_checkpoint == str(run / "checkpoint-2")
    assert not torch.equal(saved["checkpoint-2"], saved["checkpoint-4"])
    assert torch.equal(logits_of(trainer.model, ids), saved["checkpoint-2"])
    assert torch.equal(saved["final"], saved["checkpoint-2"])

    resumed = make_trainer(our_model(folder), tmp_path / "resumed", **{**settings, "load_best_model_at_end": False})
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    full, again = logged_losses(trainer), logged_losses(resumed)
    assert again.keys() == full.keys() == {1, 2, 3, 4}
    for step in (3, 4):  # computed after the resume
        assert math.isclose(again[step], full[step], rel_tol=LOSS_RTOL), step
    assert torch.allclose(logits_of(resumed.model, ids), saved["checkpoint-4"], atol=LOGITS_ATOL, rtol=0)


def test_load_state_dict_takes_checkpoint_and_module_names(checkpoints: dict[str, Path]) -> None:
    folder = checkpoints["gpt2"]
    ids = Rows(1, seed=3)[0]["input_ids"][None]
    expected = logits_of(our_model(folder), ids)
    model = our_model(folder)
    module_state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint_state = tensors_of(folder)  # fused, transposed c_attn; no lm_head (tied)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_()
    assert not torch.allclose(logits_of(model, ids), expected, atol=LOGITS_ATOL)
    assert model.load_state_dict(checkpoint_state) == ([], [])
    assert torch.allclose(logits_of(model, ids), expected, atol=LOGITS_ATOL, rtol=0)
    assert model.load_state_dict(module_state) == ([], [])
    assert checkpoint_state.keys() == tensors_of(folder).keys()  # the caller's dict is left as it was

    partial = {k: v for k, v in checkpoint_state.items() if k != "transformer.h.0.attn.c_attn.weight"}
    partial["transformer.h.0.attn.not_a_weight"] = torch.zeros(1)
    result = model.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "kqv"]
    assert result.unexpected_keys == ["transformer.h.0.attn.not_a_weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial)


# --- interface ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_num_parameters_as_transformers(checkpoints: dict[str, Path], arch: str) -> None:
    ours, ref = our_model(checkpoints[arch]), hf_model(checkpoints[arch])
    counts = []
    for model in (ours, ref):
        model.get_output_embeddings().weight.requires_grad_(False)  # GPT-2: the tied embedding too
        counts.append(
            [model.num_parameters(only_trainable=t, exclude_embeddings=e) for t in (False, True) for e in (False, True)]
        )
    assert counts[0] == counts[1]
    assert len(set(counts[0])) >= 3  # the flags change the count


def test_trainer_save_hook(tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = transformers.Trainer._save
    assert getattr(wrapped, "__lmport_wrapped__", False)
    integrations.install()  # transformers.trainer is imported: patches again, which must change nothing
    assert transformers.Trainer._save is wrapped

    # any other model goes straight through to Trainer's own save
    ref = hf_model(checkpoints["llama"])
    make_trainer(ref, tmp_path / "hf").save_model(tmp_path / "hf-save")
    assert (tmp_path / "hf-save" / "config.json").is_file()
    assert tensors_of(tmp_path / "hf-save").keys() == tensors_of(checkpoints["llama"]).keys()

    monkeypatch.setenv(integrations.ENV, "0")
    finders = list(sys.meta_path)
    integrations.install()
    assert not integrations.enabled() and sys.meta_path == finders

    # in a fresh process: lmport first, then the import of transformers.trainer triggers the hook
    code = (
        "import sys, lmport\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "import transformers.trainer as t\n"
        "print(getattr(t.Trainer._save, '__lmport_wrapped__', False),"
        " any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))\n"
    )
    env = {**os.environ, integrations.ENV: "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["True", "False"], out.stderr  # wrapped; the finder removed itself
