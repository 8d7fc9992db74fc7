"""``status.json`` in a run directory: whether the run is running, finished, failed or
was interrupted, for anyone watching the run (the web UI) rather than the run itself.

The training process writes ``running`` with its process id once the run directory has
files, and its end: ``finished``, ``failed`` (with the one-line error) or ``interrupted``
(Ctrl-C). A process killed without a word (SIGKILL, out of memory) leaves ``running``
with the id of a process that is gone, which ``process_alive`` tells apart.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STATUS_FILE = "status.json"
STATES = ("running", "finished", "failed", "interrupted")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), which tells a
    process from a later one that reuses its id; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def read_status(run_dir: Path) -> dict | None:
    """The run's status record, or None when it has none (or an unreadable one)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("state") in STATES else None


def _write(run_dir: Path, status: dict) -> None:
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, path)  # readers see the old record or the new one, never half of one


def mark_running(run_dir: Path) -> None:
    """Record that this process is training the run (``started``: its first start)."""
    now = round(time.time(), 3)
    previous = read_status(run_dir) or {}
    _write(
        run_dir,
        {
            "state": "running",
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "host": socket.gethostname(),
            "started": previous.get("started", now),
            "updated": now,
        },
    )


def mark_ended(run_dir: Path, state: str, error: str | None = None) -> None:
    if state not in STATES[1:]:
        raise ValueError(f"state={state!r} is not one of {STATES[1:]}")
    status = read_status(run_dir) or {}
    _write(run_dir, {**status, "state": state, "error": error, "updated": round(time.time(), 3)})


@contextmanager
def recorded(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Record how the block ends in the run's ``status.json``: finished, failed (with the
    error on one line) or interrupted -- only where this process marked the run running
    (an attempt refused before that leaves the run's files as they were)."""
    from lmpipe.cli import one_line

    def end(state: str, error: str | None = None) -> None:
        status = read_status(run_dir) if enabled else None
        if status and status["state"] == "running" and status.get("pid") == os.getpid():
            mark_ended(run_dir, state, error)

    try:
        yield
    except KeyboardInterrupt:
        end("interrupted", "interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        end("failed", one_line(exc))
        raise
    end("finished")


def process_alive(status: dict) -> bool | None:
    """Whether the process a ``running`` record names still runs: None when it ran on
    another host (its process cannot be seen from here)."""
    if status.get("host") != socket.gethostname():
        return None
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    started = status.get("pid_start")
    return started is None or _process_start(pid) in (None, started)
