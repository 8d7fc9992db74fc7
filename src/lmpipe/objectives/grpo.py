"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, DeepSeekMath).

Each step samples ``num_generations`` completions of every prompt, scores them with the
configured rewards and normalises the rewards within each prompt's group (``scale_rewards``
"group"; or by the batch's std, "batch"; or not at all, "none", as Dr. GRPO):

    A_i = (r_i - mean(r_group)) / (std + 1e-4)

The loss is PPO's clipped surrogate per completion token, with ratio = pi / pi_old:

    -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)  [+ beta * KL_k3]

``epsilon_high`` > ``epsilon`` is DAPO's clip-higher (Yu et al. 2025); KL_k3 =
exp(ref - logp) - (ref - logp) - 1 to the frozen starting model (``beta`` > 0). Token
losses are summed per completion and aggregated by ``loss_type``: "grpo" (mean over each
completion's tokens, then over completions), "dr_grpo" (sum / (completions x
max_completion_length); Liu et al. 2025) or "dapo" (sum / all completion tokens).
``num_iterations`` optimizer updates reuse one rollout; pi_old is then the policy that
sampled (its log-probs computed before the first update), else the detached current one.

Log-probabilities come through the LM seam (``output="logps"``): exact for AR; for masked
diffusion the LM's one-step estimate, whose masks are drawn from per-row seeds that are
the same for pi, pi_old and the reference within an iteration and new at each iteration.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch, PromptBatch
from lmpipe.models.base import unwrap
from lmpipe.objectives.base import Metrics, ObjectiveContext
from lmpipe.objectives.policy import (
    PolicyObjective,
    check_options,
    int_at_least,
    non_negative,
    positive,
)
from lmpipe.objectives.rewards import Reward, score
from lmpipe.objectives.rl import clipped_surrogate, kl_k3
from lmpipe.objectives.rollouts import Rollout, Sampled

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group: int, scale: str) -> Tensor:
    """(N,) rewards of consecutive groups of ``group`` completions -> advantages."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).flatten()
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return centred
    return centred / (std + STD_EPS)


def token_weights(mask: Tensor, loss_type: str, max_tokens: int) -> Tensor:
    """(N, L) weights of the completion tokens such that the update's loss is the sum of
    token losses x weights: the three aggregations as weights, so that the loss does not
    depend on how the tokens are laid out in rows or split into micro-batches."""
    tokens = mask.sum(dim=1, keepdim=True)
    if loss_type == "grpo":  # each completion's mean, then the mean over completions
        per_row = torch.where(tokens > 0, 1.0 / tokens.clamp(min=1), 0.0) / len(mask)
    elif loss_type == "dr_grpo":
        per_row = torch.full_like(tokens, 1.0 / (len(mask) * max_tokens))
    else:
        per_row = torch.full_like(tokens, 1.0 / max(float(tokens.sum()), 1.0))
    return per_row * mask


class GRPO(PolicyObjective):
    name = "grpo"

    def __init__(
        self,
        rewards: dict[str, Reward] | None,
        num_generations: int,
        max_completion_length: int,
        temperature: float,
        epsilon: float,
        epsilon_high: float | None,
        beta: float,
        num_iterations: int,
        loss_type: str,
        scale_rewards: str,
        mask_truncated_completions: bool,
    ):
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        check_options(
            (
                ("num_generations", num_generations, int_at_least(2), "an integer >= 2 (a group)"),
                ("num_iterations", num_iterations, int_at_least(1), "an integer >= 1"),
                ("epsilon", epsilon, positive, "a number > 0"),
                ("epsilon_high", epsilon_high, positive, "a number > 0"),
                ("beta", beta, non_negative, "a number >= 0"),
                (
                    "loss_type",
                    loss_type,
                    LOSS_TYPES.__contains__,
                    f"one of {', '.join(LOSS_TYPES)}",
                ),
                (
                    "scale_rewards",
                    scale_rewards,
                    SCALE_REWARDS.__contains__,
                    f"one of {', '.join(SCALE_REWARDS)}",
                ),
            )
        )
        super().__init__(rewards, max_completion_length, temperature)
        self.num_generations = num_generations
        self.epsilon, self.epsilon_high = float(epsilon), float(epsilon_high)
        self.beta = float(beta)
        self.num_iterations = num_iterations
        self.loss_type = loss_type
        self.scale_rewards = scale_rewards
        self.mask_truncated_completions = mask_truncated_completions

    def setup(self, ctx: ObjectiveContext) -> None:
        super().setup(ctx)
        if self.beta > 0:
            self.reference = self.frozen_reference("objective.beta > 0")

    # --- rollouts -----------------------------------------------------------------
    def prepare(self, model: nn.Module, batch: PromptBatch) -> Iterator[Batch]:
        """One rollout of the step's prompts, then ``num_iterations`` updates on it."""
        sampled = self.sample(unwrap(model), batch, self.num_generations, self.temperature)
        totals, each = score(self.rewards, sampled.completions)
        rewards = torch.tensor(totals)
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards)
        mask = sampled.loss_mask
        if self.mask_truncated_completions:
            mask = mask * (~sampled.truncated).float()[:, None]
        rollout = sampled.batch(
            self.ctx.model.config.block_size,
            mask,
            advantages=advantages[:, None].expand_as(mask),
            token_weights=token_weights(mask, self.loss_type, self.max_completion_length),
        )
        rollout.metrics = self._rollout_metrics(sampled, rewards, each)
        updates = []
        for iteration in range(self.num_iterations):
            # New masks (diffusion) at every iteration, the same for pi, pi_old and ref.
            seeds = torch.randint(0, 2**62, (len(rollout),))
            update = rollout.with_fields(noise_seeds=seeds)
            if self.num_iterations > 1:  # pi_old: the policy that sampled, before any update
                update.old_logps = self.token_logps(model, update)[0].logps
            if self.reference is not None:
                update.ref_token_logps = self.token_logps(self.reference, update)[0].logps
            if iteration:
                update.metrics = None
            updates.append(update)
        yield from updates

    def _rollout_metrics(
        self, sampled: Sampled, rewards: Tensor, each: dict[str, list[float]]
    ) -> dict[str, float]:
        grouped = rewards.view(-1, self.num_generations)
        return {
            "rewards/mean": float(rewards.mean()),
            "rewards/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "rewards/group_std": float(grouped.std(dim=1).mean()),
            **self.rollout_metrics(sampled, each),
        }

    # --- the loss -----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Rollout) -> tuple[Tensor, Metrics]:
        logps = model(batch, output="logps", temperature=self.temperature).logps
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        per_token, clipped = clipped_surrogate(
            logps, old, batch.advantages, self.epsilon, self.epsilon_high
        )
        mask = batch.loss_mask
        active = mask.sum().clamp(min=1)
        metrics: Metrics = {}
        if batch.ref_token_logps is not None:
            kl = kl_k3(logps, batch.ref_token_logps)
            per_token = per_token + self.beta * kl
            metrics["kl"] = ((kl * mask).sum() / active).detach()
        loss = (per_token * batch.token_weights).sum(dim=1).mean()
        return loss, {
            "loss": loss.detach(),
            **metrics,
            "clip_fraction": ((clipped.float() * mask).sum() / active).detach(),
            "weight": mask.sum(),
        }
