"""LoRA: low-rank adapters on the linear layers of a model's transformer blocks.

``add_lora`` freezes every weight of the model and wraps each chosen ``nn.Linear`` in a
``LoRALinear``, which adds ``scale * B(A(dropout(x)))`` (``scale = alpha / r``) to the
frozen layer's output. B starts at zero, so the adapted model computes exactly what the
base model does until it trains. ``merged`` swaps each wrapper for a plain ``nn.Linear``
holding ``W + scale * B @ A``: the model as the architecture's own state dict, which is what
a checkpoint's ``model.safetensors`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpipe.errors import ConfigError

ADAPTER_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=weight.dtype))
        # nn.Linear's own init for A (as in the LoRA paper's code); B = 0 makes the update 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.to(weight.device)

    def forward(self, x: Tensor) -> Tensor:
        low_rank = F.linear(self.dropout(x), self.lora_A) * self.scale  # scaled at rank r: cheap
        return self.base(x) + F.linear(low_rank, self.lora_B)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's function (the adapter folded in)."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            linear.weight.copy_(base.weight.float() + delta)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.to(base.weight).requires_grad_(False)


def linear_names(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules of the model's transformer blocks, by dotted name."""
    blocks = model.backbone.blocks
    return [f"backbone.blocks.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, pattern: str) -> bool:
    """A pattern names a layer by its own name (``qkv``) or a glob of its path inside the
    blocks (``0.attn.*``, ``*.mlp.down``)."""
    inside = name.removeprefix("backbone.blocks.")
    return fnmatch(name.rpartition(".")[2], pattern) or fnmatch(inside, pattern)


def add_lora(
    model: nn.Module, *, r, alpha: float, dropout: float, target_modules: list[str], seed: int
) -> list[str]:
    """Freeze ``model`` and adapt the block linears ``target_modules`` names, in place;
    returns the adapted layers' names. A pattern that names no layer is an error."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"finetune.r={r!r} must be an integer >= 1 (the adapters' rank)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"finetune.dropout={dropout!r} must be in [0, 1)")
    names = linear_names(model)
    if not target_modules:
        raise ConfigError("finetune.target_modules is empty: name the linear layers to adapt")
    for pattern in target_modules:
        if not any(_matches(name, str(pattern)) for name in names):
            short = sorted({name.rpartition(".")[2] for name in names})
            raise ConfigError(
                f"finetune.target_modules: {pattern!r} matches no linear layer of the model's "
                f"blocks (available: {', '.join(short)}; or a glob of a path like 0.attn.qkv)"
            )
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    chosen = [n for n in names if any(_matches(n, str(p)) for p in target_modules)]
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout, generator))
    return chosen


def _layers(model: nn.Module) -> Iterator[tuple[nn.Module, str, LoRALinear]]:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            yield model.get_submodule(parent_name), attr, module


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights by parameter name (empty for a model without adapters)."""
    return {
        name: param.detach()
        for name, param in model.named_parameters()
        if name.rpartition(".")[2] in ADAPTER_PARAMS
    }


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every ``LoRALinear`` swapped for its merged ``nn.Linear`` (its state
    dict is the architecture's own); the adapters are put back on exit."""
    swapped = [(parent, attr, layer) for parent, attr, layer in _layers(model)]
    for parent, attr, layer in swapped:
        setattr(parent, attr, layer.merged())
    try:
        yield model
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)
