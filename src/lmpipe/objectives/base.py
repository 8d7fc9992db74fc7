"""The Objective seam: one small class per stage loss; the Trainer never branches on stage.

An objective sees the model only through the LM seam and the run only through an
``ObjectiveContext``: where to compute, the stage's starting model, the training examples
and the held-out sets -- never the Trainer, and nothing from the training package.

    setup(ctx)               build what the loss needs (frozen reference, heads)
    modules()                trainable modules it owns: optimised, clipped, saved, resumed
    prepare(model, batch)    the update batches made from one sampled batch (RL: rollouts)
    loss(model, batch)       the scalar to minimise and its metrics
    evaluate(model, batches) metrics on held-out batches (default: the loss metrics)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError
from lmpipe.objectives.rewards import RewardContext

if TYPE_CHECKING:
    from lmpipe.data.tokenizer import Tokenizer
    from lmpipe.models import LM

ALL_ARCHS = frozenset({"ar", "diffusion", "sdd"})
Metrics = dict[str, Tensor | float]


class Examples(Protocol):
    """The training examples, as the objective may need them besides the step's batch."""

    def batch(self, step: int) -> Batch: ...

    def position(self, step: int) -> dict: ...

    def every_example(self, examples_per_batch: int) -> Iterator[Batch]:
        """Every training example once, in order, unpacked; ``example_ids`` set."""
        ...


class SavedCheckpoint(Protocol):
    """A checkpoint as objectives and rewards read one (e.g. a reward model's)."""

    path: Path
    meta: dict  # architecture, tokenizer_hash, stage, ...

    def build_model(self) -> LM: ...

    def module_states(self) -> dict[str, dict[str, Tensor]]:
        """The objective-owned modules' weights by module name (a reward head)."""
        ...


@dataclass
class ObjectiveContext:
    """What an objective may know of its run."""

    device: torch.device
    autocast: Callable[[], AbstractContextManager]  # the run's mixed precision, as a context
    tokenizer: Tokenizer
    model: LM  # the bare LM being trained (its shape; what a rollout samples from)
    examples: Examples
    val_sets: dict[str, list[Batch]]
    micro_batch_size: int  # examples per forward pass: chunk extra forwards (reference) by it
    seed: int  # the run seed: derive fixed seeds from it (e.g. held-out sampling)
    # The stage's starting model (init_from), frozen, on ``device``; None without one.
    # A factory, so an objective that needs no reference never builds one.
    starting_model: Callable[[], LM] | None = None
    # The starting checkpoint's objective-owned modules by name (e.g. a reward model's head).
    starting_modules: Callable[[], dict[str, dict[str, Tensor]]] | None = None
    # Opens a checkpoint or run directory (its newest checkpoint), verified.
    open_checkpoint: Callable[[str], SavedCheckpoint] | None = None

    def reward_context(self) -> RewardContext:
        """What the stage's rewards need (a reward model loads on ``device``)."""
        return RewardContext(
            tokenizer=self.tokenizer,
            device=self.device,
            open_checkpoint=self.open_checkpoint,
            batch_size=self.micro_batch_size,
            autocast=self.autocast,
        )


class Objective:
    """A stage loss.

    ``loss`` returns the scalar to minimise and a dict of metrics (tensors or floats,
    names without a split prefix: the Trainer logs them as ``train/<name>`` and, during
    evaluation, ``val/<name>``). A ``weight`` entry, when present, weights the metric
    averages across micro-batches and evaluation batches.
    """

    name: ClassVar[str]
    supported_archs: ClassVar[frozenset[str]] = ALL_ARCHS
    data_formats: ClassVar[frozenset[str]] = frozenset({"text", "chat", "prompt"})
    sampler_kinds: ClassVar[frozenset[str]] = frozenset({"windows", "episodes"})
    reports_perplexity: ClassVar[bool] = False  # log exp(loss) as <split>/perplexity
    # False: the model stays in eval mode while it learns (no dropout), so that the policy
    # that sampled a rollout and the one that scores it are the same function (RL ratios
    # start at exactly 1).
    train_mode: ClassVar[bool] = True
    # A sharded (FSDP) model gathers its weights inside ``forward``, on every rank at once:
    # False for an objective that calls the model otherwise (generation) or trains modules
    # of its own besides it.
    shardable: ClassVar[bool] = True

    def check_arch(self, lm_class: type[LM]) -> None:
        """Refuse, at config time, an architecture this objective cannot train."""
        if lm_class.arch not in self.supported_archs:
            raise ConfigError(
                f"stage objective '{self.name}' does not support arch={lm_class.arch} "
                f"(supported: {', '.join(sorted(self.supported_archs))})"
            )

    @classmethod
    def check_format(cls, fmt: str, data_name: str) -> None:
        if fmt not in cls.data_formats:
            raise ConfigError(
                f"stage objective '{cls.name}' trains on {' or '.join(sorted(cls.data_formats))} "
                f"data, but data={data_name} is {fmt} data"
            )

    @classmethod
    def check_sampler(cls, kind: str) -> None:
        if kind not in cls.sampler_kinds:
            raise ConfigError(
                f"stage objective '{cls.name}' reads batches from a "
                f"{' or '.join(sorted(cls.sampler_kinds))} sampler, not sampler.kind={kind}"
            )

    def setup(self, ctx: ObjectiveContext) -> None:
        """Build frozen helpers (reference, reward models) and owned modules. The default
        keeps the context for ``evaluate``."""
        self.ctx = ctx

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules the objective owns besides the LM (a value head), by name."""
        return {}

    def prepare(self, model: nn.Module, batch: Batch) -> Iterator[Batch]:
        """Batches for optimizer updates made from one sampled batch (on the CPU; the
        Trainer moves each micro-batch). Default: itself."""
        yield batch

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: LM, batches: list[Batch]) -> Iterator[Metrics]:
        """Metrics of each held-out batch (the Trainer averages them by ``weight`` over
        batches and ranks). Default: the loss metrics."""
        for batch in batches:
            with self.ctx.autocast():
                yield self.loss(model, batch.to(self.ctx.device))[1]
