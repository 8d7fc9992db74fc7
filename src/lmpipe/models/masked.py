"""What masked diffusion LMs share: the forward process, the NELBO and the samplers.

Forward process: absorbing state with the log-linear schedule, so a token is replaced by
MASK with probability t. The continuous-time NELBO is then the cross-entropy of the
clean token at masked positions, weighted by 1/t; its mean over loss tokens is a bound
on the per-token NLL, so exp of it is comparable with an AR perplexity. Tokens outside
``loss_mask`` (SFT prompts, padding) stay clean: the model denoises a response given its
prompt (LLaDA).

``MaskedDiffusionLM`` holds all of it; a subclass says what its denoiser is: plain MDLM
(``DiffusionLM``) or one that also reads candidate tokens at masked positions (``SDDLM``).
The samplers call ``denoiser()``, a fresh logits function per generation, so a denoiser
may carry state from one step to the next (SDD's candidates).

Per-token log-probabilities for RL (``token_logps``) are the one-step estimate of
diffu-GRPO (d1, Zhao et al. 2025): the response is fully masked and each prompt token is
masked with probability ``p_mask_prompt``; one denoising pass predicts every response
token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models.base import LM, TokenLogps, TokenScores
from lmpipe.models.sampling import sample_from_logits
from lmpipe.models.segments import segment_starts
from lmpipe.models.transformer import TransformerConfig

Denoiser = Callable[[Tensor], Tensor]  # (B, L) ids with MASKs -> (B, L, V) float logits


class MaskedDiffusionLM(LM):
    exact_likelihood = False
    causal = False

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
    def hidden(
        self, ids: Tensor, segment_ids: Tensor | None = None, left_pad: Tensor | None = None
    ) -> Tensor:
        """Bidirectional final hidden states of ``ids``."""
        return self.backbone.hidden_states(
            ids, causal=False, segment_ids=segment_ids, left_pad=left_pad
        )

    def logits(
        self, ids: Tensor, segment_ids: Tensor | None = None, left_pad: Tensor | None = None
    ) -> Tensor:
        """Bidirectional float logits that never predict MASK."""
        return self.lm_logits(self.hidden(ids, segment_ids, left_pad))

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Float logits with MASK impossible (MDLM's zero masking)."""
        logits = self.backbone.lm_head(hidden).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def denoise_hidden(self, noisy: Tensor, batch: Batch) -> Tensor:
        """The denoiser's final hidden states for ``noisy``, the batch's tokens partly
        masked (laid out as ``batch``: segments, left padding)."""
        return self.hidden(noisy, batch.segment_ids, batch.left_pad)

    def denoise(self, noisy: Tensor, batch: Batch) -> Tensor:
        """The denoiser's logits for ``noisy`` (see ``denoise_hidden``)."""
        return self.lm_logits(self.denoise_hidden(noisy, batch))

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

    def nelbo(self, logits: Tensor, batch: Batch, masked: Tensor, t: Tensor) -> TokenScores:
        """Scores of denoiser ``logits`` for the noised ``batch``: the 1/t-weighted
        cross-entropy of the clean tokens at masked positions."""
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
        of the row or packed segment (the response) is masked, and each prompt token is
        masked with probability ``p_mask_prompt`` (per-row draws from ``batch.noise_seeds``,
        else from the global generator); log p of each target token from that one pass.
        The features of a token are the hidden state at its (masked) position."""
        ids, targets = batch.input_ids, batch.loss_mask > 0
        seen = targets.long().cumsum(dim=1)  # targets so far: in the row, or its segment
        if batch.segment_ids is not None:
            starts = segment_starts(batch.segment_ids)
            seen = seen - torch.where(starts, seen - targets.long(), 0).cummax(dim=1).values
        response = seen > 0
        prompt = ~response
        if batch.left_pad is not None:
            index = torch.arange(ids.shape[1], device=ids.device)
            prompt &= index[None] >= batch.left_pad[:, None]
        draw = _uniform_rows(ids.shape, batch.noise_seeds, ids.device)
        masked = response | (prompt & (draw < self.p_mask_prompt))
        hidden = self.denoise_hidden(ids.masked_fill(masked, self.mask_id), batch)
        found = self.logps_at(hidden[targets], ids[targets], temperature, with_features)
        return self.placed(found, targets)

    # --- generation ---------------------------------------------------------------
    def denoiser(self, left_pad: Tensor | None = None, **options) -> Denoiser:
        """The logits function the samplers call at each step of one generation (of
        prompts with ``left_pad`` leading padding tokens)."""
        return lambda ids: self.logits(ids, left_pad=left_pad)

    def finish(self, generated: Tensor, eos_id: int | None) -> None:
        """In place on the generated part: after the first ``eos_id`` every token is
        ``eos_id``."""
        if eos_id is not None:
            after_eos = (generated == eos_id).cumsum(dim=1) > 0
            generated.masked_fill_(after_eos, eos_id)

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
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        left_pad: Tensor | None = None,
        copies: int = 1,
        **options,
    ) -> Tensor:
        """(B, T) prompt -> (B x copies, T + max_new_tokens): append MASKs and denoise them
        (``copies`` rows per prompt, consecutive).

        ``sampler``: "ancestral" (MDLM, ``steps`` steps from t=1 to 0) or "confidence"
        (LLaDA low-confidence remasking over semi-autoregressive blocks of
        ``block_length``, default one block). ``steps`` (default max_new_tokens) is the
        total budget; the confidence sampler spreads it over the blocks, at least one step
        and at most one per token each. Tokens are drawn at ``temperature`` (0: argmax)
        from the ``top_k`` / ``top_p`` filtered distribution; a committed token never
        changes. After the first ``eos_id`` in the generated part every token becomes
        ``eos_id``. ``left_pad``: prompts of different lengths, left-padded. Other
        ``options`` go to ``denoiser``, which ignores those of other architectures'
        samplers (use_cache, ...).
        """
        prompt_ids = prompt_ids.repeat_interleave(copies, dim=0)
        if left_pad is not None:
            left_pad = left_pad.repeat_interleave(copies, dim=0)
        B, T = prompt_ids.shape
        total = T + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(
                f"{self.arch} generates the whole sequence at once: prompt {T} + "
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
        denoise = self.denoiser(left_pad=left_pad, **options)

        def draw(logits: Tensor) -> Tensor:  # (B, N, V) -> (B, N)
            flat = sample_from_logits(
                logits.flatten(0, 1),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            return flat.view(logits.shape[:2])

        if sampler == "ancestral":
            self._ancestral(x, T, steps, denoise, draw, generator)
        elif sampler == "confidence":
            self._confidence(x, T, steps, block_length or max_new_tokens, denoise, draw)
        else:
            raise ValueError(f"sampler={sampler!r} is not one of ancestral, confidence")
        self.finish(x[:, T:], eos_id)
        return x

    def _ancestral(
        self,
        x: Tensor,
        start: int,
        steps: int,
        denoise: Denoiser,
        draw: Callable[[Tensor], Tensor],
        generator: torch.Generator | None,
    ) -> None:
        """MDLM ancestral sampling in place. Going from t=s to t=s' < s, a masked token is
        revealed with probability (s - s') / s (log-linear schedule); s' = 0 at the last
        step reveals the rest. The denoiser sees no time input, so its logits only change
        with the tokens: they are computed only for steps that reveal something (MDLM's
        cache, which skips the many steps that change nothing when steps >> tokens)."""
        times = torch.linspace(1, 0, steps + 1).tolist()
        for s, s_next in zip(times[:-1], times[1:], strict=True):
            gen = x[:, start:]  # a view: writes land in x
            rand = torch.rand(gen.shape, device=x.device, generator=generator)
            reveal = (gen == self.mask_id) & (rand < (s - s_next) / s)
            if reveal.any():
                logits = denoise(x)[:, start:]
                gen[reveal] = draw(logits)[reveal]

    def _confidence(
        self,
        x: Tensor,
        start: int,
        steps: int,
        block_length: int,
        denoise: Denoiser,
        draw: Callable[[Tensor], Tensor],
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
                logits = denoise(x)[:, lo : lo + size]
                tokens = draw(logits)
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
