"""Reading runs back: the runs and pipelines under an output directory, what each one is
and where it stands, from its files (the web UI's and ``api.find_runs``'s source).

A run is a directory with ``config.yaml``, ``metrics.jsonl`` or ``status.json``; a
pipeline is one with ``pipeline_state.json`` or ``report.md`` (its stages are runs inside
it). Runs are named by their path relative to the output directory
(``lifecycle-ar/sft``), and every name a caller passes is checked by ``inside``: nothing
outside the output directory is ever read, whether asked for with ``..``, an absolute path
or a symlink that leads out.

A run's state: what ``status.json`` recorded when the run ended (finished, failed,
interrupted); while it says running, whether its process is still alive (gone: killed,
so interrupted). Runs without a record (other tools, older versions) are finished when
their newest checkpoint is at ``trainer.max_steps``, running while their files changed in
the last ``stale_after_s`` seconds, and interrupted after that.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from lmpipe.errors import LmpipeError
from lmpipe.rundir import CHECKPOINT_DIR
from lmpipe.tracking.jsonl import read_metrics_from
from lmpipe.tracking.status import STATUS_FILE, process_alive, read_status

RUN_FILES = ("config.yaml", "metrics.jsonl", STATUS_FILE)
PIPELINE_FILES = ("pipeline_state.json", "report.md")
NOT_RUNS = {CHECKPOINT_DIR, "tensorboard", "wandb"}  # folders inside runs, never runs
MAX_DEPTH = 4  # out_dir/sweep/job, out_dir/pipeline/stage, one level of grouping more
STEP_DIR = re.compile(r"^step_(\d+)$")


class NotInside(LmpipeError):
    """A name that does not lead to something inside the output directory."""


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, when that stays inside ``root``: a relative name without
    ``.`` or ``..`` parts (and without backslashes or NULs) whose symlinks, if any, do not
    lead out. Raises ``NotInside`` otherwise (whether or not the target exists)."""
    parts = PurePosixPath(relative).parts
    if (
        not relative
        or "\\" in relative
        or "\x00" in relative
        or relative.startswith("/")
        or any(part in (".", "..") for part in relative.split("/"))
        or not parts
    ):
        raise NotInside(f"not a name inside the output directory: {relative!r}")
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise NotInside(f"{relative!r} leads outside the output directory")
    return path


def file_inside(root: Path, path: Path) -> Path | None:
    """``path`` (under ``root``) when it is a file that does not lead out of ``root``."""
    try:
        real = inside(root, path.relative_to(root).as_posix())
    except (NotInside, ValueError):
        return None
    return real if real.is_file() else None


def read_text(root: Path, path: Path, limit: int = 1 << 20) -> str | None:
    """A text file under ``root`` (its last ``limit`` bytes at most), or None."""
    real = file_inside(root, path)
    if real is None:
        return None
    with real.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - limit))
        data = fh.read()
    if size > limit:  # start at a whole line
        data = data[data.find(b"\n") + 1 :]
    return data.decode("utf-8", errors="replace")


def is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def is_pipeline(path: Path) -> bool:
    return any((path / name).is_file() for name in PIPELINE_FILES)


def discover(root: Path) -> tuple[list[Path], list[Path]]:
    """Run and pipeline directories under ``root`` (hidden folders, the insides of runs,
    and symlinked folders are not searched)."""
    runs: list[Path] = []
    pipelines: list[Path] = []
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name in NOT_RUNS or entry.is_symlink():
                continue
            if not entry.is_dir():
                continue
            path = Path(entry.path)
            if is_run(path):
                runs.append(path)
                continue
            if is_pipeline(path):
                pipelines.append(path)
            if depth + 1 < MAX_DEPTH:
                stack.append((path, depth + 1))
    return runs, pipelines


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's complete checkpoints (step, directory), oldest first."""
    root = run_dir / CHECKPOINT_DIR
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    found = [(int(m.group(1)), Path(e.path)) for e in entries if (m := STEP_DIR.match(e.name))]
    return sorted(found)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@dataclass
class RunInfo:
    """A run as a list of runs shows it."""

    id: str  # the path relative to the output directory
    name: str
    pipeline: str | None  # the id of the pipeline it is a stage of
    stage: str | None
    arch: str | None
    model: str | None
    data: str | None
    state: str  # running | finished | failed | interrupted
    error: str | None  # why it failed / why it is taken as interrupted
    step: int | None
    max_steps: int | None
    val: dict[str, float] = field(default_factory=dict)  # the last held-out metrics
    started: float | None = None
    updated: float | None = None
    checkpoints: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _config(root: Path, run_dir: Path) -> dict:
    text = read_text(root, run_dir / "config.yaml")
    try:
        config = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def _name(config: dict, group: str) -> str | None:
    value = config.get(group)
    return value.get("name") if isinstance(value, dict) else None


