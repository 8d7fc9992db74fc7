"""Autoregressive LM: exact shifted cross-entropy, KV-cache generation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.models.base import LM, TokenLogps, TokenScores
from lmpipe.models.sampling import sample_from_logits
from lmpipe.models.transformer import KVCache


class ARLM(LM):
    arch = "ar"
    exact_likelihood = True
    causal = True
    streams = True

    @staticmethod
    def row_length(block_size: int) -> int:
        # One more token than the context, so every input position has a target.
        return block_size + 1

    def _target_hidden(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Final hidden states at the positions that predict a target token (N, d), those
        positions as a (B, L-1) mask of the shifted grid, and the (B, L-1) targets. The LM
        head and the log-softmax over the vocabulary run there only: prompts and padding
        are often half of an SFT, DPO or RL row."""
        ids = batch.input_ids
        segments = batch.segment_ids[:, :-1] if batch.segment_ids is not None else None
        hidden = self.backbone.hidden_states(
            ids[:, :-1], causal=True, segment_ids=segments, left_pad=batch.left_pad
        )
        mask = batch.loss_mask[:, 1:] > 0
        if batch.segment_ids is not None:  # a segment's first token has no context in it
            mask &= batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
        return hidden[mask], mask, ids[:, 1:]

    def score(self, batch: Batch, *, generator: torch.Generator | None = None) -> TokenScores:
        hidden, mask, targets = self._target_hidden(batch)
        logits = self.lm_logits(hidden)
        picked = mask.nonzero(as_tuple=True)
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

    def token_logps(
        self, batch: Batch, *, temperature: float = 1.0, with_features: bool = False
    ) -> TokenLogps:
        """Exact: log-softmax of the logits / temperature at each target token; the
        features of token t are the hidden state at t - 1, which predicted it."""
        hidden, mask, targets = self._target_hidden(batch)
        found = self.logps_at(hidden, targets[mask], temperature, with_features)
        # Token 0 has no context, so it is never a target: the first column stays empty.
        return self.placed(found, F.pad(mask, (1, 0)))

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
        left_pad: Tensor | None = None,
        copies: int = 1,
    ) -> Iterator[Tensor]:
        """Yield the next token of every row, (B x copies,), one step at a time.

        Rows that produced ``eos_id`` keep yielding it; the stream stops when all rows
        have. Once a quarter of the rows still computed have finished, they leave the
        batch (and the KV cache): a batch of replies of different lengths costs about the
        sum of their lengths, not rows x the longest. When the context fills the model's
        block, the cache is rebuilt from the last half of the context (the uncached path
        crops to the last block, as nanoGPT). ``left_pad``: prompts of different lengths,
        left-padded. ``copies``: rows per prompt (consecutive), sampled independently;
        with the cache, each prompt is read once and its cache copied (RL groups).
        """
        block = self.config.block_size
        first_pad = left_pad  # the prompts' own padding, for the first pass
        seq = prompt_ids.repeat_interleave(copies, dim=0)
        if left_pad is not None:
            left_pad = left_pad.repeat_interleave(copies, dim=0)
        rows = seq.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=seq.device)
        active = torch.arange(rows, device=seq.device)  # the rows still computed
        cache = pad = None
        for _ in range(max_new_tokens):
            live_pad = None if left_pad is None else left_pad[active]
            if not use_cache:
                context, pad = _last(seq[active], block, live_pad)
                logits = self.backbone(context, causal=True, left_pad=pad)[:, -1]
            elif cache is None or cache.length >= cache.capacity:
                first = cache is None
                live, live_pad = (prompt_ids, first_pad) if first else (seq[active], live_pad)
                cache = KVCache(self.config, live.shape[1] + max_new_tokens)
                keep = block // 2 if live.shape[1] >= block else block
                context, pad = _last(live, keep, live_pad)
                logits = self.backbone(context, causal=True, cache=cache, left_pad=pad)[:, -1]
                if first and copies > 1:  # every row of a prompt starts from its one pass
                    each = torch.arange(len(live), device=seq.device).repeat_interleave(copies)
                    cache.keep_rows(each)
                    logits = logits[each]
                    pad = None if pad is None else pad[each]
            else:
                last = seq[active, -1:]
                logits = self.backbone(last, causal=True, cache=cache, left_pad=pad)[:, -1]
            sampled = sample_from_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if eos_id is None:
                token = sampled
            else:  # a finished row still computed repeats EOS, as do the rows gone
                sampled = sampled.masked_fill(done[active], eos_id)
                done[active] = sampled == eos_id
                token = torch.full_like(done, eos_id, dtype=sampled.dtype)
                token[active] = sampled
            seq = torch.cat([seq, token[:, None]], dim=1)
            yield token
            if eos_id is None:
                continue
            if bool(done.all()):
                return
            finished = done[active]
            if 4 * int(finished.sum()) >= len(active):
                active = active[~finished]
                if cache is not None:
                    cache.keep_rows(~finished)
                if pad is not None:
                    pad = pad[~finished]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        *,
        left_pad: Tensor | None = None,
        copies: int = 1,
        **sampling,
    ) -> Tensor:
        """(B, T) prompt -> (B x copies, T + n) with n <= max_new_tokens (fewer if all rows
        hit EOS)."""
        new = list(
            self.stream(prompt_ids, max_new_tokens, left_pad=left_pad, copies=copies, **sampling)
        )
        prompts = prompt_ids.repeat_interleave(copies, dim=0)
        if not new:
            return prompts
        return torch.cat([prompts, torch.stack(new, dim=1)], dim=1)


def _last(seq: Tensor, length: int, left_pad: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The last ``length`` tokens of every row and what remains of its left padding."""
    cut = max(0, seq.shape[1] - length)
    if left_pad is None:
        return seq[:, cut:], None
    return seq[:, cut:], (left_pad - cut).clamp(min=0)
