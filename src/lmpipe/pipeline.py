"""``python -m lmpipe.pipeline pipeline=lifecycle``: run stages in order, then a report card.

A pipeline config (``conf/pipeline/``) lists stages with their overrides. A stage is an
``lmpipe.train`` run (the default) or another entrypoint (``entrypoint: label``: RLAIF
labelling). Each runs in ``<out_dir>/<name>/<stage>``; a train stage starts from the
previous train stage's final checkpoint unless it sets ``init_from`` itself. An override
value ``@<name>[/<path>]`` names another stage's directory (an earlier one) or one of the
pipeline's ``inputs`` (checkpoints it starts from), e.g. ``init_from=@sft``,
``data.sources.0.path=@label/pairs.jsonl``. Stages run as subprocesses (train ones with
``resume=auto``): a re-run skips the stages ``pipeline_state.json`` records as finished
with the same arguments (and the same stages before them) and resumes one that did not
finish; a stage that ran with other settings is rerun from scratch only with
``rerun_changed=true``. At the end ``report.md`` / ``report.json`` and loss-curve PNGs in
the pipeline directory say what each stage (and input) did.
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
from lmpipe.training.checkpoint import list_checkpoints, resolve_checkpoint

STATE_FILE = "pipeline_state.json"
ENTRYPOINTS = {"train": "lmpipe.train", "label": "lmpipe.label"}


class StageFailed(LmpipeError):
    """A stage's training process exited with an error (it printed its own message)."""


@hydra.main(config_path="conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("lmpipe.pipeline"):
        run_pipeline(cfg)


def pipeline_dir(cfg: DictConfig) -> Path:
    if cfg.name:
        return Path(cfg.out_dir) / str(cfg.name)
    arch = next((o.split("=", 1)[1] for o in cfg.overrides if o.startswith("arch=")), "ar")
    return Path(cfg.out_dir) / f"{cfg.pipeline.name}-{arch}"


def entrypoint(stage: DictConfig) -> str:
    return stage.get("entrypoint") or "train"


def resolve_reference(value: str, places: dict[str, Path], where: str) -> str:
    """``@<name>[/<path>]`` -> the directory of stage or input ``name`` (+ path); any other
    value as it is."""
    if not value.startswith("@"):
        return value
    name, _, rest = value[1:].partition("/")
    if name not in places:
        raise ConfigError(
            f"{where}: {value} names no input or earlier stage (known: "
            f"{', '.join(places) or 'none'})"
        )
    return str(places[name] / rest) if rest else str(places[name])


def stage_args(
    cfg: DictConfig,
    stage: DictConfig,
    directory: Path,
    places: dict[str, Path],
    previous: Path | None,
) -> list[str]:
    """The entrypoint arguments of a stage: its overrides with references resolved, then
    (train stages) the pipeline-wide overrides and where it runs and starts from."""
    own = []
    for override in stage.get("overrides") or []:
        key, _, value = override.partition("=")
        own.append(f"{key}={resolve_reference(value, places, f'pipeline stage {stage.name!r}')}")
    if entrypoint(stage) == "label":
        return [*own, f"out={directory / stage.name}", f"cache_dir={cfg.cache_dir}"]
    args = [
        *own,
        *cfg.overrides,
        f"out_dir={directory}",
        f"run_name={stage.name}",
        f"cache_dir={cfg.cache_dir}",
        "resume=auto",
    ]
    if previous is not None and not any(o.startswith("init_from=") for o in own):
        args.append(f"init_from={previous}")
    return args


def _validate(cfg: DictConfig) -> None:
    stages = cfg.pipeline.get("stages") or []
    if not stages:
        raise ConfigError(f"pipeline '{cfg.pipeline.name}' has no stages")
    names = [s.get("name") for s in stages]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"pipeline '{cfg.pipeline.name}': stage names must be set and unique")
    clash = set(names) & set(cfg.pipeline.get("inputs") or {})
    if clash:
        raise ConfigError(
            f"pipeline '{cfg.pipeline.name}': {sorted(clash)[0]} is both an input and a stage"
        )
    known = {name: Path(name) for name in cfg.pipeline.get("inputs") or {}}
    for stage in stages:
        overrides = stage.get("overrides") or []
        if not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"pipeline stage '{stage.name}': overrides must be key=value strings")
        if entrypoint(stage) not in ENTRYPOINTS:
            raise ConfigError(
                f"pipeline stage '{stage.name}': entrypoint={entrypoint(stage)!r} is not one of "
                f"{', '.join(ENTRYPOINTS)}"
            )
        for override in overrides:
            resolve_reference(override.partition("=")[2], known, f"pipeline stage {stage.name!r}")
        known[stage.name] = Path(stage.name)
    for key in ("reward_model", "kl_reference"):
        value = (cfg.pipeline.get("report") or {}).get(key)
        if value:
            resolve_reference(value, known, f"report.{key}")


