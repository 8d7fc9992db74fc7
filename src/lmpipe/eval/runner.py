"""Evaluate checkpoints and compare them: the code path of ``lmpipe.evaluate`` and of the
pipeline's report.

``evaluate_checkpoint`` returns flat metric names shared by every architecture and stage
(``METRIC_NAMES``); ``comparison_table`` puts several checkpoints side by side.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from lmpipe.data.local import with_local_paths
from lmpipe.data.prepare import PreparedData, prepare
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import CheckpointError, ConfigError, LmpipeError
from lmpipe.eval.divergence import kl_metrics
from lmpipe.eval.diversity import distinct_n, self_bleu
from lmpipe.eval.generation import complete
from lmpipe.eval.heldout import Prompt, completion_stops, heldout_prompts, scoring_batches
from lmpipe.eval.likelihood import preference_metrics, score_rows, token_metrics
from lmpipe.eval.reward_model import reward_model_metrics
from lmpipe.eval.speed import measure_speed
from lmpipe.eval.tasks import answer_metrics, greedy_replies, reward_metrics
from lmpipe.models import LM
from lmpipe.objectives.reward_model import reward_head
from lmpipe.objectives.rewards import Reward, RewardContext
from lmpipe.rundir import CHECKPOINT_DIR
from lmpipe.training.checkpoint import Checkpoint, resolve_checkpoint
from lmpipe.training.hardware import resolve_device

METRICS = ("perplexity", "accuracy", "generation", "speed", "task", "reward", "rm", "kl")
METRIC_NAMES = (
    "val/loss",
    "val/perplexity",
    "val/perplexity_is_bound",  # 1: val/perplexity is exp of a bound (diffusion)
    "val/accuracy",
    "task/answer_accuracy",
    "task/answers",  # how many held-out questions with a checkable answer were asked
    "task/preference_accuracy",
    "task/preference_margin",
    "task/pairs",  # how many held-out preference pairs were scored
    "reward/mean",  # and reward/<name> for each reward
    "rm/accuracy",  # a reward model's held-out pairs: chosen scored above rejected
    "rm/margin",
    "kl/sequence",  # KL(model || reference) of sampled replies, per reply and per token
    "kl/token",
    "generation/distinct_1",
    "generation/distinct_2",
    "generation/self_bleu",
    "speed/tokens_per_sec_b1",
    "speed/tokens_per_sec_batched",
    "speed/ttft_ms",
)


def check_options(
    metrics, *, num_samples: int, batch_size: int, max_new_tokens: int, noise_draws: int
) -> list[str]:
    """The metric groups asked for, after checking them and the counts (ConfigError)."""
    metrics = list(metrics)
    for name in metrics:
        if name not in METRICS:
            raise ConfigError(
                f"eval.metrics: unknown metric {name!r} (known: {', '.join(METRICS)})"
            )
    if not metrics:
        raise ConfigError(f"eval.metrics is empty (known: {', '.join(METRICS)})")
    counts = {
        "num_samples": num_samples,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "noise_draws": noise_draws,
    }
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"eval.{key}={value!r} must be an integer >= 1")
    return metrics


def evaluate_checkpoint(
    checkpoint: str | Path | Checkpoint,
    *,
    data_cfg: dict | None,
    metrics: list[str],
    num_samples: int,
    cache_dir: str | Path,
    device: str | torch.device,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    samples_path: str | Path | None = None,
    temperature: float = 1.0,
    noise_draws: int = 4,
    rewards: dict[str, Reward] | None = None,
    reference: str | Path | Checkpoint | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate one checkpoint (or run directory: its newest checkpoint) on held-out data.

    ``data_cfg``: a data mixture config, prepared with the checkpoint's tokenizer; None
    means the run's own (``meta["train_config"]["data"]``). ``metrics``: groups of
    ``METRICS``. ``num_samples`` held-out examples are scored, completed and timed in
    batches of ``batch_size``. Generation samples are drawn at ``temperature`` (written to
    ``samples_path`` as JSONL when given); answers are always greedy. ``noise_draws``:
    how many fixed-seed noise draws score a bound-based architecture. ``rewards``: what
    the ``reward`` group scores the greedy replies with (an RL stage's rewards; a reward
    model among them must share the checkpoint's tokenizer). ``rm``: a reward-model
    checkpoint's accuracy on held-out preference pairs (skipped for other checkpoints or
    data). ``kl``: KL(model || ``reference``) of replies sampled at ``temperature``.
    """
    metrics = check_options(
        metrics,
        num_samples=num_samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        noise_draws=noise_draws,
    )
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = resolve_checkpoint(checkpoint, log=_stderr)
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    tokenizer = checkpoint.tokenizer()
    model = checkpoint.build_model().to(device)
    data = heldout_data(checkpoint, data_cfg, cache_dir, tokenizer, progress)

    results: dict[str, float] = {}
    wanted = set(metrics)
    pairs = "task" in wanted and data.manifest["format"] == "preference"
    if wanted & {"perplexity", "accuracy"} or pairs:
        batches = scoring_batches(data, model, num_samples, batch_size)
        scores = score_rows(
            model, batches, device=device, seed=seed, noise_draws=noise_draws, progress=progress
        )
        likelihood = token_metrics(scores)
        groups = {"val/accuracy": "accuracy"}  # the rest of token_metrics is "perplexity"
        results.update(
            {k: v for k, v in likelihood.items() if groups.get(k, "perplexity") in wanted}
        )
        if pairs:
            results.update(preference_metrics(scores))
    if "rm" in wanted and data.manifest["format"] == "preference":
        head = reward_head(checkpoint)
        if head is not None:
            batches = scoring_batches(data, model, num_samples, batch_size)
            results.update(
                reward_model_metrics(model, head, batches, pad_id=tokenizer.pad_id, device=device)
            )
    if "reward" in wanted and not rewards:
        raise ConfigError("eval.metrics has reward, but no reward is configured (reward=[...])")
    if "kl" in wanted and reference is None:
        raise ConfigError("eval.metrics has kl, but no reference model (eval.kl_reference=...)")
    if wanted & {"generation", "speed", "task", "reward", "kl"}:
        prompts = heldout_prompts(data, num_samples)
        common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device}
        if wanted & {"task", "reward"} and data.manifest["format"] != "text":
            replies = greedy_replies(model, tokenizer, prompts, progress=progress, **common)
            if "task" in wanted:
                results.update(answer_metrics(tokenizer, prompts, replies))
            if "reward" in wanted:
                context = RewardContext(
                    tokenizer=tokenizer,
                    device=device,
                    open_checkpoint=lambda path: resolve_checkpoint(path, log=_stderr),
                    batch_size=batch_size,
                )
                for reward in rewards.values():
                    reward.setup(context)
                results.update(reward_metrics(rewards, tokenizer, prompts, replies, max_new_tokens))
        if "kl" in wanted:
            results.update(
                kl_metrics(
                    model,
                    _reference_model(reference, tokenizer).to(device),
                    tokenizer,
                    prompts,
                    temperature=temperature,
                    seed=seed,
                    progress=progress,
                    **common,
                )
            )
        if "generation" in wanted:
            results.update(
                generation_metrics(
                    model,
                    tokenizer,
                    prompts,
                    stop_ids=completion_stops(data),
                    temperature=temperature,
                    seed=seed,
                    samples_path=samples_path,
                    progress=progress,
                    **common,
                )
            )
        if "speed" in wanted:
            results.update(measure_speed(model, prompts[0].ids, **common))
    ordered = {name: results[name] for name in METRIC_NAMES if name in results}
    return {**ordered, **{k: v for k, v in results.items() if k not in ordered}}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _reference_model(reference: str | Path | Checkpoint, tokenizer: Tokenizer) -> LM:
    """The reference of the ``kl`` group; it must share the evaluated model's tokenizer."""
    if not isinstance(reference, Checkpoint):
        reference = resolve_checkpoint(reference, log=_stderr)
    if reference.meta.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(
            f"eval.kl_reference={reference.path} has another tokenizer than the evaluated "
            "checkpoint: KL compares distributions over the same tokens"
        )
    return reference.build_model()


