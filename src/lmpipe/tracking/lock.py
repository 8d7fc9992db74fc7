"""One process per run directory: ``<run dir>/.lock``, held with ``flock`` while it trains.

The kernel drops a ``flock`` when its process ends however it ends (SIGKILL, out of
memory), so a lock file left by a dead process is simply taken over; no pid has to be
judged alive. The file holds the pid of its holder, for the message that names it. It is
removed when the holder is done, so a run refused for bad input keeps no trace of it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmpipe.errors import ConfigError

LOCK_FILE = ".lock"


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.read_text().partition(" ")
    except OSError:
        return "another process"
    return f"process {pid.strip()} on {host.strip()}" if pid.strip() else "another process"


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{path.parent} is in use by {_holder(path)} (lmpipe trains a run in one "
                "process at a time): wait for it to end, or choose another run_name"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed while we waited for it
            return fd
        os.close(fd)


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; ConfigError naming the holder when another
    live process has it. Creates ``run_dir`` when missing."""
    if not enabled:
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the run directory {run_dir} ({exc.strerror})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiter sees a removed file
        os.close(fd)
