"""Learning-rate schedules as pure functions of the optimizer step.

``cosine``: linear warmup from ``warmup_start_ratio * lr`` to ``lr``, then cosine down to
``min_lr_ratio * lr`` at the last step. Pretraining warms up from 0; mid-training re-warms
from lr/10 (``warmup_start_ratio: 0.1``). ``wsd``: warmup, stable at ``lr``, then linear
decay over the last ``decay_ratio`` of the steps. ``constant``: warmup, then flat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmpipe.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class LRSchedule:
    name: str
    lr: float
    max_steps: int
    warmup_steps: int
    warmup_start_ratio: float
    min_lr_ratio: float
    decay_ratio: float  # wsd only

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def __call__(self, step: int) -> float:
        """LR for optimizer step ``step`` (0-based; the last step is ``max_steps - 1``)."""
        if step < self.warmup_steps:
            start = self.lr * self.warmup_start_ratio
            return start + (self.lr - start) * step / self.warmup_steps
        last = self.max_steps - 1
        if self.name == "constant" or last <= self.warmup_steps:
            return self.lr
        if self.name == "cosine":
            progress = (step - self.warmup_steps) / (last - self.warmup_steps)
            return self.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (
                self.lr - self.min_lr
            )
        decay_start = max(self.warmup_steps, last - round(self.decay_ratio * self.max_steps))
        if step <= decay_start:
            return self.lr
        progress = (step - decay_start) / (last - decay_start)
        return self.lr + (self.min_lr - self.lr) * min(progress, 1.0)

    def describe(self) -> str:
        start = self.lr * self.warmup_start_ratio
        warmup = f"warmup {self.warmup_steps}/{self.max_steps} steps {start:.3g} -> {self.lr:.3g}"
        if self.name == "constant":
            return f"{warmup}, then constant {self.lr:.3g}"
        if self.name == "wsd":
            return f"{warmup}, stable, then linear decay over the last {self.decay_ratio:.0%} to {self.min_lr:.3g}"
        return f"{warmup}, then cosine to {self.min_lr:.3g} at step {self.max_steps - 1}"


def build_schedule(cfg: dict, lr: float, max_steps: int) -> LRSchedule:
    """The ``schedule`` keys of a composed config (defaults: ``conf/train.yaml``, which a
    stage overrides) for ``max_steps`` steps at peak ``lr``."""
    name = cfg["name"]
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r} is not one of {', '.join(SCHEDULES)}")
    warmup = cfg["warmup_steps"]
    if warmup is None:
        ratio = cfg["warmup_ratio"]
        if not (isinstance(ratio, int | float) and 0 <= ratio < 1):
            raise ConfigError(f"schedule.warmup_ratio={ratio} must be in [0, 1)")
        warmup = round(ratio * max_steps)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < max_steps:
        raise ConfigError(
            f"schedule.warmup_steps={warmup!r} must be an integer in [0, trainer.max_steps={max_steps})"
        )
    for key in ("warmup_start_ratio", "min_lr_ratio", "decay_ratio"):
        value = cfg[key]
        if not (isinstance(value, int | float) and 0 <= value <= 1):
            raise ConfigError(f"schedule.{key}={value} must be in [0, 1]")
    return LRSchedule(
        name=name,
        lr=lr,
        max_steps=max_steps,
        warmup_steps=warmup,
        warmup_start_ratio=float(cfg["warmup_start_ratio"]),
        min_lr_ratio=float(cfg["min_lr_ratio"]),
        decay_ratio=float(cfg["decay_ratio"]),
    )
