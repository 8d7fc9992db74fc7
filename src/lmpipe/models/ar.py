"""Autoregressive LM: exact shifted cross-entropy, KV-cache generation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.models.base import LM, TokenScores
from lmpipe.models.sampling import sample_from_logits
from lmpipe.models.transformer import KVCache


class ARLM(LM):
    arch = "ar"
    exact_likelihood = True

    @staticmethod
    def row_length(block_size: int) -> int:
        # One more token than the context, so every input position has a target.
        return block_size + 1

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        ids = batch.input_ids
        segments = batch.segment_ids[:, :-1] if batch.segment_ids is not None else None
        hidden = self.backbone.hidden_states(ids[:, :-1], causal=True, segment_ids=segments)
        targets = ids[:, 1:]
        mask = batch.loss_mask[:, 1:] > 0
        if batch.segment_ids is not None:  # a segment's first token has no context in it
            mask &= batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
        # The LM head and the log-softmax over the vocabulary run at target positions only:
        # prompts and padding are often half of an SFT or DPO row.
        picked = mask.nonzero(as_tuple=True)
        logits = self.backbone.lm_head(hidden[picked])
        picked_nll = F.cross_entropy(logits.float(), targets[picked], reduction="none")
        nll = picked_nll.new_zeros(targets.shape).index_put(picked, picked_nll)
        correct = torch.zeros_like(mask).index_put(picked, logits.argmax(dim=-1) == targets[picked])
        # Token 0 has no context, so it is never a target: pad the first column.
        return TokenScores(
            nll=F.pad(nll, (1, 0)),
            target_mask=F.pad(mask, (1, 0)),
            correct=F.pad(correct, (1, 0)),
            scored_mask=F.pad(mask, (1, 0)),
        )

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """Yield the next token of every row, (B,), one step at a time.

        Rows that produced ``eos_id`` keep yielding it; the stream stops when all rows
        have. When the context fills the model's block, the cache is rebuilt from the
        last half of the context (the uncached path crops to the last block, as nanoGPT).
        """
        block = self.config.block_size
        seq = prompt_ids
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.backbone(seq[:, -block:], causal=True)[:, -1]
            else:
                if cache is None or cache.length >= block:
                    cache = KVCache(self.config)
                    context = seq[:, -(block // 2) :] if seq.shape[1] >= block else seq
                    logits = self.backbone(context, causal=True, cache=cache)[:, -1]
                else:
                    logits = self.backbone(seq[:, -1:], causal=True, cache=cache)[:, -1]
            token = sample_from_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            seq = torch.cat([seq, token[:, None]], dim=1)
            yield token
            if eos_id is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, **sampling) -> Tensor:
        """(B, T) prompt -> (B, T + n) with n <= max_new_tokens (fewer if all rows hit EOS)."""
        new = list(self.stream(prompt_ids, max_new_tokens, **sampling))
        if not new:
            return prompt_ids
        return torch.cat([prompt_ids, torch.stack(new, dim=1)], dim=1)
