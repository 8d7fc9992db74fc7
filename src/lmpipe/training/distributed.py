"""torch.distributed glue: process group from torchrun's environment, DDP or FSDP2 wrapping,
reductions.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) needs none of it; every helper is
then a no-op, so the Trainer has one code path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmpipe.training.hardware import Hardware
from lmpipe.training.sharding import is_sharded, shard


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size)


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def wrap_model(model: nn.Module, env: DistEnv, hardware: Hardware) -> nn.Module:
    """What the objective calls to train ``model``: compiled if asked, and over several
    ranks wrapped in DDP or, with ``strategy=fsdp``, sharded in place (FSDP2)."""
    if env.enabled and hardware.strategy == "fsdp":
        shard(model, hardware.autocast_dtype)
    trained = torch.compile(model) if hardware.compile else model
    if not env.enabled or is_sharded(model):
        return trained
    device_ids = [hardware.device.index] if hardware.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(trained, device_ids=device_ids)


@contextlib.contextmanager
def no_sync(model: nn.Module, skip_sync: bool):
    """Around a micro-batch's forward and backward: skip the gradient reduction (DDP's
    all-reduce, FSDP's reduce-scatter) on all but the last micro-batch of a step."""
    sharded = getattr(model, "_orig_mod", model)  # under torch.compile
    if not skip_sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(sharded):
        sharded.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            sharded.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(value: int, env: DistEnv, device: torch.device) -> int:
    if not env.enabled:
        return value
    return int(all_reduce_sum(torch.tensor(value, dtype=torch.int64, device=device), env))


def all_reduce_mean_grads(module: nn.Module, env: DistEnv) -> None:
    """Average a module's gradients over ranks (for modules outside the DDP wrapper)."""
    if not env.enabled:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= env.world_size


def broadcast_from_main(value, env: DistEnv):
    """Rank 0's ``value`` on every rank (e.g. the run directory rank 0 chose)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
