"""FSDP2 (``hardware.strategy=fsdp``): parameters, gradients and optimizer state sharded
over the ranks, one all-gather per transformer block.

Checkpoints stay ordinary: the full weights and optimizer state are gathered for rank 0
on save, in the layout ``optimizer.state_dict()`` of an unsharded model has, so that a
checkpoint resumes on any number of ranks with or without sharding, and evaluation and
export read it unchanged. A model is loaded whole before it is sharded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lmpipe.models.transformer import Block

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """Shard ``model`` in place, each transformer block its own unit and the rest (the
    embeddings, the tied head) the root's; ``param_dtype``: compute in it (bf16),
    reduce gradients in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(value: Tensor) -> Tensor:
    """A sharded model's reduced value (e.g. the gradient norm) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The full weights (on rank 0, on the CPU; empty elsewhere) of a sharded model, or
    the state dict of another. Every rank calls it. Tied weights stay one tensor."""
    if not is_sharded(model):
        return model.state_dict()
    state = get_model_state_dict(model, options=_GATHER)
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied_to = first_name.setdefault(id(param), name)
        if state and tied_to != name:
            state[name] = state[tied_to]
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``; of a sharded model's optimizer: the full state (rank 0;
    empty elsewhere) with parameters numbered as an unsharded optimizer numbers them."""
    if not is_sharded(model):
        return optimizer.state_dict()
    state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not state:
        return {}
    index = _param_index(state["param_groups"])
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of ``optimizer_state`` (every rank passes the full state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = {id(param): name for name, param in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    name_of = {i: name for name, i in _param_index([{"params": g} for g in groups]).items()}
    by_name = {
        "state": {name_of[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": fqns}
            for group, fqns in zip(state["param_groups"], groups, strict=True)
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )


def _param_index(groups: list[dict]) -> dict[str, int]:
    """Parameter name -> its number in ``optimizer.state_dict()`` (in group order)."""
    names = [name for group in groups for name in group["params"]]
    return {name: i for i, name in enumerate(names)}
