"""Task scorers on held-out prompts, from greedy replies (up to the end of the turn):
exact match of the final answer, and the rewards an RL stage trains on."""

from __future__ import annotations

import torch

from lmpipe.data.tokenizer import Tokenizer
from lmpipe.eval.answers import answers_match, extract_answer
from lmpipe.eval.generation import complete
from lmpipe.eval.heldout import Prompt
from lmpipe.models import LM
from lmpipe.objectives.rewards import Completion, Reward, score


def greedy_replies(
    model: LM,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> list[list[int]]:
    """Each prompt's greedy reply, its end-of-turn token excluded."""
    return complete(
        model,
        [prompt.ids for prompt in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=(tokenizer.turn_end_id, tokenizer.eos_id),
        batch_size=batch_size,
        device=device,
        temperature=0.0,
        progress=progress,
    )


def answer_metrics(
    tokenizer: Tokenizer, prompts: list[Prompt], replies: list[list[int]]
) -> dict[str, float]:
    """``task/answer_accuracy``: the fraction of replies whose final answer is the
    reference's, over the ``task/answers`` prompts whose reference has an answer (the
    others are left out; none at all gives no metrics)."""
    hits = [
        answers_match(extract_answer(tokenizer.decode(reply)), answer)
        for prompt, reply in zip(prompts, replies, strict=True)
        if prompt.reference is not None and (answer := extract_answer(prompt.reference)) is not None
    ]
    if not hits:
        return {}
    return {"task/answer_accuracy": sum(hits) / len(hits), "task/answers": len(hits)}


def reward_metrics(
    rewards: dict[str, Reward],
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    replies: list[list[int]],
    max_new_tokens: int,
) -> dict[str, float]:
    """``reward/mean`` (the weighted total) and ``reward/<name>`` of the replies, over the
    prompts with a reference (all of them when no reward needs one)."""
    needs_reference = any(reward.needs_reference for reward in rewards.values())
    completions = [
        Completion(
            text=tokenizer.decode(reply),
            tokens=min(len(reply) + 1, max_new_tokens),
            truncated=len(reply) >= max_new_tokens,
            max_tokens=max_new_tokens,
            reference=prompt.reference,
            prompt_ids=tuple(prompt.ids),
            # A reply that stopped ended at the end of its turn (the stop token is cut).
            ids=tuple(reply if len(reply) >= max_new_tokens else [*reply, tokenizer.turn_end_id]),
        )
        for prompt, reply in zip(prompts, replies, strict=True)
        if prompt.reference is not None or not needs_reference
    ]
    if not completions:
        return {}
    totals, each = score(rewards, completions)
    return {
        "reward/mean": sum(totals) / len(totals),
        **{f"reward/{name}": sum(values) / len(values) for name, values in each.items()},
    }
