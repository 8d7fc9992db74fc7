"""Samplers turn token shards into batches.

A sampler's batch for step ``k`` is a pure function of ``(seed, k, rank)``: the step *is*
the sampler position, so a resumed run continues with exactly the next batch on any
number of ranks without saving per-rank state.
"""

from __future__ import annotations

import numpy as np
import torch

from lmpipe.batch import Batch
from lmpipe.data.shards import TokenShards
from lmpipe.errors import DataError
from lmpipe.seeding import derive_seed


def _rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


class WindowSampler:
    """Fixed-length windows at random offsets of a token stream (pretraining)."""

    def __init__(
        self,
        shards: TokenShards,
        row_length: int,
        rows: int,
        seed: int,
        rank: int = 0,
        split: str = "train",
    ):
        if len(shards) < row_length:
            raise DataError(
                f"the {split} split has {len(shards)} tokens, fewer than one row of "
                f"{row_length} (trainer.block_size is too large for this data)"
            )
        self.shards = shards
        self.row_length = row_length
        self.rows = rows
        self.seed = seed
        self.rank = rank

    def batch(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, "windows", step, self.rank)
        )
        high = len(self.shards) - self.row_length + 1
        starts = torch.randint(high, (self.rows,), generator=generator).numpy()
        ids = _rows(self.shards.tokens, starts, self.row_length)
        return Batch(input_ids=ids, loss_mask=torch.ones_like(ids, dtype=torch.float32))


def eval_windows(
    shards: TokenShards,
    row_length: int,
    stride: int,
    rows: int,
    max_batches: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "val",
) -> list[Batch]:
    """Deterministic evaluation batches: windows every ``stride`` tokens from the start of
    the split (stride = context length, so each token is scored once), up to
    ``max_batches * rows`` of them, divided among ranks. The same set at every eval."""
    if len(shards) < row_length:
        raise DataError(
            f"the {split} split has {len(shards)} tokens, fewer than one row of {row_length}"
        )
    count = min(max_batches * rows * world_size, (len(shards) - row_length) // stride + 1)
    starts = (np.arange(count) * stride)[rank::world_size]
    batches = []
    for i in range(0, len(starts), rows):
        ids = _rows(shards.tokens, starts[i : i + rows], row_length)
        batches.append(Batch(input_ids=ids, loss_mask=torch.ones_like(ids, dtype=torch.float32)))
    return batches
