"""Optimizers (``conf/optim``). AdamW decays matrix weights only: never norms, biases or
embeddings. Muon takes the 2-D matrices inside the transformer blocks and AdamW the rest;
the two step as one ``OptimizerChain``."""

from __future__ import annotations

import torch
from torch import nn

from lmpipe.errors import ConfigError
from lmpipe.models.transformer import Block

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float, skip: frozenset[int] = frozenset()):
    """AdamW's groups: decayed matrices, then everything else (parameters whose id is in
    ``skip`` belong to another optimizer)."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():  # unique parameters: tied weights appear once
        if not param.requires_grad or id(param) in skip:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adamw(params: list, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    betas = tuple(float(b) for b in cfg["betas"])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    return torch.optim.AdamW(
        params,
        lr=float(cfg["lr"]),
        betas=betas,
        eps=float(cfg["eps"]),
        fused=device.type in ("cuda", "cpu"),
    )


def _muon(params: list[nn.Parameter], cfg: dict, lr: float) -> torch.optim.Muon:
    muon_lr = float(cfg["lr"])
    if not muon_lr > 0:
        raise ConfigError(f"optim.muon.lr={cfg['lr']!r} must be > 0")
    optimizer = torch.optim.Muon(
        params,
        lr=muon_lr,
        weight_decay=float(cfg["weight_decay"]),
        momentum=float(cfg["momentum"]),
        nesterov=bool(cfg["nesterov"]),
        ns_steps=int(cfg["ns_steps"]),
        adjust_lr_fn=cfg["adjust_lr_fn"],
    )
    for group in optimizer.param_groups:  # the schedule gives AdamW's LR; Muon's is a multiple
        group["lr_scale"] = muon_lr / lr
    return optimizer


def describe_optimizer(cfg) -> str:
    """The plan line's optimizer: which one, at which peak LR(s)."""
    if cfg["name"] == "muon":
        return f"muon lr {cfg['muon']['lr']:g} (block matrices) + adamw lr {cfg['lr']:g} (the rest)"
    return f"{cfg['name']} lr {cfg['lr']:g}"


class OptimizerChain:
    """Optimizers that step as one: one list of param groups (the schedule sets each
    group's ``lr``), one state dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chain": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["chain"], strict=True):
            optimizer.load_state_dict(saved)


def build_optimizer(model: nn.Module, cfg: dict, device: torch.device):
    """The ``optim`` keys of a composed config (``conf/optim/<name>.yaml``)."""
    name = cfg["name"]
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    weight_decay = float(cfg["weight_decay"])
    if name == "adamw":
        return _adamw(param_groups(model, weight_decay), cfg, device)
    hidden = [
        p
        for m in model.modules()
        if isinstance(m, Block)
        for p in m.parameters()
        if p.ndim == 2 and p.requires_grad
    ]
    return OptimizerChain(
        _muon(hidden, cfg["muon"], float(cfg["lr"])),
        _adamw(param_groups(model, weight_decay, frozenset(map(id, hidden))), cfg, device),
    )
