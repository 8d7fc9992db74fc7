"""Tokenizers: character-level, byte-level BPE trained on the mixture, or any HF tokenizer.

All three are a ``tokenizers.Tokenizer`` underneath, so every checkpoint and dataset stores
one standard ``tokenizer.json`` and its sha256 identifies the tokenizer exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmpipe.errors import ConfigError, DataError

# Roles for chat templates, BOS/EOS/PAD, MASK for diffusion, IGNORE for SDD.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "mask": "<|mask|>",
    "ignore": "<|ignore|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool|>",
    "end": "<|end|>",
}
TOKENIZER_KINDS = ("char", "bpe", "hf")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with lmpipe's special tokens and a content hash."""

    def __init__(self, backend: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(missing)
        self.backend = backend

    # --- construction -------------------------------------------------------------
    @classmethod
    def build_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in ``texts`` (sorted), after the special tokens."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        specials = list(SPECIAL_TOKENS.values())
        vocab = {tok: i for i, tok in enumerate(specials + sorted(chars))}
        backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(specials)
        return cls(backend)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE (GPT-2 style pre-tokenization) trained on ``texts``."""
        specials = list(SPECIAL_TOKENS.values())
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(specials):
            raise ConfigError(
                f"data.tokenizer.vocab_size={vocab_size} is too small for byte-level BPE "
                f"(needs at least {len(alphabet) + len(specials)})"
            )
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> Tokenizer:
        """An HF tokenizer from a local directory / tokenizer.json, or a hub id."""
        path = Path(name_or_path)
        try:
            if path.is_dir():
                return cls.from_file(path / "tokenizer.json")
            if path.is_file():
                return cls.from_file(path)
            return cls(HFTokenizer.from_pretrained(name_or_path))
        except Exception as exc:  # hub/network errors come in many types
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot load tokenizer '{name_or_path}': {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:
            raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    # --- use ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_id(self, name: str) -> int:
        token_id = self.backend.token_to_id(SPECIAL_TOKENS[name])
        assert token_id is not None  # guaranteed by __init__
        return token_id

    @cached_property
    def special_ids(self) -> dict[str, int]:
        """Every lmpipe special token by name (``SPECIAL_TOKENS``) -> its id."""
        return {name: self.special_id(name) for name in SPECIAL_TOKENS}

    @cached_property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @cached_property
    def pad_id(self) -> int:
        return self.special_id("pad")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def iter_decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode a growing id stream piece by piece (for streaming output)."""
        emitted = ""
        seen: list[int] = []
        for token_id in ids:
            seen.append(token_id)
            text = self.decode(seen)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                continue
            yield text[len(emitted) :]
            emitted = text

    # --- persistence --------------------------------------------------------------
    def to_json(self) -> str:
        return self.backend.to_str()

    @cached_property
    def hash(self) -> str:
        """sha256 of the serialized tokenizer: equal hashes mean identical tokenization."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


def build_tokenizer(spec: dict, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer a data config asks for (``kind`` char | bpe | hf)."""
    kind = spec.get("kind", "char")
    if kind == "char":
        return Tokenizer.build_char(texts)
    if kind == "bpe":
        return Tokenizer.train_bpe(texts, int(spec.get("vocab_size", 4096)))
    if kind == "hf":
        if not spec.get("name"):
            raise ConfigError("data.tokenizer.name is required when data.tokenizer.kind=hf")
        return Tokenizer.from_pretrained(spec["name"])
    raise ConfigError(f"data.tokenizer.kind={kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
