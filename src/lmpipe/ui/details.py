"""What the pages show beyond the list of runs: one run's config, plan, checkpoints and
episode log; a pipeline's report card; every checkpoint a chat can load. Read-only, and
only inside the output directory (``lmpipe.tracking.runs.inside``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmpipe.tracking.runs import (
    NotInside,
    checkpoint_steps,
    discover,
    inside,
    is_pipeline,
    is_run,
    read_text,
    summarize,
)
from lmpipe.tracking.status import read_status

IMAGE = re.compile(r"^[\w.-]+\.png$")
EPISODE_LINES = 20  # the newest lines of episodes.jsonl a run page shows


def finite(value):
    """``value`` with NaN and infinities as None (JSON has no words for them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def run_dir(root: Path, run: str) -> Path:
    path = inside(root, run)
    if not path.is_dir() or not is_run(path):
        raise NotInside(f"no run {run!r}")
    return path


def pipeline_dir(root: Path, pipeline: str) -> Path:
    path = inside(root, pipeline)
    if not path.is_dir() or not is_pipeline(path):
        raise NotInside(f"no pipeline {pipeline!r}")
    return path


def _json(root: Path, path: Path) -> dict | None:
    text = read_text(root, path)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def checkpoints(root: Path, path: Path) -> list[dict]:
    """A run's checkpoints, newest first, with the held-out metrics saved with each."""
    found = []
    for step, directory in reversed(checkpoint_steps(path)):
        meta = _json(root, directory / "meta.json") or {}
        found.append(
            {
                "name": directory.name,
                "step": step,
                "val": meta.get("val") or {},
                "best_val_loss": meta.get("best_val_loss"),
                "arch": meta.get("architecture"),
                "stage": meta.get("stage"),
            }
        )
    return found


def episodes(root: Path, path: Path) -> list[dict] | None:
    """The newest lines of the run's episode log (which episodes trained at which step)."""
    text = read_text(root, path / "episodes.jsonl", limit=64 * 1024)
    if text is None:
        return None
    lines = []
    for line in text.splitlines()[-EPISODE_LINES:]:
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return lines


def run_detail(root: Path, run: str, stale_after_s: float) -> dict:
    path = run_dir(root, run)
    return finite(
        {
            "run": summarize(root, path, stale_after_s).to_dict(),
            "status": read_status(path),
            "config": read_text(root, path / "config.yaml"),
            "plan": read_text(root, path / "plan.txt"),
            "checkpoints": checkpoints(root, path),
            "episodes": episodes(root, path),
        }
    )


def pipeline_report(root: Path, pipeline: str) -> dict:
    """The report card (``report.md``, its rows in ``report.json``, the PNGs) and the
    pipeline's state file."""
    path = pipeline_dir(root, pipeline)
    images = sorted(p.name for p in path.iterdir() if IMAGE.match(p.name) and p.is_file())
    return finite(
        {
            "id": pipeline,
            "report_md": read_text(root, path / "report.md"),
            "report": _json(root, path / "report.json"),
            "state": _json(root, path / "pipeline_state.json"),
            "images": images,
            "stages": [p.relative_to(root).as_posix() for p in sorted(discover(path)[0])],
        }
    )


def pipeline_image(root: Path, pipeline: str, name: str) -> Path:
    """A PNG of a pipeline's report (``curves_<stage>.png``)."""
    pipeline_dir(root, pipeline)
    if not IMAGE.match(name):
        raise NotInside(f"not an image name: {name!r}")
    path = inside(root, f"{pipeline}/{name}")
    if not path.is_file():
        raise NotInside(f"no image {name!r} in {pipeline!r}")
    return path


def all_checkpoints(root: Path, stale_after_s: float) -> list[dict]:
    """Every checkpoint under the output directory, newest run first, newest step first."""
    found = []
    for path in discover(root)[0]:
        info = summarize(root, path, stale_after_s)
        for step, directory in reversed(checkpoint_steps(path)):
            found.append(
                {
                    "run": info.id,
                    "name": directory.name,
                    "step": step,
                    "arch": info.arch,
                    "stage": info.stage,
                    "started": info.started,
                }
            )
    return sorted(found, key=lambda c: (c["started"] or 0.0, c["step"]), reverse=True)
