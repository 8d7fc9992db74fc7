"""The Objective seam: one small class per stage loss; the Trainer never branches on stage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lmpipe.batch import Batch
from lmpipe.errors import ConfigError

if TYPE_CHECKING:
    from lmpipe.models import LM
    from lmpipe.training.trainer import Trainer

ALL_ARCHS = frozenset({"ar", "diffusion", "sdd"})


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
    reports_perplexity: ClassVar[bool] = False  # log exp(loss) as <split>/perplexity

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

    def setup(self, trainer: Trainer) -> None:
        """Build frozen helpers (reference, reward, value models). Default: nothing."""

    def prepare(self, model: LM, batch: Batch) -> Iterator[Batch]:
        """Batches for optimizer updates made from one sampled batch. Default: itself."""
        yield batch

    def loss(self, model: LM, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise NotImplementedError
