"""Supervised fine-tuning: mean NLL over the loss-mask tokens, which for chat data are
exactly the assistant turns (content and end-of-turn token); system, user and tool turns
are context only. A batch with no assistant token is an error, never a NaN."""

from __future__ import annotations

from typing import ClassVar

from lmpipe.objectives.ce import CrossEntropy


class MaskedSFT(CrossEntropy):
    name = "masked_sft"
    data_formats: ClassVar[frozenset[str]] = frozenset({"chat", "prompt"})
