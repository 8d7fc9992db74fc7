"""Rewards for RL stages: small classes with one method, composed with weights.

A reward scores completed replies, one float each. ``conf/reward/<name>.yaml`` makes one
available by name (``reward=[answer_match,format]``); the stage's total reward is the
weighted sum, and each one is logged as ``rewards/<name>``. A reward that needs more than
the reply's text (a reward model: weights, a device, the tokenizer) gets them in
``setup(RewardContext)`` before it first scores.

- ``AnswerMatch``: 1 if the reply's final answer equals the prompt's answer (extracted as
  the evaluator does: GSM8K's ``#### n``, "The answer is n", ...), else 0;
- ``Format``: 1 if the reply states its answer in the expected form (a regex), else 0;
- ``LengthPenalty``: DAPO's soft overlong punishment -- 0 up to ``max_tokens - buffer``
  tokens, falling linearly to -1 at ``max_tokens``, and -1 for a reply cut off there;
- ``reward_model.LearnedReward``: the score of a trained reward model (``stage=rm``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from lmpipe.errors import ConfigError
from lmpipe.eval.answers import answers_match, extract_answer

if TYPE_CHECKING:
    from lmpipe.data.tokenizer import Tokenizer
    from lmpipe.objectives.base import SavedCheckpoint


@dataclass(frozen=True)
class Completion:
    """A sampled reply, as rewards see it."""

    text: str  # the reply, without its stop token
    tokens: int  # its length in tokens (the stop token included)
    truncated: bool  # cut off at max_tokens before it stopped
    max_tokens: int  # the completion budget
    reference: str | None  # the prompt's answer, if it has one
    prompt_ids: tuple[int, ...] = ()  # the prompt's tokens (no padding)
    ids: tuple[int, ...] = ()  # the reply's tokens, its stop token included when it stopped


@dataclass
class RewardContext:
    """What a reward may need besides the replies: the policy's tokenizer (a reward model
    must share it), where to compute, and how to open a checkpoint."""

    tokenizer: Tokenizer
    device: torch.device
    open_checkpoint: Callable[[str], SavedCheckpoint]
    batch_size: int = 32  # replies per forward pass
    autocast: Callable[[], AbstractContextManager] = field(default=nullcontext)


class Reward:
    """A reward: ``__call__`` scores a list of completions."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False  # every prompt must come with an answer

    def __init__(self, weight: float = 1.0):
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise ConfigError(f"reward.{self.name}.weight={weight!r} must be a number")
        self.weight = float(weight)

    def setup(self, ctx: RewardContext) -> None:
        """Load what scoring needs (called before the first scoring; may be called again)."""

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        raise NotImplementedError


class AnswerMatch(Reward):
    name = "answer_match"
    needs_reference = True

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        return [
            float(answers_match(extract_answer(c.text), extract_answer(c.reference or "")))
            for c in completions
        ]


class Format(Reward):
    name = "format"

    def __init__(self, pattern: str, weight: float = 1.0):
        super().__init__(weight)
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"reward.format.pattern={pattern!r} is not a regex ({exc})") from None

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        return [float(self.pattern.search(c.text) is not None) for c in completions]


class LengthPenalty(Reward):
    name = "length_penalty"

    def __init__(self, buffer: int, weight: float = 1.0):
        super().__init__(weight)
        if not isinstance(buffer, int) or buffer < 1:
            raise ConfigError(f"reward.length_penalty.buffer={buffer!r} must be an integer >= 1")
        self.buffer = buffer

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        scores = []
        for c in completions:
            over = c.tokens - (c.max_tokens - self.buffer)
            scores.append(-1.0 if c.truncated else -min(1.0, max(0, over) / self.buffer))
        return scores


def score(
    rewards: dict[str, Reward], completions: Sequence[Completion]
) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total of every completion, and each reward's own scores by name."""
    if not rewards:
        raise ConfigError("no reward configured: pass e.g. reward=[answer_match,format]")
    each = {name: reward(completions) for name, reward in rewards.items()}
    totals = [
        sum(rewards[name].weight * each[name][i] for name in rewards)
        for i in range(len(completions))
    ]
    return totals, each
