"""Chaos: one run SIGKILLed at many random moments (some inside checkpoint saves) and
resumed each time ends bitwise equal to a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.tracking.jsonl import read_metrics
from lmpipe.training.checkpoint import KILL_IN_SAVE_ENV, SAVE_MOMENTS

from conftest import TINY, cli_env

MAX_STEPS = 60
SAVE_INTERVAL = 5
TIMING = ("time", "train/tokens_per_sec", "train/mfu_percent")


def _args(out: Path, cache_dir: Path) -> list[str]:
    return [
        *TINY,
        f"out_dir={out}",
        f"cache_dir={cache_dir}",
        "run_name=r",
        "resume=auto",
        "model.dropout=0.1",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.save_interval={SAVE_INTERVAL}",
        "trainer.log_interval=1",
        "trainer.eval_interval=10",
        "trainer.eval_batches=2",
        "trainer.batch_size=16",
        "hardware.micro_batch_size=8",
    ]


def _attempt(cwd: Path, args: list[str], kill_at_step: int | None, delay: float, env: dict):
    """One process; SIGKILLed ``delay`` seconds after it logs step ``kill_at_step`` (or by
    the checkpoint writer itself, through ``env``). Returns its exit code."""
    child = subprocess.Popen(
        [sys.executable, "-m", "lmpipe.train", *args],
        cwd=cwd,
        env={**cli_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in child.stdout:
        if kill_at_step is not None and line.startswith(f"step {kill_at_step:>6} |"):
            threading.Timer(delay, lambda: child.poll() is None and child.kill()).start()
            kill_at_step = None
    return child.wait()


def _records(run_dir: Path) -> dict[tuple[int, tuple[str, ...]], list[dict]]:
    """Metric records by step and metric names, timing left out."""
    found: dict[tuple[int, tuple[str, ...]], list[dict]] = {}
    for record in read_metrics(run_dir):
        values = {k: v for k, v in record.items() if k not in TIMING}
        found.setdefault((record["step"], tuple(sorted(values))), []).append(values)
    return found


def _newest_step(run_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_saves_resumes_bitwise(tmp_path, cache_dir):
    seed = int.from_bytes(os.urandom(4), "big")
    rng, seed_note = random.Random(seed), f"chaos seed {seed}"
    reference = tmp_path / "reference"
    assert _attempt(tmp_path, _args(reference, cache_dir), None, 0, {}) == 0

    out = tmp_path / "chaos"
    run_dir = out / "r"
    kills, in_save = 0, 0
    # Each attempt is killed at most one checkpoint further on, so that the run takes a
    # dozen or more kills to finish.
    while (done := _newest_step(run_dir)) < MAX_STEPS - SAVE_INTERVAL:
        if kills % 3 == 1:  # inside the next save, at a random moment of it
            moment = rng.choice(SAVE_MOMENTS)
            env = {KILL_IN_SAVE_ENV: f"step_{done + SAVE_INTERVAL:06d}:{moment}"}
            step, delay = None, 0.0
        else:  # anywhere: a random time after a random step's log line
            env, step = {}, rng.randint(done + 1, done + SAVE_INTERVAL)
            delay = rng.uniform(0, 0.1)
        code = _attempt(tmp_path, _args(out, cache_dir), step, delay, env)
        assert code == -signal.SIGKILL, (code, seed_note)
        kills += 1
        in_save += bool(env)
    assert kills >= 10 and in_save >= 1, (kills, in_save, seed_note)
    assert _attempt(tmp_path, _args(out, cache_dir), None, 0, {}) == 0

    final = f"checkpoints/step_{MAX_STEPS:06d}/model.safetensors"
    ours, theirs = load_file(run_dir / final), load_file(reference / "r" / final)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), (name, seed_note)
    expected = _records(reference / "r")
    for key, records in _records(run_dir).items():
        assert all(r == expected[key][0] for r in records), (key, seed_note)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
