"""Prompts to complete, read from a prepared split's records (``mixed_<split>.jsonl``).

A prompt record gives its prompt and its answer; a chat, its conversation before the final
assistant reply (that reply is the reference); a preference pair, its prompt and the chosen
reply; a text document, its first tokens and the rest. Chat prompts end with the chat
template's generation prompt, so a model continues them with the assistant's reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice

from lmpipe.data.prepare import PreparedData

# A text document is continued from its first tokens: at most this many, and at most half.
TEXT_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what the model continues
    text: str  # the prompt as a reader sees it
    reference: str | None  # the held-out continuation (a prompt record's answer)
    messages: tuple[dict, ...] = ()  # the conversation before the reply (not for text)


def read_prompts(data: PreparedData, split: str, limit: int | None = None) -> list[Prompt]:
    """The first ``limit`` (all: None) records of ``split`` as prompts, in file order."""
    fmt = data.manifest["format"]
    tokenizer = data.tokenizer
    prompts = []
    with (data.directory / f"mixed_{split}.jsonl").open(encoding="utf-8") as fh:
        for line in islice(fh, limit):
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
            prompts.append(Prompt(tokenizer.encode(text), text, reference, tuple(messages)))
    return prompts


def _text_prompt(text: str, data: PreparedData) -> Prompt:
    tokenizer = data.tokenizer
    ids = tokenizer.encode(text)
    cut = min(TEXT_PROMPT_TOKENS, len(ids) // 2)
    # Documents follow EOS in the token stream, so EOS + prefix is "a document starting so".
    return Prompt(
        [tokenizer.eos_id, *ids[:cut]], tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    )
