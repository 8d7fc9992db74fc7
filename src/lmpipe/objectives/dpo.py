"""Direct Preference Optimization (Rafailov et al. 2023) and its variants.

A batch holds pairs as consecutive rows (chosen, rejected). A sequence's log-probability
is -sum(token_nll) over its response tokens (the loss mask), through the LM seam only, so
for a diffusion LM it is the ELBO; policy and reference then see the same noise (a shared
``generator`` seed per sample), averaged over ``mc_samples`` draws: LLaDA 1.5's VRPO.

With h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)) and beta:

- ``sigmoid``: -log sigmoid(beta h), with ``label_smoothing`` eps the conservative cDPO
  loss -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (Mitchell 2023);
- ``robust``: the unbiased noisy-label loss of Chowdhury et al. 2024,
  (-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps);
- ``hinge``: max(0, 1 - beta h) (SLiC, Zhao et al. 2023);
- ``ipo``: (h - 1/(2 beta))^2 (Azar et al. 2023).

``rpo_alpha`` > 0 adds alpha times the chosen reply's mean NLL per token (RPO, Pang et al.
2024): the preference losses only see differences, and on pairs that differ in a few
tokens they may lower both replies; the NLL term keeps the chosen one likely.

The reference is the stage's starting checkpoint, frozen; with ``precompute_ref`` its
log-probs are computed once before training (every training example and held-out pair),
so only the policy sits in memory while training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.objectives.base import Objective, ObjectiveContext

if TYPE_CHECKING:
    from lmpipe.models import LM

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def sequence_logps(model, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
    """(rows,) log-probability (or ELBO) of each row's loss-mask tokens. ``model(batch)``
    rather than ``model.token_nll`` so that a DDP-wrapped model works too."""
    return -model(batch, generator=generator).nll.sum(dim=-1)


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair loss for sequence log-probs of the policy and the reference."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ConfigError(f"objective.loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


class DPO(Objective):
    name = "dpo"
    data_formats: ClassVar[frozenset[str]] = frozenset({"preference"})

    def __init__(
        self,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        precompute_ref: bool,
        mc_samples: int,
        rpo_alpha: float = 0.0,
    ):
        if loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"objective.loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}"
            )
        if not beta > 0:
            raise ConfigError(f"objective.beta={beta!r} must be > 0")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing={label_smoothing!r} must be in [0, 0.5)")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ConfigError(f"objective.mc_samples={mc_samples!r} must be an integer >= 1")
        if not rpo_alpha >= 0:
            raise ConfigError(f"objective.rpo_alpha={rpo_alpha!r} must be >= 0")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.precompute_ref = precompute_ref
        self.mc_samples = mc_samples
        self.rpo_alpha = rpo_alpha
        self.reference: LM | None = None
        self.reference_table: dict[int, Tensor] = {}  # example id -> (2,) precomputed

    def check_arch(self, lm_class) -> None:
        super().check_arch(lm_class)
        if self.precompute_ref and not lm_class.exact_likelihood:
            raise ConfigError(
                f"objective.precompute_ref=true needs an exact likelihood; arch={lm_class.arch} "
                "scores with a bound whose noise policy and reference must share, so it uses a "
                "live reference (precompute_ref=false)"
            )

    def setup(self, ctx: ObjectiveContext) -> None:
        super().setup(ctx)
        if ctx.starting_model is None:
            raise ConfigError("stage objective 'dpo' needs init_from (the reference model)")
        reference = ctx.starting_model()
        if not self.precompute_ref:
            self.reference = reference
            return

        @torch.no_grad()
        def rows(batch: Batch) -> Tensor:
            with ctx.autocast():
                return sequence_logps(reference, batch.to(ctx.device)).float().cpu()

        for batch in ctx.examples.every_example(ctx.micro_batch_size):
            for example, values in zip(batch.example_ids, rows(batch).view(-1, 2), strict=True):
                self.reference_table[example] = values
        for batches in ctx.val_sets.values():
            for batch in batches:
                batch.ref_logps = rows(batch)

    def prepare(self, model, batch: Batch) -> Iterator[Batch]:
        if self.reference_table:
            batch.ref_logps = torch.cat([self.reference_table[e] for e in batch.example_ids])
        yield batch

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        policy, ref = 0.0, 0.0
        for _ in range(self.mc_samples):
            # One seed per Monte-Carlo sample, from the step's RNG: the same noise for the
            # policy and the reference (no effect on an exact-likelihood model).
            seed = int(torch.randint(0, 2**62, ()))
            policy = policy + sequence_logps(model, batch, _generator(seed, batch))
            if batch.ref_logps is None:
                with torch.no_grad():
                    ref = ref + sequence_logps(self.reference, batch, _generator(seed, batch))
        policy = policy / self.mc_samples
        ref = batch.ref_logps if batch.ref_logps is not None else ref / self.mc_samples
        policy_c, policy_r = policy[0::2], policy[1::2]
        ref_c, ref_r = ref[0::2].to(policy.dtype), ref[1::2].to(policy.dtype)
        losses = preference_loss(
            policy_c,
            policy_r,
            ref_c,
            ref_r,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        chosen = self.beta * (policy_c - ref_c).detach()
        rejected = self.beta * (policy_r - ref_r).detach()
        loss = losses.mean()
        metrics = {}
        if self.rpo_alpha:
            chosen_nll = -policy_c.sum() / batch.loss_mask[0::2].sum().clamp(min=1)
            loss = loss + self.rpo_alpha * chosen_nll
            metrics["nll/chosen"] = chosen_nll.detach()
        return loss, {
            **metrics,
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracy": (chosen > rejected).float().mean(),
            "rewards/margin": (chosen - rejected).mean(),
            "logps/chosen": policy_c.detach().mean(),
            "logps/rejected": policy_r.detach().mean(),
            "weight": torch.tensor(float(len(losses))),
        }


def _generator(seed: int, batch: Batch) -> torch.Generator:
    return torch.Generator(batch.input_ids.device).manual_seed(seed)
