"""Assemble a training run from a composed config and hand it to the Trainer.

Order matters for "nothing half-written": everything that can fail on user input (config
values, checkpoints, data, model shape) is checked before the run directory gets files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmpipe import __version__
from lmpipe.batch import Batch
from lmpipe.config import instantiate, validate
from lmpipe.data.prepare import PreparedData, prepare
from lmpipe.data.tokenizer import Tokenizer, vocab_shortfall
from lmpipe.errors import CheckpointError, ConfigError
from lmpipe.models import LM, build_from_config_dict, build_lm, lm_class
from lmpipe.models.lora import add_lora
from lmpipe.objectives import Objective
from lmpipe.objectives.base import Examples, ObjectiveContext
from lmpipe.seeding import derive_seed
from lmpipe.tracking import MetricLogger, build_logger
from lmpipe.tracking.jsonl import read_metrics
from lmpipe.tracking.lock import run_lock
from lmpipe.tracking.logger import sink_names
from lmpipe.tracking.status import mark_running, recorded
from lmpipe.training.checkpoint import Checkpoint, remove_unfinished_saves, resolve_checkpoint
from lmpipe.training.distributed import (
    DistEnv,
    barrier,
    broadcast_from_main,
    init_distributed,
    local_rank_from_env,
    shutdown,
    wrap_model,
)
from lmpipe.training.hardware import Hardware, resolve_hardware
from lmpipe.training.inputs import FORGETTING_SET, Inputs, build_inputs, forgetting_set
from lmpipe.training.optim import build_optimizer, describe_optimizer
from lmpipe.training.resume import (
    check_numerics,
    check_settings,
    numerics,
    resume_checkpoint,
    starting_checkpoint,
)
from lmpipe.training.schedule import build_schedule
from lmpipe.training.trainer import Trainer, TrainerConfig


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Run one stage; returns the run directory (its newest checkpoint is the result)."""
    validate(cfg)
    hardware = resolve_hardware(OmegaConf.to_container(cfg.hardware), local_rank_from_env())
    env = init_distributed(hardware.device.type)
    try:
        # Each rank's Hydra picked a run directory; rank 0's choice is the one.
        run_dir = Path(broadcast_from_main(str(run_dir), env))
        # One process per run; status.json says how it ended: finished, failed, interrupted.
        with run_lock(run_dir, env.is_main), recorded(run_dir, env.is_main):
            return start(build_run(cfg, run_dir, hardware, env))
    finally:
        shutdown(env)


def _say(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)


@dataclass
class Run:
    """A stage assembled from its config: every input checked, nothing written yet."""

    cfg: DictConfig
    trainer: Trainer
    data: PreparedData
    plan: str  # what is about to happen, for the console
    has_forgetting_set: bool


