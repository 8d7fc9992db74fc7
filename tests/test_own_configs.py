"""A user's own configs directory (``--config-dir DIR``): its options join lmpipe's config
groups in every entrypoint, and a pipeline's stages find them too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY

ENTRYPOINTS = sorted(p.stem for p in (ROOT / "conf").glob("*.yaml"))


def write(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_every_entrypoint_composes_an_option_of_the_users_configs(lmpipe, tmp_path, entrypoint):
    write(tmp_path / "my_conf" / "extra" / "mine.yaml", {"greeting": "from my_conf"})
    proc = lmpipe(entrypoint, "--config-dir", "my_conf", "--cfg", "job", "+extra=mine")
    assert yaml.safe_load(proc.stdout)["extra"] == {"greeting": "from my_conf"}


def test_a_pipeline_stage_trains_on_the_users_data_config(lmpipe, tmp_path, cache_dir):
    (tmp_path / "mine.txt").write_text("Ada has three apples and Bob has two pears.\n" * 100)
    conf = tmp_path / "my_conf"
    write(
        conf / "data" / "mine.yaml",
        {
            "name": "mine",
            "format": "text",
            "sources": [{"name": "mine", "path": "mine.txt", "mix_ratio": 1.0}],
            "split": {"by": "position", "val_fraction": 0.1},
            "tokenizer": {"kind": "char"},
            "seed": 0,
        },
    )
    steps = ["trainer.max_steps=3", "trainer.eval_batches=1", "trainer.eval_at_start=false"]
    write(
        conf / "pipeline" / "mine.yaml",
        {
            "name": "mine",
            "stages": [{"name": "base", "overrides": ["data=mine", *TINY, *steps]}],
            "report": {"answer_data": None, "preference_data": None, "num_samples": 8},
        },
    )
    proc = lmpipe("pipeline", "--config-dir", "my_conf", "pipeline=mine", f"cache_dir={cache_dir}")
    assert f"hydra.searchpath=[file://{conf}]" in proc.stdout
    run_dir = tmp_path / "runs" / "mine-ar" / "base"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["name"] == "mine"
    report = json.loads((tmp_path / "runs" / "mine-ar" / "report.json").read_text())
    assert report["stages"][0]["steps"] == 3
