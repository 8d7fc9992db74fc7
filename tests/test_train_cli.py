"""End-to-end checks of ``python -m lmpipe.train`` as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.config import CONF_DIR

from conftest import TINY, assert_one_line_error, read_metrics, train_until_killed


def test_pretraining_learns_and_writes_a_complete_checkpoint(lmpipe, tmp_path):
    out = tmp_path / "runs"
    proc = lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        "trainer.max_steps=150",
        "trainer.eval_interval=75",
        "trainer.save_interval=75",
        "trainer.log_interval=25",
    )
    run_dir = out / "ar-demo-tiny-pretrain-v1"
    assert str(run_dir) in proc.stdout
    # Every training line says how long the run has left (the bar, off a terminal, cannot).
    lines = [
        line for line in proc.stdout.splitlines() if line.startswith("step ") and "| loss" in line
    ]
    assert [line.split("|")[0].split()[1] for line in lines] == [
        "25",
        "50",
        "75",
        "100",
        "125",
        "150",
    ]
    assert all(re.search(r" \| eta (\d+m)?\d+s$", line) for line in lines), lines
    metrics = read_metrics(run_dir)
    val = [m for m in metrics if "val/loss" in m]
    assert [m["step"] for m in val] == [0, 75, 150]
    # From ~ln(vocab) to well below: the demo prose is learned (measured: 6.25 -> 1.21).
    assert val[-1]["val/loss"] < 0.3 * val[0]["val/loss"]
    assert val[-1]["val/accuracy"] > 0.5
    assert val[-1]["val/perplexity"] == pytest.approx(math.exp(val[-1]["val/loss"]))
    train = [m for m in metrics if "train/loss" in m]
    for name in (
        "train/loss",
        "train/accuracy",
        "train/perplexity",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
    ):
        assert name in train[-1]
    checkpoint = run_dir / "checkpoints" / "step_000150"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["global_step"] == 150 and meta["architecture"] == "ar"
    assert meta["best_val_loss"] == pytest.approx(min(m["val/loss"] for m in val))
    manifest = Path(meta["data_dir"]) / "manifest.json"
    assert meta["tokenizer_hash"] == json.loads(manifest.read_text())["tokenizer_hash"]
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000075",
        "step_000150",
    ]


def _train_args(out: Path) -> list[str]:
    return [
        *TINY,
        f"out_dir={out}",
        "run_name=r",
        "model.dropout=0.1",
        "trainer.max_steps=30",
        "trainer.save_interval=10",
        "trainer.log_interval=1",
        "trainer.eval_interval=10",
        "trainer.batch_size=16",
        "hardware.micro_batch_size=8",
    ]


def _losses(run_dir: Path) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for m in read_metrics(run_dir):
        if "train/loss" in m:
            by_step.setdefault(m["step"], []).append(m["train/loss"])
    return by_step


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(lmpipe, tmp_path, cache_dir, optim):
    reference = tmp_path / "reference"
    lmpipe("train", *_train_args(reference), f"optim={optim}")

    killed = tmp_path / "killed"
    # After the step-10 checkpoint, before step 20's.
    args = [*_train_args(killed), f"optim={optim}"]
    train_until_killed(tmp_path, [*args, f"cache_dir={cache_dir}"], "step     13 |")
    run_dir = killed / "r"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000010"]
    assert max(_losses(run_dir)) < 20

    proc = lmpipe("train", *args, "resume=auto")
    assert "resuming from" in proc.stdout and "step_000010" in proc.stdout

    final_ref = load_file(reference / "r" / "checkpoints" / "step_000030" / "model.safetensors")
    final = load_file(run_dir / "checkpoints" / "step_000030" / "model.safetensors")
    assert final.keys() == final_ref.keys()
    for name in final:
        assert (final[name] == final_ref[name]).all(), name
    ref_losses = _losses(reference / "r")
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    for step, values in losses.items():  # steps 11.. were logged twice: all must agree
        assert values == [ref_losses[step][0]] * len(values), step


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["trainer.max_stepz=5"], ["unknown config key 'trainer.max_stepz'"]),
        (["optim.lr=0"], ["optim.lr=0 must be a finite number > 0"]),
        (["optim.lr=inf"], ["optim.lr=inf must be a finite number > 0"]),
        (["optim.lr=nan"], ["optim.lr=nan must be a finite number > 0"]),
        (["optim.lr=-1e-3"], ["optim.lr"]),
        (
            ["trainer.block_size=4096"],
            ["trainer.block_size=4096 is larger than the model supports"],
        ),
        (
            ["data=shakespeare_char", "data.sources.0.path=/no/such/input.txt"],
            ["file not found: /no/such/input.txt"],
        ),
        (["init_from=/tmp"], ["/tmp is not a checkpoint"]),
        (["arch=transformer"], ["no config 'arch/transformer'"]),
        (["model.n_head=3"], ["divisible"]),
        (["hardware.device=tpu"], ["hardware.device='tpu'"]),
    ],
)
def test_bad_input_is_one_clear_line(lmpipe, tmp_path, args, fragments):
    out = tmp_path / "runs"
    proc = lmpipe("train", *TINY, f"out_dir={out}", *args, check=False)
    assert_one_line_error(proc, "lmpipe.train: error:", *fragments)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_a_diverging_run_stops_with_one_line_and_no_non_finite_checkpoint(lmpipe, tmp_path):
    out = tmp_path / "runs"
    args = ["optim.lr=100", "trainer.grad_clip=null", "trainer.max_steps=40"]
    proc = lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        "run_name=nan",
        "trainer.save_interval=2",
        "trainer.log_interval=1",
        "trainer.eval_interval=1000",
        *args,
        check=False,
    )
    assert_one_line_error(proc, "training diverged", "last good checkpoint: step_0000")
    assert "update skipped" in proc.stdout
    run_dir = out / "nan"
    metrics = read_metrics(run_dir)  # valid JSON throughout (non-finite values are null)
    assert metrics[-1]["step"] < 40
    assert any(m.get("train/loss") is None and "train/lr" in m for m in metrics) or any(
        m.get("train/skipped_steps") for m in metrics
    )
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert checkpoints and all(c.name.startswith("step_") for c in checkpoints)
    for checkpoint in checkpoints:
        for name, tensor in load_file(checkpoint / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)


@pytest.fixture
def short_run(lmpipe, tmp_path) -> Path:
    out = tmp_path / "base"
    lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        "run_name=base",
        "trainer.max_steps=20",
        "trainer.save_interval=10",
        "trainer.eval_interval=20",
    )
    return out / "base"


def test_init_from_starts_from_the_weights_and_checks_them(lmpipe, tmp_path, short_run):
    out = tmp_path / "next"
    proc = lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        f"init_from={short_run}",
        "trainer.max_steps=2",
        "trainer.log_interval=1",
    )
    assert "weights from" in proc.stdout and "step_000020" in proc.stdout
    first_val = next(m for m in read_metrics(out / "ar-demo-tiny-pretrain-v1") if "val/loss" in m)
    trained_val = [m for m in read_metrics(short_run) if "val/loss" in m][-1]
    assert first_val["val/loss"] == pytest.approx(trained_val["val/loss"], rel=1e-5)

    weights = short_run / "checkpoints" / "step_000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        f"init_from={short_run / 'checkpoints' / 'step_000020'}",
        check=False,
    )
    assert_one_line_error(proc, "model.safetensors is corrupt")


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(lmpipe, short_run):
    newest = short_run / "checkpoints" / "step_000020" / "model.safetensors"
    newest.write_bytes(b"garbage")
    proc = lmpipe(
        "train",
        *TINY,
        f"out_dir={short_run.parent}",
        "run_name=base",
        "resume=auto",
        "trainer.max_steps=25",
    )
    assert "skipping unusable checkpoint" in proc.stdout and "step_000020" in proc.stdout
    assert "resuming from" in proc.stdout and "step_000010" in proc.stdout
    assert (short_run / "checkpoints" / "step_000025").is_dir()


def test_a_named_run_with_checkpoints_is_not_overwritten(lmpipe, short_run):
    proc = lmpipe("train", *TINY, f"out_dir={short_run.parent}", "run_name=base", check=False)
    assert_one_line_error(proc, "already has checkpoints", "resume=auto")


def test_runs_are_versioned_and_resume_auto_takes_the_newest(lmpipe, tmp_path):
    out = tmp_path / "runs"
    for _ in range(2):
        lmpipe("train", *TINY, f"out_dir={out}", "trainer.max_steps=2", "trainer.eval_batches=0")
    assert sorted(p.name for p in out.iterdir()) == [
        "ar-demo-tiny-pretrain-v1",
        "ar-demo-tiny-pretrain-v2",
    ]
    proc = lmpipe("train", *TINY, f"out_dir={out}", "trainer.max_steps=2", "resume=auto")
    assert "run already complete at step 2" in proc.stdout
    assert len(list(out.iterdir())) == 2


def test_multirun_sweep_runs_each_job_in_its_own_directory(lmpipe, tmp_path):
    out = tmp_path / "runs"
    lmpipe(
        "train",
        "-m",
        *TINY,
        f"out_dir={out}",
        "optim.lr=1e-3,3e-4",
        "trainer.max_steps=20",
        "trainer.eval_batches=0",
    )
    (sweep,) = out.iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0-optim.lr=0.001", "1-optim.lr=0.0003"]
    for job in jobs:
        lrs = [m["train/lr"] for m in read_metrics(sweep / job) if "train/lr" in m]
        assert max(lrs) <= float(job.split("=")[1])
        assert (sweep / job / "checkpoints" / "step_000020" / "meta.json").is_file()


def test_help_lists_groups_and_cfg_prints_the_composed_config(lmpipe):
    help_text = lmpipe("train", "--help").stdout
    for group in (
        *(
            f"{g}: " + ", ".join(sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")))
            for g in ("stage", "arch")
        ),
        "model:",
        "nanogpt-shakespeare",
        "hardware: auto, cpu",
        "logger: console, tensorboard, wandb",
        "demo, demo_chat, demo_mid, demo_pref, demo_prompts",
    ):
        assert group in help_text
    cfg = lmpipe("train", "--cfg", "job", "model=small").stdout
    assert "d_model: 384" in cfg and "_target_: lmpipe.objectives.ce.CrossEntropy" in cfg


def test_wandb_offline_and_tensorboard_sinks(lmpipe, tmp_path):
    out = tmp_path / "runs"
    lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        "run_name=wb",
        "logger=wandb",
        "trainer.max_steps=4",
        "trainer.log_interval=2",
    )
    assert list((out / "wb" / "wandb").glob("offline-run-*"))
    lmpipe(
        "train",
        *TINY,
        f"out_dir={out}",
        "run_name=tb",
        "logger=tensorboard",
        "trainer.max_steps=4",
        "trainer.log_interval=2",
    )
    assert list((out / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert read_metrics(out / "tb")[-1]["step"] == 4


def test_generate_samples_from_a_checkpoint(lmpipe, short_run):
    proc = lmpipe(
        "generate",
        f"checkpoint={short_run}",
        "prompt=Ada has",
        "max_new_tokens=20",
        "temperature=0",
    )
    assert proc.stdout.startswith("Ada has") and len(proc.stdout) > len("Ada has") + 5
    again = lmpipe(
        "generate",
        f"checkpoint={short_run}",
        "prompt=Ada has",
        "max_new_tokens=20",
        "temperature=0",
    )
    assert again.stdout == proc.stdout
    missing = lmpipe("generate", "checkpoint=/no/such/dir", check=False)
    assert_one_line_error(missing, "checkpoint not found")


def test_a_time_budget_ends_the_run_and_the_schedule_with_it(lmpipe, tmp_path):
    budget = [*TINY, f"out_dir={tmp_path}", "run_name=t", "trainer.max_steps=1000000"]
    budget += ["trainer.max_time=4", "trainer.log_interval=1", "trainer.eval_interval=1000000"]
    budget += ["trainer.save_interval=1000000", "optim.lr=1e-3"]
    proc = lmpipe("train", *budget)
    assert "1000000 steps or 4 s, whichever comes first" in proc.stdout
    run_dir = tmp_path / "t"
    lrs = [m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m]
    (final,) = (run_dir / "checkpoints").iterdir()  # saved when the time was up
    assert int(final.name.removeprefix("step_")) == len(lrs) > 5
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert lrs[-1] < 0.2e-3  # cosine to min_lr_ratio (0.1) x lr over the 4 s, not 10^6 steps
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    assert 4 <= state["elapsed_s"] < 30
    again = lmpipe("train", *budget, "resume=auto")
    assert f"run already complete at step {len(lrs)}" in again.stdout