def build_run(cfg: DictConfig, run_dir: Path, hardware: Hardware, env: DistEnv) -> Run:
    """Check the config, the checkpoints and the data, and build the model, the objective
    and the Trainer; the run directory gets no file (``start`` writes)."""
    objective = instantiate(cfg.objective)
    model_class = lm_class(cfg.arch._target_)
    objective.check_arch(model_class)
    objective.check_sampler(cfg.sampler.kind)
    if hardware.strategy == "fsdp" and not objective.shardable:
        raise ConfigError(
            f"hardware.strategy=fsdp cannot train stage objective '{objective.name}' yet (it "
            "generates rollouts or trains modules of its own); use hardware=ddp"
        )
    if hardware.strategy == "fsdp" and cfg.finetune.name != "full":
        raise ConfigError(
            f"hardware.strategy=fsdp trains every weight (finetune=full), not "
            f"finetune={cfg.finetune.name} yet; use hardware=ddp"
        )
    if hardware.strategy == "fsdp" and cfg.optim.name != "adamw":
        raise ConfigError(
            f"hardware.strategy=fsdp gathers AdamW's state only, not optim={cfg.optim.name}'s "
            "yet; use hardware=ddp or optim=adamw"
        )
    if hardware.strategy != "none" and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"hardware.strategy={hardware.strategy} runs one process per device: launch it with "
            f"torchrun --nproc_per_node=<devices> -m lmpipe.train hardware={hardware.strategy} "
            "... (one process: hardware=auto)"
        )
    sink_names(OmegaConf.to_container(cfg.logger))
    tcfg = trainer_config(cfg)
    if tcfg.batch_size % env.world_size:
        raise ConfigError(
            f"trainer.batch_size={tcfg.batch_size} is not divisible by the {env.world_size} ranks"
        )
    say = lambda message: _say(env, message)  # noqa: E731
    resume_from, init_from = _checkpoints(cfg, run_dir, say)
    source = resume_from or init_from

    data = _prepare_data(cfg, source, env)
    objective.check_format(data.manifest["format"], cfg.data.name)
    model = _build_model(cfg, data, source, model_class.arch)
    if tcfg.block_size > model.config.block_size:
        raise ConfigError(
            f"trainer.block_size={tcfg.block_size} is larger than the model supports "
            f"(model.block_size={model.config.block_size})"
        )
    adapted = _load_weights(cfg, model, resume_from, init_from)
    model.to(hardware.device)
    model_config = model.config_dict()  # before FSDP makes its class FSDP<class>
    train_model = wrap_model(model, env, hardware)

    micro = hardware.micro_batch_size or tcfg.batch_size // env.world_size
    inputs = build_inputs(
        OmegaConf.to_container(cfg.sampler), data, model, tcfg, micro, cfg.seed, env
    )
    earlier_data = None
    if cfg.stage.forgetting_eval and source is not None and tcfg.eval_batches:
        # Mid-training: the earlier stage's own validation data shows what is forgotten.
        earlier_data, forgetting = _forgetting_set(cfg, source, model, tcfg, micro, env, data)
        if isinstance(forgetting, str):
            say(f"forgetting check skipped: {forgetting}")
        else:
            inputs.val_sets[FORGETTING_SET] = forgetting

    objective.setup(
        ObjectiveContext(
            device=hardware.device,
            autocast=hardware.autocast,
            tokenizer=data.tokenizer,
            model=model,
            examples=inputs.sampler,
            val_sets=inputs.val_sets,
            micro_batch_size=micro,
            seed=cfg.seed,
            starting_model=_frozen(cfg, data, init_from, model_class.arch, hardware.device),
            starting_modules=init_from.module_states if init_from is not None else None,
            open_checkpoint=lambda path: resolve_checkpoint(path, log=say),
        )
    )
    static_meta = {
        "architecture": model.arch,
        "model_config": model_config,
        "model_name": (source.meta.get("model_name") if source else None) or cfg.model.name,
        "stage": cfg.stage.name,
        "train_config": OmegaConf.to_container(cfg, resolve=True),
        "tokenizer_hash": data.tokenizer.hash,
        "data_manifest_hash": data.manifest_hash,
        "data_dir": str(data.directory),
        "forgetting_data_dir": earlier_data,
        "init_checkpoint": init_from.reference if init_from is not None else None,
        "numerics": numerics(hardware),
        "lmpipe_version": __version__,
    }
    trainer = assemble_trainer(
        cfg,
        model=model,
        objective=objective,
        sampler=inputs.sampler,
        val_sets=inputs.val_sets,
        tokenizer=data.tokenizer,
        hardware=hardware,
        env=env,
        run_dir=run_dir,
        train_model=train_model,
        checkpoint_meta=lambda: static_meta,
    )
    if resume_from is not None:
        check_numerics(resume_from, hardware, say)
        resume_from.load_modules(trainer.modules)
        trainer.load_state_dict(resume_from.trainer_state())
        origin = f"resuming from {resume_from.path} (step {resume_from.step})"
    else:
        origin = f"weights from {source.path}" if source is not None else "fresh weights"
    plan = _plan(
        cfg,
        trainer,
        data,
        static_meta["model_name"],
        origin,
        inputs,
        _tokenizer_note(cfg, data, source),
        adapted,
    )
    return Run(cfg, trainer, data, plan, FORGETTING_SET in inputs.val_sets)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))


