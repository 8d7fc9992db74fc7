"""Console sink: a progress bar (on a terminal) and periodic metric lines with the time
left (the bar's, for logs that are not a terminal)."""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm

from lmpipe.tracking.progress import Rate


class ConsoleSink:
    def __init__(self):
        self._bar: tqdm | None = None
        self._rate: Rate | None = None  # steps per second since this process's first step
        self._step, self._total = 0, 0

    def progress(self, step: int, total: int, loss: float | None) -> None:
        self._step, self._total = step, total
        if self._rate is None:
            self._rate = Rate(step)
        if self._bar is None:
            # disable=None: a bar on a terminal, nothing when output goes to a file or pipe.
            self._bar = tqdm(
                total=total,
                initial=step,
                unit="step",
                dynamic_ncols=True,
                disable=None,
                file=sys.stderr,
                leave=False,
            )
        self._bar.update(step - self._bar.n)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def message(self, text: str) -> None:
        tqdm.write(text, file=sys.stdout)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        eta = self._rate and self._rate.eta(self._step, self._total)
        self.message(
            f"step {step:>6} | {format_metrics(metrics)}" + (f" | eta {eta}" if eta else "")
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_SHORT = {
    "accuracy": "acc",
    "perplexity": "ppl",
    "grad_norm": "grad",
    "tokens_per_sec": "tok/s",
    "mfu_percent": "mfu%",
}


def _short_name(key: str) -> str:
    """``train/loss`` -> ``loss``, ``val/rewards/accuracy`` -> ``val rewards acc`` (the
    jsonl keeps full names)."""
    parts = key.split("/")
    parts[-1] = _SHORT.get(parts[-1], parts[-1])
    if parts[0] == "train" and len(parts) > 1:
        parts = parts[1:]
    return " ".join(parts)


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, int):  # a count, e.g. SDD's train/k
            text = str(value)
        elif key.endswith("lr"):
            text = f"{value:.2e}"
        elif key.endswith(("tokens_per_sec", "tokens")):
            text = f"{value:,.0f}"
        elif math.isfinite(value) and value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            text = f"{value:.3e}"
        else:
            text = f"{value:.4f}"
        parts.append(f"{_short_name(key)} {text}")
    return " | ".join(parts)
