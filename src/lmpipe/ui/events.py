"""Server-sent events: the wire format, and a run's metrics followed as they are written."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from lmpipe.tracking.jsonl import read_metrics_from
from lmpipe.tracking.runs import current_state, file_inside, summarize
from lmpipe.ui.details import finite

PING_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


def sse(event: str, data, event_id: int | None = None) -> str:
    """One event: ``event``, ``data`` as JSON (NaN as null), and an ``id`` that a reconnecting
    EventSource sends back as Last-Event-ID."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(finite(data), separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


async def follow_run(
    root: Path, run_dir: Path, offset: int, poll_s: float, stale_after_s: float
) -> AsyncIterator[str]:
    """Events for a run page, until the client goes: ``metrics`` with the records appended
    after byte ``offset`` of metrics.jsonl (complete lines only; the id is the offset to
    resume from), and ``status`` (the run's summary) whenever its state or checkpoints
    change. Each poll reads only what was appended, and the state from a few small files."""
    shown = None
    last_sent = time.monotonic()
    metrics = run_dir / "metrics.jsonl"
    while True:
        records: list[dict] = []
        if file_inside(root, metrics):
            records, offset = read_metrics_from(metrics, offset)
        if records:
            yield sse("metrics", {"records": records, "offset": offset}, event_id=offset)
            last_sent = time.monotonic()
        state = current_state(root, run_dir, stale_after_s)
        if state != shown:
            shown = state
            yield sse("status", summarize(root, run_dir, stale_after_s).to_dict())
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent > PING_S:
            yield ": ping\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll_s)
