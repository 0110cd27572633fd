"""Training memory of a model without running a step: weights, gradients, AdamW state, activations, peak.

The model is built from its config with fake tensors (shapes and dtypes, no storage), and one
training step (forward with labels, backward) runs on them while a dispatch mode records
every tensor storage created and freed. What it reports is therefore what this version of
torch and lmport would allocate for real, for the chosen batch, sequence length, dtype,
gradient checkpointing, LoRA and 4-bit settings; nothing is loaded and nothing is computed.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import ArgumentError

#: bitsandbytes' 4-bit layout: two values a byte, one fp32 absmax per block of this many values.
BNB_4BIT_BLOCK = 64


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's memory (AdamW, as torch allocates it on ``device``).

    Attributes:
        scenario: a short description of the settings.
        weights: parameters and buffers (tied ones once; 4-bit weights packed).
        gradients: one gradient per trainable parameter.
        optimizer: AdamW's two moments per trainable parameter.
        activations: tensors kept from the forward pass for the backward pass (peak, at its end).
        peak: the most held at once during the step: weights, optimizer state, and the largest of
            the forward/backward working set and the optimizer update (gradients plus its temporaries).
    """

    scenario: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of storages created under it and still alive; keeps their peak."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in known}
        self._keep = [t.untyped_storage() for t in known]  # their ids stay theirs while we count
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, bytes)
        self.serial = 0
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: Any) -> None:
        key = id(storage)
        if key in self.known or key in self.live:
            return
        size = storage.nbytes()
        self.serial += 1
        self.live[key] = (self.serial, size)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, (0, 0))[1]

    def serials(self, storages: list[Any] | None = None) -> dict[int, int]:
        """``{serial: bytes}`` of the live storages (of ``storages`` only, when given)."""
        keys = self.live if storages is None else [id(s) for s in storages if id(s) in self.live]
        return dict(self.live[k] for k in keys)


