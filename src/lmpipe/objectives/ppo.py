"""Proximal Policy Optimization for language models (Schulman et al. 2017; Ziegler et al.
2019; Ouyang et al. 2022), as TRL's PPOTrainer runs it.

Each step samples one completion of every prompt from the policy (dropout off, logits /
``temperature``), scores it with the configured rewards (a reward model: ``reward=rm``; or
rules), less ``missing_eos_penalty`` for a completion that never stopped, and turns that
into per-token rewards: ``-kl_coef * KL_t`` at every completion token (k1 = log pi -
log ref, or k3, to the frozen starting model) plus the score at the last one. A value head
on the policy's features (the hidden state each token was predicted from) gives V_t;
GAE (``gamma``, ``lam``) gives advantages, whitened over the rollout, and returns A + V.

The rollout is then reused for ``ppo_epochs`` passes over ``num_minibatches`` shuffled
minibatches, one optimizer update each (``prepare`` yields them; the Trainer steps), with
the clipped surrogate (``cliprange``) plus ``vf_coef`` x the clipped value loss
(``cliprange_value``):

    -min(ratio * A, clip(ratio, 1 +- cliprange) * A)
    + vf_coef * 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-cliprange_value) - R)^2)

averaged over the minibatch's completion tokens. The value head starts from the reward
model's head when a reward is one (its features are the same kind), else at zero; it is
saved in ``objective.safetensors`` and resumed with the model.

Log-probabilities and features come through the LM seam in one forward pass
(``output="logps", with_features=True``), so the objective has no arch branch; for masked
diffusion the masks are drawn per row from seeds fixed for the whole rollout, the same
for pi, pi_old and the reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch, PromptBatch
from lmpipe.errors import ConfigError
from lmpipe.models.base import unwrap
from lmpipe.objectives.base import Metrics, ObjectiveContext
from lmpipe.objectives.policy import (
    PolicyObjective,
    check_options,
    int_at_least,
    non_negative,
    positive,
)
from lmpipe.objectives.reward_model import LearnedReward, scalar_head
from lmpipe.objectives.rewards import Reward, score
from lmpipe.objectives.rl import (
    KL_ESTIMATORS,
    clipped_surrogate,
    clipped_value_loss,
    explained_variance,
    gae,
    last_token,
    masked_mean,
    masked_whiten,
)
from lmpipe.objectives.rollouts import Rollout

VALUE_HEAD = "value_head"


def penalise_missing_eos(scores: Tensor, truncated: Tensor, penalty: float | None) -> Tensor:
    """Scores less ``penalty`` where the completion was cut off before its stop token."""
    if penalty is None:
        return scores
    return scores - penalty * truncated.float()


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """(N, L) per-token rewards: -kl_coef * KL at every completion token, plus the (N,)
    sequence score at each completion's last token."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(len(scores))
    rewards[rows, last_token(mask)] += scores
    return rewards


def shuffled_minibatches(rows: int, minibatches: int) -> list[Tensor]:
    """A random permutation of ``rows`` (the step's RNG) split into equal minibatches."""
    return list(torch.randperm(rows).view(minibatches, -1))


