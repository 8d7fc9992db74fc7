"""Where a run writes: ``out_dir/{arch}-{data}-{model}-{stage}-v{N}`` unless named.

Registered as the OmegaConf resolver ``lmpipe_run_dir`` so that Hydra's own run directory
(``hydra.run.dir``) is the run directory. A plain run takes the next free version;
``resume=auto`` takes the newest existing one; ``resume=<checkpoint>`` takes its run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lmpipe.config import resume_mode

CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints/step_NNNNNN


def run_versions(out_dir: Path, base: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(base)}-v(\d+)$")
    if not out_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in out_dir.iterdir() if (m := pattern.match(p.name))}


def run_dir_for(out_dir: str, run_name: str | None, resume, base: str) -> str:
    mode = resume_mode(resume)
    if mode not in (None, "auto"):
        path = Path(mode)
        if path.parent.name == CHECKPOINT_DIR:
            return str(path.parent.parent)
        if (path / CHECKPOINT_DIR).is_dir():
            return str(path)
    if run_name:
        return str(Path(out_dir) / str(run_name))
    versions = run_versions(Path(out_dir), base)
    if mode == "auto" and versions:
        return str(versions[max(versions)])
    return str(Path(out_dir) / f"{base}-v{max(versions, default=0) + 1}")


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
