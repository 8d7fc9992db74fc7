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


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """Progress lines off a terminal are timed by one clock per process: in the long test
    process any loop would print one, among the output that tests count (one-line errors).
    A test of those lines sets its own ``LMPIPE_PROGRESS_S``."""
    monkeypatch.setenv("LMPIPE_PROGRESS_S", "1e9")


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

    def run(module: str, *args: str, check: bool = True, timeout: float = 300, stdin: str = ""):
        cmd = [sys.executable, "-m", f"lmpipe.{module}", *args]
        if module == "train":
            cmd.append(f"cache_dir={cache_dir}")
        proc = subprocess.run(
            cmd,
            cwd=tmp_path,
            env=cli_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


def train_until_killed(cwd: Path, args: list[str], line_prefix: str) -> None:
    """Run ``lmpipe.train`` and SIGKILL it as soon as it prints a line starting with
    ``line_prefix`` (e.g. a step's metrics line: a kill at that point of the run)."""
    import signal

    cmd = [sys.executable, "-m", "lmpipe.train", *args]
    child = subprocess.Popen(
        cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in child.stdout:
        if line.startswith(line_prefix):
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()


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


# --- checkpoints without training (evaluation, export) ----------------------------------
def arch_config(name: str) -> dict:
    """``conf/arch/<name>.yaml``: the LM class (``_target_``) and its knobs."""
    from lmpipe.config import group_option

    return group_option("arch", name)


TINY_SHAPE = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 64}


def data_config(name: str, records: int) -> dict:
    """``conf/data/<name>.yaml`` with every (built-in) source cut to ``records`` records."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"))
    for source in cfg["sources"]:
        source["num_records"] = records
    return cfg


def save_random_checkpoint(
    path: Path,
    data_cfg: dict,
    cache_dir: Path,
    *,
    arch: str = "ar",
    stage: str = "pretrain",
    scale: float | None = None,
    seed: int = 0,
    modules: dict | None = None,
    **shape,
) -> Path:
    """A checkpoint of a freshly initialised model on prepared ``data_cfg``, with the meta
    a training run writes. ``scale``: redraw every weight from N(0, scale^2) so that the
    predictions are far from uniform (sharper checks of numerics). ``modules``: objective
    modules to save with it, by name (e.g. a reward head)."""
    import torch

    from lmpipe.data.prepare import prepare
    from lmpipe.models import build_lm
    from lmpipe.training.checkpoint import save_checkpoint

    data = prepare(data_cfg, cache_dir, progress=False)
    torch.manual_seed(seed)
    model = build_lm(
        arch_config(arch),
        {**TINY_SHAPE, **shape},
        data.tokenizer.vocab_size,
        data.tokenizer.special_ids,
    )
    if scale is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, scale)
    meta = {
        "global_step": 0,
        "architecture": arch,
        "model_config": model.config_dict(),
        "stage": stage,
        "train_config": {"data": data_cfg},
        "tokenizer_hash": data.tokenizer.hash,
        "data_dir": str(data.directory),
    }
    save_checkpoint(
        path,
        weights=model.state_dict(),
        trainer_state={},
        tokenizer=data.tokenizer,
        meta=meta,
        modules=modules,
    )
    return path


# --- runs assembled in-process (no subprocess: seconds, not tens of seconds) -------------
def build_cpu_run(run_dir: Path, *overrides: str):
    """``lmpipe.training.run.build_run`` on the CPU for ``lmpipe.train``'s config with
    these overrides."""
    from omegaconf import OmegaConf

    from lmpipe import api
    from lmpipe.training.distributed import DistEnv
    from lmpipe.training.hardware import resolve_hardware
    from lmpipe.training.run import build_run

    cfg = api.compose("train", ["hardware=cpu", *overrides])
    hardware = resolve_hardware(OmegaConf.to_container(cfg.hardware))
    return build_run(cfg, run_dir, hardware, DistEnv())


# --- a finished run to look at and talk to (UI, API) -------------------------------------
CHAT_RUN = [
    *TINY,
    "stage=sft",
    "data=demo_chat",
    "data.sources.0.num_records=1000",
    "trainer.max_steps=60",
    "trainer.log_interval=10",
    "trainer.eval_interval=30",
    "trainer.save_interval=30",
    "trainer.eval_batches=2",
]


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny model fine-tuned from scratch on demo chats for a few seconds (in this
    process, through ``lmpipe.api.train``): a finished run with two checkpoints."""
    from lmpipe import api

    out = tmp_path_factory.mktemp("chat_run")
    return api.train([*CHAT_RUN, f"out_dir={out}", f"cache_dir={cache_dir}"])


def stub_logits(model, monkeypatch, logits_of) -> None:
    """Make ``model``'s backbone compute ``logits_of(ids, **kwargs)`` as its logits: the
    stub stands in for the hidden states and the LM head becomes the identity."""
    from torch import nn

    monkeypatch.setattr(model.backbone, "hidden_states", logits_of)
    monkeypatch.setattr(model.backbone, "lm_head", nn.Identity())
