"""Weights & Biases sink. ``WANDB_MODE=offline`` (or ``logger.wandb.mode=offline``) needs no
account; the run id is derived from the run directory so a resumed run continues its W&B run."""

from __future__ import annotations

import hashlib
from pathlib import Path


class WandbSink:
    def __init__(self, cfg: dict, run_dir: Path, run_name: str, config: dict):
        import wandb

        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=cfg.get("project") or "lmpipe",
            entity=cfg.get("entity"),
            mode=cfg.get("mode"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            tags=list(cfg.get("tags") or []),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()
