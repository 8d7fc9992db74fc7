"""What a run trains and evaluates on: the sampler of training batches and the held-out sets.

The ``sampler`` config of the stage picks the kind: ``windows`` (pretraining: fixed-length
windows of the token stream), ``episodes`` (SFT / DPO: whole conversations or pairs,
epoch by epoch) or ``prompts`` (RL: prompts with their answers, epoch by epoch). Held-out
sets use the same layout as training, unshuffled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmpipe.batch import Batch
from lmpipe.data.prepare import PreparedData
from lmpipe.data.prompts import read_prompts
from lmpipe.data.samplers import (
    EpisodeOptions,
    Episodes,
    EpisodeSampler,
    PromptOptions,
    PromptSampler,
    WindowSampler,
    collate_prompts,
    eval_episodes,
    eval_windows,
    held_out_share,
)
from lmpipe.errors import ConfigError, DataError
from lmpipe.models import LM
from lmpipe.objectives.base import Examples
from lmpipe.training.distributed import DistEnv
from lmpipe.training.trainer import TrainerConfig

SAMPLER_KINDS = ("windows", "episodes", "prompts")
FORGETTING_SET = "pretrain_val"  # metrics prefix of the earlier stage's validation data
KEEP_FRACTION = 0.95  # a plan that drops more episodes names the block size keeping this many


@dataclass
class Inputs:
    sampler: Examples
    val_sets: dict[str, list[Batch]]
    description: str  # one line for the run's plan printout
    held_out: str  # the plan's line on the held-out set (or on why there is none)


def build_inputs(
    sampler_cfg: dict,
    data: PreparedData,
    model: LM,
    tcfg: TrainerConfig,
    micro_examples: int,
    seed: int,
    env: DistEnv,
) -> Inputs:
    kind = sampler_cfg.get("kind")
    if kind not in SAMPLER_KINDS:
        raise ConfigError(f"sampler.kind={kind!r} is not one of {', '.join(SAMPLER_KINDS)}")
    row_length = model.row_length(tcfg.block_size)
    if kind == "windows":
        if data.manifest["documents_per_record"] != 1:
            raise ConfigError(
                f"sampler.kind=windows cannot read {data.manifest['format']} data "
                f"(data={data.manifest['name']}); use a stage with an episode sampler"
            )
        sampler = WindowSampler(
            data.split("train"), row_length, tcfg.batch_size, seed, env.rank, env.world_size
        )
        val = _window_val(data, row_length, tcfg, micro_examples, env) if _val_records(data) else []
        val_sets = {"val": val} if val else {}
        return Inputs(
            sampler,
            val_sets,
            "random windows of the token stream",
            held_out_line(data, val_sets, tcfg, "trainer.block_size"),
        )

    if kind == "prompts":
        return _prompt_inputs(sampler_cfg, data, tcfg, micro_examples, env)
    options = EpisodeOptions.from_dict(sampler_cfg)
    docs = data.manifest["documents_per_record"]
    pad_id = data.tokenizer.pad_id
    target = model.pad_target()
    pad_target_id = data.tokenizer.special_id(target) if target else None
    train = Episodes(data.split("train"), docs, row_length, options.episode_min_tokens)
    sampler = EpisodeSampler(
        train,
        tcfg.batch_size,
        options,
        pad_id=pad_id,
        pad_target_id=pad_target_id,
        rank=env.rank,
        world_size=env.world_size,
    )
    val_sets = {}
    if tcfg.eval_batches:
        held_out = Episodes(data.split("val"), docs, row_length, options.episode_min_tokens)
        if len(held_out.kept):
            val_sets["val"] = eval_episodes(
                held_out,
                micro_examples,
                held_out_examples(tcfg),
                pad_id=pad_id,
                pad_target_id=pad_target_id,
                rank=env.rank,
                world_size=env.world_size,
            )
    layout = "packed" if options.packing else "padded"
    description = (
        f"{len(train.kept):,} episodes ({layout}, {sampler.steps_in_epoch(0):,} steps per "
        f"epoch; dropped: {_dropped(train.dropped, len(train.starts))})"
    )
    row = train.row_length_keeping(KEEP_FRACTION)
    if row is not None:
        block = row - (model.row_length(row) - row)
        description += f"; trainer.block_size={block} would keep {KEEP_FRACTION:.0%}"
        if block > model.config.block_size:
            description += f" (model.block_size is {model.config.block_size})"
    held_out = held_out_line(data, val_sets, tcfg, "trainer.block_size")
    return Inputs(sampler, val_sets, description, held_out)


def held_out_examples(tcfg: TrainerConfig) -> int:
    """Examples of a held-out set, all ranks together: ``eval_batches`` full batches,
    whatever the number of ranks and the micro-batch size."""
    return tcfg.eval_batches * tcfg.batch_size


def _prompt_inputs(
    sampler_cfg: dict, data: PreparedData, tcfg: TrainerConfig, micro_examples: int, env: DistEnv
) -> Inputs:
    """Prompts with their references; held out: the val split's first prompts that fit."""
    options = PromptOptions.from_dict(sampler_cfg)
    pad_id = data.tokenizer.pad_id
    sampler = PromptSampler(
        read_prompts(data, "train"),
        tcfg.batch_size,
        options,
        pad_id=pad_id,
        rank=env.rank,
        world_size=env.world_size,
    )
    val_sets = {}
    if tcfg.eval_batches:
        held_out = read_prompts(data, "val")
        fits = [i for i, p in enumerate(held_out) if len(p.ids) <= options.max_prompt_tokens]
        mine = fits[held_out_share(len(fits), held_out_examples(tcfg), env.rank, env.world_size)]
        if mine:
            val_sets["val"] = [
                collate_prompts(held_out, mine[i : i + micro_examples], pad_id)
                for i in range(0, len(mine), micro_examples)
            ]
    description = (
        f"{len(sampler.kept):,} prompts ({sampler.steps_in_epoch(0):,} steps per epoch; "
        f"dropped: {_dropped(sampler.dropped, len(sampler.prompts))})"
    )
    held_out = held_out_line(data, val_sets, tcfg, "sampler.max_prompt_tokens")
    return Inputs(sampler, val_sets, description, held_out)


