"""Rollouts for RL objectives: sample completions of prompts and lay them out for training.

``sample`` generates from the bare LM (``unwrap``: no DDP or ``torch.compile`` wrapper) with
dropout off, at the temperature the training log-probs use, for left-padded prompts of
different lengths; a completion ends at its first stop token (the chat template's turn
end, or EOS). The result is a ``Rollout`` batch: rows ``[padding | prompt | completion]``
whose loss mask covers each completion up to and including its stop token, and whose
``left_pad`` the model reads exactly as it did while sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmpipe.batch import Batch, PromptBatch
from lmpipe.models import LM
from lmpipe.objectives.rewards import Completion


@dataclass
class Rollout(Batch):
    """Completions of prompts, ready to train on (all tensors row-aligned, (N,) or (N, L))."""

    advantages: Tensor | None = None  # (N,) one per completion (GRPO) or (N, L) per token (PPO)
    token_weights: Tensor | None = None  # (N,) a row's loss = sum over its tokens * weight
    old_logps: Tensor | None = None  # (N, L) log-probs of the policy that sampled
    ref_token_logps: Tensor | None = None  # (N, L) log-probs of the frozen reference
    old_values: Tensor | None = None  # (N, L) a value head's estimates at sampling time
    returns: Tensor | None = None  # (N, L) the value head's targets


@dataclass
class Sampled:
    """A rollout batch and what the rewards need to know of each completion."""

    batch: Rollout
    completions: list[Completion]

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([float(c.tokens) for c in self.completions])

    @property
    def truncated(self) -> Tensor:
        return torch.tensor([c.truncated for c in self.completions])


@torch.no_grad()
def sample(
    model: LM,
    prompts: PromptBatch,
    *,
    copies: int,
    max_tokens: int,
    temperature: float,
    stop_ids: Sequence[int],
    decode,
    device: torch.device,
) -> Sampled:
    """``copies`` completions of every prompt (consecutive rows), at most ``max_tokens``
    each, sampled at ``temperature`` (0: greedy) from the global RNG (seeded by the step)."""
    ids = prompts.input_ids.repeat_interleave(copies, dim=0)
    left_pad = prompts.left_pad.repeat_interleave(copies, dim=0)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            ids.to(device),
            max_tokens,
            temperature=temperature,
            eos_id=stop_ids[0],
            left_pad=left_pad.to(device),
        ).cpu()
    finally:
        model.train(was_training)
    width = ids.shape[1]
    new = out[:, width:]
    stops = torch.isin(new, torch.tensor(list(stop_ids)))
    stopped = stops.any(dim=1)
    first = torch.where(stopped, stops.int().argmax(dim=1), new.shape[1])
    position = torch.arange(new.shape[1])[None]
    kept = position <= first[:, None]  # the completion and its stop token
    new = new.masked_fill(~kept, stop_ids[0])
    references = [r for r in prompts.references for _ in range(copies)]
    completions = []
    for row in range(len(new)):
        end = int(first[row])
        tokens = int(kept[row].sum())
        completions.append(
            Completion(
                text=decode(new[row, :end].tolist()),
                tokens=tokens,
                truncated=not bool(stopped[row]),
                max_tokens=max_tokens,
                reference=references[row],
                prompt_ids=tuple(ids[row, int(left_pad[row]) :].tolist()),
                ids=tuple(new[row, :tokens].tolist()),
            )
        )
    loss_mask = torch.cat([torch.zeros(ids.shape), kept.float()], dim=1)
    batch = Rollout(
        input_ids=torch.cat([ids, new], dim=1),
        loss_mask=loss_mask,
        left_pad=left_pad,
        rows_per_example=copies,
        real_tokens=int((ids.shape[1] - left_pad).sum() + kept.sum()),
    )
    return Sampled(batch, completions)
