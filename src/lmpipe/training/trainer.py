"""The Trainer loop. It knows an LM, an Objective and batches -- never the stage or the arch.

One step = one sampled batch -> ``objective.prepare`` (usually itself; RL turns it into
rollouts) -> for each update: micro-batches with gradient accumulation under autocast,
clipping, optimizer step. Eval, logging and checkpoints happen between steps.

A step whose loss or gradient norm is not finite is skipped (the optimizer does not
step; ``train/skipped_steps`` counts them); ``max_bad_steps`` in a row stop the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import CheckpointError, ConfigError, LmpipeError
from lmpipe.models import LM
from lmpipe.models.lora import adapter_state, merged
from lmpipe.objectives import Objective
from lmpipe.objectives.base import Examples
from lmpipe.seeding import derive_seed
from lmpipe.tracking import MetricLogger
from lmpipe.training.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from lmpipe.training.distributed import (
    DistEnv,
    all_reduce_mean_grads,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    no_sync,
    sum_over_ranks,
)
from lmpipe.training.hardware import Hardware
from lmpipe.training.schedule import LRSchedule
from lmpipe.training.sharding import (
    full_tensor,
    load_optimizer_state,
    model_state,
    optimizer_state,
)


@dataclass(frozen=True)
class TrainerConfig:
    """The ``trainer`` keys of a composed config (defaults: ``conf/train.yaml``)."""

    max_steps: int
    max_time: float | None  # seconds of wall time the run may take (all its resumes together)
    batch_size: int  # rows per step, all ranks and micro-batches together
    block_size: int  # positions per row the model processes
    grad_clip: float | None
    log_interval: int
    eval_interval: int
    eval_batches: int
    eval_at_start: bool
    save_interval: int
    keep_last: int
    max_bad_steps: int

    @classmethod
    def from_dict(cls, values: dict) -> TrainerConfig:
        missing = [k for k in cls.__dataclass_fields__ if k not in values]
        if missing:
            raise ConfigError(f"trainer config lacks {', '.join(f'trainer.{k}' for k in missing)}")
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


class TrainingDiverged(LmpipeError):
    """Too many steps in a row with a non-finite loss or gradient norm."""


class MetricAverager:
    """Running means of metrics, weighted by their ``weight`` entry when given (tokens for a
    token-level loss, pairs for DPO); the total weight is kept as ``weight``."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, Tensor | float]) -> None:
        weight = float(metrics.get("weight", 1.0))
        for key, value in metrics.items():
            summed = key == "weight"
            self.totals[key] = self.totals.get(key, 0.0) + float(value) * (
                1.0 if summed else weight
            )
            self.weights[key] = self.weights.get(key, 0.0) + (0.0 if summed else weight)

    def result(self, env: DistEnv, device: torch.device) -> dict[str, float]:
        """Means over all micro-batches of all ranks (``weight``: the total)."""
        keys = sorted(self.totals)
        packed = torch.tensor(
            [[self.totals[k], self.weights[k]] for k in keys], dtype=torch.float64
        )
        if env.enabled:
            packed = all_reduce_sum(packed.to(device), env).cpu()
        return {
            k: total if k == "weight" else total / max(weight, 1e-12)
            for k, (total, weight) in zip(keys, packed.tolist(), strict=True)
        }