def _inputs(cfg: DictConfig) -> dict[str, Path]:
    """The pipeline's input checkpoints by name, each checked to be one."""
    found = {}
    for name, path in (cfg.pipeline.get("inputs") or {}).items():
        try:
            found[name] = resolve_checkpoint(str(path), log=lambda _: None).path
        except LmpipeError as exc:
            raise ConfigError(f"pipeline input {name}: {exc}") from None
    return found


def run_pipeline(cfg: DictConfig) -> Path:

    from lmpipe.config import instantiate
    from lmpipe.eval.report import write_report

    _validate(cfg)
    places: dict[str, Path] = dict(_inputs(cfg))
    directory = pipeline_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    previous: Path | None = None
    fingerprint = ""
    for stage in cfg.pipeline.stages:
        args = stage_args(cfg, stage, directory, places, previous)
        # Chained: a stage whose input stage changed has changed too.
        fingerprint = hashlib.sha256(json.dumps([fingerprint, args]).encode()).hexdigest()[:16]
        record = state.get(stage.name, {})
        run_dir = directory / stage.name
        # A finished stage whose run directory is gone (deleted by hand) runs again.
        if record.get("fingerprint") == fingerprint and record.get("finished") and run_dir.exists():
            print(f"== stage {stage.name}: finished earlier, skipped ({run_dir})")
        else:
            if record and record.get("fingerprint") != fingerprint:
                _replace_changed(stage.name, run_dir, cfg.rerun_changed)
                record = {}
            elif not run_dir.exists():  # nothing to resume: its time starts again too
                record = {}
            module = ENTRYPOINTS[entrypoint(stage)]
            state[stage.name] = record = _run_stage(stage.name, module, args, record, fingerprint)
            state_path.write_text(json.dumps(state, indent=2) + "\n")
            if not record["finished"]:
                raise StageFailed(
                    f"stage '{stage.name}' failed (its error is above); fix it and re-run the "
                    "same command to resume from this stage"
                )
        places[stage.name] = run_dir
        if entrypoint(stage) == "train":
            previous = run_dir
    report_cfg = OmegaConf.to_container(cfg.pipeline.report, resolve=True)
    for key in ("reward_model", "kl_reference"):
        if report_cfg.get(key):
            report_cfg[key] = resolve_reference(report_cfg[key], places, f"report.{key}")
    rows = [(name, places[name], None) for name in cfg.pipeline.get("inputs") or {}]
    rows += [
        (stage.name, directory / stage.name, state[stage.name]["wall_s"])
        for stage in cfg.pipeline.stages
    ]
    report = write_report(
        directory,
        rows,
        report_cfg,
        cache_dir=cfg.cache_dir,
        device=cfg.device,
        rewards=instantiate(cfg.reward),
    )
    print(f"report: {report}")
    return directory


def _replace_changed(name: str, run_dir: Path, rerun_changed: bool) -> None:
    """A stage that ran with other settings (its own, or an earlier stage's) is never
    resumed with the new ones: it is rerun from scratch when the user says so."""
    if not (list_checkpoints(run_dir) or (run_dir / "pairs.jsonl").exists()):  # train, label
        return
    if not rerun_changed:
        raise ConfigError(
            f"stage '{name}' in {run_dir} ran with other settings than the pipeline gives it "
            "now; pass rerun_changed=true to delete it (and rerun it and the stages after it), "
            "or name=<another directory>"
        )
    print(f"== stage {name}: settings changed, deleting {run_dir}", flush=True)
    shutil.rmtree(run_dir)


def _user_search_path() -> list[str]:
    """``hydra.searchpath=[...]`` for the config directories the command line added
    (``--config-dir``, ``hydra.searchpath``): the stages find the same configs."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    added = [
        f"{source.schema}://{source.path}"
        for source in HydraConfig.get().runtime.config_sources
        if source.provider == "command-line" or source.provider.startswith("hydra.searchpath")
    ]
    return [f"hydra.searchpath=[{','.join(added)}]"] if added else []


def _run_stage(name: str, module: str, args: list[str], record: dict, fingerprint: str) -> dict:
    """Run (or resume) one stage as a ``python -m <module>`` process; its new state record
    (``finished`` false when the process failed: it printed its own error)."""
    args = [*_user_search_path(), *args]
    print(f"== stage {name}: python -m {module} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", module, *args])
    return {
        "fingerprint": fingerprint,
        "finished": code == 0,
        # A resumed stage's wall time adds to the time its earlier attempts took.
        "wall_s": record.get("wall_s", 0.0) + time.perf_counter() - started,
    }


if __name__ == "__main__":
    run(main, "lmpipe.pipeline")