class _Dequantize(torch.autograd.Function):
    """``x @ W.T`` where ``W`` is materialised from 4-bit storage in each pass and never kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = (out_features, x.shape[-1])
        weight = x.new_empty(ctx.shape)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        weight = grad.new_empty(ctx.shape)
        return grad @ weight, None, None


class _Linear4bit(nn.Module):
    """Stands for a bitsandbytes ``Linear4bit``: packed weight and absmax, dequantized on the fly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        numel = linear.in_features * linear.out_features
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.empty((numel + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(-(-numel // BNB_4BIT_BLOCK), dtype=torch.float32))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Dequantize.apply(x, self.packed, self.out_features)
        return out + self.bias if self.bias is not None else out


class _LoraLinear(nn.Module):
    """Stands for peft's LoRA ``Linear`` (dropout 0): ``base(x) + B(A(x)) * scaling``."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * 2.0


def _replace_linears(model: nn.Module, make: Any) -> None:
    """Swap every linear layer (plain or 4-bit) but the output head for ``make(layer)``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, _Linear4bit) and m is not head]
    for name, linear in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, make(linear))


def _unique(tensors: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def scenario_name(gradient_checkpointing: bool, lora_r: int, load_in_4bit: bool) -> str:
    """``"full"``, ``"LoRA r=16"``, ``"4-bit LoRA r=16"``..., with ``" + checkpointing"``."""
    name = ("4-bit " if load_in_4bit else "") + (f"LoRA r={lora_r}" if lora_r else "full" if not load_in_4bit else "")
    return name.strip() + (" + checkpointing" if gradient_checkpointing else "")


def estimate_memory(
    model_class: type[nn.Module],
    config: Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    lora_r: int = 0,
    load_in_4bit: bool = False,
    chunked_loss: bool = True,
    foreach_optimizer: bool = False,
) -> MemoryEstimate:
    """One training step's memory for ``model_class(config)`` on ``batch_size`` rows of ``seq_len`` tokens.

    Args:
        dtype: the parameters' dtype (and, with ``load_in_4bit``, the compute dtype).
        gradient_checkpointing: recompute every decoder layer in backward.
        lora_r: LoRA adapters of this rank on every linear layer but the head (peft's ``"all-linear"``,
            dropout 0), the rest frozen; 0 trains every parameter.
        load_in_4bit: every linear layer but the head stored as bitsandbytes 4-bit (frozen).
        chunked_loss: lmport's default loss without full logits (``False``: the plain path).
        foreach_optimizer: AdamW's multi-tensor update (torch's default on CUDA) rather than the
            per-parameter one (its default on CPU); it holds a temporary as large as all trainable
            parameters instead of twice the largest one.

    Raises:
        ArgumentError: a batch size, sequence length or rank below what makes sense.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("lora_r", lora_r, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ArgumentError(f"estimate_memory: {name} must be an int >= {least}, got {value!r}")
    device = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters made in their final dtype (no conversion of fakes)
        try:
            model: Any = model_class(config)  # initialisers run on fake tensors: nothing is computed
            model.init_buffers(device)
        finally:
            torch.set_default_dtype(previous)
        model.tie_weights()
        if load_in_4bit:
            _replace_linears(model, _Linear4bit)
        if lora_r or load_in_4bit:
            for p in model.parameters():
                p.requires_grad_(False)
        if lora_r:
            _replace_linears(model, lambda m: _LoraLinear(m, m.in_features, m.out_features, lora_r, dtype))
            for m in model.modules():
                if isinstance(m, _LoraLinear):
                    m.lora_A.requires_grad_(True)
                    m.lora_B.requires_grad_(True)
        if load_in_4bit and not lora_r:
            for p in model.parameters():
                p.requires_grad_(True)  # what 4-bit leaves trainable: embeddings, norms, the head
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model.chunked_loss = chunked_loss
        params = _unique(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        state = _unique([*params, *model.buffers()])
        weights = _nbytes(state)
        gradients = _nbytes(trainable)
        optimizer = 2 * gradients
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        tracker = _LiveStorages(state)
        with tracker:
            loss = model(input_ids=ids, labels=ids).loss
            at_forward_end = tracker.current
            forward_live = tracker.serials()
            loss.backward()
            grads = tracker.serials([p.grad.untyped_storage() for p in trainable if p.grad is not None])
            from_forward = sum(size for serial, size in grads.items() if serial in forward_live)
            del loss
    activations = at_forward_end - from_forward  # gradients made in forward (the chunked head) are gradients
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    update = gradients + (gradients if foreach_optimizer else 2 * largest)
    peak = weights + optimizer + max(tracker.peak, update)
    return MemoryEstimate(
        scenario=scenario_name(gradient_checkpointing, lora_r, load_in_4bit),
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        peak=peak,
    )


def estimate_scenarios(
    model_class: type[nn.Module],
    config: Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    lora_r: int = 16,
    chunked_loss: bool = True,
    foreach_optimizer: bool = False,
) -> list[MemoryEstimate]:
    """:func:`estimate_memory` for full fine-tuning, LoRA and 4-bit LoRA, each without and with checkpointing."""
    rows = []
    for r, four_bit in ((0, False), (lora_r, False), (lora_r, True)):
        for checkpointing in (False, True):
            rows.append(
                estimate_memory(
                    model_class, config, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                    gradient_checkpointing=checkpointing, lora_r=r, load_in_4bit=four_bit,
                    chunked_loss=chunked_loss, foreach_optimizer=foreach_optimizer,
                )
            )  # fmt: skip
    return rows


def estimate_checkpoint(
    name_or_path: str | Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype | str | None = None,
    lora_r: int = 16,
    chunked_loss: bool = True,
    foreach_optimizer: bool = False,
    **source: Any,
) -> list[MemoryEstimate]:
    """:func:`estimate_scenarios` for a checkpoint (a folder or hub id; only its ``config.json`` is read).

    ``dtype``: a ``torch.dtype``, ``"float32"``/``"bfloat16"``/``"float16"``, ``"auto"`` (the config's
    ``dtype``) or ``None`` (fp32, ``from_pretrained``'s default). ``source``: ``AutoConfig.from_pretrained``'s
    source arguments (``revision``, ``cache_dir``, ``subfolder``...).
    """
    from .auto import AutoConfig
    from .hooks import model_class_for

    config = AutoConfig.from_pretrained(name_or_path, **source)
    resolved = resolve_dtype(dtype, config)
    model_class = model_class_for(config)  # the architecture loaded first; an error names what is missing
    return estimate_scenarios(
        model_class, config, batch_size=batch_size, seq_len=seq_len, dtype=resolved, lora_r=lora_r,
        chunked_loss=chunked_loss, foreach_optimizer=foreach_optimizer,
    )  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None, config: Any = None) -> torch.dtype:
    """A ``torch.dtype`` from a dtype, its name, ``"auto"`` (``config``'s ``dtype``, else fp32) or ``None`` (fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or "float32"
        if isinstance(dtype, torch.dtype):
            return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype is None:
        return torch.float32
    if dtype not in names:
        raise ArgumentError(f"dtype must be one of {sorted(names)}, 'auto' or a torch.dtype, got {dtype!r}")
    return names[dtype]


def human_bytes(n: int) -> str:
    """``n`` bytes in MiB under a GiB, else GiB, two decimals."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(rows: list[MemoryEstimate]) -> str:
    """The estimates as an aligned text table, one scenario a line."""
    header = ["scenario", "weights", "gradients", "AdamW", "activations", "peak"]
    cells = [[r.scenario] + [human_bytes(v) for v in (r.weights, r.gradients, r.optimizer, r.activations, r.peak)] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in [header, *cells]]
    return "\n".join(lines)
