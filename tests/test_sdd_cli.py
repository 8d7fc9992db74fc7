"""``arch=sdd`` through the CLIs: the k-curriculum in a run, across a resume and into
the next stage; evaluation and generation of its checkpoints; bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import (
    ROOT,
    TINY,
    assert_one_line_error,
    cli_env,
    read_metrics,
    save_random_checkpoint,
)

# k = 1 for steps 1-4, 2 for steps 5-8, 4 from step 9 on.
SDD = [*TINY, "arch=sdd", "arch.k_schedule=[[0,1],[4,2],[8,4]]"]
RUN = [
    "trainer.max_steps=12",
    "trainer.save_interval=6",
    "trainer.eval_interval=6",
    "trainer.eval_batches=2",
    "trainer.log_interval=1",
    "run_name=base",
]


@pytest.fixture(scope="module")
def sdd_run(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("sdd")
    cmd = [sys.executable, "-m", "lmpipe.train", *SDD, *RUN, f"out_dir={out}"]
    subprocess.run(
        [*cmd, f"cache_dir={cache_dir}"],
        cwd=out,
        env=cli_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out / "base"


def test_pretraining_logs_the_curriculum_and_a_perplexity_bound(sdd_run):
    metrics = read_metrics(sdd_run)
    ks = {m["step"]: m["train/k"] for m in metrics if "train/k" in m}
    assert ks == {step: 1 if step <= 4 else 2 if step <= 8 else 4 for step in range(1, 13)}
    val = [m for m in metrics if "val/perplexity" in m]
    assert [m["step"] for m in val] == [0, 6, 12]
    meta = json.loads((sdd_run / "checkpoints" / "step_000012" / "meta.json").read_text())
    assert meta["architecture"] == "sdd"
    assert meta["model_config"]["arch_options"]["k_schedule"] == [[0, 1], [4, 2], [8, 4]]


def test_resume_continues_the_curriculum_and_ends_with_the_same_weights(lmpipe, sdd_run, tmp_path):
    resumed = tmp_path / "runs" / "base"
    shutil.copytree(sdd_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000012")
    proc = lmpipe("train", *SDD, *RUN, f"out_dir={tmp_path / 'runs'}", "resume=auto")
    assert "step_000006" in proc.stdout
    # With the step counter lost, steps 7-12 would train at k=1 and end elsewhere.
    final = load_file(resumed / "checkpoints" / "step_000012" / "model.safetensors")
    reference = load_file(sdd_run / "checkpoints" / "step_000012" / "model.safetensors")
    assert final.keys() == reference.keys() and "_extra_state" in final
    for name in final:
        assert (final[name] == reference[name]).all(), name


@pytest.mark.slow
def test_sft_starts_at_the_k_pretraining_reached(lmpipe, sdd_run, tmp_path):
    lmpipe(
        "train",
        *TINY,
        "arch=sdd",
        "stage=sft",
        "data=demo_chat",
        "data.sources.0.num_records=300",
        f"init_from={sdd_run}",
        f"out_dir={tmp_path}",
        "run_name=sft",
        "trainer.max_steps=2",
        "trainer.log_interval=1",
        "trainer.eval_batches=2",
    )
    metrics = read_metrics(tmp_path / "sft")
    assert [m["train/k"] for m in metrics if "train/k" in m] == [4, 4]
    assert all(m["val/loss"] > 0 for m in metrics if "val/loss" in m)


@pytest.mark.slow
def test_evaluate_and_generate_an_sdd_checkpoint(lmpipe, sdd_run, cache_dir, tmp_path):
    lmpipe(
        "evaluate",
        f"checkpoint={sdd_run}",
        f"cache_dir={cache_dir}",
        "eval.metrics=[perplexity,generation]",
        "eval.num_samples=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=8",
        "eval.output=results.json",
        "device=cpu",
    )
    results = json.loads((tmp_path / "results.json").read_text())["results"]["base@12"]
    assert results["val/perplexity_is_bound"] == 1.0 and results["val/loss"] > 0
    assert 0 <= results["generation/distinct_1"] <= 1
    proc = lmpipe(
        "generate", f"checkpoint={sdd_run}", "prompt=Once", "max_new_tokens=8", "device=cpu"
    )
    assert proc.stdout.strip()


def test_bad_k_schedule_is_one_line(lmpipe, tmp_path):
    """(Every bad value is checked in test_sdd.py; this is the CLI's way of saying it.)"""
    proc = lmpipe(
        "train",
        *TINY,
        "arch=sdd",
        "arch.k_schedule=[[0,1],[50,2],[20,4]]",
        f"out_dir={tmp_path}",
        check=False,
    )
    assert_one_line_error(proc, "lmpipe.train: error:", "arch.k_schedule=", "steps must increase")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_init_from_a_checkpoint_of_another_arch_is_one_line(lmpipe, sdd_run, cache_dir, tmp_path):
    demo = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "demo.yaml"))
    diffusion = save_random_checkpoint(tmp_path / "mdlm", demo, cache_dir, arch="diffusion")
    proc = lmpipe(
        "train",
        *TINY,
        "arch=sdd",
        f"init_from={diffusion}",
        f"out_dir={tmp_path / 'runs'}",
        check=False,
    )
    assert_one_line_error(proc, "architecture mismatch", "arch=diffusion", "asks for arch=sdd")
