"""``data.path``: point a shipped mixture at local copies of its sources, in one override.

``data.path=<file or glob>`` replaces the loader of a single-source mixture,
``data.path={<source>: <file or glob>, ...}`` those of the named sources. A replaced source
keeps its fields, adapter, filters, ratio and text unit; the keys that named the old data
(hub id, subset, split, its own val split, a built-in generator) go with it, so its
held-out records come from ``data.split.val_fraction``.
"""

from __future__ import annotations

from lmpipe.errors import ConfigError

OLD_LOADER_KEYS = (
    "builtin",
    "num_records",
    "seed",
    "hub",
    "subset",
    "data_dir",
    "split",
    "val_split",
    "path",
    "val_path",
)


def with_local_paths(cfg: dict) -> dict:
    """The mixture with ``data.path`` applied to its sources (and removed)."""
    local = cfg.get("path")
    if local is None:
        return cfg
    name = cfg.get("name")
    sources = cfg.get("sources") or []
    names = [source.get("name") for source in sources]
    if isinstance(local, str):
        if len(sources) != 1:
            raise ConfigError(
                f"data.path={local!r}: data '{name}' has {len(sources)} sources, so name the "
                f"one(s) to replace: {local_path_hint(cfg, names)}"
            )
        local = {names[0]: local}
    if not isinstance(local, dict) or not local:
        raise ConfigError(
            f"data.path={local!r} must be a file or glob, or a mapping source -> file or glob"
        )
    for key, value in local.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.path.{key}={value!r} must be a file or glob")
    unknown = [key for key in local if key not in names]
    if unknown:
        raise ConfigError(
            f"data.path names no source '{unknown[0]}' of data '{name}' (sources: "
            f"{', '.join(map(str, names))})"
        )
    replaced = [
        {
            **{k: v for k, v in source.items() if k not in OLD_LOADER_KEYS},
            "path": str(local[source["name"]]),
        }
        if source.get("name") in local
        else source
        for source in sources
    ]
    return {**{k: v for k, v in cfg.items() if k != "path"}, "sources": replaced}


def local_path_hint(cfg: dict, names: list[str]) -> str:
    """The override that points the sources ``names`` of mixture ``cfg`` at local files."""
    if len(cfg.get("sources") or []) == 1:
        return "data.path=<file or glob>"
    return "'data.path={" + ", ".join(f"{n}: <file>" for n in names) + "}'"
