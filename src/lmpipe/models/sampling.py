"""Turning logits into tokens: temperature, top-k, top-p (nucleus), greedy at temperature 0."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_from_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits), ~3x faster on
    # the CPU than torch.multinomial (whose exponential draws are slow).
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_().log_()
    return (logits + gumbel).argmax(dim=-1)
