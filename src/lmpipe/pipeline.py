"""``python -m lmpipe.pipeline pipeline=lifecycle``: run stages in order, then a report card.

A pipeline config (``conf/pipeline/``) lists stages with their ``lmpipe.train`` overrides.
Each stage runs in ``<out_dir>/<name>/<stage>`` and starts from the previous stage's final
checkpoint. Stages run as ``lmpipe.train`` subprocesses with ``resume=auto``: a re-run
skips the stages ``pipeline_state.json`` records as finished with the same overrides and
resumes one that did not finish. At the end ``report.md`` / ``report.json`` and loss-curve
PNGs in the pipeline directory say what each stage did.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lmpipe.cli import run, user_errors
from lmpipe.errors import ConfigError, LmpipeError

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
    from lmpipe.eval.report import write_report

    _validate(cfg)
    directory = pipeline_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    previous: Path | None = None
    for stage in cfg.pipeline.stages:
        args = stage_args(cfg, stage, directory)
        if previous is not None:
            args.append(f"init_from={previous}")
        fingerprint = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
        record = state.get(stage.name, {})
        if record.get("fingerprint") == fingerprint and record.get("finished"):
            print(f"== stage {stage.name}: finished earlier, skipped ({directory / stage.name})")
        else:
            print(f"== stage {stage.name}: python -m lmpipe.train {' '.join(args)}", flush=True)
            # A resumed stage's wall time adds to the time its earlier attempts took.
            earlier = record.get("wall_s", 0.0) if record.get("fingerprint") == fingerprint else 0.0
            started = time.perf_counter()
            code = subprocess.call([sys.executable, "-m", "lmpipe.train", *args])
            record = {
                "fingerprint": fingerprint,
                "finished": code == 0,
                "wall_s": earlier + time.perf_counter() - started,
            }
            state[stage.name] = record
            state_path.write_text(json.dumps(state, indent=2) + "\n")
            if code != 0:
                raise StageFailed(
                    f"stage '{stage.name}' failed (exit {code}, its error is above); fix it and "
                    "re-run the same command to resume from this stage"
                )
        previous = directory / stage.name
    report = write_report(
        directory,
        [
            (stage.name, directory / stage.name, state[stage.name]["wall_s"])
            for stage in cfg.pipeline.stages
        ],
        OmegaConf.to_container(cfg.pipeline.report, resolve=True),
        cache_dir=cfg.cache_dir,
        device=cfg.device,
    )
    print(f"report: {report}")
    return directory


if __name__ == "__main__":
    run(main, "lmpipe.pipeline")