def run_state(
    status: dict | None, finished: bool, updated: float | None, stale_after_s: float
) -> tuple[str, str | None]:
    """(state, why) from the status record, whether the final checkpoint is there, and
    when the run's files last changed (see the module docstring)."""
    if status and status["state"] != "running":
        return status["state"], status.get("error")
    if finished:
        return "finished", None
    alive = process_alive(status) if status else None
    if alive:
        return "running", None
    if alive is False:
        return "interrupted", "its training process is gone without saying how it ended (killed?)"
    if updated is not None and time.time() - updated < stale_after_s:
        return "running", None
    return "interrupted", f"no final checkpoint, and no new files for {stale_after_s:g} s"


def _state(
    root: Path, run_dir: Path, config: dict, checkpoints: list, stale_after_s: float
) -> tuple[str, str | None, float | None, dict | None]:
    """(state, why, when the files last changed, the status record), metrics unread."""
    max_steps = _max_steps(config)
    status = read_status(run_dir) if file_inside(root, run_dir / STATUS_FILE) else None
    times = [
        _mtime(p)
        for p in (run_dir / "metrics.jsonl", run_dir / STATUS_FILE, run_dir / CHECKPOINT_DIR)
    ]
    updated = max((t for t in times if t is not None), default=None)
    finished = max_steps is not None and bool(checkpoints) and checkpoints[-1][0] >= max_steps
    return (*run_state(status, finished, updated, stale_after_s), updated, status)


def _max_steps(config: dict) -> int | None:
    trainer = config.get("trainer")
    max_steps = trainer.get("max_steps") if isinstance(trainer, dict) else None
    return max_steps if isinstance(max_steps, int) else None


def current_state(root: Path, run_dir: Path, stale_after_s: float) -> tuple[str, str | None, int]:
    """(state, why, number of checkpoints): what a live view polls (metrics unread)."""
    checkpoints = checkpoint_steps(run_dir)
    state, error, _, _ = _state(root, run_dir, _config(root, run_dir), checkpoints, stale_after_s)
    return state, error, len(checkpoints)


def summarize(root: Path, run_dir: Path, stale_after_s: float) -> RunInfo:
    """What a list of runs shows about ``run_dir`` (under ``root``)."""
    config = _config(root, run_dir)
    checkpoints = checkpoint_steps(run_dir)
    state, error, updated, status = _state(root, run_dir, config, checkpoints, stale_after_s)
    metrics_path = file_inside(root, run_dir / "metrics.jsonl")
    records = read_metrics_from(metrics_path)[0] if metrics_path else []
    val: dict[str, float] = {}
    for record in records:
        if any(key.startswith("val/") for key in record):
            val = {k: v for k, v in record.items() if k.startswith("val/")}
    started = (status or {}).get("started") or (records[0].get("time") if records else None)
    parent = run_dir.parent
    relative = run_dir.relative_to(root)
    return RunInfo(
        id=relative.as_posix(),
        name=run_dir.name,
        pipeline=relative.parent.as_posix() if parent != root and is_pipeline(parent) else None,
        stage=_name(config, "stage"),
        arch=_name(config, "arch"),
        model=_name(config, "model"),
        data=_name(config, "data"),
        state=state,
        error=error,
        step=records[-1]["step"] if records else (checkpoints[-1][0] if checkpoints else None),
        max_steps=_max_steps(config),
        val=val,
        started=started or _mtime(run_dir),
        updated=updated,
        checkpoints=len(checkpoints),
    )


def find_runs(out_dir: str | Path, stale_after_s: float) -> list[RunInfo]:
    """Every run under ``out_dir``, newest first."""
    root = Path(out_dir).resolve()
    runs = [summarize(root, path, stale_after_s) for path in discover(root)[0]]
    return sorted(runs, key=lambda r: (r.started or 0.0, r.id), reverse=True)


def find_pipelines(out_dir: str | Path) -> list[str]:
    """The ids of every pipeline directory under ``out_dir``."""
    root = Path(out_dir).resolve()
    return sorted(path.relative_to(root).as_posix() for path in discover(root)[1])
