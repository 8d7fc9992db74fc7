"""Searches: what a training job returns to a Hydra sweeper, and a multirun's results table.

``SweepSummary`` is a Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``). Each job
of a multirun appends its line to ``<sweep dir>/jobs.jsonl`` (so that jobs a launcher runs
in other processes count too); at the end the table is made from that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

JOBS = "jobs.jsonl"
SUMMARY = "summary"  # summary.md and summary.json in the sweep directory


def final_val_loss(run_dir: Path) -> float | None:
    """``val/loss`` at the run's final checkpoint; None without a validation split."""
    from lmpipe.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return None
    meta = json.loads((checkpoints[-1] / "meta.json").read_text())
    return (meta.get("val") or {}).get("val/loss")


class SweepSummary(Callback):
    """Records each multirun job (overrides, final val loss, run dir); at the end prints
    them as a table sorted by val loss (jobs without one last) and writes ``summary.md`` and
    ``summary.json`` into the sweep directory."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A multirun into an earlier one's sweep dir (a fixed hydra.sweep.dir) starts afresh.
        (Path(config.hydra.sweep.dir) / JOBS).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        completed = job_return.status == JobStatus.COMPLETED
        record = {
            "job": config.hydra.job.num,
            "overrides": list(job_return.overrides or []),
            "val_loss": job_return.return_value if completed else None,
            "status": "completed" if completed else "failed",
            "run_dir": config.hydra.runtime.output_dir,
        }
        with (Path(config.hydra.sweep.dir) / JOBS).open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs_file = sweep_dir / JOBS
        if not jobs_file.is_file():
            return
        records = [json.loads(line) for line in jobs_file.read_text().splitlines()]
        records.sort(key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0, r["job"]))
        table = summary_table(records)
        (sweep_dir / f"{SUMMARY}.md").write_text(table + "\n")
        (sweep_dir / f"{SUMMARY}.json").write_text(json.dumps(records, indent=2) + "\n")
        print(f"\n{table}\n\nsweep summary: {sweep_dir / SUMMARY}.md", flush=True)


def summary_table(records: list[dict]) -> str:
    """A markdown table of sorted job records; the overrides column shows what differs
    between the jobs (the ones they all share are left out)."""
    shared = (
        set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    )
    lines = ["| rank | job | val loss | overrides | run dir |", "| --- | --- | --- | --- | --- |"]
    for rank, r in enumerate(records, 1):
        loss = r["status"] if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        swept = " ".join(o for o in r["overrides"] if o not in shared)
        lines.append(f"| {rank} | {r['job']} | {loss} | {swept} | {r['run_dir']} |")
    return "\n".join(lines)
