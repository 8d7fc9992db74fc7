"""``python -m lmpipe.label policy=<checkpoint> out=<dir> [judge=rule|rm|lm]``: RLAIF
preference labelling (``lmpipe.rlaif``): the policy's replies to the data's prompts,
judged, written as preference pairs for ``stage=rm`` or ``stage=dpo``. A rerun of the same
command continues where a stopped one left off."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lmpipe.cli import run, user_errors


@hydra.main(config_path="conf", config_name="label", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.label"):
        label(cfg)


def label(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from lmpipe.data.prepare import prepare
    from lmpipe.data.prompts import read_prompts
    from lmpipe.errors import ConfigError
    from lmpipe.objectives.rewards import RewardContext
    from lmpipe.rlaif.labeler import Labeler, LabelSettings, usable_prompts
    from lmpipe.training.checkpoint import resolve_checkpoint
    from lmpipe.training.hardware import resolve_device

    settings = LabelSettings(
        num_replies=cfg.num_replies,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    settings.check()
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r} must be train or val")

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    policy = resolve_checkpoint(cfg.policy, log=log)
    tokenizer = policy.tokenizer()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    judge = instantiate(cfg.judge)
    device = resolve_device(cfg.device)
    judge.setup(
        RewardContext(
            tokenizer=tokenizer,
            device=device,
            open_checkpoint=lambda path: resolve_checkpoint(path, log=log),
            batch_size=cfg.batch_size,
        )
    )
    data = prepare(data_cfg, cfg.cache_dir, tokenizer=tokenizer, progress=cfg.progress)
    if data.manifest["format"] == "text":
        raise ConfigError(f"lmpipe.label reads prompts, but data={data_cfg['name']} is text data")
    model = policy.build_model().to(device)
    prompts, dropped = usable_prompts(
        read_prompts(data, cfg.split, cfg.num_prompts), model, cfg.max_new_tokens
    )
    labeler = Labeler(
        model=model,
        tokenizer=tokenizer,
        judge=judge,
        settings=settings,
        device=device,
        out=Path(cfg.out),
        describe={
            "policy": str(policy.path),
            "policy_weights_sha256": policy.meta["files"]["model.safetensors"]["sha256"],
            "data": data_cfg["name"],
            "data_dir": str(data.directory),
            "split": cfg.split,
            "num_prompts": cfg.num_prompts,
        },
    )
    manifest = labeler.run(prompts, dropped, progress=cfg.progress)
    print(
        f"labelled {manifest['prompts']} prompts with judge {manifest['judge']}: "
        f"{manifest['pairs']} pairs, {manifest['ties_dropped']} ties dropped -> "
        f"{manifest['pairs_file']}"
    )
    return manifest


if __name__ == "__main__":
    run(main, "lmpipe.label")
