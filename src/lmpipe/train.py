"""``python -m lmpipe.train``: the one entrypoint for every stage (Hydra app).

Heavy imports happen inside ``main`` so that ``--help`` and ``--cfg job`` are fast.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmpipe.cli import run, user_errors
from lmpipe.rundir import register_resolvers

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train one stage; returns its final validation loss, what a sweeper (``-m
    hydra/sweeper=optuna``) minimises. The final one, not the best: the run's result is its
    final checkpoint (the best one's may be pruned). None when the run has no validation
    (no val split or ``trainer.eval_batches=0``; an Optuna trial then fails)."""
    from hydra.core.hydra_config import HydraConfig

    from lmpipe.rundir import remove_if_empty
    from lmpipe.sweep import final_val_loss
    from lmpipe.training.run import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors("lmpipe.train"):
            return final_val_loss(train(cfg, run_dir))
    finally:
        remove_if_empty(run_dir)


if __name__ == "__main__":
    run(main, "lmpipe.train")
