"""The unit of data that flows from samplers through objectives into models."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """Rows of token ids with a per-token loss mask.

    ``loss_mask[b, t] == 1`` means token ``t`` of row ``b`` is a training target. The
    meaning is the same for every architecture: an AR model predicts it from the tokens
    before it, a diffusion model denoises it. Subclasses add fields (all row-aligned
    tensors are moved and split together).
    """

    input_ids: Tensor  # (B, L) int64
    loss_mask: Tensor  # (B, L) float32 0/1
    # Packing: which episode of its row each token belongs to (B, L) int64. Tokens attend
    # only within their segment and positions restart at each segment. None: one per row.
    segment_ids: Tensor | None = None
    # Rows of different lengths: padding tokens at the start of each row (B,) int64,
    # never attended to; positions count from each row's first real token.
    left_pad: Tensor | None = None
    # Per-row seeds of an architecture's noise (B,) int64 (diffusion masks): a row's noise
    # is then the same whichever micro-batch it lands in. None: the generator's stream.
    noise_seeds: Tensor | None = None
    # DPO: precomputed reference sequence log-probs, one per row (B,).
    ref_logps: Tensor | None = None
    # Rows that form one example and must stay together (2 for a chosen/rejected pair).
    rows_per_example: int = 1
    # Tokens that are not padding (throughput counts these); None: every token.
    real_tokens: int | None = None
    # Which episodes the whole step (all ranks) holds, for the run's episode log.
    episode_ids: list[int] | None = None
    # This rank's examples, in row order (for values kept per example, e.g. DPO's
    # precomputed reference). Like ``episode_ids`` it is not split into micro-batches.
    example_ids: list[int] | None = None
    # How the batch was made (an RL objective's rollout rewards and lengths): logged with
    # the step's metrics.
    metrics: dict[str, float] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        values = {}
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            values[name] = fn(value) if isinstance(value, Tensor) else value
        return type(self)(**values)

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    @property
    def num_examples(self) -> int:
        return len(self) // self.rows_per_example

    def split(self, examples: int) -> list[Batch]:
        """Micro-batches of at most ``examples`` examples (gradient accumulation)."""
        rows = examples * self.rows_per_example
        return [self._map(lambda t, s=s: t[s : s + rows]) for s in range(0, len(self), rows)]

    def with_fields(self, **changes) -> Batch:
        return dataclasses.replace(self, **changes)


@dataclass
class PromptBatch(Batch):
    """Prompts to complete (RL stages): left-padded ids (``left_pad``), nothing to train on
    yet, and each prompt's reference (a verifiable answer) or None."""

    references: list[str | None] = field(default_factory=list)


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths -> (B, longest) int64 ids padded on the left with
    ``pad_id``, and the (B,) padding counts (``Batch.left_pad``)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
    return ids, torch.tensor([width - len(row) for row in rows], dtype=torch.int64)
