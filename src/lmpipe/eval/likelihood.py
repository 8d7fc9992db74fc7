"""Held-out likelihood: perplexity and token accuracy, and preference accuracy of pairs.

Every architecture is scored through the LM seam (``model(batch)`` -> ``TokenScores``).
An exact-likelihood model (AR) is scored once. A model whose NLL is a Monte-Carlo bound
(diffusion: the NELBO at random noise levels and masks) is scored ``noise_draws`` times
and the draws are averaged; each draw's noise comes from a seed fixed by
``(seed, batch, draw)``, so every checkpoint is scored on the same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.models import LM
from lmpipe.seeding import derive_seed
from lmpipe.tracking.progress import progress_bar


@dataclass
class RowScores:
    """Sums over each held-out row's scored tokens, averaged over noise draws."""

    nll: Tensor  # (rows,) NLL (or NELBO) of the row's target tokens: -log p(row)
    targets: Tensor  # (rows,) target tokens
    correct: Tensor  # (rows,) positions whose argmax prediction is the token
    predicted: Tensor  # (rows,) positions with a prediction
    rows_per_example: int  # 2 for preference pairs (chosen, rejected)
    exact: bool  # False: the NLL is a bound


@torch.no_grad()
def score_rows(
    model: LM,
    batches: list[Batch],
    *,
    device: torch.device,
    seed: int,
    noise_draws: int,
    progress: bool = True,
) -> RowScores:
    draws = 1 if model.exact_likelihood else noise_draws
    parts = []
    bar = progress_bar(batches, desc="score", unit="batch", enabled=progress)
    for index, batch in enumerate(bar):
        batch = batch.to(device)
        total = torch.zeros(4, len(batch), device=device)
        for draw in range(draws):
            generator = torch.Generator(device).manual_seed(
                derive_seed(seed, "eval-noise", index, draw)
            )
            scores = model(batch, generator=generator)
            total += torch.stack(
                [
                    scores.nll.sum(dim=1),
                    scores.target_mask.sum(dim=1),
                    scores.correct.sum(dim=1),
                    scores.scored_mask.sum(dim=1),
                ]
            ).float()
        parts.append(total.cpu() / draws)
    nll, targets, correct, predicted = torch.cat(parts, dim=1).double()
    return RowScores(
        nll, targets, correct, predicted, batches[0].rows_per_example, model.exact_likelihood
    )


def token_metrics(scores: RowScores) -> dict[str, float]:
    """``val/loss`` (mean NLL per target token), ``val/perplexity``, whether that is a bound,
    and ``val/accuracy``. Of a pair only the chosen reply counts: the text held out as good."""
    first = slice(None, None, scores.rows_per_example)
    loss = float(scores.nll[first].sum() / scores.targets[first].sum())
    return {
        "val/loss": loss,
        "val/perplexity": math.exp(min(loss, 50.0)),
        "val/perplexity_is_bound": float(not scores.exact),
        "val/accuracy": float(
            scores.correct[first].sum() / scores.predicted[first].sum().clamp(min=1)
        ),
    }


def preference_metrics(scores: RowScores) -> dict[str, float]:
    """How often log p(chosen) > log p(rejected) over the ``task/pairs`` held-out pairs,
    and the mean of log p(chosen) - log p(rejected) (nats per response)."""
    if scores.rows_per_example != 2:
        raise ValueError("preference metrics need pairs (rows_per_example=2)")
    logp = -scores.nll
    margin = logp[0::2] - logp[1::2]
    return {
        "task/preference_accuracy": float((margin > 0).double().mean()),
        "task/preference_margin": float(margin.mean()),
        "task/pairs": margin.numel(),
    }
