"""Shared fixtures: the real datasets in ../shared/data, and a runner for the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LMPIPE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()

# A model and batch small enough for a CLI run to take seconds on a 2-core CPU.
TINY = [
    "model=tiny",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.block_size=64",
    "trainer.batch_size=8",
    "optim.lr=3e-3",
    "logger=console",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (set LMPIPE_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (data prep runs once per config)."""
    return tmp_path_factory.mktemp("cache")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        LMPIPE_DATA_DIR=str(SHARED_DATA),
    )
    env.pop("LMPIPE_TRACEBACK", None)
    return env


@pytest.fixture
def lmpipe(cache_dir, tmp_path):
    """Run ``python -m lmpipe.<module> ...`` in a subprocess; returns the CompletedProcess."""

    def run(module: str, *args: str, check: bool = True, timeout: float = 300):
        cmd = [sys.executable, "-m", f"lmpipe.{module}", *args]
        if module == "train":
            cmd.append(f"cache_dir={cache_dir}")
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(proc, *fragments: str) -> None:
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
