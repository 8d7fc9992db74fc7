"""Record formats: normalise raw records to one schema per format, and encode them to tokens.

| format     | normalised record                                             | documents |
| ---------- | ------------------------------------------------------------- | --------- |
| text       | ``{"text": str}``                                             | 1: text + EOS, all trained |
| chat       | ``{"messages": [{"role", "content"}, ...]}``                  | 1: chat template, assistant turns trained |
| preference | ``{"prompt": [messages], "chosen": str, "rejected": str}``   | 2: prompt + chosen, prompt + rejected; response trained |
| prompt     | ``{"prompt": [messages], "answer": str | None}``             | 1: prompt (+ answer as the assistant turn, trained) |

Accepted raw shapes: chat from ``messages``, ShareGPT ``conversations`` (``from``/``value``)
or Alpaca ``instruction``/``input``/``output`` (also the seed tasks' ``instances``);
preference from ``prompt``/``chosen``/``rejected`` (strings or message lists) or hh-rlhf
transcripts (``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns); prompt from ``prompt`` or
``question`` with an optional ``answer``. ``fields`` in a source renames raw keys first.
"""

from __future__ import annotations

import re

from lmpipe.data.tokenizer import Encoded, Tokenizer
from lmpipe.errors import DataError

FORMATS = ("text", "chat", "preference", "prompt")
ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
DOCUMENTS_PER_RECORD = {"text": 1, "chat": 1, "preference": 2, "prompt": 1}


class SkipRecord(Exception):
    """A record that is well-formed but unusable: dropped and counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def detect_format(record: dict, where: str) -> str:
    """The format a raw record is in, from its fields."""
    if "chosen" in record or "rejected" in record:
        return "preference"
    if {"messages", "conversations", "instruction"} & record.keys():
        return "chat"
    if "prompt" in record or "question" in record:
        return "prompt"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot detect the record format from fields {sorted(record)}")


def normalize(record: dict, fmt: str, where: str, fields: dict | None = None) -> dict:
    """Map a raw record to the format's schema. Raises DataError for a malformed record
    and SkipRecord for one to drop and count."""
    if fields:
        record = {fields.get(k, k): v for k, v in record.items()}
    if fmt == "text":
        return {"text": _string(record, "text", where)}
    if fmt == "chat":
        messages = _chat_messages(record, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipRecord("no_assistant_turn")
        return {"messages": messages}
    if fmt == "preference":
        return _preference(record, where)
    if fmt == "prompt":
        prompt = record.get("prompt", record.get("question"))
        if prompt is None:
            raise DataError(f"{where}: record has no 'prompt' or 'question' field")
        answer = record.get("answer")
        return {
            "prompt": _as_messages(prompt, where, "prompt"),
            "answer": None if answer is None else str(answer),
        }
    raise DataError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


def record_texts(record: dict) -> list[str]:
    """The strings of a normalised record (tokenizer training, filters, lengths)."""
    if "text" in record:
        return [record["text"]]
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    texts = [m["content"] for m in record["prompt"]]
    return texts + [record[k] for k in ("chosen", "rejected", "answer") if record.get(k)]


def encode_batch(records: list[dict], fmt: str, tokenizer: Tokenizer) -> list[list[Encoded]]:
    """The documents (token ids + loss mask) of each record; see the table above."""
    if fmt == "text":
        ids = tokenizer.encode_batch([r["text"] for r in records])
        return [[(doc + [tokenizer.eos_id], [1] * (len(doc) + 1))] for doc in ids]
    return [encode_record(r, fmt, tokenizer) for r in records]


def encode_record(record: dict, fmt: str, tokenizer: Tokenizer) -> list[Encoded]:
    if fmt == "text":
        return encode_batch([record], fmt, tokenizer)[0]
    if fmt == "chat":
        return [tokenizer.encode_chat(record["messages"])]
    if fmt == "preference":
        return [
            tokenizer.encode_chat(_reply(record["prompt"], record[side]), train_on="last")
            for side in ("chosen", "rejected")
        ]
    if record["answer"] is None:
        ids = tokenizer.encode(tokenizer.render_chat(record["prompt"], add_generation_prompt=True))
        return [([*ids, tokenizer.eos_id], [0] * (len(ids) + 1))]
    return [tokenizer.encode_chat(_reply(record["prompt"], record["answer"]), train_on="last")]


# --- helpers ---------------------------------------------------------------------------
def _reply(prompt: list[dict], response: str) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": response}]


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: record has no '{key}' field (fields: {sorted(record)})")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _message(raw, where: str, index: int, role_key="role", content_key="content") -> dict:
    if not isinstance(raw, dict) or role_key not in raw or content_key not in raw:
        raise DataError(f"{where}: message {index} needs '{role_key}' and '{content_key}'")
    role = str(raw[role_key]).lower()
    role = _ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise DataError(
            f"{where}: message {index} has unknown role '{raw[role_key]}' "
            f"(expected {', '.join(ROLES)})"
        )
    content = raw[content_key]
    if not isinstance(content, str):
        raise DataError(f"{where}: message {index} content must be a string")
    return {"role": role, "content": content}


def _chat_messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        raw = record["messages"]
        keys = ("role", "content")
    elif "conversations" in record:
        raw = record["conversations"]
        keys = ("from", "value")
    else:
        return _alpaca(record, where)
    if not isinstance(raw, list) or not raw:
        raise DataError(
            f"{where}: '{'messages' if keys[0] == 'role' else 'conversations'}' "
            "must be a non-empty list"
        )
    return [_message(m, where, i, *keys) for i, m in enumerate(raw)]


def _alpaca(record: dict, where: str) -> list[dict]:
    instruction = _string(record, "instruction", where)
    if "instances" in record:  # Alpaca seed tasks: the first instance is the example
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: 'instances' must be a non-empty list")
        record = {**record, **instances[0]}
    output = _string(record, "output", where)
    extra = record.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _as_messages(value, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        return [_message(m, where, i) for i, m in enumerate(value)]
    raise DataError(f"{where}: '{key}' must be a string or a non-empty list of messages")


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_transcript(text: str, where: str) -> tuple[list[dict], str]:
    """An hh-rlhf transcript -> (prompt messages, final assistant response)."""
    parts = _HH_TURN.split(text)
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": content.strip()}
        for who, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: transcript does not end with an '\\n\\nAssistant:' turn")
    return turns[:-1], turns[-1]["content"]


def _response(value, where: str, key: str) -> tuple[list[dict] | None, str]:
    """A chosen/rejected value -> (its own prompt messages if it carries them, response)."""
    if isinstance(value, str):
        if "\n\nHuman:" in value:
            return _hh_transcript(value, where)
        return None, value
    messages = _as_messages(value, where, key)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{key}' must end with an assistant message")
    return messages[:-1] or None, messages[-1]["content"]


def _preference(record: dict, where: str) -> dict:
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise DataError(f"{where}: preference record has no '{key}' field")
    chosen_prompt, chosen = _response(record["chosen"], where, "chosen")
    rejected_prompt, rejected = _response(record["rejected"], where, "rejected")
    if record.get("prompt") is not None:
        prompt = _as_messages(record["prompt"], where, "prompt")
    elif chosen_prompt:
        prompt = chosen_prompt
    else:
        raise DataError(f"{where}: preference record has no 'prompt' field")
    if rejected_prompt and chosen_prompt and rejected_prompt != chosen_prompt:
        raise SkipRecord("prompts_differ")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen_equals_rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
