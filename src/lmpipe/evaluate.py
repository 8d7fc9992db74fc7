"""``python -m lmpipe.evaluate checkpoint=<dir> [data=<mixture>]``: evaluate checkpoints.

The architecture, model and tokenizer come from each checkpoint; the held-out data is each
run's own unless ``data`` names a mixture. A reward model (``stage=rm``) also reports its
held-out pair accuracy (``rm/*``); ``eval.kl_reference`` with ``kl`` in ``eval.metrics``
reports each checkpoint's KL to that reference. Several checkpoints (``checkpoint=[a,b,c]``)
give one comparison table: printed, and written as JSON (``results.json``) with the table
as Markdown next to it (``results.md``) and the generation samples in ``results_samples/``:
by default in ``eval/<time>/`` of the run directory (of the directory holding all the runs,
for several), or where ``eval.output`` says.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmpipe.cli import run, user_errors


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.evaluate"):
        _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> None:

    from lmpipe.config import instantiate
    from lmpipe.eval.runner import (
        check_options,
        checkpoint_details,
        checkpoint_label,
        default_output,
        evaluate_checkpoint,
        write_results,
    )
    from lmpipe.rundir import check_writable_dir
    from lmpipe.training.checkpoint import resolve_checkpoint

    metrics = check_options(
        cfg.eval.metrics,
        num_samples=cfg.eval.num_samples,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        noise_draws=cfg.eval.noise_draws,
    )
    paths = list(cfg.checkpoint) if isinstance(cfg.checkpoint, ListConfig) else [cfg.checkpoint]
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    checkpoints = [resolve_checkpoint(str(path), log=log) for path in paths]  # all, up front
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data is not None else None
    output = Path(cfg.eval.output) if cfg.eval.output else default_output(checkpoints)
    check_writable_dir(output.parent, "eval.output")  # before the work, not after it
    samples = output.with_name(f"{output.stem}_samples")
    rewards = instantiate(cfg.reward) if cfg.get("reward") else None
    results, details = {}, {}
    for checkpoint in checkpoints:
        name = checkpoint_label(checkpoint)
        if name in results:
            name = f"{name}#{len(results) + 1}"
        print(f"evaluating {name} ({checkpoint.path})", file=sys.stderr, flush=True)
        results[name] = evaluate_checkpoint(
            checkpoint,
            data_cfg=data_cfg,
            metrics=metrics,
            num_samples=cfg.eval.num_samples,
            cache_dir=cfg.cache_dir,
            device=cfg.device,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            seed=cfg.eval.seed,
            samples_path=samples / f"{name}.jsonl",
            temperature=cfg.eval.temperature,
            noise_draws=cfg.eval.noise_draws,
            rewards=rewards,
            reference=cfg.eval.kl_reference,
        )
        details[name] = checkpoint_details(checkpoint, data_cfg and data_cfg.get("name"))
    print(write_results(results, output, details))
    written = [str(output), str(output.with_suffix(".md"))]
    if samples.is_dir():
        written.append(f"{samples}/")
    print(f"wrote {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
    run(main, "lmpipe.evaluate")
