"""Where a run writes: ``out_dir/{arch}-{data}-{model}-{stage}-v{N}`` unless named.

Registered as the OmegaConf resolver ``lmpipe_run_dir`` so that Hydra's own run directory
(``hydra.run.dir``) is the run directory. A plain run takes the next free version;
``resume=auto`` takes the newest existing one; ``resume=<checkpoint>`` takes its run.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lmpipe.config import resume_mode
from lmpipe.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints/step_NNNNNN


def run_versions(out_dir: Path, base: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(base)}-v(\d+)$")
    if not out_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in out_dir.iterdir() if (m := pattern.match(p.name))}


def check_run_name(run_name, what: str = "run_name") -> str:
    """A run name is one directory name inside ``out_dir``: no separators, no ``..``."""
    name = str(run_name)
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"{what}={name!r} must be a plain directory name inside out_dir (no '/', no '..')"
        )
    return name


def check_writable_dir(path: Path, key: str) -> None:
    """``path`` is a directory this process can write, or one it can create."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r} cannot be a directory: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r} is not writable ({probe}: permission denied)")


def run_dir_for(out_dir: str, run_name: str | None, resume, base: str) -> str:
    path = _choose_run_dir(out_dir, run_name, resume, base)
    # The first resolution comes before Hydra creates the directory; later ones after it.
    missing = [p for p in (path, *path.parents) if not p.exists()]
    _NEW_DIRS.setdefault(str(path.resolve()), missing)
    return str(path)


def _choose_run_dir(out_dir: str, run_name: str | None, resume, base: str) -> Path:
    mode = resume_mode(resume)
    if mode not in (None, "auto"):
        path = Path(mode)
        if path.parent.name == CHECKPOINT_DIR:
            return path.parent.parent
        if (path / CHECKPOINT_DIR).is_dir():
            return path
    check_writable_dir(Path(out_dir), "out_dir")
    if run_name:
        return Path(out_dir) / check_run_name(run_name)
    check_run_name(base, "the run name {arch}-{data}-{model}-{stage}")
    versions = run_versions(Path(out_dir), base)
    if mode == "auto" and versions:
        return versions[max(versions)]
    return Path(out_dir) / f"{base}-v{max(versions, default=0) + 1}"


# Run directory -> the directories (it and those above it) that did not exist when it was
# chosen: what a run that fails before writing anything removes again.
_NEW_DIRS: dict[str, list[Path]] = {}


def remove_if_empty(run_dir: Path) -> None:
    """Drop a run directory that got no file (a run refused before writing anything), and
    the empty directories above it that were created for it."""
    for path in _NEW_DIRS.pop(str(Path(run_dir).resolve()), [Path(run_dir)]):
        try:
            path.rmdir()
        except OSError:  # not empty (or not there): the run, or someone else, owns it
            break


_SWEEP_FUNCTIONS = re.compile(r"^(range|choice|glob|interval)\(")


def swept_keys(argv: list[str]) -> set[str]:
    """Keys a Hydra multirun command line sweeps (``k=a,b`` or ``k=range(...)``)."""
    keys = set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith("-"):
            continue
        if _SWEEP_FUNCTIONS.match(value) or ("," in value and value[:1] not in "[{'\""):
            keys.add(key.lstrip("+~"))
    return keys


def sweep_job_dir(num, override_dirname: str) -> str:
    """``<job number>-<swept key=value,...>``: a sweep job's directory name."""
    swept = swept_keys(sys.argv[1:])
    parts = [
        item
        for item in str(override_dirname).split(",")
        if item.split("=")[0].lstrip("+~") in swept
    ]
    return "-".join([str(num), *[",".join(parts)] * bool(parts)])


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("lmpipe_run_dir"):
        OmegaConf.register_new_resolver("lmpipe_run_dir", run_dir_for, use_cache=True)
    if not OmegaConf.has_resolver("lmpipe_sweep_job_dir"):
        OmegaConf.register_new_resolver("lmpipe_sweep_job_dir", sweep_job_dir)
