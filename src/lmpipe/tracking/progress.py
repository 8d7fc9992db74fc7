"""Progress of long loops (data preparation, labelling, evaluation, training's ETA).

On a terminal a tqdm bar; elsewhere (a log file, a pipe, a job scheduler) a bar cannot
draw, so a plain line every ``LMPIPE_PROGRESS_S`` seconds (default 10) says how far the
loop is, how fast it goes and how long it has left: a redirected run never looks hung.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

from lmpipe.errors import ConfigError

INTERVAL_ENV = "LMPIPE_PROGRESS_S"


def line_interval() -> float:
    """Seconds between progress lines (``LMPIPE_PROGRESS_S``; default 10)."""
    value = os.environ.get(INTERVAL_ENV, "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"{INTERVAL_ENV}={value!r} must be a number of seconds >= 0")
    return seconds


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Rate:
    """Items per second since ``start`` items were done, and the time left to a total."""

    def __init__(self, start: int = 0):
        self.start = start
        self.started = time.monotonic()

    def per_second(self, done: int) -> float | None:
        elapsed = time.monotonic() - self.started
        return (done - self.start) / elapsed if done > self.start and elapsed > 0 else None

    def eta(self, done: int, total: int | None) -> str | None:
        """The time left to ``total`` at the rate so far, formatted; None before any progress."""
        rate = self.per_second(done)
        if rate is None or not total:
            return None
        return format_duration(max(total - done, 0) / rate)


class ProgressLines:
    """The part of tqdm's interface lmpipe uses, as a line every ``interval`` seconds. The
    clock is shared by every loop of the process: steps shorter than the interval one after
    another (load, tokenizer, tokenize) do not add up to a long silence."""

    last_line: float | None = None  # when any loop of this process last printed (monotonic)

    def __init__(self, iterable, *, desc: str, unit: str, total, initial: int, interval, file):
        self.iterable = iterable
        self.desc, self.unit, self.file, self.interval = desc, unit, file, interval
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = initial
        self.rate = Rate(initial)
        self.postfix: dict = {}
        if ProgressLines.last_line is None:
            ProgressLines.last_line = self.rate.started

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - ProgressLines.last_line >= self.interval:
            ProgressLines.last_line = now
            print(self.line(), file=self.file, flush=True)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def line(self) -> str:
        count = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {count} {self.unit}{percent}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        rate = self.rate.per_second(self.n)
        if rate is not None:
            parts.append(
                f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2g} {self.unit}/s"
            )
        eta = self.rate.eta(self.n, self.total)
        if eta is not None:
            parts.append(f"eta {eta}")
        return " | ".join(parts)

    def close(self) -> None:
        pass


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    enabled: bool = True,
    file=None,
):
    """A tqdm bar on a terminal, ``ProgressLines`` elsewhere, nothing when not ``enabled``."""
    file = file or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if file.isatty():
        return tqdm(
            iterable,
            desc=desc,
            unit=f" {unit}",
            total=total,
            initial=initial,
            file=file,
            leave=False,
            dynamic_ncols=True,
        )
    return ProgressLines(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        initial=initial,
        interval=line_interval(),
        file=file,
    )
