"""The always-on sink: one JSON object per log call in ``metrics.jsonl``. A value that is
not a finite number (a diverging step's loss) is written as null: the file stays JSON."""

from __future__ import annotations

import json
import math
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
        values = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        line = json.dumps({"step": step, "time": round(time.time(), 3), **values}, allow_nan=False)
        self._fh.write(line + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
