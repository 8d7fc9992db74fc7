"""Reward models: a scalar head on the LM's features, trained on preference pairs
(``stage=rm``), and a trained one as a reward for RL stages and labelling (``reward=rm``).

A sequence's score is ``head(features)`` at its last response token, where ``features``
are the LM's final hidden states of the clean sequence as its architecture reads them
(causal for AR, bidirectional for masked diffusion: the LM decides, the objective has no
arch branch). Sequences (each row's tokens up to its last response token) are scored
*packed*: several to a row, told apart by segment ids, so no padding is computed and no
architecture sees any -- a score is a function of the tokens alone, the same in any
batch. The head is ``Linear(d_model, 1, bias=False)``, as HF's
``...ForSequenceClassification.score``, so a reward model exports to one.

The loss is Bradley-Terry's on (chosen, rejected) pairs (Ouyang et al. 2022), with an
optional ``margin`` the chosen score must win by and Eisenstein et al.'s (2023)
``center_rewards_coefficient`` that keeps scores near zero (useful to PPO):

    -log sigmoid(r_c - r_r - margin) + center_rewards_coefficient * (r_c + r_r)^2

The head starts at zero (every score 0, loss ln 2), or from the starting checkpoint's head
when that is a reward model already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpipe.batch import Batch
from lmpipe.data.samplers import pack_best_fit
from lmpipe.errors import CheckpointError, ConfigError
from lmpipe.models import LM
from lmpipe.objectives.base import Metrics, Objective, ObjectiveContext, SavedCheckpoint
from lmpipe.objectives.rewards import Completion, Reward, RewardContext

HEAD = "reward_head"  # the module's name in a checkpoint's objective.safetensors


def scalar_head(d_model: int) -> nn.Linear:
    """A zero-initialised ``Linear(d_model, 1, bias=False)``."""
    head = nn.Linear(d_model, 1, bias=False)
    nn.init.zeros_(head.weight)
    return head


def response_end(loss_mask: Tensor) -> Tensor:
    """(B,) position of each row's last response token: the end of the first run of
    loss-mask ones (padding that an architecture trains on, e.g. diffusion's EOS padding,
    comes after a gap and does not count)."""
    on = loss_mask > 0
    started = on.cumsum(dim=1) > 0
    after = started & ~on  # past the first run
    length = loss_mask.shape[1]
    first_after = torch.where(after.any(dim=1), after.int().argmax(dim=1), length)
    return first_after - 1


def packed_scores(
    model: nn.Module, head: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int
) -> Tensor:
    """(N,) float scores of token sequences: packed by best fit into rows as long as the
    longest, one forward pass, the head at each sequence's last token."""
    device = head.weight.device
    lengths = [len(seq) for seq in sequences]
    rows = pack_best_fit(list(range(len(sequences))), lengths, max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    last = torch.zeros((2, len(sequences)), dtype=torch.long)  # (row, column) of each end
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            ids[r, at : at + lengths[i]] = torch.as_tensor(sequences[i])
            segments[r, at : at + lengths[i]] = s
            at += lengths[i]
            last[:, i] = torch.tensor([r, at - 1])
        segments[r, at:] = len(row)  # the row's padding: a segment of its own
    packed = Batch(input_ids=ids, loss_mask=torch.zeros(ids.shape), segment_ids=segments)
    features = model(packed.to(device), output="features")
    return head(features[last[0], last[1]]).squeeze(-1).float()


def response_sequences(batch: Batch, max_tokens: int) -> list[list[int]]:
    """Each row's tokens from its first real one (after ``left_pad``) to its last response
    token (the end of the first run of loss-mask ones), at most the last ``max_tokens``."""
    start = batch.left_pad.tolist() if batch.left_pad is not None else [0] * len(batch)
    ends = response_end(batch.loss_mask).tolist()
    return [
        row[max(first, end + 1 - max_tokens) : end + 1]
        for row, first, end in zip(batch.input_ids.tolist(), start, ends, strict=True)
    ]


def response_scores(
    model: nn.Module, head: nn.Module, batch: Batch, pad_id: int, max_tokens: int
) -> Tensor:
    """(B,) scores of a batch's rows (prompt + response, with the response's loss mask)."""
    return packed_scores(model, head, response_sequences(batch, max_tokens), pad_id)


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: float, center: float) -> Tensor:
    """Per-pair loss -log sigmoid(r_c - r_r - margin) + center * (r_c + r_r)^2."""
    return -F.logsigmoid(chosen - rejected - margin) + center * (chosen + rejected) ** 2


