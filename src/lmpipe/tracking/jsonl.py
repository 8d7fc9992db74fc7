"""The always-on sink: one JSON object per log call in ``metrics.jsonl``."""

from __future__ import annotations

import json
import time
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl (empty when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlSink:
    def __init__(self, path: Path):
        self._fh = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
