"""A reward model's held-out pair accuracy: how often it scores the chosen reply above the
rejected one (``rm/accuracy``), and the mean score difference (``rm/margin``)."""

from __future__ import annotations

import torch
from torch import nn

from lmpipe.batch import Batch
from lmpipe.models import LM
from lmpipe.objectives.reward_model import response_scores


@torch.no_grad()
def reward_model_metrics(
    model: LM, head: nn.Module, batches: list[Batch], *, pad_id: int, device: torch.device
) -> dict[str, float]:
    """``batches``: held-out pairs (rows chosen, rejected), as ``scoring_batches`` lays them
    out."""
    head = head.to(device)
    scores = torch.cat(
        [
            response_scores(model, head, batch.to(device), pad_id, model.config.block_size).cpu()
            for batch in batches
        ]
    )
    chosen, rejected = scores[0::2], scores[1::2]
    return {
        "rm/accuracy": float((chosen > rejected).float().mean()),
        "rm/margin": float((chosen - rejected).mean()),
        "rm/chosen": float(chosen.mean()),
        "rm/rejected": float(rejected.mean()),
    }
