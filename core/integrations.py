"""Post-import patches that make fine-tuning libraries treat lmport models as transformers models.

Some libraries choose their behaviour with ``isinstance(model, transformers.PreTrainedModel)``
rather than duck typing, so an lmport model (a plain ``nn.Module``) silently gets different
treatment. lmport never imports those libraries; it installs one ``sys.meta_path`` finder
that, right after one of the modules in :data:`PATCHES` has executed (or at once, if it
already had been imported), applies that module's patch. Every patch is idempotent and acts
only on lmport models (:class:`~lmport.modeling.base.PreTrainedCausalLM`); every other model
goes straight through the library's own code.

- ``transformers.trainer``: ``Trainer._save`` writes a non-``PreTrainedModel`` as its raw
  ``state_dict()`` in one safetensors file, with module names, no ``config.json``, and an
  error on tied weights. Wrapped, it writes an lmport model with ``model.save_pretrained(
  output_dir, state_dict=state_dict, is_main_process=args.should_save)``: ``config.json``
  (and ``generation_config.json`` where the model has one) beside weights in the Hugging
  Face layout. Everything else ``_save`` does (the folder, the tokenizer, the training
  arguments) is Trainer's own code. Resuming needs no patch: Trainer calls
  ``model.load_state_dict`` on that file, which takes checkpoint names.
- ``peft.tuners.tuners_utils``: ``target_modules="all-linear"`` leaves out the output head
  only for a ``PreTrainedModel``. Wrapped, ``_maybe_include_all_linear_layers`` also drops
  the module that is ``model.get_output_embeddings()`` for an lmport model, so LoRA
  targets the same layers as on transformers (never ``lm_head``). The copies peft's tuner
  modules imported by name are replaced too when peft was imported before lmport.

Environment switches, read when a patch would be applied (set them before importing lmport
or the library): ``LMPORT_INTEGRATIONS=0`` turns every patch off;
``LMPORT_TRAINER_INTEGRATION=0`` or ``LMPORT_PEFT_INTEGRATION=0`` turns off one.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

#: Environment switch for all patches: ``0``/``false``/``no``/``off`` disables them.
ENV = "LMPORT_INTEGRATIONS"
_MARK = "__lmport_wrapped__"
_OFF = {"0", "false", "no", "off"}
_ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
_PEFT_FUNCTION = "_maybe_include_all_linear_layers"


class Patch(NamedTuple):
    """One post-import patch: its own environment switch and what it does to the imported module."""

    env: str
    apply: Callable[[ModuleType], None]


def _switch_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in _OFF


def enabled(module: str | None = None) -> bool:
    """Whether :data:`ENV` (and, given a module of :data:`PATCHES`, that patch's own switch) is on."""
    if not _switch_on(ENV):
        return False
    return module is None or _switch_on(PATCHES[module].env)


def install() -> None:
    """Patch every module of :data:`PATCHES` now if imported, else when it is. Idempotent."""
    pending = []
    for name in PATCHES:
        if not enabled(name):
            continue
        module = sys.modules.get(name)
        if module is not None:
            PATCHES[name].apply(module)
        else:
            pending.append(name)
    if pending and not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


# --- transformers.trainer ------------------------------------------------------------------------


def patch_trainer(trainer_class: type) -> None:
    """Wrap ``trainer_class._save`` (once) to save lmport models with ``save_pretrained``."""
    original = trainer_class.__dict__.get("_save")
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _save(self: Any, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        model = _lmport_model(self)
        if model is None:
            return original(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.model.state_dict()  # what Trainer would save
        # Trainer's own steps, with an empty weight file that save_pretrained then replaces.
        original(self, output_dir, {})
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)

    setattr(_save, _MARK, True)
    trainer_class._save = _save


def _patch_trainer_module(module: ModuleType) -> None:
    trainer_class = getattr(module, "Trainer", None)
    if isinstance(trainer_class, type):
        patch_trainer(trainer_class)


def _lmport_model(trainer: Any) -> Any:
    """The trainer's model if, unwrapped (DDP, torch.compile), it is an lmport causal LM; else ``None``."""
    from .modeling.base import PreTrainedCausalLM

    model = trainer.model
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
    return model if isinstance(model, PreTrainedCausalLM) else None


# --- peft.tuners.tuners_utils --------------------------------------------------------------------


def patch_peft(module: ModuleType) -> None:
    """Wrap ``module._maybe_include_all_linear_layers`` (once) to leave out an lmport model's output head,
    here and in the ``peft`` modules that already imported the original by name."""
    original = getattr(module, _PEFT_FUNCTION, None)
    if not callable(original) or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config: Any, model: Any) -> Any:
        target = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(target, str) and target.lower() == _ALL_LINEAR
        peft_config = original(peft_config, model)
        if all_linear and isinstance(getattr(peft_config, "target_modules", None), set):
            head = _lmport_output_head(model)
            if head is not None:
                peft_config.target_modules -= {name for name, child in model.named_modules() if child is head}
        return peft_config

    setattr(_maybe_include_all_linear_layers, _MARK, True)
    setattr(module, _PEFT_FUNCTION, _maybe_include_all_linear_layers)
    for name, other in list(sys.modules.items()):
        if name.startswith("peft.") and getattr(other, _PEFT_FUNCTION, None) is original:
            setattr(other, _PEFT_FUNCTION, _maybe_include_all_linear_layers)


def _lmport_output_head(model: Any) -> Any:
    """``model.get_output_embeddings()`` if ``model`` is an lmport causal LM (as peft asks of a
    ``PreTrainedModel``, with no further unwrapping); else ``None``."""
    from .modeling.base import PreTrainedCausalLM

    return model.get_output_embeddings() if isinstance(model, PreTrainedCausalLM) else None


#: Module name -> the patch applied right after that module has executed.
PATCHES: dict[str, Patch] = {
    "transformers.trainer": Patch("LMPORT_TRAINER_INTEGRATION", _patch_trainer_module),
    "peft.tuners.tuners_utils": Patch("LMPORT_PEFT_INTEGRATION", patch_peft),
}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when a module of :data:`PATCHES` is found by the other finders, it makes
    that spec's loader apply the patch right after the module has run (before any other module can
    import names from it); once every module is patched it leaves ``sys.meta_path``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PATCHES:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            if enabled(fullname):
                PATCHES[fullname].apply(module)
            if all(name in sys.modules for name in PATCHES):
                self._remove()

        loader.exec_module = exec_then_patch  # this spec's own loader instance only
        return spec

    def _remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


__all__ = ["ENV", "PATCHES", "Patch", "enabled", "install", "patch_peft", "patch_trainer"]
