"""Diversity of generated samples: distinct-n and self-BLEU, over whitespace tokens.

- distinct-n (Li et al. 2016): distinct n-grams / all n-grams, over all samples together;
  1.0 when nothing repeats.
- self-BLEU (Zhu et al. 2018, Texygen): the mean BLEU-4 of each sample against all the
  others as references; 1.0 when the samples are identical, near 0 when they share
  nothing. BLEU here has add-one smoothing of the 2- to 4-gram precisions (Lin and Och
  2004; NLTK's ``method2``), so that short samples do not score 0 for lack of a 4-gram.
"""

from __future__ import annotations

import math
from collections import Counter


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: list[str], n: int) -> float:
    grams: Counter = Counter()
    for text in texts:
        grams.update(_ngrams(text.split(), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU of ``hypothesis`` against ``references`` (token lists)."""
    if not references:
        return 0.0
    counts = [_ngrams(hypothesis, n) for n in range(1, max_n + 1)]
    most = [Counter() for _ in counts]
    for reference in references:
        for n, grams in enumerate(most, start=1):
            grams |= _ngrams(reference, n)  # |= keeps the larger count of each n-gram
    return _bleu(counts, most, len(hypothesis), [len(r) for r in references])


def _bleu(
    counts: list[Counter], most: list[dict], length: int, reference_lengths: list[int]
) -> float:
    """BLEU from the hypothesis' n-gram counts (``counts[n - 1]``) and the most times any
    one reference holds each of them (``most[n - 1]``)."""
    if length == 0:
        return 0.0
    log_precision = 0.0
    for n, (grams, limit) in enumerate(zip(counts, most, strict=True), start=1):
        matches = sum(min(c, limit.get(g, 0)) for g, c in grams.items())
        total = sum(grams.values())
        if n == 1 and matches == 0:
            return 0.0
        if n > 1:
            matches, total = matches + 1, total + 1
        log_precision += math.log(matches / total) / len(counts)
    closest = min(reference_lengths, key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(log_precision)


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean BLEU-4 of each sample against the others (needs at least two samples).

    Linear in the number of samples: for every n-gram the largest count in any sample,
    who holds it, and the second largest give the largest count among the others."""
    if len(texts) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    tokens = [text.split() for text in texts]
    counts = [[_ngrams(t, n) for n in range(1, max_n + 1)] for t in tokens]
    top: list[dict[tuple, tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for who, sample in enumerate(counts):
        for table, grams in zip(top, sample, strict=True):
            for gram, c in grams.items():
                best, holder, second = table.get(gram, (0, -1, 0))
                table[gram] = (c, who, best) if c > best else (best, holder, max(second, c))
    lengths = [len(t) for t in tokens]
    scores = []
    for i, sample in enumerate(counts):
        most = [_others(table, grams, i) for table, grams in zip(top, sample, strict=True)]
        scores.append(_bleu(sample, most, lengths[i], lengths[:i] + lengths[i + 1 :]))
    return sum(scores) / len(scores)


def _others(top: dict[tuple, tuple[int, int, int]], grams: Counter, i: int) -> dict:
    """The largest count of each of ``grams`` in any sample but sample ``i``."""
    out = {}
    for gram in grams:
        best, holder, second = top[gram]
        out[gram] = second if holder == i else best
    return out