def load_reward_model(
    saved: SavedCheckpoint, tokenizer_hash: str | None, key: str
) -> tuple[LM, nn.Linear]:
    """A reward model's LM and head, frozen on the CPU. ``tokenizer_hash``: the tokenizer
    it must share (of the policy it scores); ``key``: the config key that named it."""
    if tokenizer_hash is not None and saved.meta.get("tokenizer_hash") != tokenizer_hash:
        raise CheckpointError(
            f"{key}={saved.path} has another tokenizer "
            f"({str(saved.meta.get('tokenizer_hash'))[:12]}) than the model it scores "
            f"({tokenizer_hash[:12]}): train the reward model from a checkpoint of the same "
            "tokenizer"
        )
    head = reward_head(saved)
    if head is None:
        raise CheckpointError(
            f"{key}={saved.path} has no reward head (it is a stage="
            f"{saved.meta.get('stage')} checkpoint; train a reward model with stage=rm)"
        )
    return saved.build_model().requires_grad_(False), head


def reward_head(saved: SavedCheckpoint) -> nn.Linear | None:
    """The checkpoint's reward head, frozen; None if it has none."""
    state = saved.module_states().get(HEAD)
    if state is None:
        return None
    head = scalar_head(state["weight"].shape[1])
    head.load_state_dict(state)
    return head.requires_grad_(False)


class RewardModel(Objective):
    """``stage=rm``: Bradley-Terry on preference pairs (rows: chosen, rejected)."""

    name = "rm"
    data_formats: ClassVar[frozenset[str]] = frozenset({"preference"})
    sampler_kinds: ClassVar[frozenset[str]] = frozenset({"episodes"})
    shardable: ClassVar[bool] = False  # trains a reward head besides the model

    def __init__(self, margin: float, center_rewards_coefficient: float | None):
        center = center_rewards_coefficient or 0.0
        for key, value in (("margin", margin), ("center_rewards_coefficient", center)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"objective.{key}={value!r} must be a number >= 0")
        self.margin = float(margin)
        self.center = float(center)

    def setup(self, ctx: ObjectiveContext) -> None:
        super().setup(ctx)
        self.head = scalar_head(ctx.model.config.d_model)
        states = ctx.starting_modules() if ctx.starting_modules is not None else {}
        if HEAD in states:  # continue training a reward model
            self.head.load_state_dict(states[HEAD])
        self.pad_id = ctx.tokenizer.pad_id
        self.max_tokens = ctx.model.config.block_size

    def modules(self) -> dict[str, nn.Module]:
        return {HEAD: self.head}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Metrics]:
        scores = response_scores(model, self.head, batch, self.pad_id, self.max_tokens)
        chosen, rejected = scores[0::2], scores[1::2]
        loss = bradley_terry(chosen, rejected, self.margin, self.center).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {
            "loss": loss.detach(),
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "chosen": chosen.mean(),
            "rejected": rejected.mean(),
            "weight": torch.tensor(float(len(chosen))),
        }


class LearnedReward(Reward):
    """``reward=rm``: the score of a reward-model checkpoint (``checkpoint``: a ``stage=rm``
    run or checkpoint, trained with the policy's tokenizer)."""

    name = "rm"

    def __init__(self, checkpoint: str | None, weight: float = 1.0):
        super().__init__(weight)
        if not checkpoint:
            raise ConfigError(
                "reward.rm.checkpoint is not set: pass reward.rm.checkpoint=<a stage=rm run "
                "or checkpoint>"
            )
        self.checkpoint = str(checkpoint)
        self.model: LM | None = None
        self.loaded_for: tuple[str, torch.device] | None = None

    def setup(self, ctx: RewardContext) -> None:
        if self.loaded_for == (ctx.tokenizer.hash, ctx.device):
            return
        saved = ctx.open_checkpoint(self.checkpoint)
        model, self.head = load_reward_model(saved, ctx.tokenizer.hash, "reward.rm.checkpoint")
        self.model = model.to(ctx.device)
        self.head.to(ctx.device)
        self.ctx = ctx
        self.loaded_for = (ctx.tokenizer.hash, ctx.device)

    @torch.no_grad()
    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        if self.model is None:
            raise RuntimeError("LearnedReward.setup was not called")
        ctx, block = self.ctx, self.model.config.block_size
        scores: list[float] = []
        for at in range(0, len(completions), ctx.batch_size):
            rows = [(c.prompt_ids + c.ids)[-block:] for c in completions[at : at + ctx.batch_size]]
            with ctx.autocast():
                found = packed_scores(self.model, self.head, rows, ctx.tokenizer.pad_id)
            scores += found.cpu().tolist()
        return scores
