"""Tokenizers: character-level, byte-level BPE trained on the mixture, or any HF tokenizer.

All three are a ``tokenizers.Tokenizer`` underneath, saved the way HF saves them:
``tokenizer.json`` plus ``tokenizer_config.json`` (chat template, BOS/EOS strings), so a
checkpoint's tokenizer also loads with ``transformers.AutoTokenizer``. The sha256 of both
identifies the tokenizer exactly.

Chat formatting is a Jinja chat template, as in HF: lmpipe's built-in one uses the role
special tokens; an HF tokenizer that ships a ``chat_template`` keeps its own.
"""

from __future__ import annotations

import hashlib
import json
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

# <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>: an assistant turn
# is its content and <|end|>, which is where generation stops.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with lmpipe's special tokens, a chat template and a hash."""

    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        missing = [t for t in SPECIAL_TOKENS.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(missing)
        self.backend = backend
        self.chat_template = chat_template or BUILTIN_CHAT_TEMPLATE
        self.bos_token = bos_token or SPECIAL_TOKENS["bos"]
        self.eos_token = eos_token or SPECIAL_TOKENS["eos"]

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
        """An HF tokenizer from a local directory / tokenizer.json, or a hub id (with its
        chat template when it has one)."""
        if Path(name_or_path).exists():
            return cls.load(name_or_path)
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # hub/network errors come in many types
            raise DataError(f"cannot load tokenizer '{name_or_path}': {exc}") from None
        if not hf.is_fast:
            raise DataError(f"tokenizer '{name_or_path}' has no fast (tokenizers) version")
        return cls(hf.backend_tokenizer, hf.chat_template, hf.bos_token, hf.eos_token)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a directory holding tokenizer.json (and maybe tokenizer_config.json), or
        from a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"tokenizer file not found: {file}")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:
            raise DataError(f"{file}: not a valid tokenizer.json ({exc})") from None
        config_path = file.with_name(CONFIG_FILE)
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"{config_path}: invalid JSON ({exc.msg})") from None
        template = file.with_name(TEMPLATE_FILE)  # where transformers 5 saves it
        return cls(
            backend,
            _template_text(config.get("chat_template"))
            or (template.read_text() if template.is_file() else None),
            _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")),
        )

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

    def unknown_characters(self, text: str) -> set[str]:
        """Characters of ``text`` that a vocabulary of whole characters without an unknown
        token cannot encode (a character tokenizer's unseen ones); none for byte-level BPE."""
        if not isinstance(self.backend.model, models.WordLevel):
            return set()
        vocab = self.backend.get_vocab()
        return {c for c in set(text) if c not in vocab}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @cached_property
    def turn_end_id(self) -> int:
        """The token that ends an assistant turn, where chat generation stops: <|end|> in
        lmpipe's template; the tokenizer's EOS (e.g. ChatML's <|im_end|>) in an HF one."""
        if self.chat_template != BUILTIN_CHAT_TEMPLATE:
            template_eos = self.backend.token_to_id(self.eos_token)
            if template_eos is not None:
                return template_eos
        return self.special_id("end")

    # --- chat ---------------------------------------------------------------------
    @cached_property
    def _template(self):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, through the chat template (as HF's apply_chat_template)."""
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def encode_chat(self, messages: list[dict], train_on: str = "assistant") -> Encoded:
        """Token ids and loss mask of a conversation, followed by EOS.

        The mask is 1 exactly on the tokens of assistant turns (``train_on="assistant"``) or
        of the last turn only (``"last"``, for preference responses and prompt answers): a
        turn's tokens are what rendering it adds after the generation prompt, i.e. its
        content and end-of-turn token, found by rendering the conversation prefix by
        prefix. So any HF chat template works without special markers.
        """
        text = self.render_chat(messages)
        spans = []
        for i, message in enumerate(messages):
            wanted = message["role"] == "assistant" and (
                train_on == "assistant" or i == len(messages) - 1
            )
            if not wanted:
                continue
            before = self.render_chat(messages[:i], add_generation_prompt=True)
            after = self.render_chat(messages[: i + 1])
            if not (after.startswith(before) and text.startswith(after)):
                raise DataError(
                    "the chat template does not render conversations prefix by prefix, so "
                    "assistant turns cannot be located"
                )
            spans.append((len(before), len(after.rstrip())))
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoding.offsets]
        return [*encoding.ids, self.eos_id], [*mask, 0]

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

    def config_json(self) -> str:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": SPECIAL_TOKENS["pad"],
            "mask_token": SPECIAL_TOKENS["mask"],
        }
        return json.dumps(config, indent=2) + "\n"

    @cached_property
    def hash(self) -> str:
        """sha256 of both files: equal hashes mean identical tokenization and formatting."""
        return hashlib.sha256((self.to_json() + "\0" + self.config_json()).encode()).hexdigest()

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.to_json())
        (directory / CONFIG_FILE).write_text(self.config_json())


Encoded = tuple[list[int], list[int]]  # token ids, loss mask (1 = train on the token)


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _template_text(value) -> str | None:
    """HF allows several named templates (a list of {name, template}); take the default."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value}
        return named.get("default") or next(iter(named.values()), None)
    return value


def vocab_shortfall(spec: dict, vocab_size: int) -> str | None:
    """Why a trained BPE vocabulary is smaller than ``spec`` asked, or None when it is not:
    training stops when the text has no pair left to merge."""
    asked = spec.get("vocab_size")
    if spec.get("kind") != "bpe" or asked is None or vocab_size >= int(asked):
        return None
    return (
        f"BPE vocabulary {vocab_size:,}, not the {int(asked):,} asked "
        "(data.tokenizer.vocab_size): the text is too small to learn more merges"
    )


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
