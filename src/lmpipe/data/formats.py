"""Record formats: normalise raw records to one schema per format and encode them to tokens.

``text``: ``{"text": str}``; every document is followed by EOS and trained on entirely.
"""

from __future__ import annotations

from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import ConfigError, DataError

FORMATS = ("text",)

Encoded = tuple[list[int], list[int] | None]  # token ids, loss mask (None = train on all)


def detect_format(record: dict, where: str) -> str:
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot detect the record format from fields {sorted(record)}")


def normalize(record: dict, fmt: str, where: str, fields: dict | None = None) -> dict:
    """Map a raw record to the format's schema; ``fields`` renames source fields."""
    if fields:
        record = {fields.get(k, k): v for k, v in record.items()}
    if fmt == "text":
        text = record.get("text")
        if text is None:
            raise DataError(f"{where}: record has no 'text' field (fields: {sorted(record)})")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return {"text": text}
    raise ConfigError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


def record_texts(record: dict) -> list[str]:
    """The strings a tokenizer should be trained on for this record."""
    return [record["text"]]


def encode_batch(records: list[dict], fmt: str, tokenizer: Tokenizer) -> list[Encoded]:
    if fmt == "text":
        ids = tokenizer.encode_batch([r["text"] for r in records])
        return [(doc + [tokenizer.eos_id], None) for doc in ids]
    raise ConfigError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")
