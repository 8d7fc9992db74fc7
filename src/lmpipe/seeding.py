"""Deterministic seeds derived from the run seed, a named stream and integers (e.g. step, rank).

Deriving every random draw from ``(seed, stream, step, rank)`` instead of carrying RNG
state makes resume exact on any number of ranks: the step alone says what comes next.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed, stable across runs, processes and platforms."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode()), *(int(p) for p in parts)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
