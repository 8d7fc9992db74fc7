"""Sparse distribution diffusion (SDD): masked diffusion whose denoiser reads, at every
masked position, a small weighted set of candidate tokens instead of MASK alone.

Each position holds a sparse distribution over the vocabulary and MASK: a clean token is
one-hot; a masked position holds up to k-1 candidate tokens with weights and MASK with
the rest of the mass. The backbone reads the weighted sum of their embeddings
(``embedding_bag``), so the order of the slots cannot matter. How the traps of the first
SDD prototype are kept out:

- the candidates depend on the clean sequence only through the corrupted one: they are
  the top-(k-1) tokens, with their probabilities as weights, of the model's own plain
  (MDLM) prediction from the corrupted sequence (self-conditioning), under stop-gradient;
- the loss is the masked-diffusion NELBO of the second pass. Both passes together are a
  function of the corrupted sequence, i.e. one denoiser, so the NELBO is a bound and
  exp(val/loss) a perplexity bound like ``arch=diffusion``'s; with k=1 there is no first
  pass and the model is exactly ``arch=diffusion``;
- the first pass learns too: its own NELBO's gradient is added with a value of zero
  (``nll + aux - aux.detach()``), so every row trains both passes while the loss stays the
  two-pass bound. Self-conditioning is never dropped at random (as Chen et al. 2022 do
  to train the first pass), which keeps the estimator a deterministic function of the
  noise, the same in training and evaluation mode: a DPO policy and its frozen reference
  compute the same estimate from shared noise;
- the samplers commit tokens and never change them; positions still masked carry the top
  k-1 of the last prediction as their candidates (the first step proposes them from the
  MASKs, as training does);
- SFT rows are padded with IGNORE, trained (diffusion uses EOS); generation ends a row at
  its first IGNORE, which never leaves ``generate``.

The k-curriculum ``k_schedule`` ([[step, k], ...]) runs over the model's own training
steps, counted in the checkpoint with the weights: a resumed run continues it exactly and
a later stage (SFT after pretraining) starts at the k the earlier one reached. In
evaluation mode k is ``eval_k``, or the k of the last trained step when that is null.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.models.base import TokenScores
from lmpipe.models.masked import Denoiser, MaskedDiffusionLM
from lmpipe.models.transformer import TransformerConfig

REQUIRED_TOKENS = ("mask", "ignore", "eos")


@dataclass
class Proposal:
    """Candidate tokens for every position, read only where the input is MASK."""

    ids: Tensor  # (B, L, k-1) token ids
    probs: Tensor  # (B, L, k-1) their weights: the proposing prediction's probabilities


def check_k(k, vocab_size: int, key: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{key}: k={k!r} must be an integer >= 1")
    if k >= vocab_size:  # k-1 candidates among the tokens other than MASK
        raise ConfigError(f"{key}: k={k} must be smaller than the vocabulary ({vocab_size})")
    return k


def check_k_schedule(schedule, vocab_size: int) -> list[list[int]]:
    """``[[step, k], ...]`` from step 0 with increasing steps, as plain lists."""
    key = f"arch.k_schedule={schedule!r}"
    pairs = schedule if isinstance(schedule, list | tuple) else []
    if not pairs or not all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        for p in pairs
    ):
        raise ConfigError(f"{key} must be a non-empty list of [step, k] integer pairs")
    steps = [step for step, _ in pairs]
    if steps[0] != 0:
        raise ConfigError(f"{key} must start at step 0")
    if any(later <= earlier for earlier, later in pairwise(steps)):
        raise ConfigError(f"{key}: the steps must increase")
    for _, k in pairs:
        check_k(k, vocab_size, key)
    return [[step, k] for step, k in pairs]


class SDDLM(MaskedDiffusionLM):
    arch = "sdd"

    def __init__(
        self,
        config: TransformerConfig,
        special_ids: dict[str, int] | None = None,
        eps: float = 1e-3,
        antithetic: bool = True,
        p_mask_prompt: float = 0.3,
        k_schedule: list | tuple = ((0, 1),),
        eval_k: int | None = None,
    ):
        missing = [name for name in REQUIRED_TOKENS if name not in (special_ids or {})]
        if missing:
            raise ConfigError(
                f"arch=sdd needs the tokenizer's {', '.join(repr(m) for m in missing)} "
                "special token(s), which this model was not given"
            )
        super().__init__(config, special_ids, eps, antithetic, p_mask_prompt)
        self.ignore_id = self.special_id("ignore")
        self.k_schedule = check_k_schedule(k_schedule, config.vocab_size)
        self.eval_k = None if eval_k is None else check_k(eval_k, config.vocab_size, "arch.eval_k")
        # Optimizer steps taken (saved as the module's extra state) and the k of the last
        # one: a plain int, so a compiled model recompiles when k changes, not every step.
        self.trained_steps = 0
        self.k = self.k_at(0)

    @classmethod
    def pad_target(cls) -> str:
        return "ignore"

    def arch_options(self) -> dict:
        return {**super().arch_options(), "k_schedule": self.k_schedule, "eval_k": self.eval_k}

    # --- the k-curriculum ---------------------------------------------------------
    def k_at(self, step: int) -> int:
        """The scheduled k of training step ``step`` (0-based)."""
        return next(k for start, k in reversed(self.k_schedule) if start <= step)

    def current_k(self) -> int:
        """k of the last (or current) training step; in evaluation mode ``eval_k`` when
        it is set."""
        if not self.training and self.eval_k is not None:
            return self.eval_k
        return self.k

    def on_train_step(self) -> dict[str, float]:
        self.k = self.k_at(self.trained_steps)
        self.trained_steps += 1
        return {"k": self.k}

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.trained_steps, dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        self.trained_steps = int(state)
        self.k = self.k_at(max(self.trained_steps - 1, 0))

    def flops_per_token(self, seq_len: int) -> float:
        """Twice the plain model's once k > 1: both passes run forward and backward."""
        return super().flops_per_token(seq_len) * (2 if self.current_k() > 1 else 1)

    # --- the denoiser -------------------------------------------------------------
    def propose(self, logits: Tensor, k: int) -> Proposal:
        """The k-1 most probable tokens of a prediction, under stop-gradient."""
        probs, ids = logits.detach().softmax(dim=-1).topk(k - 1, dim=-1)
        return Proposal(ids, probs)

    def embed(self, ids: Tensor, proposal: Proposal) -> Tensor:
        """(B, L, d_model) inputs: a clean token's embedding; at a MASK, the sum of the
        candidates' embeddings weighted by their probabilities plus MASK's weighted by the
        rest of the mass."""
        weights = proposal.probs * (ids == self.mask_id)[..., None]
        bag_ids = torch.cat([ids[..., None], proposal.ids], dim=-1)
        bag_weights = torch.cat([1 - weights.sum(dim=-1, keepdim=True), weights], dim=-1)
        table = self.backbone.tok_emb.weight
        embeds = F.embedding_bag(
            bag_ids.flatten(0, 1),
            table,
            per_sample_weights=bag_weights.flatten(0, 1).to(table.dtype),
            mode="sum",
        )
        return embeds.view(*ids.shape, -1)

    def hidden(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        left_pad: Tensor | None = None,
        proposal: Proposal | None = None,
    ) -> Tensor:
        """Final hidden states; with a ``proposal`` the masked positions read its
        candidates."""
        embeds = None if proposal is None else self.embed(ids, proposal)
        return self.backbone.hidden_states(
            ids, causal=False, segment_ids=segment_ids, left_pad=left_pad, embeds=embeds
        )

    def logits(
        self,
        ids: Tensor,
        segment_ids: Tensor | None = None,
        left_pad: Tensor | None = None,
        proposal: Proposal | None = None,
    ) -> Tensor:
        """Float logits; with a ``proposal`` the masked positions read its candidates."""
        return self.lm_logits(self.hidden(ids, segment_ids, left_pad, proposal))

    def denoise_hidden(self, noisy: Tensor, batch: Batch) -> Tensor:
        """The two-pass denoiser: candidates from the plain pass, then the pass that reads
        them (just the plain pass at k=1)."""
        first = self.hidden(noisy, batch.segment_ids, batch.left_pad)
        k = self.current_k()
        if k == 1:
            return first
        proposal = self.propose(self.lm_logits(first), k)
        return self.hidden(noisy, batch.segment_ids, batch.left_pad, proposal)

    def score(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        """One-sample NELBO of the two-pass denoiser; all randomness comes from
        ``generator`` (shared noise for DPO / VRPO)."""
        noisy, masked, t = self.noise(batch, generator)
        first = self.logits(noisy, batch.segment_ids, batch.left_pad)
        k = self.current_k()
        if k == 1:
            return self.nelbo(first, batch, masked, t)
        proposal = self.propose(first, k)
        second = self.logits(noisy, batch.segment_ids, batch.left_pad, proposal)
        scores = self.nelbo(second, batch, masked, t)
        if torch.is_grad_enabled():  # train the first pass too, adding nothing to the value
            aux = self.nelbo(first, batch, masked, t).nll
            scores.nll = scores.nll + (aux - aux.detach())
        return scores

    # --- generation ---------------------------------------------------------------
    def denoiser(self, left_pad: Tensor | None = None, k: int | None = None, **ignored) -> Denoiser:
        """Logits for the samplers; candidates carry over between steps. ``k`` (default:
        ``current_k()``) overrides the model's."""
        k = self.current_k() if k is None else check_k(k, self.config.vocab_size, "k")
        if k == 1:
            return super().denoiser(left_pad)
        proposal: Proposal | None = None

        def denoise(x: Tensor) -> Tensor:
            nonlocal proposal
            if proposal is None:  # the first step proposes from the MASKs, as training does
                proposal = self.propose(self.logits(x, left_pad=left_pad), k)
            logits = self.logits(x, left_pad=left_pad, proposal=proposal)
            proposal = self.propose(logits, k)
            return logits

        return denoise

    def finish(self, generated: Tensor, eos_id: int | None) -> None:
        """From a row's first IGNORE (or ``eos_id``) on, every token is ``eos_id`` (the
        tokenizer's EOS when None): IGNORE is padding, never output."""
        stop = generated == self.ignore_id
        if eos_id is not None:
            stop |= generated == eos_id
        end = self.special_id("eos") if eos_id is None else eos_id
        generated.masked_fill_(stop.cumsum(dim=1) > 0, end)