def assemble_trainer(
    cfg: DictConfig,
    *,
    model: LM,
    objective: Objective,
    sampler: Examples | None,
    val_sets: dict[str, list[Batch]],
    tokenizer: Tokenizer,
    hardware: Hardware,
    env: DistEnv,
    run_dir: Path,
    train_model: nn.Module | None = None,
    checkpoint_meta: Callable[[], dict] = dict,
) -> Trainer:
    """The Trainer a composed config describes (trainer settings, optimizer over the model
    and the objective's modules, LR schedule) around a model and an objective that is set
    up: ``build_run``'s last step, and how the benchmarks get the Trainer a run has."""
    modules = objective.modules()
    for module in modules.values():
        module.to(hardware.device)
    tcfg = trainer_config(cfg)
    return Trainer(
        config=tcfg,
        model=model,
        train_model=model if train_model is None else train_model,
        objective=objective,
        optimizer=build_optimizer(
            nn.ModuleList([model, *modules.values()]),
            OmegaConf.to_container(cfg.optim),
            hardware.device,
        ),
        schedule=build_schedule(
            OmegaConf.to_container(cfg.schedule), float(cfg.optim.lr), tcfg.max_steps
        ),
        sampler=sampler,
        val_sets=val_sets,
        hardware=hardware,
        env=env,
        logger=MetricLogger([]),  # ``start`` gives it the configured sinks
        run_dir=run_dir,
        tokenizer=tokenizer,
        checkpoint_meta=checkpoint_meta,
        seed=cfg.seed,
    )


def _checkpoints(
    cfg: DictConfig, run_dir: Path, say: Callable[[str], None]
) -> tuple[Checkpoint | None, Checkpoint | None]:
    """The checkpoint the run resumes, and the one its stage started from."""
    resume_from = resume_checkpoint(cfg, run_dir, say)
    if resume_from is not None:
        check_settings(resume_from, cfg, say)
        # The stage's starting weights stay its reference when it resumes (DPO).
        return resume_from, starting_checkpoint(resume_from, cfg)
    if cfg.init_from:
        return None, resolve_checkpoint(cfg.init_from, log=say)
    if cfg.stage.requires_init:
        raise ConfigError(
            f"stage={cfg.stage.name} starts from an earlier stage: pass "
            "init_from=<checkpoint or run dir>"
        )
    return None, None


def _load_weights(
    cfg: DictConfig, model: LM, resume_from: Checkpoint | None, init_from: Checkpoint | None
) -> list[str]:
    """Load the run's weights into ``model`` by ``finetune``; returns the layers that got
    LoRA adapters. A LoRA run freezes its starting weights under adapters, and resumes
    from them and the checkpoint's adapters (its ``model.safetensors`` holds them merged)."""
    finetune = OmegaConf.to_container(cfg.finetune, resolve=True)
    name = finetune.pop("name")
    adapted: list[str] = []
    if name == "full":
        if (source := resume_from or init_from) is not None:
            source.load_weights(model)
    elif name == "lora":
        if init_from is None:
            raise ConfigError(
                "finetune=lora adapts a trained model: pass init_from=<checkpoint or run dir>"
            )
        init_from.load_weights(model)
        adapted = add_lora(model, **finetune, seed=derive_seed(cfg.seed, "lora"))
    else:
        raise ConfigError(f"finetune.name={name!r} is not one of full, lora")
    if resume_from is not None:
        resume_from.load_adapters(model)
    return adapted


