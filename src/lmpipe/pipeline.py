"""``python -m lmpipe.pipeline pipeline=lifecycle``: run stages in order, then a report card.

A pipeline config (``conf/pipeline/``) lists stages with their ``lmpipe.train`` overrides.
Each stage runs in ``<out_dir>/<name>/<stage>`` and starts from the previous stage's final
checkpoint. Stages run as ``lmpipe.train`` subprocesses with ``resume=auto``: a re-run
skips the stages ``pipeline_state.json`` records as finished with the same overrides (and
the same stages before them) and resumes one that did not finish; a stage that ran with
other settings is rerun from scratch only with ``rerun_changed=true``. At the end
``report.md`` / ``report.json`` and loss-curve PNGs in the pipeline directory say what
each stage did.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lmpipe.cli import run, user_errors
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.training.checkpoint import list_checkpoints

STATE_FILE = "pipeline_state.json"


class StageFailed(LmpipeError):
    """A stage's training process exited with an error (it printed its own message)."""


@hydra.main(config_path="../../conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.pipeline"):
        run_pipeline(cfg)


def pipeline_dir(cfg: DictConfig) -> Path:
    if cfg.name:
        return Path(cfg.out_dir) / str(cfg.name)
    arch = next((o.split("=", 1)[1] for o in cfg.overrides if o.startswith("arch=")), "ar")
    return Path(cfg.out_dir) / f"{cfg.pipeline.name}-{arch}"


def stage_args(cfg: DictConfig, stage: DictConfig, directory: Path) -> list[str]:
    """The ``lmpipe.train`` overrides of a stage (without ``init_from``)."""
    return [
        *stage.overrides,
        *cfg.overrides,
        f"out_dir={directory}",
        f"run_name={stage.name}",
        f"cache_dir={cfg.cache_dir}",
        "resume=auto",
    ]


def _validate(cfg: DictConfig) -> None:
    stages = cfg.pipeline.get("stages") or []
    if not stages:
        raise ConfigError(f"pipeline '{cfg.pipeline.name}' has no stages")
    names = [s.get("name") for s in stages]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"pipeline '{cfg.pipeline.name}': stage names must be set and unique")
    for stage in stages:
        if not all(isinstance(o, str) and "=" in o for o in stage.get("overrides") or []):
            raise ConfigError(f"pipeline stage '{stage.name}': overrides must be key=value strings")


def run_pipeline(cfg: DictConfig) -> Path:

    from lmpipe.config import instantiate
    from lmpipe.eval.report import write_report

    _validate(cfg)
    directory = pipeline_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    previous: Path | None = None
    fingerprint = ""
    for stage in cfg.pipeline.stages:
        args = stage_args(cfg, stage, directory)
        if previous is not None:
            args.append(f"init_from={previous}")
        # Chained: a stage whose input stage changed has changed too.
        fingerprint = hashlib.sha256(json.dumps([fingerprint, args]).encode()).hexdigest()[:16]
        record = state.get(stage.name, {})
        run_dir = directory / stage.name
        if record.get("fingerprint") == fingerprint and record.get("finished"):
            print(f"== stage {stage.name}: finished earlier, skipped ({run_dir})")
        else:
            if record and record.get("fingerprint") != fingerprint:
                _replace_changed(stage.name, run_dir, cfg.rerun_changed)
                record = {}
            state[stage.name] = record = _run_stage(stage.name, args, record, fingerprint)
            state_path.write_text(json.dumps(state, indent=2) + "\n")
            if not record["finished"]:
                raise StageFailed(
                    f"stage '{stage.name}' failed (its error is above); fix it and re-run the "
                    "same command to resume from this stage"
                )
        previous = run_dir
    report = write_report(
        directory,
        [
            (stage.name, directory / stage.name, state[stage.name]["wall_s"])
            for stage in cfg.pipeline.stages
        ],
        OmegaConf.to_container(cfg.pipeline.report, resolve=True),
        cache_dir=cfg.cache_dir,
        device=cfg.device,
        rewards=instantiate(cfg.reward),
    )
    print(f"report: {report}")
    return directory


def _replace_changed(name: str, run_dir: Path, rerun_changed: bool) -> None:
    """A stage that ran with other settings (its own, or an earlier stage's) is never
    resumed with the new ones: it is rerun from scratch when the user says so."""
    if not list_checkpoints(run_dir):
        return
    if not rerun_changed:
        raise ConfigError(
            f"stage '{name}' in {run_dir} ran with other settings than the pipeline gives it "
            "now; pass rerun_changed=true to delete it (and rerun it and the stages after it), "
            "or name=<another directory>"
        )
    print(f"== stage {name}: settings changed, deleting {run_dir}", flush=True)
    shutil.rmtree(run_dir)


def _run_stage(name: str, args: list[str], record: dict, fingerprint: str) -> dict:
    """Run (or resume) one stage as an ``lmpipe.train`` process; its new state record
    (``finished`` false when the process failed: it printed its own error)."""
    print(f"== stage {name}: python -m lmpipe.train {' '.join(args)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "lmpipe.train", *args])
    return {
        "fingerprint": fingerprint,
        "finished": code == 0,
        # A resumed stage's wall time adds to the time its earlier attempts took.
        "wall_s": record.get("wall_s", 0.0) + time.perf_counter() - started,
    }


if __name__ == "__main__":
    run(main, "lmpipe.pipeline")
