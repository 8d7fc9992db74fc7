"""The always-on sink: one JSON object per log call in ``metrics.jsonl``. A value that is
not a finite number (a diverging step's loss) is written as null: the file stays JSON."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def parse_records(data: bytes) -> tuple[list[dict], int]:
    """The records of the complete lines in ``data`` and how many bytes those lines take.

    A last line without its newline is still being written: it is left for a later read.
    A line that is not a JSON object (a write cut short by a kill, before a resume appended
    to it) is skipped, so one bad line never hides the others.
    """
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records, end


def read_metrics_from(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The records appended to a metrics file after byte ``offset`` and the offset to read
    on from (a file that shrank, i.e. was replaced, is read again from the start)."""
    try:
        with Path(path).open("rb") as fh:
            if offset > fh.seek(0, 2):
                offset = 0
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    records, used = parse_records(data)
    return records, offset + used


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (empty when there is none yet)."""
    return read_metrics_from(Path(run_dir) / "metrics.jsonl")[0]


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
