"""Record filters: small pure measures of a text, and the filters a data config names.

A source's ``filters`` list names filters and their thresholds::

    filters:
      - {name: length, min_chars: 20, max_words: 2000}
      - {name: quality, min_alpha_ratio: 0.6, max_repetition: 0.3}
      - {name: dedup}

``build_filters`` checks such a list and builds the filters; ``first_failing`` runs them
on a record's text and names the first one that drops it (so prepare can count drops per
filter). Every threshold is inclusive: ``min_chars: 20`` keeps a 20-character text.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from typing import ClassVar

from lmpipe.errors import ConfigError

# --- measures ------------------------------------------------------------------------


def alpha_ratio(text: str) -> float:
    """Alphabetic characters / non-whitespace characters (0.0 for a blank text)."""
    chars = "".join(text.split())
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def repetition_ratio(text: str) -> float:
    """How much of the text is repeated content, in [0, 1]: the larger of two Gopher
    (Rae et al. 2021) measures, so that one threshold covers both:

    - duplicate-line character fraction: characters in non-blank lines that repeat an
      earlier line (after stripping) / characters in all non-blank lines;
    - top word-2-gram character fraction: characters of the most frequent (lowercased)
      word bigram times its count / characters of all words; 0 unless it occurs twice.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    duplicate_chars = 0
    for line in lines:
        if line in seen:
            duplicate_chars += len(line)
        seen.add(line)
    line_fraction = duplicate_chars / sum(map(len, lines)) if lines else 0.0

    words = text.lower().split()
    bigram_fraction = 0.0
    if len(words) >= 2:
        (first, second), count = Counter(pairwise(words)).most_common(1)[0]
        if count > 1:
            total = sum(map(len, words))
            bigram_fraction = min(1.0, count * (len(first) + len(second)) / total)
    return max(line_fraction, bigram_fraction)


# A statement keyword at the start of a line (after indentation or a closing brace).
# Case-sensitive and line-initial because prose is full of "if", "for" and "return"
# mid-sentence, while its lines start with a capital or continue a sentence.
_CODE_LINE = re.compile(
    r"^[\s}]*(?:#\s*(?:include|define|import)\b|@\w|(?:"
    r"def|class|return|import|from|for|while|if|elif|else|try|except|finally|with|"
    r"function|var|let|const|public|private|protected|static|void|int|package|"
    r"using|namespace|struct|fn|func|switch|case)\b)"
)
_CODE_SYMBOLS = frozenset("{}()[];=<>:")
# Share of non-whitespace characters that are code symbols at which the symbol signal
# saturates: typical Python/C/JS code has 10-20%, prose 1-2% (mostly ':' and ';'). The
# density is taken over at least SYMBOL_MIN_CHARS characters, so that a short line such as
# a play's "TITUS:" does not count as dense code.
SYMBOL_SATURATION = 0.10
SYMBOL_MIN_CHARS = 40


