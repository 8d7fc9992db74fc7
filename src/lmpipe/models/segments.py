"""Attention over packed rows, one segment at a time ("varlen" attention in plain SDPA).

A packed row holds several sequences one after another, told apart by segment ids. One
SDPA call over the whole row with a block-diagonal mask is exact but slow: the fused
kernel (CPU flash; measured in benchmarks/sft.py) computes every block of the mask,
masked ones included, so a row of 512 tokens costs 512^2 however short its segments are.
Here every segment becomes a sequence of its own that starts at position 0, and the
segments whose lengths round up to the same multiple of ``SEGMENT_BUCKET`` are stacked
into one SDPA call. The cost is then about the sum of the segments' squared lengths,
and causal calls need no mask at all, so SDPA can use its plain causal kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Segment lengths are rounded up to a multiple of this to share an SDPA call: smaller
# wastes less on padding but makes more calls. 32 was the fastest of 8 to 128 for the
# GSM8K chats (benchmarks/sft.py) on CPU.
SEGMENT_BUCKET = 32


def segment_starts(segment_ids: Tensor) -> Tensor:
    """(B, T) boolean: True where a segment begins (each row's first token and every change)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_positions(segment_ids: Tensor) -> Tensor:
    """Position of every token within its segment: 0, 1, ... restarting at each change."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    first = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=1).values
    return index - first


@dataclass(frozen=True)
class SegmentGroup:
    count: int  # segments in the group
    width: int  # their common (padded) length
    key_mask: Tensor | None  # (count, 1, 1, width), True at real keys; None when causal


class PackedSegments:
    """Where every token of a packed (B, T) batch goes in the per-segment layout.

    Padding after a segment (up to its group's width) repeats the segment's last token.
    With causal attention no real token ever sees it; without, ``key_mask`` hides it.
    The outputs at padded positions are dropped, so they get no gradient either.
    Under ``torch.compile`` it runs eagerly (the model around it stays compiled): its
    groups change with every batch and would recompile the model at every step.
    """

    @torch.compiler.disable
    def __init__(self, segment_ids: Tensor, causal: bool, bucket: int = SEGMENT_BUCKET):
        B, T = segment_ids.shape
        device = segment_ids.device
        first = (
            segment_starts(segment_ids).reshape(-1).nonzero().squeeze(1)
        )  # flat index of each segment's start
        lengths = torch.diff(first, append=first.new_tensor([B * T]))
        widths = ((lengths + bucket - 1) // bucket * bucket).clamp(max=T)

        self.shape = (B, T)
        self.groups: list[SegmentGroup] = []
        gather, scatter = [], torch.empty(B * T, dtype=torch.long, device=device)
        offset = 0
        for width in widths.unique().tolist():
            members = (widths == width).nonzero().squeeze(1)
            start, length = first[members, None], lengths[members, None]
            steps = torch.arange(width, device=device)[None]
            real = steps < length
            index = start + torch.minimum(steps, length - 1)  # (count, width) flat tokens
            gather.append(index.reshape(-1))
            slots = offset + torch.arange(index.numel(), device=device).view_as(index)
            scatter[index[real]] = slots[real]
            offset += index.numel()
            key_mask = None if causal else real[:, None, None, :]
            self.groups.append(SegmentGroup(len(members), width, key_mask))
        self.gather = torch.cat(gather)  # per-segment layout <- packed rows
        self.scatter = scatter  # packed rows <- per-segment layout

    @torch.compiler.disable
    def attend(self, attention: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        """Queries, keys, values (B, T, heads, head_dim) -> attention output, the same
        shape: ``attention(q, k, v, key_mask=...)`` runs once per group, on (count, heads,
        width, head_dim) as SDPA takes them."""
        B, T = self.shape
        token = inputs[0].shape[2:]  # (heads, head_dim)
        sizes = [g.count * g.width for g in self.groups]
        stacked = [x.reshape(B * T, *token).index_select(0, self.gather) for x in inputs]
        outputs = []
        for g, *parts in zip(self.groups, *(x.split(sizes) for x in stacked), strict=True):
            shaped = [p.view(g.count, g.width, *token).transpose(1, 2) for p in parts]
            y = attention(*shaped, key_mask=g.key_mask)
            outputs.append(y.transpose(1, 2).reshape(-1, *token))
        return torch.cat(outputs).index_select(0, self.scatter).view(B, T, *token)