def _forgetting_set(cfg, source: Checkpoint, model, tcfg, micro, env, data):
    """The earlier stage's data directory (from its checkpoint: only inside cache_dir) and
    its validation windows, or why they are not available."""
    cached = Path(cfg.cache_dir) / "data"
    try:
        earlier = source.path_in_meta("forgetting_data_dir", cached) or source.path_in_meta(
            "data_dir", cached
        )
    except CheckpointError as exc:
        return None, str(exc)
    earlier_data = str(earlier) if earlier is not None else None
    return earlier_data, forgetting_set(earlier_data, model, tcfg, micro, env, data.tokenizer.hash)


def start(run: Run) -> Path:
    """Write the run's config and plan, open its metric sinks and train to ``max_steps``."""
    cfg, trainer, env = run.cfg, run.trainer, run.trainer.env
    run_dir = trainer.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        if removed := remove_unfinished_saves(run_dir):
            _say(env, f"removed the unfinished save(s) of a killed process: {', '.join(removed)}")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "plan.txt").write_text(run.plan + "\n")  # for those watching (the web UI)
        mark_running(run_dir)
    trainer.logger = build_logger(
        OmegaConf.to_container(cfg.logger),
        run_dir,
        run_dir.name,
        OmegaConf.to_container(cfg, resolve=True),
        env.is_main,
    )
    _say(env, run.plan)
    if trainer.budget_used() >= 1.0:
        limits = f"trainer.max_steps={trainer.config.max_steps}, max_time={trainer.config.max_time}"
        _say(env, f"run already complete at step {trainer.step} ({limits})")
        trainer.logger.close()
        return run_dir
    trainer.fit()
    if run.has_forgetting_set:
        _say(env, forgetting_report(run_dir))
    _say(env, f"done: {run_dir} (final checkpoint step_{trainer.step:06d})")
    return run_dir


def _frozen(cfg: DictConfig, data: PreparedData, checkpoint: Checkpoint | None, arch: str, device):
    """A factory of the checkpoint's model, frozen on ``device`` (None without one), built
    as the policy is: the stage's architecture knobs (e.g. SDD's k) apply to both."""
    if checkpoint is None:
        return None

    def build() -> LM:
        model = _build_model(cfg, data, checkpoint, arch)
        checkpoint.load_weights(model)
        return model.to(device).eval().requires_grad_(False)

    return build


def forgetting_report(run_dir: Path) -> str:
    """The earlier stage's validation loss at the start and the end of this run."""
    key = f"{FORGETTING_SET}/loss"
    values = [m[key] for m in read_metrics(run_dir) if key in m]
    return (
        f"forgetting: {key} {values[0]:.4f} at the start -> {values[-1]:.4f} at the end "
        f"({values[-1] - values[0]:+.4f})"
    )


