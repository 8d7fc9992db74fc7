"""What evaluation reads from a prepared dataset's validation split.

- ``scoring_batches``: rows to score, laid out as in training (windows of the token stream
  for text data; whole episodes with their loss mask for chat, prompt and preference data,
  a pair being two rows: chosen, rejected; an architecture that learns to stop by
  predicting its padding token, diffusion's EOS or SDD's IGNORE, is scored on that padding
  too, as in its training);
- ``heldout_prompts``: prompts to complete, from the split's records (``mixed_val.jsonl``),
  each with its held-out continuation: the final assistant reply of a chat, the answer of
  a prompt record, the chosen reply of a pair, the rest of a text document.

Both take the first ``num_samples`` in file order, so every checkpoint sees the same set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice

from lmpipe.batch import Batch
from lmpipe.data.prepare import PreparedData
from lmpipe.data.samplers import Episodes, eval_episodes, eval_windows
from lmpipe.errors import DataError
from lmpipe.models import LM

# A text document is continued from its first tokens: at most this many, and at most half.
TEXT_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the model continues
    text: str  # the prompt as a reader sees it (for the samples file)
    reference: str | None  # the held-out continuation


def scoring_batches(
    data: PreparedData, model: LM, num_samples: int, batch_size: int
) -> list[Batch]:
    """Up to ``num_samples`` held-out examples (windows, episodes or pairs) in batches of
    ``batch_size`` examples, for a context of the model's ``block_size``."""
    block = model.config.block_size
    row_length = model.row_length(block)
    shards = data.split("val")
    max_batches = -(-num_samples // batch_size)
    if data.manifest["format"] == "text":
        batches = eval_windows(shards, row_length, block, batch_size, max_batches)
    else:
        episodes = Episodes(shards, data.manifest["documents_per_record"], row_length)
        if not len(episodes.kept):
            raise DataError(
                f"{data.directory}: no held-out episode fits a row of {row_length} tokens "
                f"(dropped: {dict(episodes.dropped)})"
            )
        tokenizer = data.tokenizer
        target = model.pad_target()
        batches = eval_episodes(
            episodes,
            batch_size,
            max_batches,
            pad_id=tokenizer.pad_id,
            pad_target_id=tokenizer.special_id(target) if target else None,
        )
    return _first_examples(batches, num_samples)


def _first_examples(batches: list[Batch], count: int) -> list[Batch]:
    kept = []
    for batch in batches:
        if count <= 0:
            break
        if batch.num_examples > count:
            batch = batch.split(count)[0]
        kept.append(batch)
        count -= batch.num_examples
    return kept


def completion_stops(data: PreparedData) -> tuple[int, ...]:
    """Where a completion of the data's prompts ends: a text document at EOS, a reply at
    the end of its turn (or EOS)."""
    tokenizer = data.tokenizer
    if data.manifest["format"] == "text":
        return (tokenizer.eos_id,)
    return (tokenizer.turn_end_id, tokenizer.eos_id)


def heldout_prompts(data: PreparedData, num_samples: int) -> list[Prompt]:
    """The first ``num_samples`` validation records as prompts: chats end with the chat
    template's generation prompt; text documents are cut after their first tokens."""
    fmt = data.manifest["format"]
    tokenizer = data.tokenizer
    prompts = []
    with (data.directory / "mixed_val.jsonl").open(encoding="utf-8") as fh:
        for line in islice(fh, num_samples):
            record = json.loads(line)
            if fmt == "text":
                prompts.append(_text_prompt(record["text"], data))
                continue
            if fmt == "chat":
                messages = record["messages"]
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                messages, reference = messages[:last], messages[last]["content"]
            else:
                messages = record["prompt"]
                reference = record["answer"] if fmt == "prompt" else record["chosen"]
            text = tokenizer.render_chat(messages, add_generation_prompt=True)
            prompts.append(Prompt(tokenizer.encode(text), text, reference))
    if not prompts:
        raise DataError(f"{data.directory}: the validation split has no records")
    return prompts


def _text_prompt(text: str, data: PreparedData) -> Prompt:
    tokenizer = data.tokenizer
    ids = tokenizer.encode(text)
    cut = min(TEXT_PROMPT_TOKENS, len(ids) // 2)
    # Documents follow EOS in the token stream, so EOS + prefix is "a document starting so".
    return Prompt(
        [tokenizer.eos_id, *ids[:cut]], tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    )
