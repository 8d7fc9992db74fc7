"""Resuming a run: which checkpoint, whether the settings still match, and what the
checkpoint may point to.

A run resumes with the settings it started with. A setting that changes the data order,
the model or the optimisation (anything but the keys of ``MAY_CHANGE``) differs from the
checkpoint's ``train_config``: the resume is refused with the list of changed keys unless
``resume_changed=true`` says to go on with the new values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lmpipe.config import resume_mode
from lmpipe.errors import ConfigError
from lmpipe.training.checkpoint import (
    HF_PREFIX,
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from lmpipe.training.hardware import Hardware

# Where a run writes, what it runs on (activation checkpointing: the memory it takes), how
# it reports, and how long it goes on: none of them changes what the steps compute. (A
# longer trainer.max_steps stretches the LR schedule from the resumed step on: the way to
# extend a run.)
MAY_CHANGE = (
    "out_dir",
    "cache_dir",
    "run_name",
    "resume",
    "resume_changed",
    "init_from",
    "hardware",
    "logger",
    "model.activation_checkpointing",
    "trainer.max_steps",
    "trainer.log_interval",
    "trainer.eval_interval",
    "trainer.eval_batches",
    "trainer.eval_at_start",
    "trainer.save_interval",
    "trainer.keep_last",
    "trainer.max_bad_steps",
)
SHOWN = 6  # changed keys named in the message


def resume_checkpoint(
    cfg: DictConfig, run_dir: Path, log: Callable[[str], None]
) -> Checkpoint | None:
    """The checkpoint ``resume`` asks for (None: start fresh); a run that has checkpoints
    is never started over without ``resume``."""
    mode = resume_mode(cfg.resume)
    if mode is None:
        if list_checkpoints(run_dir):
            raise ConfigError(
                f"{run_dir} already has checkpoints: pass resume=auto to continue it, "
                "or choose another run_name"
            )
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir, log=log)
    return resolve_checkpoint(mode, log=log)


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in items:
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat or {prefix: value}


def changed_settings(saved: dict, current: dict) -> list[str]:
    """``key (old -> new)`` for each setting outside ``MAY_CHANGE`` that differs. A key the
    saved config lacks is unchanged when it is now null or false: an option added since
    then, off (as it was, being absent)."""
    old, new = _flat(saved), _flat(current)
    missing = object()
    changed = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE):
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before is missing and (after is None or after is False):
            continue
        if before != after:
            show = lambda v: "(none)" if v is missing else repr(v)  # noqa: E731
            changed.append(f"{key} ({show(before)} -> {show(after)})")
    return changed


def check_settings(checkpoint: Checkpoint, cfg: DictConfig, log: Callable[[str], None]) -> None:
    """Refuse to resume ``checkpoint`` with other settings than it was trained with, unless
    ``resume_changed`` is set (then say which)."""
    saved = checkpoint.meta.get("train_config")
    if not isinstance(saved, dict):
        return  # nothing recorded to compare with
    changed = changed_settings(saved, OmegaConf.to_container(cfg, resolve=True))
    if not changed:
        return
    listed = "; ".join(changed[:SHOWN]) + (
        f"; and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
    )
    if not cfg.resume_changed:
        raise ConfigError(
            f"{checkpoint.path} was trained with other settings: {listed}. Pass "
            "resume_changed=true to continue with the new ones, or choose another run_name"
        )
    log(f"resuming with changed settings (resume_changed=true): {listed}")


def starting_checkpoint(checkpoint: Checkpoint, cfg: DictConfig) -> Checkpoint | None:
    """The checkpoint a resumed stage started from (its frozen reference, e.g. DPO's), as
    its meta.json names it: only inside ``out_dir`` or the ``init_from`` given now."""
    roots = [cfg.out_dir, *([cfg.init_from] if cfg.init_from else [])]
    path = checkpoint.path_in_meta("init_checkpoint", *roots)
    if path is None:
        return None
    if str(checkpoint.meta["init_checkpoint"]).startswith(HF_PREFIX):
        return resolve_checkpoint(f"{HF_PREFIX}{path}")
    return load_checkpoint(path)


def numerics(hardware: Hardware) -> dict:
    """What a bitwise-exact resume assumes stays the same (recorded in every checkpoint):
    the torch build, the device type, the precision and the number of CPU threads (which
    decides how CPU kernels split, and so round, their sums)."""
    return {
        "torch": torch.__version__,
        "device": hardware.device.type,
        "precision": hardware.precision,
        "threads": torch.get_num_threads(),
    }


def check_numerics(checkpoint: Checkpoint, hardware: Hardware, log: Callable[[str], None]) -> None:
    """Say so when a resume runs on other numerics than the checkpoint was written with."""
    saved = checkpoint.meta.get("numerics")
    if not isinstance(saved, dict):
        return
    changed = [
        f"{k} {saved.get(k)} -> {v}" for k, v in numerics(hardware).items() if saved.get(k) != v
    ]
    if changed:
        log(
            f"resuming with other numerics ({', '.join(changed)}): the weights may differ from "
            "an uninterrupted run's in the last bits"
        )
