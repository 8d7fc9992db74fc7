"""Helpers shared by the benchmark scripts: data, timing and tables."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(
    os.environ.get(
        "LMPIPE_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)


def shakespeare_char_tokens() -> tuple[np.ndarray, int, str]:
    """Tiny shakespeare as character ids when the shared data is there, else built-in prose."""
    path = DATA_DIR / "tinyshakespeare" / "input.txt"
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        from lmpipe.data.builtin import stories

        text, source = "\n".join(r["text"] for r in stories(3000, 0)), "lmpipe built-in stories"
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.array([lookup[c] for c in text], dtype=np.int64), len(chars), source


def random_rows(
    tokens: np.ndarray, rows: int, length: int, count: int, seed: int = 0
) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        starts = rng.integers(0, len(tokens) - length, rows)
        out.append(torch.from_numpy(np.stack([tokens[s : s + length] for s in starts])))
    return out


def interleaved_times(
    steps: dict[str, Callable[[int], None]], total: int, chunk: int, warmup: int
) -> dict[str, list[float]]:
    """Per-step wall times of each contender, run in alternating chunks so that machine
    noise (other processes, thermal state) hits all of them alike."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for start in range(0, total, chunk):
        for name, step in steps.items():
            for i in range(start, min(start + chunk, total)):
                t0 = time.perf_counter()
                step(i)
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
