"""Helpers shared by the benchmark scripts: data, lmpipe's Trainer, timing and tables."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lmpipe import api
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.models import LM
from lmpipe.objectives import Objective
from lmpipe.training.distributed import DistEnv
from lmpipe.training.hardware import resolve_hardware
from lmpipe.training.run import assemble_trainer
from lmpipe.training.trainer import Trainer

DATA_DIR = Path(
    os.environ.get(
        "LMPIPE_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)


def shakespeare_char_tokens() -> tuple[np.ndarray, int, str]:
    """Tiny shakespeare as character ids when the shared data is there, else built-in prose."""
    path = DATA_DIR / "tinyshakespeare" / "input.txt"
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        from lmpipe.data.builtin import stories

        text, source = "\n".join(r["text"] for r in stories(3000, 0)), "lmpipe built-in stories"
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.array([lookup[c] for c in text], dtype=np.int64), len(chars), source


def optim_overrides(optim: dict) -> list[str]:
    """``optim.<key>=<value>`` overrides: the optimizer settings a peer gets, for lmpipe."""
    return [f"optim.{key}={json.dumps(value).replace(' ', '')}" for key, value in optim.items()]


def lmpipe_trainer(
    model: LM,
    objective: Objective,
    *overrides: str,
    tokenizer: Tokenizer,
    sampler=None,
    run_dir: Path | None = None,
    train_model: torch.nn.Module | None = None,
) -> Trainer:
    """lmpipe's Trainer as a run assembles it (``assemble_trainer``) from ``lmpipe.train``'s
    config with these overrides: on the CPU in fp32, for as many steps as a benchmark
    takes, at a constant LR unless the overrides say otherwise."""
    cfg = api.compose(
        "train",
        [
            "hardware=cpu",
            "trainer.max_steps=1000000000",
            "schedule.name=constant",
            "schedule.warmup_steps=0",
            "seed=0",
            *overrides,
        ],
    )
    return assemble_trainer(
        cfg,
        model=model,
        objective=objective,
        sampler=sampler,  # None: the benchmark calls train_step with its own batches
        val_sets={},
        tokenizer=tokenizer,
        hardware=resolve_hardware(OmegaConf.to_container(cfg.hardware)),
        env=DistEnv(),
        run_dir=run_dir or Path(tempfile.mkdtemp(prefix="lmpipe-bench-")),
        train_model=train_model,
    )


def random_rows(
    tokens: np.ndarray, rows: int, length: int, count: int, seed: int = 0
) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        starts = rng.integers(0, len(tokens) - length, rows)
        out.append(torch.from_numpy(np.stack([tokens[s : s + length] for s in starts])))
    return out


def interleaved_times(
    steps: dict[str, Callable[[int], None]], total: int, chunk: int, warmup: int
) -> dict[str, list[float]]:
    """Per-step wall times of each contender, run in alternating chunks so that machine
    noise (other processes, thermal state) hits all of them alike."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for start in range(0, total, chunk):
        for name, step in steps.items():
            for i in range(start, min(start + chunk, total)):
                t0 = time.perf_counter()
                step(i)
                times[name].append(time.perf_counter() - t0)
    return times


def speedup(times: dict[str, list[float]], name: str, rounds: int, base: str = "TRL") -> str:
    """How many times faster ``name`` is than ``base``: the ratio of their median seconds per
    step and its range over ``rounds`` consecutive parts of the run, as "1.72x | 1.35-1.80"
    cells ("vs TRL", "range")."""

    def per_round(who: str) -> list[float]:
        bounds = np.linspace(0, len(times[who]), rounds + 1).astype(int)
        return [
            statistics.median(times[who][a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    ratios = [b / n for b, n in zip(per_round(base), per_round(name), strict=True)]
    overall = statistics.median(times[base]) / statistics.median(times[name])
    return f"{overall:.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}"


RESULT = "RESULT "  # how a benchmark's child process hands its figures to the parent


def report_result(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def child_result(command: list[str], what: str) -> dict:
    """Run ``command`` (one side of a benchmark, in a fresh process) and return the result
    it reported; its output is shown when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{what} failed (exit {done.returncode})")
    return json.loads(lines[-1][len(RESULT) :])


def memory_kib(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def reset_peak_memory() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
