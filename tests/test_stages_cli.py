"""The post-pretraining stages through the CLI: mid-training, SFT, DPO."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY, assert_one_line_error, cli_env, read_metrics, train_until_killed

DEMO_SIZES = [  # small versions of the demo mixtures, so that preparing them takes seconds
    "data.sources.0.num_records=600",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny model pretrained on the demo prose: the starting point of later stages."""
    out = tmp_path_factory.mktemp("base")
    cmd = [
        sys.executable,
        "-m",
        "lmpipe.train",
        *TINY,
        f"out_dir={out}",
        "run_name=base",
        f"cache_dir={cache_dir}",
        "trainer.max_steps=40",
        "trainer.eval_interval=40",
        "trainer.save_interval=40",
    ]
    subprocess.run(cmd, cwd=out, env=cli_env(), check=True, capture_output=True, timeout=300)
    return out / "base"


@pytest.mark.parametrize(("stage", "data"), [("midtrain", "demo_mid"), ("dpo", "demo_pref")])
def test_later_stages_need_init_from(lmpipe, tmp_path, stage, data):
    proc = lmpipe(
        "train", *TINY, f"stage={stage}", f"data={data}", f"out_dir={tmp_path}", check=False
    )
    assert_one_line_error(proc, f"stage={stage} starts from an earlier stage", "init_from=")
    assert not any(tmp_path.iterdir())  # no run directory left behind


def test_midtrain_rewarms_and_reports_forgetting(lmpipe, tmp_path, base_run):
    stage_lr = [a for a in TINY if not a.startswith("optim.lr")]  # the stage's own LR
    proc = lmpipe(
        "train",
        *stage_lr,
        "stage=midtrain",
        "data=demo_mid",
        "data.sources.0.num_records=600",
        "data.sources.1.num_records=300",
        f"init_from={base_run}",
        f"out_dir={tmp_path}",
        "run_name=mid",
        "trainer.max_steps=20",
        "trainer.log_interval=1",
        "trainer.eval_interval=10",
    )
    assert "warmup 1/20 steps 2e-05 -> 0.0002, then cosine to 2e-05 at step 19" in proc.stdout
    metrics = read_metrics(tmp_path / "mid")
    lrs = [m["train/lr"] for m in metrics if "train/lr" in m]
    assert (
        lrs[0] == pytest.approx(2e-5)
        and lrs[1] == pytest.approx(2e-4)
        and lrs[-1] == pytest.approx(2e-5)
    )
    forgetting = [m["pretrain_val/loss"] for m in metrics if "pretrain_val/loss" in m]
    assert len(forgetting) == 3  # at the start, step 10, step 20
    base_val = [m["val/loss"] for m in read_metrics(base_run) if "val/loss" in m][-1]
    assert forgetting[0] == pytest.approx(base_val, rel=1e-5)  # same weights, same data
    assert f"forgetting: pretrain_val/loss {forgetting[0]:.4f} at the start" in proc.stdout


def _sft_args(out: Path, base_run: Path) -> list[str]:
    return [
        *TINY,
        "stage=sft",
        "data=demo_chat",
        *DEMO_SIZES,
        f"init_from={base_run}",
        f"out_dir={out}",
        "run_name=sft",
        "model.dropout=0.1",
        "trainer.batch_size=8",
        "trainer.max_steps=24",
        "trainer.save_interval=8",
        "trainer.eval_interval=8",
        "trainer.log_interval=1",
        "optim.lr=1e-3",
    ]


def _episode_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]


def test_sft_resume_after_sigkill_continues_the_episode_log(lmpipe, tmp_path, base_run, cache_dir):
    reference = tmp_path / "reference"
    lmpipe("train", *_sft_args(reference, base_run))
    ref_log = _episode_log(reference / "sft")
    assert [e["step"] for e in ref_log] == list(range(1, 25))
    # 600 chats -> 570 train episodes (5% held out, minus duplicates): >= 1 epoch here.
    first_epoch = [e for line in ref_log[:8] for e in line["episodes"]]
    assert len(set(first_epoch)) == len(first_epoch)

    killed = tmp_path / "killed"
    # After the step-8 checkpoint, before step 16's.
    train_until_killed(
        tmp_path, [*_sft_args(killed, base_run), f"cache_dir={cache_dir}"], "step     11 |"
    )
    assert len(_episode_log(killed / "sft")) >= 11
    proc = lmpipe("train", *_sft_args(killed, base_run), "resume=auto")
    assert "resuming from" in proc.stdout and "step_000008" in proc.stdout
    assert _episode_log(killed / "sft") == ref_log  # no gap, no repeat, same episodes
    final = load_file(killed / "sft" / "checkpoints" / "step_000024" / "model.safetensors")
    final_ref = load_file(reference / "sft" / "checkpoints" / "step_000024" / "model.safetensors")
    assert all((final[k] == final_ref[k]).all() for k in final)
    state_meta = json.loads(
        (killed / "sft" / "checkpoints" / "step_000024" / "meta.json").read_text()
    )
    assert state_meta["stage"] == "sft"


def test_sft_learns_the_assistant_turns_with_packing(lmpipe, tmp_path, base_run):
    lmpipe(
        "train",
        *_sft_args(tmp_path, base_run),
        "sampler.packing=true",
        "trainer.batch_size=4",
        "trainer.max_steps=40",
        "trainer.eval_interval=40",
    )
    val = [m for m in read_metrics(tmp_path / "sft") if "val/loss" in m]
    assert val[-1]["val/loss"] < 0.8 * val[0]["val/loss"]  # measured: 4.21 -> 2.98


def test_stage_and_data_must_agree(lmpipe, tmp_path, base_run):
    proc = lmpipe(
        "train",
        *TINY,
        "stage=dpo",
        "data=demo_chat",
        *DEMO_SIZES,
        f"init_from={base_run}",
        f"out_dir={tmp_path}",
        check=False,
    )
    assert_one_line_error(
        proc, "stage objective 'dpo' trains on preference data", "demo_chat is chat data"
    )
    proc = lmpipe("train", *TINY, "stage=dpo", "data=demo_pref", f"out_dir={tmp_path}", check=False)
    assert_one_line_error(proc, "stage=dpo starts from an earlier stage")


def test_dpo_on_a_pair_file_missing_rejected_names_the_line(lmpipe, tmp_path, base_run):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "What is 1 plus 1?", "chosen": "2.", "rejected": "3."}] * 3
    rows.append({"prompt": "What is 2 plus 2?", "chosen": "4."})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = lmpipe(
        "train",
        *TINY,
        "stage=dpo",
        "data=demo_pref",
        f"+data.sources.0.path={pairs}",
        "~data.sources.0.builtin",
        f"init_from={base_run}",
        f"out_dir={tmp_path / 'runs'}",
        check=False,
    )
    assert_one_line_error(proc, f"{pairs}:4: preference record has no 'rejected' field")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
