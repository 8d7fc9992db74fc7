"""Optimizers. AdamW decays matrix weights only: never norms, biases or embeddings."""

from __future__ import annotations

import torch
from torch import nn

from lmpipe.errors import ConfigError

OPTIMIZERS = ("adamw",)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():  # unique parameters: tied weights appear once
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    """The ``optim`` keys of a composed config (defaults: ``conf/train.yaml``)."""
    name = cfg["name"]
    if name != "adamw":
        raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    betas = tuple(float(b) for b in cfg["betas"])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    return torch.optim.AdamW(
        param_groups(model, float(cfg["weight_decay"])),
        lr=float(cfg["lr"]),
        betas=betas,
        eps=float(cfg["eps"]),
        fused=device.type in ("cuda", "cpu"),
    )
