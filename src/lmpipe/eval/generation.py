"""Completing prompts with any architecture: batched for evaluation, streamed for a terminal.

A completion ends before the first of ``stop_ids`` (the chat template's turn end for a
chat, EOS for text); ``stop_ids[0]`` is the token the model stops at. Prompts of different
lengths share a batch left-padded (the LM seam's ``left_pad``); batches hold prompts of
similar lengths, so little is padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import takewhile

import torch

from lmpipe.batch import left_padded
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import ConfigError
from lmpipe.models import LM
from lmpipe.tracking.progress import progress_bar


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict]) -> tuple[list[int], tuple]:
    """The ids a model completes for ``prompt`` and the ids its completion stops at.

    Messages (``[{role, content}]``) go through the chat template up to the assistant's
    turn, which the template's end of turn ends; text follows EOS, the way documents
    start in training ("a document starting with it"), and ends at EOS.
    """
    if isinstance(prompt, str):
        return [tokenizer.eos_id, *tokenizer.encode(prompt)], (tokenizer.eos_id,)
    text = tokenizer.render_chat(list(prompt), add_generation_prompt=True)
    return tokenizer.encode(text), (tokenizer.turn_end_id, tokenizer.eos_id)


def prompt_budget(model: LM, max_new_tokens: int) -> int:
    """How many prompt tokens (the newest) a generation of ``max_new_tokens`` keeps: a
    model that streams (AR) slides its window and keeps a full block; one that writes the
    whole sequence at once (diffusion) keeps what the new tokens leave of the block."""
    block = model.config.block_size
    if model.streams:
        return block
    if max_new_tokens >= block:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt: arch={model.arch} "
            f"generates prompt and answer in one block of {block} tokens"
        )
    return block - max_new_tokens


def _until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    return list(takewhile(lambda t: t not in stop_ids, ids))


@torch.no_grad()
def complete(
    model: LM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int,
    device: torch.device,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[list[int]]:
    """The completion (token ids, stop token excluded) of every prompt, in order.
    ``temperature`` 0 is greedy and deterministic."""
    budget = prompt_budget(model, max_new_tokens)
    prompts = [p[-budget:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    generator = torch.Generator(device).manual_seed(seed)
    completions: list[list[int]] = [[] for _ in prompts]
    for chunk in progress_bar(chunks, desc="generate", unit="batch", enabled=progress):
        ids, left_pad = left_padded([prompts[i] for i in chunk], pad_id=0)  # never attended
        out = model.generate(
            ids.to(device),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=stop_ids[0],
            generator=generator,
            left_pad=left_pad.to(device),
        )
        for index, row in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
            completions[index] = _until_stop(row, stop_ids)
    return completions


def stream_completion(
    model: LM,
    prompt: list[int],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    device: torch.device,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> Iterator[int]:
    """The completion of one prompt, token by token as the model makes them (AR); an
    architecture that cannot stream yields its whole completion when it is done."""
    prompt = prompt[-prompt_budget(model, max_new_tokens) :]
    ids = torch.tensor([prompt], device=device)
    sampling = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "eos_id": stop_ids[0],
        "generator": torch.Generator(device).manual_seed(seed),
    }
    # Both are no_grad themselves (a ``with no_grad`` here would leak out at each yield).
    if model.streams:
        tokens: Iterator[int] = (int(t[0]) for t in model.stream(ids, max_new_tokens, **sampling))
    else:
        tokens = iter(model.generate(ids, max_new_tokens, **sampling)[0, len(prompt) :].tolist())
    yield from takewhile(lambda t: t not in stop_ids, tokens)
