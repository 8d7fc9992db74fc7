"""Task scorers on held-out prompts: exact match of the final answer of a greedy reply."""

from __future__ import annotations

import torch

from lmpipe.data.tokenizer import Tokenizer
from lmpipe.eval.answers import answers_match, extract_answer
from lmpipe.eval.generation import complete
from lmpipe.eval.heldout import Prompt
from lmpipe.models import LM


def answer_accuracy(
    model: LM,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> float | None:
    """The fraction of chat prompts whose greedy reply (up to the turn end) has the final
    answer of the reference; prompts whose reference has no answer are left out, and
    None means none had one."""
    scorable = [
        (prompt, answer)
        for prompt in prompts
        if prompt.reference is not None and (answer := extract_answer(prompt.reference)) is not None
    ]
    if not scorable:
        return None
    replies = complete(
        model,
        [prompt.ids for prompt, _ in scorable],
        max_new_tokens=max_new_tokens,
        stop_ids=(tokenizer.turn_end_id, tokenizer.eos_id),
        batch_size=batch_size,
        device=device,
        temperature=0.0,
        progress=progress,
    )
    hits = [
        answers_match(extract_answer(tokenizer.decode(reply)), answer)
        for reply, (_, answer) in zip(replies, scorable, strict=True)
    ]
    return sum(hits) / len(hits)
