"""``python -m lmpipe.prepare data=<mixture>``: prepare a dataset without training.

``train`` does the same on first use; this entrypoint lets you build and inspect the
data first. Prints the dataset directory and its per-split summary.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from lmpipe.cli import run, user_errors


@hydra.main(config_path="conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.prepare"):
        _prepare(cfg)


def _prepare(cfg: DictConfig) -> None:
    from lmpipe.data.prepare import prepare

    tokenizer = None
    if cfg.tokenizer_from:  # torch only then: its import is most of a start-up
        from lmpipe.training.checkpoint import resolve_checkpoint

        tokenizer = resolve_checkpoint(
            cfg.tokenizer_from, log=lambda m: print(m, file=sys.stderr)
        ).tokenizer()
    data = prepare(
        OmegaConf.to_container(cfg.data, resolve=True),
        cfg.cache_dir,
        tokenizer=tokenizer,
        force=cfg.force,
    )
    print(data.directory)
    print(
        json.dumps(
            {"splits": data.manifest["splits"], "vocab_size": data.manifest["vocab_size"]}, indent=2
        )
    )


if __name__ == "__main__":
    run(main, "lmpipe.prepare")