def _dropped(counts, total: int) -> str:
    """Dropped examples by reason, and their share of all of them."""
    if not counts:
        return "none"
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    return f"{reasons} ({sum(counts.values()) / total:.0%} of {total:,})"


def _val_records(data: PreparedData) -> int:
    return data.manifest["splits"]["val"]["records"]


def held_out_line(
    data: PreparedData, val_sets: dict[str, list[Batch]], tcfg: TrainerConfig, fit_knob: str
) -> str:
    """The plan's line on what the run evaluates on, or loudly why it evaluates on nothing
    (``fit_knob``: what lets longer held-out examples fit)."""
    if val_sets.get("val"):
        return (
            f"{_val_records(data):,} val records, {len(val_sets['val'])} batch(es) every "
            f"{tcfg.eval_interval} steps"
        )
    if not tcfg.eval_batches:
        return "none (trainer.eval_batches=0)"
    if not _val_records(data):
        fraction = data.manifest["split"]["val_fraction"]
        return (
            f"NONE: data '{data.manifest['name']}' has no validation split "
            f"(data.split.val_fraction={fraction}, no val_split/val_path); set "
            "data.split.val_fraction > 0 to hold records out"
        )
    return f"NONE: none of the {_val_records(data):,} val records fits (raise {fit_knob})"


def _window_val(
    data: PreparedData, row_length: int, tcfg: TrainerConfig, micro_examples: int, env: DistEnv
) -> list[Batch]:
    if not tcfg.eval_batches:
        return []
    return eval_windows(
        data.split("val"),
        row_length,
        tcfg.block_size,
        micro_examples,
        held_out_examples(tcfg),
        env.rank,
        env.world_size,
    )


def forgetting_set(
    data_dir: str | None,
    model: LM,
    tcfg: TrainerConfig,
    micro_examples: int,
    env: DistEnv,
    tokenizer_hash: str,
) -> list[Batch] | str:
    """The validation windows of the data an earlier stage trained on (its checkpoint's
    ``data_dir``), to show forgetting; or why they are not available."""
    if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
        return f"the earlier stage's data ({data_dir}) is no longer in the cache"
    try:
        earlier = PreparedData.open(data_dir)
    except DataError as exc:
        return str(exc)
    if earlier.tokenizer.hash != tokenizer_hash:
        return f"the earlier stage's data ({data_dir}) uses another tokenizer"
    if earlier.manifest["documents_per_record"] != 1:
        return f"the earlier stage's data ({data_dir}) is {earlier.manifest['format']} data"
    try:
        return _window_val(earlier, model.row_length(tcfg.block_size), tcfg, micro_examples, env)
    except DataError as exc:
        return str(exc)
