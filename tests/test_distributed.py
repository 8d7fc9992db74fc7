"""Two ranks (torchrun, gloo, on the CPU) train what one rank does with the same global
batch in two micro-batches, with DDP and with FSDP2; a checkpoint resumes across world
sizes; held-out sets and token counts do not depend on how a batch is split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmpipe import api

from conftest import TINY, build_cpu_run, cli_env, read_metrics

STEPS = 10
# SFT on chats: episodes of different lengths, so that ranks see different token counts.
RUN = [
    *TINY,
    "stage=sft",
    "data=demo_chat",
    "data.sources.0.num_records=400",
    "hardware.device=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.log_interval=1",
    "trainer.eval_interval=5",
    "trainer.save_interval=5",
    "trainer.eval_batches=1",
]
TOLERANCE = 1e-5


def torchrun(out: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lmpipe.train",
        *args,
        f"out_dir={out}",
        f"cache_dir={cache_dir}",
    ]
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def one_rank(out: Path, cache_dir: Path, *args: str) -> Path:
    """One rank, the batch of 8 in two micro-batches of 4 (as two ranks split it)."""
    overrides = [*RUN, "hardware=cpu", "hardware.micro_batch_size=4", *args]
    return api.train([*overrides, f"out_dir={out}", f"cache_dir={cache_dir}"])


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    """``key`` at each step it was logged (a resumed step: its last value)."""
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


def weights(run_dir: Path, step: int = STEPS) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def cut_at_step_5(run_dir: Path, copy: Path) -> None:
    """``run_dir`` as it was at step 5 (its checkpoint then), copied to ``copy``."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{STEPS:06d}")
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if json.loads(line)["step"] <= 5))


def assert_same_training(run: Path, reference: Path, first_step: int = 1) -> None:
    """The same episodes at every step, the same losses and token counts from
    ``first_step`` on, and the same final weights."""
    episodes = (run / "episodes.jsonl").read_text()
    assert episodes == (reference / "episodes.jsonl").read_text()
    assert len(episodes.splitlines()) == STEPS
    for key in ("train/loss", "train/tokens"):
        got, want = by_step(run, key), by_step(reference, key)
        steps = range(first_step, STEPS + 1)
        assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], abs=TOLERANCE)
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= TOLERANCE


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    return one_rank(tmp_path_factory.mktemp("one"), cache_dir)


@pytest.fixture(scope="module", params=["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def two_ranks(request, tmp_path_factory, cache_dir) -> tuple[str, Path]:
    """Two ranks of 4 rows each, under ``hardware=<param>``."""
    out = tmp_path_factory.mktemp(request.param)
    torchrun(out, cache_dir, *RUN, f"hardware={request.param}", "run_name=two")
    return request.param, out / "two"


def test_two_ranks_train_as_one_rank_accumulating(two_ranks, reference):
    strategy, run = two_ranks
    assert_same_training(run, reference)
    val, want = by_step(run, "val/loss"), by_step(reference, "val/loss")
    assert [val[s] for s in (0, 5, 10)] == pytest.approx([want[s] for s in (0, 5, 10)], abs=1e-5)
    if strategy == "fsdp":  # a sharded run's checkpoint is an ordinary one
        assert type(api.load_checkpoint(run).build_model()).__name__ == "ARLM"


def test_a_two_rank_checkpoint_resumes_on_one_rank(two_ranks, reference, tmp_path, cache_dir):
    """Saved at step 5 by two ranks, continued by one: the steps after it are the
    uninterrupted one-rank run's."""
    _, run = two_ranks
    copy = tmp_path / "resumed"
    cut_at_step_5(run, copy)
    one_rank(tmp_path, cache_dir, "run_name=resumed", "resume=auto")
    assert_same_training(copy, reference, first_step=6)


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_sharded_ranks(reference, tmp_path, cache_dir):
    copy = tmp_path / "resumed"
    cut_at_step_5(reference, copy)
    torchrun(tmp_path, cache_dir, *RUN, "hardware=fsdp", "run_name=resumed", "resume=auto")
    assert_same_training(copy, reference, first_step=6)


def test_held_out_loss_does_not_depend_on_the_micro_batch_size(tmp_path, cache_dir):
    losses = []
    for micro in (2, 4):
        run = build_cpu_run(
            tmp_path / str(micro),
            *RUN,
            "trainer.eval_batches=2",
            f"hardware.micro_batch_size={micro}",
            f"cache_dir={cache_dir}",
        )
        losses.append(run.trainer.evaluate()["val/loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
