"""Architectures behind the LM seam (``base.LM``) and how to build them from configs."""

from __future__ import annotations

from hydra.utils import get_class

from lmpipe.errors import ConfigError
from lmpipe.models.base import LM, TokenScores
from lmpipe.models.transformer import TransformerConfig

__all__ = ["LM", "TokenScores", "build_lm", "build_from_config_dict", "lm_class"]


def lm_class(target: str) -> type[LM]:
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"arch._target_={target!r} is not an importable class") from None
    if not (isinstance(cls, type) and issubclass(cls, LM)):
        raise ConfigError(f"arch._target_={target!r} is not an lmpipe LM class")
    return cls


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
    """Rebuild the module described by ``LM.config_dict()`` (e.g. from a checkpoint)."""
    cls = lm_class(config["lm_class"])
    return cls(TransformerConfig.from_dict(config["model"]), **config.get("arch_options", {}))
