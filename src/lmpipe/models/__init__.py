"""Architectures behind the LM seam (``base.LM``) and how to build them from configs."""

from __future__ import annotations

import importlib

from lmpipe.errors import CheckpointError, ConfigError
from lmpipe.models.base import LM, TokenScores
from lmpipe.models.transformer import TransformerConfig

__all__ = ["LM", "TokenScores", "build_lm", "build_from_config_dict", "lm_class"]

# LM classes a checkpoint may name: lmpipe's own, and those a config of this process named
# (``arch._target_``: the user's choice). Importing a module a checkpoint names would run
# its code, so nothing else is imported for a checkpoint.
_OWN_MODULES = "lmpipe.models."
_NAMED_BY_CONFIG: set[str] = set()


def lm_class(target: str) -> type[LM]:
    """The LM class a config names (``arch._target_``: ``package.module.Class``)."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as exc:  # whatever importing the module raised, or no such attribute
        raise ConfigError(
            f"arch._target_={target!r} is not an importable class ({type(exc).__name__}: {exc})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, LM)):
        raise ConfigError(f"arch._target_={target!r} is not an lmpipe LM class")
    _NAMED_BY_CONFIG.add(target)
    return cls


def checkpoint_lm_class(target) -> type[LM]:
    """The LM class a checkpoint names: lmpipe's own or one a config of this process
    named, checked before anything is imported."""
    allowed = isinstance(target, str) and (
        target.startswith(_OWN_MODULES) or target in _NAMED_BY_CONFIG
    )
    if not allowed:
        raise CheckpointError(
            f"model_config.lm_class={target!r} is not an lmpipe LM class (a checkpoint may "
            f"only name classes in {_OWN_MODULES}* or the arch._target_ of your config)"
        )
    try:
        return lm_class(target)
    except ConfigError:
        raise CheckpointError(
            f"model_config.lm_class={target!r} is not an lmpipe LM class"
        ) from None


def build_lm(
    arch_cfg: dict, model_cfg: dict, vocab_size: int, special_ids: dict[str, int] | None = None
) -> LM:
    """An LM from the ``arch`` and ``model`` config groups (names and targets dropped) and
    the tokenizer's vocabulary size and special token ids."""
    cls = lm_class(arch_cfg["_target_"])
    options = {k: v for k, v in arch_cfg.items() if k not in ("_target_", "name")}
    shape = {k: v for k, v in model_cfg.items() if k != "name"}
    unknown = set(shape) - set(TransformerConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"model config has unknown keys: {', '.join(sorted(unknown))}")
    config = TransformerConfig.from_dict({**shape, "vocab_size": vocab_size})
    try:
        return cls(config, special_ids=special_ids, **options)
    except TypeError as exc:  # an unknown knob in conf/arch/<name>.yaml
        raise ConfigError(f"arch={arch_cfg.get('name')}: {exc}") from None


def build_from_config_dict(config: dict) -> LM:
    """Rebuild the module described by ``LM.config_dict()`` (from a checkpoint: only an
    LM class ``checkpoint_lm_class`` allows)."""
    cls = checkpoint_lm_class(config.get("lm_class"))
    options = config.get("arch_options") or {}
    try:
        return cls(TransformerConfig.from_dict(config["model"]), **options)
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"model_config does not describe a {cls.__name__} ({exc})") from None
