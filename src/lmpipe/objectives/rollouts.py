"""Rollouts for RL objectives: sample completions of prompts and lay them out for training.

``sample`` generates from the bare LM (``unwrap``: no DDP or ``torch.compile`` wrapper) with
dropout off, at the temperature the training log-probs use, for left-padded prompts of
different lengths; a completion ends at its first stop token (the chat template's turn
end, or EOS). ``Sampled.batch`` then lays the sequences out for the update: packed
several per row (best-fit decreasing, kept apart by segment ids, positions restarting in
each, as SFT packing), so that an update costs what the real tokens do rather than
rows x the longest (most completions stop well before the longest). A sequence is its
prompt and its completion up to the stop token for a causal model (what follows can
change nothing before it); a bidirectional model keeps the whole generated block, as it
saw it while sampling. Values per token (advantages, log-probs) come along with their
tokens. ``Sampled.rows`` is the plain layout instead, one left-padded row per completion,
for what runs along a completion's tokens (PPO's GAE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmpipe.batch import Batch, PromptBatch
from lmpipe.data.samplers import pack_best_fit
from lmpipe.models import LM
from lmpipe.objectives.rewards import Completion


@dataclass
class Rollout(Batch):
    """Sampled sequences ready to train on; every extra field is per token (rows, width)."""

    advantages: Tensor | None = None
    token_weights: Tensor | None = None  # the update's loss = sum(token loss x weight) / rows
    old_logps: Tensor | None = None  # log-probs of the policy that sampled
    ref_token_logps: Tensor | None = None  # log-probs of the frozen reference
    old_values: Tensor | None = None  # a value head's estimates at sampling time
    returns: Tensor | None = None  # the value head's targets


@dataclass
class Sampled:
    """Completions of prompts: what the rewards read, and the token layout to train on."""

    completions: list[Completion]
    ids: Tensor  # (N, L) left-padded prompt + completion, padded after the stop
    loss_mask: Tensor  # (N, L) 1 on each completion up to and including its stop token
    left_pad: Tensor  # (N,)
    sequence_lengths: Tensor  # (N,) prompt + what the model reads of the completion
    pad_id: int

    @property
    def lengths(self) -> Tensor:
        """(N,) float tokens of each completion, its stop token included."""
        return torch.tensor([float(c.tokens) for c in self.completions])

    @property
    def truncated(self) -> Tensor:
        return torch.tensor([c.truncated for c in self.completions])

    def batch(self, capacity: int, loss_mask: Tensor, **per_token: Tensor) -> Rollout:
        """The sequences packed into rows of ``capacity`` tokens, with ``loss_mask`` and
        the ``per_token`` fields, (N, L) each, moved along. ``token_weights`` are given
        per update (the loss is their weighted sum) and are scaled here by the number of
        packed rows, since the Trainer averages row losses."""
        n, width = self.ids.shape
        rows = pack_best_fit(list(range(n)), self.sequence_lengths.tolist(), capacity)
        source = torch.full((len(rows), capacity), -1, dtype=torch.long)
        segments = torch.zeros((len(rows), capacity), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for s, i in enumerate(members):
                length = int(self.sequence_lengths[i])
                start = i * width + int(self.left_pad[i])
                source[r, at : at + length] = torch.arange(start, start + length)
                segments[r, at : at + length] = s
                at += length
            segments[r, at:] = len(members)  # padding is a segment of its own
        real = source >= 0

        def packed(values: Tensor, fill) -> Tensor:
            flat = values.reshape(-1)[source.clamp(min=0)]
            return flat.masked_fill(~real, fill)

        fields = {name: packed(value, 0) for name, value in per_token.items()}
        if "token_weights" in fields:
            fields["token_weights"] = fields["token_weights"] * len(rows)
        return Rollout(
            input_ids=packed(self.ids, self.pad_id),
            loss_mask=packed(loss_mask, 0.0),
            segment_ids=segments,
            real_tokens=int(self.sequence_lengths.sum()),
            **fields,
        )

    def rows(self) -> Rollout:
        """One left-padded row per completion, ``[padding | prompt | completion]``."""
        return Rollout(
            input_ids=self.ids,
            loss_mask=self.loss_mask,
            left_pad=self.left_pad,
            real_tokens=int(self.sequence_lengths.sum()),
        )


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
    pad_id: int,
) -> Sampled:
    """``copies`` completions of every prompt (consecutive rows), at most ``max_tokens``
    each, sampled at ``temperature`` (0: greedy) from the global RNG (seeded by the step)."""
    ids = prompts.input_ids.repeat_interleave(copies, dim=0)
    left_pad = prompts.left_pad.repeat_interleave(copies, dim=0)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            prompts.input_ids.to(device),
            max_tokens,
            temperature=temperature,
            eos_id=stop_ids[0],
            left_pad=prompts.left_pad.to(device),
            copies=copies,
        ).cpu()
    finally:
        model.train(was_training)
    width = ids.shape[1]
    new = out[:, width:]
    stops = torch.isin(new, torch.tensor(list(stop_ids)))
    stopped = stops.any(dim=1)
    first = torch.where(stopped, stops.int().argmax(dim=1), new.shape[1])
    kept = torch.arange(new.shape[1])[None] <= first[:, None]  # up to and with the stop
    if model.causal:
        new = new.masked_fill(~kept, pad_id)
    references = [r for r in prompts.references for _ in range(copies)]
    completions = [
        Completion(
            text=decode(new[row, : int(first[row])].tolist()),
            tokens=int(kept[row].sum()),
            truncated=not bool(stopped[row]),
            max_tokens=max_tokens,
            reference=references[row],
            prompt_ids=tuple(ids[row, int(left_pad[row]) :].tolist()),
            ids=tuple(new[row, : int(kept[row].sum())].tolist()),
        )
        for row in range(len(new))
    ]
    read = kept.sum(dim=1) if model.causal else torch.full_like(first, new.shape[1])
    return Sampled(
        completions=completions,
        ids=torch.cat([ids, new], dim=1),
        loss_mask=torch.cat([torch.zeros(ids.shape), kept.float()], dim=1),
        left_pad=left_pad,
        sequence_lengths=width - left_pad + read,
        pad_id=pad_id,
    )