def heldout_data(
    checkpoint: Checkpoint,
    data_cfg: dict | None,
    cache_dir: str | Path,
    tokenizer: Tokenizer,
    progress: bool = True,
) -> PreparedData:
    """``data_cfg`` prepared with the checkpoint's tokenizer; for None the run's own data:
    its prepared directory while that is still in ``cache_dir``, else its config prepared
    again -- built-in sources only, since a checkpoint may not choose files or downloads."""
    if data_cfg is None:
        own = _own_data(checkpoint, cache_dir)
        if own is not None and own.tokenizer.hash == tokenizer.hash:
            return own
        data_cfg = (checkpoint.meta.get("train_config") or {}).get("data")
        if not isinstance(data_cfg, dict) or not data_cfg:
            raise ConfigError(
                f"{checkpoint.path}: meta.json names no training data; pass data=<mixture>"
            )
        data_cfg = with_local_paths(data_cfg)  # a data.path in it reads files too
        fetched = [
            s.get("name", "?") for s in data_cfg.get("sources") or [] if not s.get("builtin")
        ]
        if fetched:
            raise ConfigError(
                f"{checkpoint.path}: its training data is not in cache_dir={cache_dir}, and "
                f"lmpipe reads no files or hub datasets a checkpoint names (sources: "
                f"{', '.join(map(str, fetched))}); pass data=<mixture>, or the cache_dir it "
                "trained with"
            )
    return prepare(data_cfg, cache_dir, tokenizer=tokenizer, progress=progress)


