"""Fan one metric stream out to the configured sinks."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lmpipe.errors import ConfigError
from lmpipe.tracking.console import ConsoleSink
from lmpipe.tracking.jsonl import JsonlSink

SINKS = ("console", "wandb", "tensorboard")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class MetricLogger:
    """Sends ``{name: value}`` at a step to every sink; NaN/inf values are logged too."""

    def __init__(self, sinks: list[Sink], console: ConsoleSink | None = None):
        self.sinks = sinks
        self.console = console

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        for sink in self.sinks:
            sink.log(step, clean)

    def message(self, text: str) -> None:
        """A line for the user (console only; never interleaves with the progress bar)."""
        if self.console is not None:
            self.console.message(text)

    def progress(self, step: int, total: int, loss: float | None = None) -> None:
        if self.console is not None:
            self.console.progress(step, total, loss)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sink_names(cfg: dict) -> list[str]:
    """The sinks the ``logger`` config names, checked (before a run writes anything)."""
    names = list(cfg["sinks"])
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ConfigError(f"logger.sinks has unknown sink(s) {unknown}; known: {', '.join(SINKS)}")
    return names


def build_logger(
    cfg: dict, run_dir: Path, run_name: str, config: dict, enabled: bool = True
) -> MetricLogger:
    """Sinks from the ``logger`` config group; ``enabled=False`` (non-main ranks) logs nothing."""
    if not enabled:
        return MetricLogger([])
    names = sink_names(cfg)
    console = ConsoleSink() if "console" in names else None
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if console is not None:
        sinks.append(console)
    if "wandb" in names:
        from lmpipe.tracking.wandb_sink import WandbSink

        sinks.append(WandbSink(cfg.get("wandb") or {}, run_dir, run_name, config))
    if "tensorboard" in names:
        from lmpipe.tracking.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    return MetricLogger(sinks, console)
