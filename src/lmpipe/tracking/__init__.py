"""Metric sinks. Every run writes ``metrics.jsonl``; console, W&B and TensorBoard are other
sinks of the same stream (``MetricLogger`` fans out to them)."""

from lmpipe.tracking.logger import MetricLogger, build_logger

__all__ = ["MetricLogger", "build_logger"]
