"""What every RL objective that learns from its own samples shares (GRPO, PPO).

``PolicyObjective`` reads prompts (with their answers) from a prompt sampler, checks that a
completion fits the model's block and that the rewards get what they need, samples
completions from the bare model at the training temperature, scores rollouts in
micro-batches, and evaluates held-out prompts by the rewards of one sampled and one greedy
completion each (plus the KL to the reference, when the objective keeps one). The model
stays in eval mode while it learns (``train_mode = False``): the policy that sampled and
the one that is scored are the same function, so ratios start at exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch, PromptBatch
from lmpipe.errors import ConfigError
from lmpipe.models import LM
from lmpipe.models.base import TokenLogps
from lmpipe.objectives.base import Metrics, Objective, ObjectiveContext
from lmpipe.objectives.rewards import Reward, score
from lmpipe.objectives.rl import kl_k1
from lmpipe.objectives.rollouts import Rollout, Sampled, sample


def int_at_least(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def non_negative(value) -> bool:
    return value == 0 or positive(value)


def check_options(checks) -> None:
    """``(key, value, ok, what)`` rows: the first value that is not ``ok`` is a ConfigError."""
    for key, value, ok, what in checks:
        if not ok(value):
            raise ConfigError(f"objective.{key}={value!r} must be {what}")


class PolicyObjective(Objective):
    data_formats: ClassVar[frozenset[str]] = frozenset({"prompt"})
    sampler_kinds: ClassVar[frozenset[str]] = frozenset({"prompts"})
    train_mode: ClassVar[bool] = False
    shardable: ClassVar[bool] = False  # rollouts call ``generate``
    # How to configure a reward, for the error message of a stage without one.
    reward_hint: ClassVar[str] = "reward=[answer_match,format]"

    def __init__(
        self, rewards: dict[str, Reward] | None, max_completion_length: int, temperature: float
    ):
        check_options(
            (
                (
                    "max_completion_length",
                    max_completion_length,
                    int_at_least(1),
                    "an integer >= 1",
                ),
                ("temperature", temperature, positive, "a number > 0"),
            )
        )
        if not rewards:
            raise ConfigError(f"stage {self.name} needs a reward: pass e.g. {self.reward_hint}")
        self.rewards = dict(rewards)
        self.max_completion_length = max_completion_length
        self.temperature = float(temperature)
        self.reference: LM | None = None  # set by objectives that keep one

    # --- setup --------------------------------------------------------------------
    def setup(self, ctx: ObjectiveContext) -> None:
        super().setup(ctx)
        tokenizer = ctx.tokenizer
        self.stop_ids = (tokenizer.turn_end_id, tokenizer.eos_id)
        prompts = list(ctx.examples.every_example(256))
        longest = max(batch.input_ids.shape[1] for batch in prompts)
        block = ctx.model.config.block_size
        if longest + self.max_completion_length > block:
            raise ConfigError(
                f"objective.max_completion_length={self.max_completion_length} does not fit: "
                f"the longest prompt ({longest} tokens) + the completion exceed the model's "
                f"block of {block} tokens (lower it, or sampler.max_prompt_tokens)"
            )
        needs = [name for name, reward in self.rewards.items() if reward.needs_reference]
        missing = sum(r is None for batch in prompts for r in batch.references)
        if needs and missing:
            total = sum(len(batch) for batch in prompts)
            raise ConfigError(
                f"reward {needs[0]} needs each prompt's answer, but {missing} of the {total} "
                "training prompts have none"
            )
        for reward in self.rewards.values():
            reward.setup(ctx.reward_context())

    def frozen_reference(self, why: str) -> LM:
        """The stage's starting model, frozen (``why``: what needs it, for the error)."""
        if self.ctx.starting_model is None:
            raise ConfigError(f"{why} needs init_from (the reference model)")
        return self.ctx.starting_model()

    # --- rollouts -----------------------------------------------------------------
    def sample(self, model: LM, prompts: PromptBatch, copies: int, temperature: float) -> Sampled:
        with self.ctx.autocast():
            return sample(
                model,
                prompts,
                copies=copies,
                max_tokens=self.max_completion_length,
                temperature=temperature,
                stop_ids=self.stop_ids,
                decode=self.ctx.tokenizer.decode,
                device=self.ctx.device,
                pad_id=self.ctx.tokenizer.pad_id,
            )

    @torch.no_grad()
    def token_logps(
        self, model: nn.Module, batch: Rollout, head: nn.Module | None = None
    ) -> tuple[TokenLogps, Tensor | None]:
        """Log-probs (and entropies) of every completion token in micro-batches, on the
        CPU in float32; with ``head``, also its (N, L) values of the features they were
        predicted from, in the same forward pass."""
        chunks, values = [], []
        for micro in batch.split(self.ctx.micro_batch_size):
            with self.ctx.autocast():
                out = model(
                    micro.to(self.ctx.device),
                    output="logps",
                    temperature=self.temperature,
                    with_features=head is not None,
                )
                if head is not None:
                    values.append(head(out.features).squeeze(-1).float().cpu())
            chunks.append(TokenLogps(out.logps.float().cpu(), out.entropy.float().cpu()))
        found = TokenLogps(
            torch.cat([c.logps for c in chunks]), torch.cat([c.entropy for c in chunks])
        )
        return found, torch.cat(values) if values else None

    def rollout_metrics(self, sampled: Sampled, each: dict[str, list[float]]) -> dict[str, float]:
        """Each reward's mean and the completions' lengths."""
        return {
            **{f"rewards/{name}": sum(v) / len(v) for name, v in each.items()},
            "completions/mean_length": float(sampled.lengths.mean()),
            "completions/truncated_fraction": float(sampled.truncated.float().mean()),
        }

    # --- held-out prompts -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: LM, batches: list[Batch]) -> Iterator[Metrics]:
        """Rewards of one sampled (at the training temperature) and one greedy completion
        of every held-out prompt: ``rewards/*`` and ``greedy/rewards/*``; with a reference,
        ``kl``: the sampled completions' KL to it (k1, summed over each completion)."""
        for prompts in batches:
            metrics: Metrics = {"weight": float(len(prompts))}
            for prefix, temperature in (("", self.temperature), ("greedy/", 0.0)):
                sampled = self.sample(model, prompts, 1, temperature)
                totals, each = score(self.rewards, sampled.completions)
                metrics[f"{prefix}rewards/mean"] = sum(totals) / len(totals)
                for name, values in each.items():
                    metrics[f"{prefix}rewards/{name}"] = sum(values) / len(values)
                metrics[f"{prefix}completions/mean_length"] = float(sampled.lengths.mean())
                metrics[f"{prefix}completions/truncated_fraction"] = float(
                    sampled.truncated.float().mean()
                )
                if self.reference is not None and not prefix:
                    rollout = sampled.rows()
                    rollout.noise_seeds = torch.randint(0, 2**62, (len(rollout),))  # shared
                    logps = self.token_logps(model, rollout)[0].logps
                    ref = self.token_logps(self.reference, rollout)[0].logps
                    metrics["kl"] = float((kl_k1(logps, ref) * rollout.loss_mask).sum(1).mean())
            yield metrics
