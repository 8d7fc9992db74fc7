"""Policy-gradient math shared by the RL objectives (GRPO, PPO): pure tensor functions.

Token tensors are (N, L) rows of a rollout with a 0/1 ``mask`` over each completion's
tokens (one contiguous span per row, the stop token included); positions outside it
never count.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor]:
    """Per-token -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A) with ratio = pi / pi_old,
    and whether the clipped branch won. ``advantages`` broadcasts to ``logps``: (N, 1) one
    per completion (GRPO) or (N, L) one per token (PPO)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - low, 1 + high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The k1 estimate of KL(pi || ref) per token, log pi - log ref: unbiased, may be < 0."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per token: unbiased and >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``values`` scaled to unit variance over the masked positions (and centred, with
    ``shift_mean``); zero outside the mask."""
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum()
    variance = masked_mean(centred**2, mask) * count / (count - 1).clamp(min=1)  # unbiased
    whitened = centred * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token(mask: Tensor) -> Tensor:
    """(N,) column of each row's last masked position (a row needs one)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask > 0, columns, -1).amax(dim=1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked span:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    with V and A zero after the span's last token (the episode ends there). Returns the
    advantages and the returns A + V, both zero outside the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    next_value = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """Per-token 0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped within ``clip`` of
    the rollout's values (PPO2's value clipping), and whether the clipped term won."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain, bounded = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, bounded), bounded > plain


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 for a perfect value function, 0
    for one that predicts the mean, < 0 for worse."""
    returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    residual_var = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - residual_var / returns_var) if returns_var > 0 else 0.0