class PPO(PolicyObjective):
    name = "ppo"
    reward_hint = "reward=rm reward.rm.checkpoint=<a stage=rm run>, or reward=[answer_match]"

    def __init__(
        self,
        rewards: dict[str, Reward] | None,
        max_completion_length: int,
        temperature: float,
        kl_coef: float,
        kl_estimator: str,
        missing_eos_penalty: float | None,
        gamma: float,
        lam: float,
        whiten_rewards: bool,
        cliprange: float,
        cliprange_value: float,
        vf_coef: float,
        ppo_epochs: int,
        num_minibatches: int,
    ):
        check_options(
            (
                ("kl_coef", kl_coef, non_negative, "a number >= 0"),
                ("kl_estimator", kl_estimator, KL_ESTIMATORS.__contains__, "k1 or k3"),
                (
                    "missing_eos_penalty",
                    missing_eos_penalty,
                    lambda v: v is None or non_negative(v),
                    "null or a number >= 0",
                ),
                ("gamma", gamma, lambda v: non_negative(v) and v <= 1, "a number in [0, 1]"),
                ("lam", lam, lambda v: non_negative(v) and v <= 1, "a number in [0, 1]"),
                ("cliprange", cliprange, positive, "a number > 0"),
                ("cliprange_value", cliprange_value, positive, "a number > 0"),
                ("vf_coef", vf_coef, non_negative, "a number >= 0"),
                ("ppo_epochs", ppo_epochs, int_at_least(1), "an integer >= 1"),
                ("num_minibatches", num_minibatches, int_at_least(1), "an integer >= 1"),
            )
        )
        super().__init__(rewards, max_completion_length, temperature)
        self.kl_coef = float(kl_coef)
        self.kl = KL_ESTIMATORS[kl_estimator]
        self.missing_eos_penalty = missing_eos_penalty
        self.gamma, self.lam = float(gamma), float(lam)
        self.whiten_rewards = whiten_rewards
        self.cliprange, self.cliprange_value = float(cliprange), float(cliprange_value)
        self.vf_coef = float(vf_coef)
        self.ppo_epochs = ppo_epochs
        self.num_minibatches = num_minibatches

    def setup(self, ctx: ObjectiveContext) -> None:
        super().setup(ctx)
        rows = len(ctx.examples.batch(0))
        if rows % self.num_minibatches:
            raise ConfigError(
                f"objective.num_minibatches={self.num_minibatches} does not divide the "
                f"{rows} prompts per step (trainer.batch_size per rank)"
            )
        self.reference = self.frozen_reference("stage ppo")
        self.value_head = scalar_head(ctx.model.config.d_model)
        learned = [r for r in self.rewards.values() if isinstance(r, LearnedReward)]
        if learned:  # the reward model's head reads the same kind of features
            with torch.no_grad():
                self.value_head.weight.copy_(learned[0].head.weight)

    def modules(self) -> dict[str, nn.Module]:
        return {VALUE_HEAD: self.value_head}

    # --- rollouts -----------------------------------------------------------------
    def prepare(self, model: nn.Module, batch: PromptBatch) -> Iterator[Batch]:
        """One rollout of the step's prompts, then ``ppo_epochs`` x ``num_minibatches``
        updates on it."""
        sampled = self.sample(unwrap(model), batch, 1, self.temperature)
        totals, each = score(self.rewards, sampled.completions)
        scores = penalise_missing_eos(
            torch.tensor(totals), sampled.truncated, self.missing_eos_penalty
        )
        rollout = sampled.rows()
        # Diffusion masks, fixed for the rollout: the same for pi, pi_old and ref.
        rollout.noise_seeds = torch.randint(0, 2**62, (len(rollout),))
        mask = rollout.loss_mask
        policy, values = self.token_logps(model, rollout, self.value_head)
        ref = self.token_logps(self.reference, rollout)[0].logps
        kl = self.kl(policy.logps, ref) * mask
        rewards = token_rewards(scores, kl, mask, self.kl_coef)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        rollout = rollout.with_fields(
            advantages=masked_whiten(advantages, mask),
            returns=returns,
            old_values=values * mask,
            old_logps=policy.logps,
        )
        sequence_kl = kl.sum(dim=1)
        metrics = {
            "rewards/score": float(scores.mean()),
            "rewards/non_score": float(-self.kl_coef * sequence_kl.mean()),
            "kl": float(sequence_kl.mean()),
            "entropy": float(masked_mean(policy.entropy, mask)),
            "explained_variance": explained_variance(values, returns, mask),
            **self.rollout_metrics(sampled, each),
        }
        # Tokens that are not padding, per row: prompt, completion and its stop token.
        real = mask.sum(dim=1) + (batch.input_ids.shape[1] - batch.left_pad)
        first = True
        for _ in range(self.ppo_epochs):
            for rows in shuffled_minibatches(len(rollout), self.num_minibatches):
                update = _rows(rollout, rows)
                # Per-row weights: the update's loss is the mean over its completion tokens,
                # whatever its split into micro-batches.
                tokens = float(update.loss_mask.sum())
                update.token_weights = torch.full((len(update),), len(update) / max(tokens, 1.0))
                update.real_tokens = int(real[rows].sum())
                update.metrics = metrics if first else None
                first = False
                yield update

    # --- the loss -----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Rollout) -> tuple[Tensor, Metrics]:
        out = model(batch, output="logps", temperature=self.temperature, with_features=True)
        values = self.value_head(out.features).squeeze(-1).float()
        mask = batch.loss_mask
        policy_loss, clipped = clipped_surrogate(
            out.logps, batch.old_logps, batch.advantages, self.cliprange, self.cliprange
        )
        value_loss, value_clipped = clipped_value_loss(
            values, batch.old_values, batch.returns, self.cliprange_value
        )

        def token_mean(values: Tensor) -> Tensor:  # over the update, split-invariant
            return ((values * mask).sum(dim=1) * batch.token_weights).mean()

        policy_loss, value_loss = token_mean(policy_loss), token_mean(value_loss)
        loss = policy_loss + self.vf_coef * value_loss
        log_ratio = (out.logps - batch.old_logps).detach()
        return loss, {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "clip_fraction": masked_mean(clipped.float(), mask),
            "value_clip_fraction": masked_mean(value_clipped.float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(log_ratio.exp(), mask),
            "weight": mask.sum(),
        }


def _rows(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rollout's rows ``rows`` (tensors indexed; everything else kept)."""
    return rollout._map(lambda t: t[rows])