def _prepare_data(cfg: DictConfig, source: Checkpoint | None, env: DistEnv) -> PreparedData:
    """Prepare on the main rank first (the others then hit its cache)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    tokenizer = source.tokenizer() if source is not None else None
    data = None
    if env.is_main:
        data = prepare(data_cfg, cfg.cache_dir, tokenizer=tokenizer, log=lambda m: _say(env, m))
    barrier(env)
    if data is None:
        data = prepare(data_cfg, cfg.cache_dir, tokenizer=tokenizer, progress=False)
    if source is not None and data.tokenizer.hash != source.meta.get("tokenizer_hash"):
        raise CheckpointError(
            f"tokenizer mismatch: checkpoint {source.path} has "
            f"{str(source.meta.get('tokenizer_hash'))[:12]}, dataset {data.directory} has "
            f"{data.tokenizer.hash[:12]}"
        )
    return data


def _tokenizer_note(cfg: DictConfig, data: PreparedData, source: Checkpoint | None) -> str | None:
    """What became of ``data.tokenizer`` when it is not what the run uses: a checkpoint's
    tokenizer replaces it (said when it asks for another than the checkpoint's run did),
    or BPE training stopped short of the vocabulary asked."""
    asked = OmegaConf.to_container(cfg.data.tokenizer, resolve=True)
    if source is None:
        return vocab_shortfall(asked, data.tokenizer.vocab_size)
    before = ((source.meta.get("train_config") or {}).get("data") or {}).get("tokenizer")
    if asked == before:
        return None
    shown = " ".join(f"{k}={v}" for k, v in asked.items())
    return (
        f"data.tokenizer ({shown}) is ignored: a run from a checkpoint keeps its tokenizer "
        f"(vocab {data.tokenizer.vocab_size:,})"
    )


def _build_model(cfg: DictConfig, data: PreparedData, source: Checkpoint | None, arch: str) -> LM:
    if source is None:
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return build_lm(
            OmegaConf.to_container(cfg.arch),
            OmegaConf.to_container(cfg.model),
            data.tokenizer.vocab_size,
            data.tokenizer.special_ids,
        )
    if source.meta.get("architecture") != arch:
        raise CheckpointError(
            f"architecture mismatch: {source.path} is arch={source.meta.get('architecture')}, "
            f"the config asks for arch={arch}"
        )
    # The shape and the special tokens come from the checkpoint; a stage may still change
    # dropout, activation checkpointing and the architecture's own knobs (e.g. the
    # diffusion noise floor).
    saved = json.loads(json.dumps(source.meta["model_config"]))
    saved["model"]["dropout"] = float(cfg.model.dropout)
    saved["model"]["activation_checkpointing"] = cfg.model.activation_checkpointing
    knobs = {
        k: v for k, v in OmegaConf.to_container(cfg.arch).items() if k not in ("_target_", "name")
    }
    saved["arch_options"] = {**saved.get("arch_options", {}), **knobs}
    return build_from_config_dict(saved)


def _plan(
    cfg: DictConfig,
    trainer: Trainer,
    data: PreparedData,
    model_name: str,
    origin: str,
    inputs: Inputs,
    tokenizer_note: str | None,
    adapted: list[str],
) -> str:
    """What is about to happen, in a few lines, before the first step."""
    tcfg, hw, env = trainer.config, trainer.hardware, trainer.env
    params = list(trainer.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    how = (
        f"LoRA r={cfg.finetune.r} alpha={cfg.finetune.alpha:g} on {len(adapted)} layers"
        if adapted
        else "all weights"
    )
    micro_batches = math.ceil(tcfg.batch_size // env.world_size / trainer.micro_batch_examples)
    tokens = data.manifest["splits"]["train"]["tokens"]
    return "\n".join(
        [
            f"lmpipe {__version__} | stage={cfg.stage.name} arch={trainer.model.arch} "
            f"model={model_name} data={cfg.data.name}",
            f"  run dir    {trainer.run_dir}",
            f"  model      {trainer.model.backbone.num_params() / 1e6:.2f}M params, {origin}",
            f"  trains     {trainable:,} of {total:,} params ({trainable / total:.2%}): {how}",
            f"  data       {data.directory} ({tokens:,} train tokens, vocab {data.tokenizer.vocab_size})",
            *([f"  tokenizer  {tokenizer_note}"] if tokenizer_note else []),
            f"  sampling   {inputs.description}",
            f"  held out   {inputs.held_out}",
            f"  batch      {tcfg.batch_size} x {tcfg.block_size} tokens/step on {env.world_size} rank(s), "
            f"{micro_batches} micro-batch(es) each; {tcfg.max_steps} steps"
            + (f" or {tcfg.max_time:g} s, whichever comes first" if tcfg.max_time else ""),
            f"  optimizer  {describe_optimizer(cfg.optim)}; {trainer.schedule.describe()}",
            f"  hardware   {hw.device} {hw.precision}{' compiled' if hw.compile else ''}",
        ]
    )