class Trainer:
    def __init__(
        self,
        *,
        config: TrainerConfig,
        model: LM,
        train_model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        sampler: Examples,
        val_sets: dict[str, list[Batch]],
        hardware: Hardware,
        env: DistEnv,
        logger: MetricLogger,
        run_dir: Path,
        tokenizer: Tokenizer,
        checkpoint_meta: Callable[[], dict],
        seed: int,
    ):
        self.config = config
        self.model = model  # the LM (checkpoints, generation; sharded in place under FSDP)
        self.train_model = train_model  # what the objective calls (maybe DDP/compiled)
        self.objective = objective
        self.optimizer = optimizer
        self.schedule = schedule
        self.sampler = sampler
        self.val_sets = val_sets  # "val" and maybe others, e.g. the pretraining val split
        self.hardware = hardware
        self.env = env
        self.logger = logger
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.checkpoint_meta = checkpoint_meta
        self.seed = seed
        self.modules = objective.modules()  # what the objective trains besides the model
        self.scaler = hardware.grad_scaler()
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.best_val_loss = math.inf
        self.last_val: dict[str, float] = {}
        self.elapsed = 0.0  # wall seconds in ``fit``, over all resumes

    def parameters(self):
        """Everything the optimizer trains: the model's and the objective's parameters."""
        return chain(self.model.parameters(), *(m.parameters() for m in self.modules.values()))

    # --- state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every rank calls it (a sharded optimizer state is gathered for rank 0)."""
        return {
            "step": self.step,
            # Batches are a function of the step; the position is saved to be checked.
            "sampler": self.sampler.position(self.step),
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "best_val_loss": self.best_val_loss,
            "elapsed_s": self.elapsed,
            "optimizer": optimizer_state(self.model, self.optimizer),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if state["sampler"] != self.sampler.position(self.step):
            raise CheckpointError(
                f"the training data no longer matches the checkpoint: it was at "
                f"{state['sampler']}, the data now puts step {self.step} at "
                f"{self.sampler.position(self.step)}"
            )
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.best_val_loss = float(state["best_val_loss"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # --- loop ---------------------------------------------------------------------
    def budget_used(self) -> float:
        """The fraction of the run done: of its steps, or of ``max_time`` when that is
        spent faster. The LR schedule runs on it; 1 ends the run."""
        used = self.step / self.config.max_steps
        if self.config.max_time is not None:
            used = max(used, self.elapsed / self.config.max_time)
        return min(used, 1.0)

    def _lr(self) -> float:
        if self.config.max_time is None:  # exactly the step's LR (and resumes bitwise)
            return self.schedule(self.step)
        return self.schedule(self.budget_used() * self.config.max_steps)

    def _tick(self, since: float) -> float:
        """Add the wall time since ``since`` to ``elapsed`` (the ranks' mean, so that they
        agree on the LR and on when the budget is spent); returns now."""
        now = time.perf_counter()
        spent = now - since
        if self.env.enabled and self.config.max_time is not None:
            spent_t = torch.tensor([spent], dtype=torch.float64, device=self.hardware.device)
            spent = float(all_reduce_sum(spent_t, self.env))
            spent /= self.env.world_size
        self.elapsed += spent
        return now

    def fit(self) -> None:
        cfg = self.config
        clock = time.perf_counter()
        self._trim_episode_log()
        if self.step == 0 and cfg.eval_at_start and self.val_sets:
            self.evaluate()
        train_time, interval_tokens = 0.0, 0
        self.logger.progress(self.step, cfg.max_steps)
        clock = self._tick(clock)
        while self.budget_used() < 1.0:
            # Every random draw of a step (dropout, noise, rollouts) comes from a seed that is
            # a function of the step, so a resumed run replays exactly what it would have done.
            torch.manual_seed(derive_seed(self.seed, "train", self.step, self.env.rank))
            lr = self._lr()
            for group in self.optimizer.param_groups:  # lr_scale: a group's LR relative to lr
                group["lr"] = lr * group.get("lr_scale", 1.0)
            started = time.perf_counter()
            batch = self.sampler.batch(self.step)
            model_metrics = self.model.on_train_step()  # the model's own schedule, if any
            metrics, step_tokens = self.train_step(batch)
            metrics.update(model_metrics)
            self.step += 1
            self._log_episodes(batch)
            self.tokens_seen += step_tokens
            interval_tokens += step_tokens
            train_time += time.perf_counter() - started
            self.logger.progress(self.step, cfg.max_steps, metrics.get("loss"))
            clock = self._tick(clock)
            last = self.budget_used() >= 1.0

            if self.step % cfg.log_interval == 0 or last:
                self._log_train(metrics, lr, interval_tokens / max(train_time, 1e-9))
                train_time, interval_tokens = 0.0, 0
            if self.val_sets and (self.step % cfg.eval_interval == 0 or last):
                self.evaluate()
            if self.step % cfg.save_interval == 0 or last:
                clock = self._tick(clock)  # the checkpoint records the time spent so far
                self.save()
        self.logger.close()

    def train_step(self, batch: Batch) -> tuple[dict[str, float], int]:
        """One optimizer step per update batch the objective prepares; returns the metrics
        and the tokens processed (all ranks)."""
        self.train_model.train(self.objective.train_mode)
        averager = MetricAverager()
        examples = self.micro_batch_examples
        tokens = 0
        for update in self.objective.prepare(self.train_model, batch):
            if update.metrics:
                averager.add(update.metrics)
            tokens += update.real_tokens or len(update) * self.config.block_size
            micro_batches = update.split(examples)
            finite = True
            for i, micro in enumerate(micro_batches):
                micro = micro.to(self.hardware.device)
                last = i == len(micro_batches) - 1
                with no_sync(self.train_model, not last):
                    with self.hardware.autocast():
                        loss, metrics = self.objective.loss(self.train_model, micro)
                    self.scaler.scale(loss * (len(micro) / len(update))).backward()
                finite &= math.isfinite(float(loss.detach()))
                averager.add(metrics)
            for module in self.modules.values():  # DDP syncs the model's gradients only
                all_reduce_mean_grads(module, self.env)
            self.scaler.unscale_(self.optimizer)
            clip = self.config.grad_clip if self.config.grad_clip else math.inf
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(list(self.parameters()), clip))
            # fp16: the GradScaler itself skips steps with inf gradients (and rescales).
            finite &= self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
            if finite:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if finite:
                averager.add({"grad_norm": grad_norm})
            self._count_bad(finite)
        metrics = averager.result(self.env, self.hardware.device)
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        return metrics, sum_over_ranks(tokens, self.env, self.hardware.device)

    def _count_bad(self, finite: bool) -> None:
        if finite:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        self.logger.message(
            f"step {self.step + 1}: non-finite loss or gradient norm, update skipped "
            f"({self.bad_in_a_row} in a row)"
        )
        if self.bad_in_a_row >= self.config.max_bad_steps:
            good = [p.name for p in list_checkpoints(self.run_dir)]
            raise TrainingDiverged(
                f"training diverged: {self.bad_in_a_row} steps in a row up to step "
                f"{self.step + 1} had a non-finite loss or gradient norm (trainer.max_bad_steps="
                f"{self.config.max_bad_steps}); last good checkpoint: "
                f"{good[-1] if good else 'none'} in {self.run_dir} (lower optim.lr or set "
                "trainer.grad_clip)"
            )

    @property
    def micro_batch_examples(self) -> int:
        per_rank = self.config.batch_size // self.env.world_size
        return self.hardware.micro_batch_size or per_rank

    # --- the episode log ----------------------------------------------------------
    @property
    def episode_log(self) -> Path:
        return self.run_dir / "episodes.jsonl"

    def _log_episodes(self, batch: Batch) -> None:
        """Which episodes trained at which step (episode-indexed samplers only)."""
        if batch.episode_ids is None or not self.env.is_main:
            return
        with self.episode_log.open("a") as fh:
            fh.write(json.dumps({"step": self.step, "episodes": batch.episode_ids}) + "\n")

    def _trim_episode_log(self) -> None:
        """On resume, drop the lines of steps after the checkpoint (a killed run may have
        written them), so the log continues without a gap or a repeat."""
        if not self.env.is_main or not self.episode_log.exists():
            return
        lines = self.episode_log.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= self.step]
        if len(kept) != len(lines):
            self.episode_log.write_text("".join(kept))

    # --- reporting ----------------------------------------------------------------
    def _named(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        """``loss`` -> ``train/loss`` / ``val/loss``; a name with its own namespace, e.g.
        ``rewards/margin``, stays as it is in training and becomes ``val/rewards/margin``."""
        order = sorted(metrics, key=lambda k: (k != "loss", k))  # loss first on the console
        named = {
            k if split == "train" and "/" in k else f"{split}/{k}": metrics[k]
            for k in order
            if k != "weight"
        }
        if self.objective.reports_perplexity and "loss" in metrics:
            named[f"{split}/perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return named

    def _log_train(self, metrics: dict[str, float], lr: float, tokens_per_sec: float) -> None:
        named = self._named("train", metrics)
        named["train/lr"] = lr
        named["train/tokens"] = self.tokens_seen
        named["train/tokens_per_sec"] = tokens_per_sec
        if self.hardware.peak_tflops:
            flops = self.model.flops_per_token(self.config.block_size) * tokens_per_sec
            named["train/mfu_percent"] = (
                100 * flops / (self.hardware.peak_tflops * 1e12 * self.env.world_size)
            )
        self.logger.log(self.step, named)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's metrics on each held-out set, averaged by weight, as
        ``<set>/*`` (``val/*``, and e.g. ``pretrain_val/*`` for a forgetting check)."""
        self.train_model.eval()
        named: dict[str, float] = {}
        for name, batches in self.val_sets.items():
            torch.manual_seed(derive_seed(self.seed, "eval"))  # the same noise at every eval
            averager = MetricAverager()
            for metrics in self.objective.evaluate(self.model, batches):
                averager.add(metrics)
            named.update(self._named(name, averager.result(self.env, self.hardware.device)))
        self.train_model.train()
        if "val/loss" in named:
            self.best_val_loss = min(self.best_val_loss, named["val/loss"])
        self.last_val = named
        self.logger.log(self.step, named)
        return named

    def save(self) -> None:
        # Every rank gathers (a sharded model's weights and optimizer state); rank 0 writes.
        with merged(self.model):  # LoRA adapters folded in: the checkpoint is a plain model
            weights = model_state(self.model)
        trainer_state = self.state_dict()
        if not broadcast_from_main(self.env.is_main and self._finite(weights), self.env):
            raise TrainingDiverged(
                f"training diverged: the weights at step {self.step} are not finite, so no "
                f"checkpoint was written (lower optim.lr or set trainer.grad_clip)"
            )
        if self.env.is_main:
            meta = {
                **self.checkpoint_meta(),
                "global_step": self.step,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "val": self.last_val,
            }
            path = checkpoint_dir(self.run_dir, self.step)
            save_checkpoint(
                path,
                weights=weights,
                adapters=adapter_state(self.model),
                modules=self.modules,
                trainer_state=trainer_state,
                tokenizer=self.tokenizer,
                meta=meta,
            )
            prune_checkpoints(self.run_dir, self.config.keep_last)
            self.logger.message(f"saved checkpoint {path}")
        barrier(self.env)

    def _finite(self, weights: dict[str, Tensor]) -> bool:
        modules = (p for m in self.modules.values() for p in m.parameters())
        return all(bool(torch.isfinite(t).all()) for t in chain(weights.values(), modules))
