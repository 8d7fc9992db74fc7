"""Every config in ``conf/`` composes, validates and builds what it can without data (models
on the meta device), so that a broken YAML fails here in seconds, not in a user's run."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmpipe import api
from lmpipe.config import validate
from lmpipe.data.mixer import validate_mixture
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import ConfigError
from lmpipe.models import build_lm, lm_class
from lmpipe.pipeline import entrypoint, resolve_reference
from lmpipe.tracking.logger import SINKS
from lmpipe.training.hardware import resolve_hardware
from lmpipe.training.optim import build_optimizer
from lmpipe.training.run import trainer_config
from lmpipe.training.schedule import LRSchedule, build_schedule
from lmpipe.training.trainer import TrainerConfig

from conftest import ROOT

CONF = ROOT / "conf"
ENTRYPOINTS = sorted(p.stem for p in CONF.glob("*.yaml"))
SPECIAL_IDS = Tokenizer.build_char("ab").special_ids
# What a stage or a reward cannot do without, named at composition (a stand-in path: no
# checkpoint is opened before setup).
STAGE_NEEDS = {"ppo": ["reward=[answer_match]"]}
REWARD_NEEDS = {"rm": ["reward.rm.checkpoint=earlier/rm"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def check_stage(cfg) -> None:
    """What ``build_run`` checks and builds before it needs data: values, objective, LM
    class and its fit with the objective, model (meta device), optimizer, schedule."""
    validate(cfg)
    objective = instantiate(cfg.objective)
    cls = lm_class(cfg.arch._target_)
    objective.check_arch(cls)
    objective.check_sampler(cfg.sampler.kind)
    validate_mixture(_container(cfg.data))
    tcfg = trainer_config(cfg)
    with torch.device("meta"):
        model = build_lm(_container(cfg.arch), _container(cfg.model), 512, SPECIAL_IDS)
    assert tcfg.block_size <= model.config.block_size
    build_optimizer(model, _container(cfg.optim), torch.device("meta"))
    build_schedule(_container(cfg.schedule), float(cfg.optim.lr), tcfg.max_steps)


@pytest.mark.parametrize("optim", options("optim"))
def test_every_optimizer_builds_for_every_arch(optim):
    for arch in options("arch"):
        check_stage(api.compose("train", [f"optim={optim}", f"arch={arch}"]))


@pytest.mark.parametrize("arch", options("arch"))
@pytest.mark.parametrize("stage", options("stage"))
def test_every_stage_with_every_arch(stage, arch):
    cfg = api.compose("train", [f"stage={stage}", f"arch={arch}", *STAGE_NEEDS.get(stage, [])])
    try:
        check_stage(cfg)
    except ConfigError as exc:  # a pair the objective refuses, in one line, at config time
        assert f"does not support arch={arch}" in str(exc)


@pytest.mark.parametrize("arch", options("arch"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds_on_the_meta_device(model, arch):
    cfg = api.compose("train", [f"model={model}", f"arch={arch}"])
    with torch.device("meta"):
        lm = build_lm(_container(cfg.arch), _container(cfg.model), 50257, SPECIAL_IDS)
    assert lm.backbone.num_params() > 0
    assert lm.config.block_size == cfg.model.block_size


@pytest.mark.parametrize("data", options("data"))
def test_every_data_mixture_is_valid(data):
    cfg = api.compose("train", [f"data={data}"])
    validate_mixture(_container(cfg.data))
    assert cfg.data.name == data  # the name a run directory and the cache entry carry
    assert "phase" not in cfg.data  # a key nothing read (the stage says what a run is)


@pytest.mark.parametrize("hardware", options("hardware"))
def test_every_hardware_resolves_or_says_what_is_missing(hardware):
    cfg = api.compose("train", [f"hardware={hardware}"])
    try:
        resolve_hardware(_container(cfg.hardware))
    except ConfigError as exc:  # e.g. hardware=gpu on a machine without CUDA
        assert not torch.cuda.is_available() and "CUDA" in str(exc)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_names_known_sinks(logger):
    cfg = api.compose("train", [f"logger={logger}"])
    assert set(cfg.logger.sinks) <= set(SINKS)


@pytest.mark.parametrize("reward", options("reward"))
def test_every_reward_instantiates(reward):
    cfg = api.compose("train", ["stage=grpo", f"reward=[{reward}]", *REWARD_NEEDS.get(reward, [])])
    rewards = instantiate(cfg.reward)
    assert list(rewards) == [reward]


JUDGE_NEEDS = {"lm": ["judge.model=earlier/judge"], "rm": ["reward.rm.checkpoint=earlier/rm"]}


@pytest.mark.parametrize("judge", options("judge"))
def test_every_judge_instantiates(judge):
    cfg = api.compose("label", [f"judge={judge}", *JUDGE_NEEDS.get(judge, [])])
    assert instantiate(cfg.judge) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment(experiment):
    check_stage(api.compose("train", [f"+experiment={experiment}"]))


@pytest.mark.parametrize("pipeline", options("pipeline"))
@pytest.mark.parametrize("arch", options("arch"))
def test_every_pipeline_stage_composes_and_builds(pipeline, arch):
    cfg = api.compose("pipeline", [f"pipeline={pipeline}"])
    assert cfg.pipeline.stages
    # ``@name`` references: stand-in paths (the pipeline resolves them to run directories).
    places = {name: Path("earlier") / name for name in cfg.pipeline.get("inputs") or {}}
    places.update({stage.name: Path("earlier") / stage.name for stage in cfg.pipeline.stages})
    for stage in cfg.pipeline.stages:
        overrides = [
            f"{key}={resolve_reference(value, places, stage.name)}"
            for key, _, value in (o.partition("=") for o in stage.overrides)
        ]
        if entrypoint(stage) != "train":  # e.g. RLAIF labelling: composes, its judge builds
            label = api.compose(entrypoint(stage), overrides)
            OmegaConf.to_container(label, resolve=True)
            instantiate(label.judge)
            continue
        check_stage(api.compose("train", [*overrides, f"arch={arch}", "init_from=earlier/stage"]))


@pytest.mark.parametrize("name", ENTRYPOINTS)
def test_every_entrypoint_config_composes(name):
    cfg = api.compose(name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def test_settings_have_one_source_of_defaults_conf():
    """The trainer and schedule settings have no Python defaults that could differ from
    ``conf/`` (log_interval 10 vs 25 once): a key missing from the config is an error."""
    for cls in (TrainerConfig, LRSchedule):
        defaulted = [
            f.name
            for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING
        ]
        assert not defaulted, (cls.__name__, defaulted)
    trainer = _container(api.compose("train").trainer)
    del trainer["log_interval"]
    with pytest.raises(ConfigError, match="trainer.log_interval"):
        TrainerConfig.from_dict(trainer)