def calculate_code_ratio(text: str) -> float:
    """How much the text looks like code, in [0, 1]: the mean of three signals,

        (indented + keyword + min(1, symbol_density / SYMBOL_SATURATION)) / 3

    over its non-blank lines: ``indented`` = fraction of lines starting with a space or
    tab; ``keyword`` = fraction of lines starting with a programming keyword (def, class,
    return, import, for, while, if, else, function, var, let, const, public, #include,
    ...); ``symbol_density`` = characters among ``{}()[];=<>:`` / max(SYMBOL_MIN_CHARS,
    non-whitespace characters). Each signal alone gives at most 1/3, so prose with many
    colons, or a math answer full of ``<<48/2=24>>``, stays well under 0.5.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    indented = sum(line[0] in " \t" for line in lines) / len(lines)
    keyword = sum(bool(_CODE_LINE.match(line)) for line in lines) / len(lines)
    chars = "".join(text.split())
    density = sum(c in _CODE_SYMBOLS for c in chars) / max(SYMBOL_MIN_CHARS, len(chars))
    return (indented + keyword + min(1.0, density / SYMBOL_SATURATION)) / 3


# --- filters -------------------------------------------------------------------------


def _count(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key}={value!r} must be an integer >= 0")
    return value


def _ratio(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{key}={value!r} must be a number in [0, 1]")
    return float(value)


class Filter:
    """Judges a record's text: calling it returns True to keep the record.

    ``THRESHOLDS`` maps each keyword argument to its validator; every one is optional,
    but a filter that has thresholds must be given at least one (else it would do nothing).
    """

    name: ClassVar[str]
    THRESHOLDS: ClassVar[dict] = {}
    RANGES: ClassVar[tuple[tuple[str, str], ...]] = ()  # (min key, max key) pairs

    def __init__(self, **thresholds):
        known = ", ".join(sorted(self.THRESHOLDS)) or "none"
        unknown = sorted(set(thresholds) - set(self.THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown threshold '{unknown[0]}' (known: {known})")
        if self.THRESHOLDS and all(v is None for v in thresholds.values()):
            raise ValueError(f"no threshold set (one of: {known})")
        for key, check in self.THRESHOLDS.items():
            value = thresholds.get(key)
            setattr(self, key, None if value is None else check(key, value))
        for low, high in self.RANGES:
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low}={lo} is greater than {high}={hi}")

    def __call__(self, text: str) -> bool:
        raise NotImplementedError


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


class Length(Filter):
    """Character and whitespace-separated word counts within bounds."""

    name = "length"
    THRESHOLDS = {
        "min_chars": _count,
        "max_chars": _count,
        "min_words": _count,
        "max_words": _count,
    }
    RANGES = (("min_chars", "max_chars"), ("min_words", "max_words"))

    def __call__(self, text: str) -> bool:
        if not _within(len(text), self.min_chars, self.max_chars):
            return False
        if self.min_words is None and self.max_words is None:
            return True  # skip splitting the text
        return _within(len(text.split()), self.min_words, self.max_words)


class Quality(Filter):
    """Mostly letters (``alpha_ratio``) and not repetitive (``repetition_ratio``)."""

    name = "quality"
    THRESHOLDS = {"min_alpha_ratio": _ratio, "max_repetition": _ratio}

    def __call__(self, text: str) -> bool:
        return (self.min_alpha_ratio is None or alpha_ratio(text) >= self.min_alpha_ratio) and (
            self.max_repetition is None or repetition_ratio(text) <= self.max_repetition
        )


class CodeQuality(Filter):
    """Looks like code (``calculate_code_ratio``), for code-only sources."""

    name = "code_quality"
    THRESHOLDS = {"min_code_ratio": _ratio}

    def __call__(self, text: str) -> bool:
        return calculate_code_ratio(text) >= self.min_code_ratio


class Dedup(Filter):
    """Drops a text whose whitespace-normalised form was seen before. Stateful: keeps a
    16-byte BLAKE2b digest per kept text, never the texts, so memory stays small.
    ``seen`` (positional, so no YAML key can set it) shares the digests between several
    filters, e.g. every source of a mixture and both splits."""

    name = "dedup"

    def __init__(self, seen: set[bytes] | None = None, /, **thresholds):
        super().__init__(**thresholds)
        self.seen = set() if seen is None else seen

    def __call__(self, text: str) -> bool:
        digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


FILTERS: dict[str, type[Filter]] = {f.name: f for f in (CodeQuality, Dedup, Length, Quality)}


def build_filters(
    specs: list[dict] | None, source_name: str, dedup_scope: set[bytes] | None = None
) -> list[Filter]:
    """The filters a source's ``filters`` list names, in order; a bad spec is a one-line
    ``ConfigError`` naming the source and the key. ``dedup_scope``: the digest set a
    ``dedup`` filter shares (pass one set for all sources to dedup across the mixture);
    None gives each ``dedup`` its own."""
    where = f"data source '{source_name}'"
    filters = []
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: filters[{i}] must be a mapping with a name, got {spec!r}")
        name = spec["name"]
        if name not in FILTERS:
            raise ConfigError(
                f"{where}: unknown filter '{name}' (known: {', '.join(sorted(FILTERS))})"
            )
        thresholds = {k: v for k, v in spec.items() if k != "name"}
        try:
            if name == Dedup.name:
                filters.append(Dedup(dedup_scope, **thresholds))
            else:
                filters.append(FILTERS[name](**thresholds))
        except ValueError as exc:
            raise ConfigError(f"{where}: filter '{name}': {exc}") from None
    return filters


def first_failing(filters: Iterable[Filter], text: str) -> str | None:
    """Name of the first filter that drops ``text``, or None to keep it. Later filters
    do not see a dropped text, so ``dedup`` placed last only remembers kept texts."""
    for f in filters:
        if not f(text):
            return f.name
    return None
