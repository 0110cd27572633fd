"""The plugin contract: what an architecture plugin must satisfy with lmport alone (no transformers).

Entry point, config parsing and serialisation, a reversible weight map, a tiny config that
builds and trains, and a model built from its class that saves, reloads and generates the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .compare import (
    LOGITS_ATOL,
    assert_logits_close,
    assert_loss_equal,
    batch_of_two,
    checkpoint_weight_map,
    eval_mode,
    generation_positions,
    left_padded_prompts,
    load_clean,
    loss_and_grads,
    perturb_parameters,
    require,
    tensors_of,
)


def architecture_of(model_type: str) -> Any:
    """The plugin object serving ``model_type`` (loaded through its entry point if need be)."""
    from ..registry import get_registry

    return get_registry().architecture(model_type)


def check_entry_point(model_type: str) -> Any:
    """One installed ``lmport.architectures`` entry point named ``model_type``, resolving to an
    :class:`lmport.Architecture` of that ``model_type`` whose config and model classes fit together.

    Returns:
        The :class:`lmport.Architecture`.
    """
    from ..architecture import Architecture
    from ..config import PretrainedConfig
    from ..modeling import PreTrainedCausalLM
    from ..registry import ARCHITECTURES_GROUP, get_registry

    registry = get_registry()
    entries = [e for e in registry.entry_points(ARCHITECTURES_GROUP) if e.name == model_type]
    require(entries, f"no installed distribution has an {ARCHITECTURES_GROUP!r} entry point named {model_type!r}")
    dists = [e.distribution for e in entries]
    require(len(entries) == 1, f"{model_type!r} is provided by several distributions: {dists}")
    loaded = entries[0].load()
    require(
        isinstance(loaded, Architecture),
        f"entry point {model_type} = {entries[0].value} is a {type(loaded).__name__}, not an lmport.Architecture",
    )
    require(loaded.model_type == model_type, f"entry point {model_type!r} serves model_type {loaded.model_type!r}")
    arch = registry.architecture(model_type)
    require(arch is loaded, f"the registry resolves {model_type!r} to {arch!r}, not the entry point's {loaded!r}")
    config_class, model_class = arch.config_class, arch.model_class
    require(
        isinstance(config_class, type) and issubclass(config_class, PretrainedConfig),
        f"config_class {config_class!r} is not a PretrainedConfig subclass",
    )
    require(
        config_class.model_type == model_type,
        f"{config_class.__name__}.model_type is {config_class.model_type!r}, not {model_type!r}",
    )
    require(
        isinstance(model_class, type) and issubclass(model_class, PreTrainedCausalLM),
        f"model_class {model_class!r} is not a PreTrainedCausalLM subclass",
    )
    require(
        issubclass(config_class, model_class.config_class),
        f"{model_class.__name__}.config_class is {model_class.config_class.__name__}, not {config_class.__name__}",
    )
    return arch


def check_config(model_type: str, values: Mapping[str, Any], work_dir: str | Path) -> Any:
    """``values`` (``config.json`` keys) parse into the plugin's config, and serialise back stably.

    The config read by ``lmport.AutoConfig.from_pretrained`` from a ``config.json`` of
    ``values`` serialises as the config class's ``from_dict`` does; ``to_dict`` is JSON, names
    the ``model_type``, and parses back to a config with the same ``to_dict``.

    Returns:
        The parsed config.
    """
    import lmport

    arch = architecture_of(model_type)
    raw = {**values, "model_type": model_type}
    config = arch.config_class.from_dict(dict(raw))
    folder = Path(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    auto = lmport.AutoConfig.from_pretrained(folder)
    require(type(auto) is type(config), f"AutoConfig read a {type(auto).__name__}, not a {type(config).__name__}")
    first = config.to_dict()
    require(auto.to_dict() == first, f"AutoConfig's config differs from {type(config).__name__}.from_dict's")
    json.dumps(first)  # must be JSON
    require(first.get("model_type") == model_type, f"to_dict() names model_type {first.get('model_type')!r}")
    second = arch.config_class.from_dict(dict(first)).to_dict()
    changed = sorted(k for k in first.keys() | second.keys() if first.get(k, "<absent>") != second.get(k, "<absent>"))
    require(not changed, f"to_dict() is not stable across a round trip: {changed}")
    return config


def check_weight_map(config: Any, *, weight_map: Any = None, seed: int = 0) -> None:
    """The architecture's weight map is reversible on a model of ``config``.

    Module tensors → ``to_checkpoint`` → ``to_module`` gives back the same names and tensors
    (and ``plan`` predicts those names and shapes); checkpoint tensors → ``to_module`` →
    ``to_checkpoint`` gives back the same checkpoint; no saved name is one the map ignores on load.

    Args:
        config: the plugin's config.
        weight_map: the map to check (default: the one the architecture saves with).
    """
    model = architecture_of(config.model_type).model_class.from_config(config, seed=seed)
    weight_map = checkpoint_weight_map(model) if weight_map is None else weight_map
    state = dict(model.named_checkpoint_tensors())
    checkpoint = weight_map.to_checkpoint(state)
    back: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint.items():
        require(not weight_map.ignored(name), f"saved tensor {name!r} is one the weight map ignores on load")
        parts = weight_map.to_module(name, tensor)
        planned = weight_map.plan(name, tuple(tensor.shape))
        require(
            [(n, tuple(t.shape)) for n, t in parts] == planned,
            f"{name}: plan() says {planned}, to_module() gives {[(n, tuple(t.shape)) for n, t in parts]}",
        )
        for module_name, part in parts:
            require(module_name not in back, f"{module_name!r} comes from two checkpoint tensors")
            back[module_name] = part
    require(
        back.keys() == state.keys(),
        f"to_module(to_checkpoint(state)) loses {sorted(state.keys() - back.keys())}, "
        f"invents {sorted(back.keys() - state.keys())}",
    )
    for name, tensor in state.items():
        require(back[name].shape == tensor.shape, f"{name}: shape {tuple(back[name].shape)} after a round trip")
        require(torch.equal(back[name], tensor), f"{name}: values changed by a round trip through the weight map")
    again = weight_map.to_checkpoint(back)
    require(again.keys() == checkpoint.keys(), f"checkpoint names changed: {sorted(again.keys() ^ checkpoint.keys())}")
    for name, tensor in checkpoint.items():
        require(torch.equal(again[name], tensor), f"checkpoint tensor {name!r} changed by a round trip")


def check_trains(model: Any, *, seq: int = 12) -> None:
    """A training forward with labels asked for logits (``skip_logits=False``) gives finite logits of
    ``(batch, seq, vocab_size)`` and a finite loss; by default (the loss taken chunk by chunk) the same
    loss without logits, and backward reaches every parameter with finite gradients."""
    vocab = model.config.vocab_size
    batch = batch_of_two(seq, seed=0, vocab=vocab)
    was_training = model.training
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch, skip_logits=False)
        require(tuple(out.logits.shape) == (2, seq, vocab), f"logits shape {tuple(out.logits.shape)}")
        require(torch.isfinite(out.logits).all(), "non-finite logits")
        require(out.loss is not None and torch.isfinite(out.loss), f"loss {out.loss}")
        loss, grads = loss_and_grads(model, batch)
        assert_loss_equal(loss, out.loss)
        for name, g in grads.items():
            require(torch.isfinite(g).all(), f"{name}: non-finite gradient")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def check_tiny_config(model_type: str, work_dir: str | Path) -> Any:
    """The plugin's ``tiny_config`` is present, parses (see :func:`check_config`), builds and trains.

    Returns:
        The tiny config.
    """
    arch = architecture_of(model_type)
    tiny = arch.tiny_config
    require(isinstance(tiny, Mapping) and tiny, f"{arch!r} has no tiny_config (Architecture(..., tiny_config={{...}}))")
    config = check_config(model_type, tiny, work_dir)
    check_trains(arch.model_class.from_config(config, seed=0))
    return config


def check_padding_invariance(model: Any, *, atol: float = LOGITS_ATOL) -> None:
    """Padding changes no real position: a left-padded row (with ``generate``'s ``position_ids``) and a
    right-padded row give, where their tokens are, the logits of the same tokens unpadded."""
    vocab = model.config.vocab_size
    with eval_mode(model):
        ids, mask = left_padded_prompts((10, 7), seed=3, vocab=vocab)
        left = model(ids, attention_mask=mask, position_ids=generation_positions(mask)).logits
        alone = model(ids[1:, 3:]).logits
        assert_logits_close(left[1:, 3:], alone, atol=atol)
        right_ids = torch.cat([ids[1:, 3:], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        right_mask = torch.cat([mask[1:, 3:], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        right = model(right_ids, attention_mask=right_mask).logits
        assert_logits_close(right[:, :7], alone, atol=atol)


def check_generation_cache(model: Any, *, max_new_tokens: int = 6) -> None:
    """Greedy ``generate`` gives the same tokens with and without the KV cache, for a left-padded batch."""
    vocab = model.config.vocab_size
    ids, mask = left_padded_prompts((7, 4), seed=4, vocab=vocab)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=vocab, pad_token_id=0)
    with eval_mode(model):
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **settings)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    require(torch.equal(cached, uncached), f"generate with the cache {cached.tolist()} != without {uncached.tolist()}")


def check_save_reload(config: Any, work_dir: str | Path, *, seed: int = 0, atol: float = LOGITS_ATOL) -> None:
    """A model built from its class (``model_class.from_config``) saves and reloads to identical numbers.

    The save holds the weight map's checkpoint names and tensors and a ``config.json`` of the
    ``model_type``; ``lmport.AutoModelForCausalLM.from_pretrained`` reads it back with nothing
    missing, unexpected or mismatched, as the same class and config, with bit-identical logits
    and loss. The model also passes :func:`check_padding_invariance` and :func:`check_generation_cache`.
    """
    import lmport

    arch = architecture_of(config.model_type)
    model = arch.model_class.from_config(config, seed=seed)
    perturb_parameters(model)  # not the init pattern: the save must carry these values
    folder = Path(work_dir) / "saved"
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    require(raw.get("model_type") == config.model_type, f"saved config.json has model_type {raw.get('model_type')!r}")
    expected = checkpoint_weight_map(model).to_checkpoint(dict(model.named_checkpoint_tensors()))
    saved = tensors_of(folder)
    differ = sorted(saved.keys() ^ expected.keys())
    require(not differ, f"saved names differ from the weight map's: {differ}")
    for name, tensor in expected.items():
        require(torch.equal(saved[name], tensor.detach().cpu()), f"saved tensor {name!r} differs from the model's")
    again = load_clean(lmport.AutoModelForCausalLM, folder)
    require(type(again) is type(model), f"reloaded as {type(again).__name__}, not {type(model).__name__}")
    require(again.config.to_dict() == model.config.to_dict(), "the reloaded config differs from the saved one")
    batch = batch_of_two(16, seed=1, padded=True, left_pad=2, vocab=config.vocab_size)
    with eval_mode(model, again):
        a = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        b = again(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    keep = batch["attention_mask"].bool()
    require(torch.equal(a.logits[keep], b.logits[keep]), "reloaded logits are not bit-identical")
    require(torch.equal(a.loss, b.loss), "reloaded loss is not bit-identical")
    check_padding_invariance(again, atol=atol)
    check_generation_cache(again)


__all__ = [
    "architecture_of",
    "check_config",
    "check_entry_point",
    "check_generation_cache",
    "check_padding_invariance",
    "check_save_reload",
    "check_tiny_config",
    "check_trains",
    "check_weight_map",
]
