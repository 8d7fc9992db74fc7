"""Cross-entropy over loss-mask tokens: pretraining and mid-training."""

from __future__ import annotations

from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import DataError
from lmpipe.objectives.base import Objective


class CrossEntropy(Objective):
    name = "cross_entropy"
    reports_perplexity = True

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        scores = model(batch)
        num_tokens = scores.target_mask.sum()
        if num_tokens.item() == 0:
            raise DataError(
                f"{self.name}: a batch has no target tokens (its loss mask is all zero)"
            )
        loss = scores.nll.sum() / num_tokens
        scored = scores.scored_mask.sum().clamp(min=1)
        accuracy = scores.correct.sum() / scored
        return loss, {
            "loss": loss.detach(),
            "accuracy": accuracy.detach(),
            "weight": num_tokens,
        }
