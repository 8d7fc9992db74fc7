"""Searches: ``lmpipe.train`` returns its final val loss to a sweeper, Optuna optimises it,
and a multirun ends with a table of its jobs by val loss."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lmpipe.sweep import JOBS, SweepSummary, final_val_loss

from conftest import TINY, read_metrics

# Three steps on a cut of the demo data (test_pipeline's: one cache): seconds per job.
QUICK = [
    *(o for o in TINY if not o.startswith("optim.lr=")),  # each test sweeps the rate
    "trainer.max_steps=3",
    "trainer.eval_batches=2",
    "trainer.eval_at_start=false",
    "data.sources.0.num_records=400",
    "data.sources.1.num_records=200",
]


def _sweep_dir(out: Path) -> Path:
    (found,) = out.glob("sweep-*")
    return found


def _last_val_loss(run_dir: str) -> float:
    return [m["val/loss"] for m in read_metrics(Path(run_dir)) if "val/loss" in m][-1]


def test_a_multirun_ends_with_its_jobs_sorted_by_val_loss(lmpipe, tmp_path):
    out = tmp_path / "runs"
    # In 3 steps the larger rate learns more: job 1 comes first.
    proc = lmpipe("train", "-m", *QUICK, f"out_dir={out}", "optim.lr=1e-4,1e-2")
    sweep = _sweep_dir(out)
    records = json.loads((sweep / "summary.json").read_text())
    assert [r["job"] for r in records] == [1, 0]
    for record in records:  # the return value is the run's own final val loss
        assert record["val_loss"] == _last_val_loss(record["run_dir"])
    assert records[0]["val_loss"] < records[1]["val_loss"]
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[2].startswith("| 1 | 1 |") and "| optim.lr=0.01 |" in table[2]
    assert table[3].startswith("| 2 | 0 |") and "| optim.lr=0.0001 |" in table[3]
    assert "\n".join(table) in proc.stdout


def test_optuna_minimises_the_final_val_loss(lmpipe, tmp_path):
    out = tmp_path / "runs"
    lmpipe(
        "train",
        "-m",
        *QUICK,
        f"out_dir={out}",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=0",
        "optim.lr=tag(log,interval(1e-4,1e-2))",
    )
    sweep = _sweep_dir(out)
    records = json.loads((sweep / "summary.json").read_text())
    assert len(records) == 3
    losses = {r["run_dir"]: _last_val_loss(r["run_dir"]) for r in records}
    assert len(set(losses.values())) == 3  # three different rates, three different losses
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(losses.values())
    assert f"optim.lr={best['best_params']['optim.lr']}" in records[0]["overrides"]


def _checkpoint(run_dir: Path, step: int, val: dict) -> None:
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"global_step": step, "val": val}))


def test_the_return_value_is_the_final_checkpoints_val_loss_or_none(tmp_path):
    assert final_val_loss(tmp_path) is None  # no checkpoint
    _checkpoint(tmp_path, 10, {"val/loss": 1.5})
    _checkpoint(tmp_path, 20, {"val/loss": 2.5, "val/accuracy": 0.1})
    assert final_val_loss(tmp_path) == 2.5  # the final one, not the best
    _checkpoint(tmp_path, 30, {})  # no validation split
    assert final_val_loss(tmp_path) is None


def test_jobs_without_a_val_loss_come_last(tmp_path, capsys):
    jobs = [
        {"job": 0, "overrides": ["a=1", "b=1"], "val_loss": None, "status": "failed"},
        {"job": 1, "overrides": ["a=1", "b=2"], "val_loss": 3.0, "status": "completed"},
        {"job": 2, "overrides": ["a=1", "b=3"], "val_loss": 2.0, "status": "completed"},
    ]
    (tmp_path / JOBS).write_text("".join(json.dumps({**j, "run_dir": "d"}) + "\n" for j in jobs))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = (tmp_path / "summary.md").read_text().splitlines()[2:]
    assert rows == [
        "| 1 | 2 | 2.0000 | b=3 | d |",
        "| 2 | 1 | 3.0000 | b=2 | d |",
        "| 3 | 0 | failed | b=1 | d |",
    ]
    assert rows[0] in capsys.readouterr().out


def test_a_multirun_into_an_earlier_sweep_dir_starts_its_job_list_afresh(tmp_path):
    (tmp_path / JOBS).write_text('{"job": 0}\n')
    SweepSummary().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert not (tmp_path / JOBS).exists()