def _own_data(checkpoint: Checkpoint, cache_dir: str | Path) -> PreparedData | None:
    """The run's prepared data, when meta.json's ``data_dir`` is an intact cache entry in
    ``cache_dir``."""
    try:
        own = checkpoint.path_in_meta("data_dir", Path(cache_dir) / "data")
        return PreparedData.open(own) if own is not None else None
    except LmpipeError:
        return None


def generation_metrics(
    model: LM,
    tokenizer: Tokenizer,
    prompts: list[Prompt],
    *,
    stop_ids: tuple[int, ...],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    temperature: float,
    seed: int,
    samples_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Sample a completion of every prompt; distinct-1/2 and self-BLEU over them."""
    completions = complete(
        model,
        [prompt.ids for prompt in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        batch_size=batch_size,
        device=device,
        temperature=temperature,
        seed=seed,
        progress=progress,
    )
    texts = [tokenizer.decode(ids) for ids in completions]
    if samples_path is not None:
        path = Path(samples_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for prompt, text in zip(prompts, texts, strict=True):
                sample = {"prompt": prompt.text, "completion": text, "reference": prompt.reference}
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    metrics = {
        "generation/distinct_1": distinct_n(texts, 1),
        "generation/distinct_2": distinct_n(texts, 2),
    }
    if len(texts) > 1:
        metrics["generation/self_bleu"] = self_bleu(texts)
    return metrics


# --- reporting ------------------------------------------------------------------------
def _run_dir(checkpoint: Checkpoint) -> Path | None:
    """The run directory of a checkpoint inside one (``<run>/checkpoints/step_N``)."""
    path = checkpoint.path.resolve()
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else None


def checkpoint_label(checkpoint: Checkpoint) -> str:
    """``<run name>@<step>`` for a checkpoint inside a run directory, else its folder name."""
    run_dir = _run_dir(checkpoint)
    return f"{run_dir.name}@{checkpoint.step}" if run_dir else checkpoint.path.resolve().name


def default_output(checkpoints: list[Checkpoint]) -> Path:
    """``eval/<YYYYmmdd-HHMMSS>/results.json`` beside what was evaluated: in the run
    directory of one run's checkpoints (of a checkpoint outside a run: the folder holding
    it), in the directory that holds them all (usually ``out_dir``) for several runs.
    Timestamped like a sweep's directory, so evaluations
    with other data or metrics never overwrite each other."""
    homes = [_run_dir(c) or c.path.resolve().parent for c in checkpoints]
    root = Path(os.path.commonpath(homes)) / "eval"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / stamp, 1
    while folder.exists():  # another evaluation in the same second
        n += 1
        folder = root / f"{stamp}-{n}"
    return folder / "results.json"


def checkpoint_details(checkpoint: Checkpoint, data_name: str | None = None) -> dict:
    """What the table says about a checkpoint besides its metrics."""
    meta = checkpoint.meta
    own_data = ((meta.get("train_config") or {}).get("data") or {}).get("name")
    return {
        "path": str(checkpoint.path),
        "arch": meta.get("architecture"),
        "stage": meta.get("stage"),
        "step": checkpoint.step,
        "data": data_name or own_data,
    }


def _cell(key: str, row: dict) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if key == "val/perplexity" and row.get("val/perplexity_is_bound"):
        text += " (bound)"
    return text


def comparison_table(results: dict[str, dict]) -> str:
    """A Markdown table with one column per checkpoint (``results``: name -> metrics,
    possibly with details such as arch and stage) and one row per metric."""
    names = list(results)
    keys: list[str] = []
    for row in results.values():  # details (no "/") first, in the order given
        keys += [k for k in row if "/" not in k and k != "path" and k not in keys]
    present = {k for row in results.values() for k in row}
    keys += [k for k in METRIC_NAMES if k in present and k != "val/perplexity_is_bound"]
    keys += sorted(k for k in present if "/" in k and k not in METRIC_NAMES)
    lines = [
        "| metric | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_cell(key, results[n]) for n in names) + " |")
    return "\n".join(lines)


def write_results(
    results: dict[str, dict[str, float]], output: str | Path, details: dict[str, dict]
) -> str:
    """Write ``output`` (JSON: ``{"results": {name: metrics}, "checkpoints": {name:
    details}}``) and the comparison table next to it (same name, ``.md``); returns the
    table."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table = comparison_table({name: {**details[name], **results[name]} for name in results})
    output.write_text(json.dumps({"results": results, "checkpoints": details}, indent=2) + "\n")
    output.with_suffix(".md").write_text(f"# Evaluation\n\n{table}\n")
    return table
