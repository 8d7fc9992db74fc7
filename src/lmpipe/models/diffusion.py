"""Masked diffusion LM: MDLM training (Sahoo et al. 2024), MDLM and LLaDA samplers.

Forward process: absorbing state with the log-linear schedule, so a token is replaced by
MASK with probability t. The continuous-time NELBO is then the cross-entropy of the
clean token at masked positions, weighted by 1/t; its mean over loss tokens is a bound
on the per-token NLL, so exp of it is comparable with an AR perplexity. Tokens outside
``loss_mask`` (SFT prompts, padding) stay clean: the model denoises a response given its
prompt (LLaDA).

Per-token log-probabilities for RL (``token_logps``) are the one-step estimate of
diffu-GRPO (d1, Zhao et al. 2025): the response is fully masked and each prompt token is
masked with probability ``p_mask_prompt``; one forward pass predicts every response token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models.base import LM, TokenLogps, TokenScores
from lmpipe.models.sampling import sample_from_logits
from lmpipe.models.transformer import TransformerConfig


class DiffusionLM(LM):
    arch = "diffusion"
    exact_likelihood = False
    causal = False
    pads_with_eos: ClassVar[bool] = True

    def __init__(
        self,
        config: TransformerConfig,
        special_ids: dict[str, int] | None = None,
        eps: float = 1e-3,
        antithetic: bool = True,
        p_mask_prompt: float = 0.3,
    ):
        super().__init__(config, special_ids)
        if not 0 < eps < 1:
            raise ConfigError(f"arch.eps={eps!r} must be in (0, 1)")
        if not 0 <= p_mask_prompt < 1:
            raise ConfigError(f"arch.p_mask_prompt={p_mask_prompt!r} must be in [0, 1)")
        self.eps = eps
        self.antithetic = antithetic
        self.p_mask_prompt = p_mask_prompt
        self.mask_id = self.special_id("mask")  # fail at build time, not at the first step

    def arch_options(self) -> dict:
        return {
            **super().arch_options(),
            "eps": self.eps,
            "antithetic": self.antithetic,
            "p_mask_prompt": self.p_mask_prompt,
        }

    # --- training -----------------------------------------------------------------
    def logits(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        left_pad: Tensor | None = None,
    ) -> Tensor:
        """Bidirectional float logits that never predict MASK (MDLM's zero masking)."""
        return self.lm_logits(
            self.backbone.hidden_states(
                ids, causal=False, segment_ids=segment_ids, left_pad=left_pad
            )
        )

    def lm_logits(self, hidden: Tensor) -> Tensor:
        logits = self.backbone.lm_head(hidden).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        """(n,) noise levels in [eps, 1]. Antithetic: one uniform shifted by i/n, so every
        one of n equal strata holds exactly one t (lower-variance loss, as MDLM/VDM)."""
        if self.antithetic:
            u = torch.rand(1, device=device, generator=generator)
            u = (u + torch.arange(n, device=device) / n) % 1
        else:
            u = torch.rand(n, device=device, generator=generator)
        return u * (1 - self.eps) + self.eps

    def noise(
        self, batch: Batch, generator: torch.Generator | None = None, t: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward process: (noisy ids, masked (B, L) bool, t (B,)). Each loss token is
        masked with probability t of its row; other tokens are never touched. ``t`` may be
        given to noise at fixed levels."""
        ids = batch.input_ids
        if t is None:
            t = self.sample_t(ids.shape[0], ids.device, generator)
        draw = torch.rand(ids.shape, device=ids.device, generator=generator)
        masked = (draw < t[:, None]) & (batch.loss_mask > 0)
        return ids.masked_fill(masked, self.mask_id), masked, t

    def score(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        """One-sample NELBO: all randomness comes from ``generator`` so that two models
        given alike-seeded generators see the same t and masks (DPO / VRPO)."""
        noisy, masked, t = self.noise(batch, generator)
        logits = self.logits(noisy, batch.segment_ids, batch.left_pad)
        targets = batch.input_ids
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        nll = torch.where(masked, ce.view_as(targets) / t[:, None], 0.0)
        return TokenScores(
            nll=nll,
            target_mask=batch.loss_mask > 0,
            correct=(logits.argmax(dim=-1) == targets) & masked,
            scored_mask=masked,
        )

    def token_logps(
        self, batch: Batch, *, temperature: float = 1.0, with_features: bool = False
    ) -> TokenLogps:
        """d1's one-step estimate: every position from the first target token to the end
        of the row (the response) is masked, and each prompt token is masked with
        probability ``p_mask_prompt`` (per-row draws from ``batch.noise_seeds``, else from
        the global generator); log p of each target token from that one forward pass. The
        features of a token are the hidden state at its (masked) position."""
        ids, targets = batch.input_ids, batch.loss_mask > 0
        response = targets.cumsum(dim=1) > 0
        prompt = ~response
        if batch.left_pad is not None:
            index = torch.arange(ids.shape[1], device=ids.device)
            prompt &= index[None] >= batch.left_pad[:, None]
        draw = _uniform_rows(ids.shape, batch.noise_seeds, ids.device)
        masked = response | (prompt & (draw < self.p_mask_prompt))
        hidden = self.backbone.hidden_states(
            ids.masked_fill(masked, self.mask_id),
            causal=False,
            segment_ids=batch.segment_ids,
            left_pad=batch.left_pad,
        )
        found = self.logps_at(hidden[targets], ids[targets], temperature, with_features)
        return self.placed(found, targets)

    # --- generation ---------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        steps: int | None = None,
        block_length: int | None = None,
        sampler: str = "confidence",
        temperature: float = 0.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        left_pad: Tensor | None = None,
        **ignored,
    ) -> Tensor:
        """(B, T) prompt -> (B, T + max_new_tokens): append MASKs and denoise them.

        ``sampler``: "ancestral" (MDLM, ``steps`` steps from t=1 to 0) or "confidence"
        (LLaDA low-confidence remasking over semi-autoregressive blocks of
        ``block_length``, default one block). ``steps`` (default max_new_tokens) is the
        total budget; the confidence sampler spreads it over the blocks, at least one step
        and at most one per token each. ``temperature`` 0 picks the argmax token. After the
        first ``eos_id`` in the generated part every token becomes ``eos_id``. Options of
        other architectures' samplers (top_k, use_cache, ...) are ignored. ``left_pad``:
        prompts of different lengths, left-padded.
        """
        B, T = prompt_ids.shape
        total = T + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(
                f"diffusion generates the whole sequence at once: prompt {T} + "
                f"max_new_tokens {max_new_tokens} = {total} exceeds block_size "
                f"{self.config.block_size}"
            )
        if max_new_tokens < 1:
            return prompt_ids
        steps = max_new_tokens if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        masks = prompt_ids.new_full((B, max_new_tokens), self.mask_id)
        x = torch.cat([prompt_ids, masks], dim=1)
        if sampler == "ancestral":
            self._ancestral(x, T, steps, temperature, generator, left_pad)
        elif sampler == "confidence":
            self._confidence(
                x, T, steps, block_length or max_new_tokens, temperature, generator, left_pad
            )
        else:
            raise ValueError(f"sampler={sampler!r} is not one of ancestral, confidence")
        if eos_id is not None:
            after_eos = (x[:, T:] == eos_id).cumsum(dim=1) > 0
            x[:, T:].masked_fill_(after_eos, eos_id)
        return x

    def _draw(
        self, logits: Tensor, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        """(B, N, V) logits -> (B, N) tokens, argmax at temperature 0."""
        flat = sample_from_logits(
            logits.flatten(0, 1), temperature=temperature, generator=generator
        )
        return flat.view(logits.shape[:2])

    def _ancestral(
        self,
        x: Tensor,
        start: int,
        steps: int,
        temperature: float,
        generator: torch.Generator | None,
        left_pad: Tensor | None,
    ) -> None:
        """MDLM ancestral sampling in place. Going from t=s to t=s' < s, a masked token is
        revealed with probability (s - s') / s (log-linear schedule); s' = 0 at the last
        step reveals the rest. The denoiser sees no time input, so its logits only change
        with the tokens: they are computed only for steps that reveal something (MDLM's
        cache, which skips the many steps that change nothing when steps >> tokens)."""
        times = torch.linspace(1, 0, steps + 1).tolist()
        for s, s_next in zip(times[:-1], times[1:], strict=True):
            gen = x[:, start:]  # a view: writes land in x
            draw = torch.rand(gen.shape, device=x.device, generator=generator)
            reveal = (gen == self.mask_id) & (draw < (s - s_next) / s)
            if reveal.any():
                logits = self.logits(x, left_pad=left_pad)[:, start:]
                gen[reveal] = self._draw(logits, temperature, generator)[reveal]

    def _confidence(
        self,
        x: Tensor,
        start: int,
        steps: int,
        block_length: int,
        temperature: float,
        generator: torch.Generator | None,
        left_pad: Tensor | None,
    ) -> None:
        """LLaDA low-confidence remasking in place: blocks are filled left to right; each
        step predicts every masked position of the block and commits the k most confident
        predictions, with k spread evenly so the block finishes within its steps."""
        n = x.shape[1] - start
        n_blocks = math.ceil(n / block_length)
        steps_per_block = math.ceil(steps / n_blocks)
        for lo in range(start, start + n, block_length):
            block = x[:, lo : lo + block_length]  # a view: writes land in x
            size = block.shape[1]
            block_steps = min(steps_per_block, size)
            for i in range(block_steps):
                k = size // block_steps + (i < size % block_steps)
                logits = self.logits(x, left_pad=left_pad)[:, lo : lo + size]
                tokens = self._draw(logits, temperature, generator)
                confidence = logits.softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
                confidence = confidence.masked_fill(block != self.mask_id, -1.0)
                chosen = confidence.topk(k, dim=-1).indices
                block.scatter_(1, chosen, tokens.gather(1, chosen))


def _uniform_rows(shape: torch.Size, seeds: Tensor | None, device: torch.device) -> Tensor:
    """Uniform draws of ``shape`` (B, L): row b from ``seeds[b]`` when given (the same
    draws whichever batch the row is in), else from the global generator."""
    if seeds is None:
        return torch.rand(shape, device=device)
    rows = [torch.rand(shape[1], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)
