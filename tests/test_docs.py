"""The README's measured figures are the saved reports' (docs/reports), and those reports
were measured with the pipeline as it is now: change a stage and this fails until the
report is measured again (``docs/readme_report.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmpipe.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
SAVED = sorted((ROOT / "docs" / "reports").glob("*.json"))


def _readme_report():
    spec = importlib.util.spec_from_file_location("readme_report", ROOT / "docs/readme_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pipeline(name: str):
    for path in (CONF_DIR / "pipeline").glob("*.yaml"):
        pipeline = OmegaConf.load(path)
        if name.startswith(f"{pipeline.name}-"):
            return pipeline
    raise AssertionError(f"no pipeline in conf/pipeline makes {name}")


def _max_steps(overrides) -> int | None:
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "trainer.max_steps":
            return int(value)
    return None


def test_every_readme_report_card_has_a_saved_report():
    blocks = [line for line in (ROOT / "README.md").read_text().splitlines()]
    names = [b.split(":", 1)[1].rstrip(" ->") for b in blocks if b.startswith("<!-- report-card:")]
    assert names and sorted(names) == sorted(p.stem for p in SAVED)


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.stem)
def test_readme_shows_the_saved_report(path):
    readme_report = _readme_report()
    saved = json.loads(path.read_text())
    match = readme_report.block(saved["name"]).search((ROOT / "README.md").read_text())
    assert match is not None and match[2] == readme_report.render(saved)


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.stem)
def test_saved_report_was_measured_with_the_pipeline_as_it_is(path):
    saved = json.loads(path.read_text())
    pipeline = _pipeline(saved["name"])
    assert [row["stage"] for row in saved["stages"]] == [s.name for s in pipeline.stages]
    for row, stage in zip(saved["stages"], pipeline.stages, strict=True):
        assert row["steps"] == _max_steps(stage.overrides), stage.name
    assert saved["report"] == OmegaConf.to_container(pipeline.report, resolve=True)
