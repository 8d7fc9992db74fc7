"""The lifecycle pipeline: stages in order from each other's checkpoints, skip and resume on
a re-run, the report card, and a failing stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, assert_one_line_error

SMALL_DATA = {
    "demo": ["data.sources.0.num_records=400", "data.sources.1.num_records=200"],
    "demo_chat": ["data.sources.0.num_records=400"],
    "demo_pref": ["data.sources.0.num_records=300"],
}
STEPS = ["trainer.max_steps=6", "trainer.eval_interval=3", "trainer.save_interval=3"]


def stage(name: str, stage_name: str, data: str, *extra: str) -> dict:
    return {
        "name": name,
        "overrides": [f"stage={stage_name}", f"data={data}", *SMALL_DATA[data], *extra],
    }


def write_pipeline(conf_dir: Path, stages: list[dict], report: dict | None = None) -> None:
    """A pipeline config ``conf_dir/pipeline/test.yaml`` (found through hydra.searchpath)."""
    (conf_dir / "pipeline").mkdir(parents=True, exist_ok=True)
    config = {
        "name": "test",
        "stages": stages,
        "report": report
        or {
            "answer_data": None,
            "preference_data": "demo_pref",
            "num_samples": 8,
            "max_new_tokens": 8,
            "batch_size": 8,
            "seed": 0,
        },
    }
    (conf_dir / "pipeline" / "test.yaml").write_text(json.dumps(config))


@pytest.fixture
def pipeline(lmpipe, tmp_path, cache_dir):
    conf_dir = tmp_path / "conf"

    def run(stages: list[dict], *args: str, check: bool = True, report: dict | None = None):
        write_pipeline(conf_dir, stages, report)
        return lmpipe(
            "pipeline",
            "pipeline=test",
            f"hydra.searchpath=[file://{conf_dir}]",
            "overrides=[" + ",".join(f"'{o}'" for o in [*TINY, *STEPS]) + "]",
            f"cache_dir={cache_dir}",
            "device=cpu",
            *args,
            check=check,
        )

    return run


def test_stages_chain_skip_when_finished_and_write_the_report(pipeline, tmp_path):
    stages = [stage("base", "pretrain", "demo"), stage("dpo", "dpo", "demo_pref")]
    first = pipeline(stages)
    directory = tmp_path / "runs" / "test-ar"
    dpo_meta = sorted((directory / "dpo" / "checkpoints").iterdir())[-1] / "meta.json"
    assert Path(json.loads(dpo_meta.read_text())["init_checkpoint"]).parent.parent.name == "base"

    report = json.loads((directory / "report.json").read_text())["stages"]
    assert [row["stage"] for row in report] == ["base", "dpo"]
    for row in report:
        assert row["steps"] == 6 and row["tokens"] > 0 and row["wall_s"] > 0
        assert 0 <= row["task/preference_accuracy"] <= 1
        assert row["train/loss"] is not None and row["val/loss"] is not None
    assert report[1]["val/rewards/accuracy"] is not None  # DPO's own held-out metric
    markdown = (directory / "report.md").read_text()
    assert "| base | 6 |" in markdown and "![dpo](curves_dpo.png)" in markdown
    for name in ("base", "dpo"):
        assert (directory / f"curves_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert first.stdout.count("python -m lmpipe.train") == 2

    again = pipeline(stages)
    assert "stage base: finished earlier, skipped" in again.stdout
    assert "stage dpo: finished earlier, skipped" in again.stdout
    assert "python -m lmpipe.train" not in again.stdout

    shutil.rmtree(directory / "dpo")  # deleted by hand: it runs again, timed afresh
    state_file = directory / "pipeline_state.json"
    state = json.loads(state_file.read_text())
    state["dpo"]["wall_s"] = 1e6
    state_file.write_text(json.dumps(state))
    rerun = pipeline(stages)
    assert json.loads(state_file.read_text())["dpo"]["wall_s"] < 1e6
    assert "stage base: finished earlier, skipped" in rerun.stdout
    assert "== stage dpo: python -m lmpipe.train" in rerun.stdout
    assert (directory / "dpo" / "checkpoints").is_dir()


def test_a_failing_stage_stops_the_pipeline_and_a_rerun_resumes_there(pipeline, tmp_path):
    chats = tmp_path / "chats.jsonl"
    stages = [
        stage("base", "pretrain", "demo"),
        stage(
            "sft",
            "sft",
            "demo_chat",
            "data.sources.0.builtin=null",
            f"+data.sources.0.path={chats}",
        ),
        stage("more", "sft", "demo_chat"),
    ]
    failed = pipeline(stages, check=False)
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lmpipe.pipeline: error: stage 'sft' failed"), failed.stderr
    assert str(chats) in failed.stderr  # the stage's own one-line error, above it
    assert "Traceback" not in failed.stderr
    assert "stage more" not in failed.stdout

    chats.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus 1?"},
                        {"role": "assistant", "content": f"The answer is {i + 1}."},
                    ]
                }
            )
            for i in range(300)
        )
    )
    fixed = pipeline(stages)
    assert "stage base: finished earlier, skipped" in fixed.stdout
    assert "== stage sft: python -m lmpipe.train" in fixed.stdout
    state = json.loads((tmp_path / "runs" / "test-ar" / "pipeline_state.json").read_text())
    assert all(record["finished"] for record in state.values()) and len(state) == 3


def test_a_changed_stage_is_not_resumed_with_other_settings(pipeline, tmp_path):
    stages = [stage("base", "pretrain", "demo")]
    pipeline(stages)
    changed = [stage("base", "pretrain", "demo", "trainer.grad_clip=0.5")]
    proc = pipeline(changed, check=False)
    assert_one_line_error(proc, "stage 'base'", "ran with other settings", "rerun_changed=true")
    rerun = pipeline(changed, "rerun_changed=true")
    assert "settings changed, deleting" in rerun.stdout
    config = (tmp_path / "runs" / "test-ar" / "base" / "config.yaml").read_text()
    assert "grad_clip: 0.5" in config


def test_a_pipeline_without_stages_is_one_clear_line(pipeline):
    proc = pipeline([], check=False)
    assert_one_line_error(proc, "pipeline 'test' has no stages")
