"""Mixture validation and the mixing plan.

Each source gets ``mix_ratio * total`` slots, where ``total`` is ``data.total_records`` or,
by default, the sum of the sources' kept records (largest-remainder rounding, so slots sum
to ``total``). A source's slots are filled from a seeded permutation of its records,
wrapping around when it has fewer records than slots; then all slots are shuffled together.
"""

from __future__ import annotations

import math
import re

import numpy as np

from lmpipe.data.adapters import ADAPTERS
from lmpipe.data.filters import build_filters
from lmpipe.data.formats import FORMATS
from lmpipe.data.sources import source_kind
from lmpipe.data.tokenizer import TOKENIZER_KINDS
from lmpipe.errors import ConfigError

SPLIT_METHODS = ("record", "position")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")


def validate_mixture(cfg: dict) -> None:
    """Check a data config before any work; each failure is one line naming the key."""
    name = cfg.get("name")
    if not name:
        raise ConfigError("data.name is required")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"data.name={name!r} must be a plain name (letters, digits, '._+=-'; no '/' or "
            "leading '.'): it names the cache directory"
        )
    sources = cfg.get("sources") or []
    if not sources:
        raise ConfigError(f"data '{name}': data.sources is empty")
    fmt = cfg.get("format", "auto")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    seen = set()
    for i, src in enumerate(sources):
        label = src.get("name") or f"#{i}"
        if not src.get("name"):
            raise ConfigError(f"data.sources[{i}] has no name")
        if label in seen:
            raise ConfigError(f"data.sources: duplicate source name '{label}'")
        seen.add(label)
        source_kind(src)
        ratio = src.get("mix_ratio", 1.0 / len(sources))
        if not isinstance(ratio, int | float) or ratio < 0:
            raise ConfigError(f"data source '{label}': mix_ratio={ratio!r} must be a number >= 0")
        max_samples = src.get("max_samples")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ConfigError(f"data source '{label}': max_samples={max_samples!r} must be >= 1")
        adapter = src.get("adapter")
        if adapter is not None and adapter not in ADAPTERS:
            raise ConfigError(
                f"data source '{label}': unknown adapter '{adapter}' "
                f"(known: {', '.join(sorted(ADAPTERS))})"
            )
        build_filters(src.get("filters") or [], label, set())  # raises on a bad filter spec
    total = sum(mixture_ratios(sources))
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"data '{name}': mix_ratio values sum to {total:g}, not 1")
    total_records = cfg.get("total_records")
    if total_records is not None and (not isinstance(total_records, int) or total_records < 1):
        raise ConfigError(f"data.total_records={total_records!r} must be a positive integer")
    tok_kind = (cfg.get("tokenizer") or {}).get("kind", "char")
    if tok_kind not in TOKENIZER_KINDS:
        raise ConfigError(
            f"data.tokenizer.kind={tok_kind!r} is not one of {', '.join(TOKENIZER_KINDS)}"
        )
    split = cfg.get("split") or {}
    if split.get("by", "record") not in SPLIT_METHODS:
        raise ConfigError(
            f"data.split.by={split.get('by')!r} is not one of {', '.join(SPLIT_METHODS)}"
        )
    val_fraction = split.get("val_fraction", 0.05)
    if not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise ConfigError(f"data.split.val_fraction={val_fraction!r} must be in [0, 1)")


def mixture_ratios(sources: list[dict]) -> list[float]:
    """Each source's ``mix_ratio``; sources without one share the mixture equally."""
    return [float(s.get("mix_ratio", 1.0 / len(sources))) for s in sources]


def allocate_slots(ratios: list[float], total: int) -> list[int]:
    """Integer slots per source proportional to ``ratios``, summing exactly to ``total``."""
    exact = [r * total for r in ratios]
    slots = [math.floor(x) for x in exact]
    remainders = sorted(range(len(ratios)), key=lambda i: (slots[i] - exact[i], i))
    for i in remainders[: total - sum(slots)]:
        slots[i] += 1
    return slots


def plan_mixture(
    counts: list[int],
    ratios: list[float],
    seed: int,
    total: int | None = None,
    shuffle: bool = True,
) -> np.ndarray:
    """Ordered slots of the mixture: an ``(n, 2)`` array of (source index, record index).

    ``shuffle=False`` keeps every source's records in order and the sources in config order.
    """
    total = sum(counts) if total is None else total
    rng = np.random.default_rng(seed)
    parts = [np.zeros((0, 2), dtype=np.int64)]
    for source, (count, slots) in enumerate(
        zip(counts, allocate_slots(ratios, total), strict=True)
    ):
        if count == 0 or slots == 0:
            continue
        passes = [
            rng.permutation(count) if shuffle else np.arange(count)
            for _ in range(math.ceil(slots / count))
        ]
        order = np.concatenate(passes)[:slots]
        parts.append(np.stack([np.full(slots, source), order], axis=1))
    plan = np.concatenate(parts)
    return plan[rng.permutation(len(plan))] if shuffle else plan
