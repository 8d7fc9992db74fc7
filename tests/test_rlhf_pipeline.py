"""pipeline=rlhf's machinery on a tiny scale: an input model, a labelling stage (another
entrypoint), stage references, a reward model and PPO, and the report card's RM accuracy,
RM score and KL columns."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY, data_config, save_random_checkpoint

PROMPTS = ["data=demo_prompts", "data.sources.0.num_records=300"]


def test_the_shipped_rlhf_pipeline_chains_label_rm_and_ppo_from_the_sft_input():
    config = OmegaConf.load(ROOT / "conf" / "pipeline" / "rlhf.yaml")
    stages = {stage.name: stage for stage in config.stages}
    assert list(stages) == ["label", "rm", "ppo"] and stages["label"].entrypoint == "label"
    assert "policy=@sft" in stages["label"].overrides
    assert "data.sources.0.path=@label/pairs.jsonl" in stages["rm"].overrides
    assert {"init_from=@sft", "reward.rm.checkpoint=@rm"} <= set(stages["ppo"].overrides)
    assert config.report.reward_model == "@rm" and config.report.kl_reference == "@sft"


def pipeline_cfg(stages: list[dict], inputs: dict | None = None):
    return OmegaConf.create(
        {
            "pipeline": {"name": "p", "inputs": inputs or {}, "stages": stages},
            "overrides": ["arch=ar"],
            "cache_dir": "cache",
        }
    )


def test_stage_arguments_resolve_references_and_the_label_entrypoint_gets_its_own(tmp_path):
    from lmpipe.pipeline import stage_args

    cfg = pipeline_cfg(
        [
            {"name": "label", "entrypoint": "label", "overrides": ["policy=@sft", "seed=1"]},
            {"name": "rm", "overrides": ["init_from=@sft", "data.sources.0.path=@label/p.jsonl"]},
            {"name": "more", "overrides": ["stage=sft"]},
        ]
    )
    places = {"sft": tmp_path / "in", "label": tmp_path / "label"}
    label, rm, more = cfg.pipeline.stages
    assert stage_args(cfg, label, tmp_path, places, None) == [
        f"policy={tmp_path / 'in'}",
        "seed=1",
        f"out={tmp_path / 'label'}",
        "cache_dir=cache",
    ]  # the pipeline-wide train overrides are not the label entrypoint's
    args = stage_args(cfg, rm, tmp_path, places, tmp_path / "earlier")
    assert args[:3] == [
        f"init_from={tmp_path / 'in'}",
        f"data.sources.0.path={tmp_path / 'label' / 'p.jsonl'}",
        "arch=ar",
    ]
    assert not any(a == f"init_from={tmp_path / 'earlier'}" for a in args)  # its own wins
    assert stage_args(cfg, more, tmp_path, places, tmp_path / "rm")[-1] == (
        f"init_from={tmp_path / 'rm'}"
    )


@pytest.mark.parametrize(
    ("stages", "inputs", "message"),
    [
        (
            [{"name": "rm", "overrides": ["init_from=@later"]}, {"name": "later"}],
            None,
            "pipeline stage 'rm': @later names no input or earlier stage (known: none)",
        ),
        ([{"name": "x", "entrypoint": "chat"}], None, "entrypoint='chat' is not one of train"),
        ([{"name": "x"}], {"sft": "/nowhere"}, "pipeline input sft: checkpoint not found"),
        ([{"name": "sft"}], {"sft": "/nowhere"}, "sft is both an input and a stage"),
    ],
)
def test_bad_pipeline_references_are_refused(tmp_path, stages, inputs, message):
    from lmpipe.errors import ConfigError
    from lmpipe.pipeline import run_pipeline

    cfg = pipeline_cfg(stages, inputs)
    cfg.merge_with({"out_dir": str(tmp_path), "name": "p", "rerun_changed": False})
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_pipeline(cfg)
    assert not (tmp_path / "p").exists()  # nothing written


@pytest.mark.slow
def test_an_rlhf_pipeline_labels_trains_a_reward_model_and_ppo_and_reports(
    lmpipe, tmp_path, cache_dir
):
    start = save_random_checkpoint(
        tmp_path / "sft", data_config("demo_prompts", 300), cache_dir, scale=0.3
    )
    steps = ["trainer.max_steps=4", "trainer.eval_interval=4", "trainer.save_interval=4"]
    pipeline = {
        "name": "tiny_rlhf",
        "inputs": {"sft": str(start)},
        "stages": [
            {
                "name": "label",
                "entrypoint": "label",
                # Random replies: judged by whether they hold an "e" (the rule judge's rewards
                # replaced on the command line), so that some pairs are not ties.
                "overrides": [
                    "policy=@sft",
                    *PROMPTS,
                    "num_prompts=48",
                    "num_replies=4",
                    "max_new_tokens=8",
                    "reward=[format]",
                    "reward.format.pattern=e",
                    "device=cpu",
                    "progress=false",
                ],
            },
            {
                "name": "rm",
                "overrides": [
                    "stage=rm",
                    "init_from=@sft",
                    "data=labelled_pairs",
                    "data.sources.0.path=@label/pairs.jsonl",
                    "data.split.val_fraction=0.2",
                    "trainer.batch_size=4",
                    *steps,
                ],
            },
            {
                "name": "ppo",
                "overrides": [
                    "stage=ppo",
                    "init_from=@sft",
                    *PROMPTS,
                    "reward=rm",
                    "reward.rm.checkpoint=@rm",
                    "trainer.batch_size=4",
                    "objective.max_completion_length=8",
                    "trainer.eval_batches=1",
                    *steps,
                ],
            },
        ],
        "report": {
            "answer_data": "demo_prompts",
            "preference_data": None,
            "reward_model": "@rm",
            "kl_reference": "@sft",
            "num_samples": 8,
            "max_new_tokens": 8,
            "batch_size": 8,
            "seed": 0,
        },
    }
    conf_dir = tmp_path / "conf"
    (conf_dir / "pipeline").mkdir(parents=True)
    (conf_dir / "pipeline" / "tiny_rlhf.yaml").write_text(json.dumps(pipeline))
    train_overrides = [
        *(o for o in TINY if not o.startswith(("model", "trainer.batch_size"))),
        "model.block_size=64",  # the input's
    ]
    proc = lmpipe(
        "pipeline",
        "pipeline=tiny_rlhf",
        f"hydra.searchpath=[file://{conf_dir}]",
        "overrides=[" + ",".join(f"'{o}'" for o in train_overrides) + "]",
        f"out_dir={tmp_path / 'runs'}",
        f"cache_dir={cache_dir}",
        "device=cpu",
        timeout=600,
    )
    directory = tmp_path / "runs" / "tiny_rlhf-ar"
    assert f"python -m lmpipe.label policy={start}" in proc.stdout
    assert f"data.sources.0.path={directory / 'label' / 'pairs.jsonl'}" in proc.stdout
    rows = {
        row["stage"]: row for row in json.loads((directory / "report.json").read_text())["stages"]
    }
    assert list(rows) == ["sft", "label", "rm", "ppo"]
    assert rows["label"]["pairs"] + rows["label"]["ties"] == 48 and rows["label"]["pairs"] > 0
    assert 0 <= rows["rm"]["rm/accuracy"] <= 1 and "task/answer_accuracy" not in rows["rm"]
    for name in ("sft", "ppo"):
        assert rows[name]["rm/score"] is not None and rows[name]["task/answer_accuracy"] is not None
    assert rows["sft"]["kl/sequence"] == pytest.approx(0, abs=1e-4)  # the reference itself
    assert rows["ppo"]["kl/sequence"] != rows["sft"]["kl/sequence"]
    ppo_meta = json.loads(
        next((directory / "ppo" / "checkpoints").iterdir()).joinpath("meta.json").read_text()
    )
    assert ppo_meta["init_checkpoint"] == str(start)
    report = (directory / "report.md").read_text()
    assert "RM held-out accuracy" in report and "KL to reference" in report
