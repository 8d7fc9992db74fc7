"""The Python API (``lmpipe.api``): the CLIs' config tree and code paths, user errors as
``LmpipeError``, a light import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmpipe import api
from lmpipe.errors import ConfigError

PROMPT = "What is 2 plus 3?"


def test_importing_the_api_imports_no_torch():
    code = "import sys, lmpipe.api; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compose_is_the_command_lines_config(tmp_path):
    cfg = api.compose("train", ["model=tiny", "trainer.max_steps=7", f"out_dir={tmp_path}"])
    assert cfg.trainer.max_steps == 7 and cfg.model.name == "tiny" and "hydra" not in cfg
    assert api.compose("ui").host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_stepz'"):
        api.compose("train", ["trainer.max_stepz=5"])
    with pytest.raises(ConfigError, match="no config 'data/nope'"):
        api.compose("train", ["data=nope"])


def test_run_directories_follow_the_command_lines_rule(tmp_path):
    cfg = api.compose("train", [f"out_dir={tmp_path}"])
    first = api.run_dir_of(cfg)
    assert first == tmp_path / "ar-demo-tiny-pretrain-v1"
    first.mkdir()
    assert api.run_dir_of(cfg) == tmp_path / "ar-demo-tiny-pretrain-v2"  # not a cached answer
    named = api.compose("train", [f"out_dir={tmp_path}", "run_name=mine"])
    assert api.run_dir_of(named) == tmp_path / "mine"


def test_generation_through_a_loaded_checkpoint(chat_run):
    model = api.load(chat_run, device="cpu")
    assert model.checkpoint.step == 60
    as_text = model.generate(PROMPT, chat=True, temperature=0, max_new_tokens=30)
    as_turns = model.generate(
        [{"role": "user", "content": PROMPT}], temperature=0, max_new_tokens=30
    )
    assert as_text == as_turns and as_text
    assert "".join(model.stream(PROMPT, chat=True, temperature=0, max_new_tokens=30)) == as_text
    assert model.generate(PROMPT, temperature=0, max_new_tokens=30) != as_text  # a document
    with pytest.raises(ConfigError, match="unknown sampling setting"):
        model.generate(PROMPT, temprature=0)


def test_evaluate_takes_the_eval_settings(chat_run, cache_dir):
    results = api.evaluate(
        chat_run, metrics=["perplexity"], num_samples=8, batch_size=8, cache_dir=cache_dir
    )
    assert set(results) == {"val/loss", "val/perplexity", "val/perplexity_is_bound"}
    with pytest.raises(ConfigError, match="unknown setting"):
        api.evaluate(chat_run, samples=8)
    # eval.kl_reference is the kl metric's reference: a model's KL to itself is 0.
    kl = api.evaluate(
        chat_run,
        metrics=["kl"],
        kl_reference=str(chat_run),
        num_samples=4,
        batch_size=4,
        max_new_tokens=8,
        cache_dir=cache_dir,
    )
    assert kl["kl/sequence"] == pytest.approx(0.0, abs=1e-5)
    runs = api.find_runs(chat_run.parent)
    assert [(r.name, r.state, r.step) for r in runs] == [(chat_run.name, "finished", 60)]
