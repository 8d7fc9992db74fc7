"""Checks of run-wide config values, before any work is done.

Hydra already rejects unknown keys (typos) because the composed config is in struct mode;
this module rejects known keys with unusable values, one line per problem, naming the key.
Defaults are never repeated here: they live in ``conf/`` only.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmpipe.errors import ConfigError, LmpipeError


def _positive_int(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}")


def instantiate(node):
    """``hydra.utils.instantiate``, re-raising an lmpipe user error from a constructor as
    itself (Hydra wraps it in an InstantiationException with its own report)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ConfigError | LmpipeError):
            raise exc.__cause__ from None
        raise


def _finite(value) -> bool:
    """A real number (not a bool, nan or inf)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def resume_mode(value) -> str | None:
    """``resume`` as None (start fresh), "auto", or a checkpoint path."""
    if (
        value is None
        or value is False
        or str(value).lower() in ("false", "no", "never", "none", "")
    ):
        return None
    if value is True or str(value).lower() in ("auto", "true", "yes"):
        return "auto"
    return str(value)


def validate(cfg: DictConfig) -> None:
    for key in (
        "trainer.max_steps",
        "trainer.batch_size",
        "trainer.block_size",
        "trainer.log_interval",
        "trainer.eval_interval",
        "trainer.save_interval",
        "trainer.keep_last",
        "trainer.max_bad_steps",
    ):
        _positive_int(cfg, key)
    _positive_int(cfg, "trainer.eval_batches", allow_zero=True)
    max_time = cfg.trainer.max_time
    if max_time is not None and not (_finite(max_time) and max_time > 0):
        raise ConfigError(f"trainer.max_time={max_time!r} must be a number of seconds > 0 or null")
    clip = cfg.trainer.grad_clip
    if clip is not None and not (_finite(clip) and clip >= 0):
        raise ConfigError(f"trainer.grad_clip={clip!r} must be a finite number >= 0 or null")
    lr = cfg.optim.lr
    if not (_finite(lr) and lr > 0):
        raise ConfigError(f"optim.lr={lr!r} must be a finite number > 0")
    wd = cfg.optim.weight_decay
    if not (_finite(wd) and wd >= 0):
        raise ConfigError(f"optim.weight_decay={wd!r} must be a finite number >= 0")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer")
    mode = resume_mode(cfg.resume)
    if mode not in (None, "auto") and not Path(mode).exists():
        raise ConfigError(
            f"resume={mode!r}: no such checkpoint (use false, auto or a checkpoint directory)"
        )


CONF_DIR = Path(__file__).resolve().parent / "conf"


def group_option(group: str, name: str) -> dict:
    """``conf/<group>/<name>.yaml`` resolved, as a dict (e.g. a data mixture by name)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no config '{group}/{name}' (available: {', '.join(options)})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
