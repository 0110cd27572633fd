"""Hook specifications: every step of a load that a plugin may implement.

Each hook is called through one pluggy ``PluginManager`` with project name
``"lmport"``. Implementations are plain functions or methods decorated with
:data:`hookimpl`. Unless a spec says otherwise it is ``firstresult``: plugins are
asked in pluggy's order (last registered first; ``tryfirst``/``trylast`` move an
implementation), and the first one to return something other than ``None`` wins.
An implementation returns ``None`` to say "not mine".

Capability plugins from the ``lmport.plugins`` entry point group are registered
after the builtins, so they are asked first: a third party overrides a builtin
by installing a package, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from .attention import AttentionKernel
    from .config import PretrainedConfig
    from .formats import WeightFormat
    from .gguf_spec import GGUFArchitecture
    from .options import LoadOptions, SourceOptions
    from .placement import Placement, PlacementOptions
    from .quantization import Quantizer
    from .weights import WeightMap, WeightSource

PROJECT_NAME = "lmport"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def lmport_resolve_source(name_or_path: str, options: SourceOptions) -> Path | None:
    """Turn what the user passed into a local checkpoint folder.

    Args:
        name_or_path: a local folder or a hub repository id, as given.
        options: ``revision``, ``cache_dir``, ``token``, ``local_files_only``,
            ``subfolder`` and the other source arguments.

    Returns:
        The folder that holds ``config.json`` (subfolder applied), or ``None``
        when this source does not handle ``name_or_path``. First result wins.
    """


@hookspec(firstresult=True)
def lmport_parse_config(raw: dict[str, Any], model_type: str) -> PretrainedConfig | None:
    """Parse the decoded ``config.json`` into a typed config object.

    Args:
        raw: the JSON object, unmodified.
        model_type: ``raw["model_type"]``, given separately for dispatch.

    Returns:
        A :class:`~lmport.config.PretrainedConfig` subclass instance, or
        ``None`` when the plugin does not provide ``model_type``. First result wins.
    """


@hookspec(firstresult=True)
def lmport_resolve_model_class(config: PretrainedConfig) -> type | None:
    """Choose the ``torch.nn.Module`` class that implements ``config``.

    Returns:
        A subclass of :class:`~lmport.modeling.PreTrainedCausalLM`, or ``None``
        when the config is not this plugin's. First result wins.
    """


@hookspec(firstresult=True)
def lmport_weight_mapping(config: PretrainedConfig, model_class: type) -> WeightMap | None:
    """Give the rules between checkpoint tensor names/layouts and module names/layouts.

    The same rules run forward when loading and backward in ``save_pretrained``.

    Returns:
        A :class:`~lmport.weights.WeightMap`, or ``None`` to defer (the default
        implementation returns ``model_class.weight_map_for(config)``, which is
        ``model_class.weight_map`` unless the class overrides it). First result wins.
    """


@hookspec(firstresult=True)
def lmport_open_weights(folder: Path, options: LoadOptions) -> WeightSource | None:
    """Open the checkpoint's weights in ``folder`` as a lazy stream of tensors.

    Args:
        folder: the checkpoint folder.
        options: ``variant``, ``use_safetensors`` and the other load arguments.

    Returns:
        A :class:`~lmport.weights.WeightSource` that reads each tensor on demand,
        or ``None`` when this format has no files in ``folder``. First result wins.
        The builtin implementation (asked last) opens the most preferred format of
        ``lmport_weight_formats`` that has files in ``folder``: declare a format there
        rather than implement this hook, unless you take over opening entirely.
    """


@hookspec
def lmport_weight_formats() -> list[WeightFormat]:
    """Declare the weight formats this plugin reads, and maybe writes (all results are collected).

    Returns:
        A list of :class:`~lmport.formats.WeightFormat` instances, each with its file
        names (a single file and/or a shard index, variants applied by the format), a
        ``preference`` (higher wins when a folder holds several formats; the builtins:
        safetensors 200, PyTorch ``.bin`` 100), a reader (``open``) and, when
        ``writable``, a writer (``write``) that ``save_pretrained`` may choose. The
        builtin ``lmport_open_weights``, the hub source and the "no weight files" error
        all ask these formats. Not ``firstresult``.
    """


@hookspec(firstresult=True)
def lmport_gguf_architecture(name: str) -> GGUFArchitecture | None:
    """Say how GGUF files of llama.cpp architecture ``name`` load (their config keys and tensor names).

    Args:
        name: the file's ``general.architecture`` metadata (``"llama"``, ``"gpt2"``).

    Returns:
        A :class:`~lmport.gguf_spec.GGUFArchitecture` (plain data: metadata key -> ``config.json``
        key, GGUF tensor name -> checkpoint name, rows to un-permute, the ``model_type`` it
        builds), or ``None`` when this plugin does not read ``name``. An
        :class:`~lmport.Architecture` answers from its ``gguf=`` declarations. First result wins.
    """


@hookspec(firstresult=True)
def lmport_select_attention(
    requested: str | None,
    config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> AttentionKernel | None:
    """Choose the attention kernel for a model.

    Args:
        requested: the ``attn_implementation`` asked for (argument first, then
            ``config.json``), or ``None`` for "the best available".
        config: the parsed config.
        device: the device the model will run on.
        dtype: the dtype of its weights.

    Returns:
        An :class:`~lmport.attention.AttentionKernel`, or ``None`` when the plugin
        does not serve this request. An implementation that is asked for by name
        but cannot run here raises :class:`~lmport.errors.AttentionKernelError`
        instead of returning ``None``. First result wins.
    """


@hookspec(firstresult=True)
def lmport_quantizer(quantization_config: Any, config: PretrainedConfig, pre_quantized: bool) -> Quantizer | None:
    """Plan quantization applied while loading.

    Args:
        quantization_config: with ``pre_quantized`` false, the ``quantization_config``
            argument (weights are quantized as they stream in); with ``pre_quantized`` true,
            the checkpoint's own ``quantization_config`` from ``config.json`` (its weights are
            stored quantized). Normalised to :class:`~lmport.quantization.BitsAndBytesConfig`
            when it is bitsandbytes'; otherwise the argument's object, or a copy of
            ``config.json``'s dict (read its ``quant_method``).
        config: the parsed model config.
        pre_quantized: whether the checkpoint is stored quantized. An implementation
            that does not take this argument is asked too (pluggy passes only what it
            names), so a quantize-on-load plugin must check ``quantization_config``.

    Returns:
        A :class:`~lmport.quantization.Quantizer`, or ``None`` when this plugin does not
        serve ``quantization_config``. For ``pre_quantized`` loads it must be a
        :class:`~lmport.quantization.StoredQuantizer` whose ``pre_quantized`` is true
        (it loads the stored weights as they are); anything else is refused with
        :class:`~lmport.errors.UnsupportedQuantizationError`, as is a stored
        ``quantization_config`` no plugin serves: a checkpoint's quantization is never
        ignored. First result wins.
    """


@hookspec(firstresult=True)
def lmport_placement(device_map: Any, model: Any, dtype: torch.dtype, options: PlacementOptions) -> Placement | None:
    """Plan where each tensor lands for a ``device_map`` that is not a single device.

    Args:
        device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a
            module-name → device dict (devices: an index, ``"cpu"``, ``"cuda:N"``, ``"disk"``).
        model: the model, still on the meta device (sizes only).
        dtype: the dtype weights are loaded in.
        options: ``max_memory``, ``offload_folder``, ``offload_buffers``, whether quantized.

    Returns:
        A :class:`~lmport.placement.Placement`, or ``None`` to defer. First result wins.
    """


@hookspec
def lmport_attention_kernels() -> list[str]:
    """Name the attention kernels this plugin provides (all results are collected).

    Used to list the choices in error messages and in ``lmport plugins``.
    """
