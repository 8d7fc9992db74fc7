"""Chat over HTTP: checkpoints kept loaded, a reply streamed as server-sent events.

A request carries the whole conversation (the page keeps it), which goes through the
checkpoint's chat template each turn, as in ``python -m lmpipe.chat``; the sampling seed
of turn *n* is ``seed + n``, as there. Stopping a reply is closing the stream: the server
generates no token after the one in progress.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from lmpipe import api
from lmpipe.cli import one_line
from lmpipe.errors import LmpipeError
from lmpipe.tracking.runs import STEP_DIR, NotInside, checkpoint_steps, inside
from lmpipe.ui.details import run_dir
from lmpipe.ui.events import sse

NULLABLE = ("top_k", "top_p")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """A turn: the conversation so far and the sampling settings. A setting left out is
    ``conf/chat.yaml``'s; ``top_k``/``top_p`` given as null are off."""

    run: str
    checkpoint: str | None = None  # step_NNNNNN; None: the run's newest
    messages: list[Message] = Field(min_length=1)
    mode: Literal["chat", "text"] = "chat"  # text: continue the last message as a document
    max_new_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None

    def sampling(self, defaults: dict) -> dict:
        chosen = {}
        for key in api.SAMPLING:
            value = getattr(self, key)
            given = key in self.model_fields_set and (value is not None or key in NULLABLE)
            chosen[key] = value if given else defaults[key]
        chosen["seed"] += sum(m.role == "assistant" for m in self.messages)  # seed + turn
        return chosen

    def prompt(self) -> str | list[dict]:
        if self.mode == "text":
            return self.messages[-1].content
        return [m.model_dump() for m in self.messages]


def checkpoint_path(root: Path, run: str, name: str | None) -> Path:
    """A checkpoint directory of a run under ``root`` (``name`` None: the newest)."""
    directory = run_dir(root, run)
    if name is None:
        steps = checkpoint_steps(directory)
        if not steps:
            raise NotInside(f"run {run!r} has no checkpoints")
        return steps[-1][1]
    if not STEP_DIR.match(name):
        raise NotInside(f"not a checkpoint name: {name!r}")
    path = inside(root, f"{run}/checkpoints/{name}")
    if not path.is_dir():
        raise NotInside(f"run {run!r} has no checkpoint {name!r}")
    return path


class ModelCache:
    """The checkpoints loaded last (at most ``size``), each verified once when loaded."""

    def __init__(self, device: str, size: int):
        self.device = device
        self.size = max(1, size)
        self._models: OrderedDict[tuple, api.Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> api.Model:
        key = (str(path), (path / "meta.json").stat().st_mtime_ns)
        with self._lock:
            if key not in self._models:
                self._models[key] = api.load(path, device=self.device)
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]


def reply_events(model: api.Model, request: ChatRequest, defaults: dict) -> Iterator[str]:
    """``token`` events with the reply's text piece by piece (a token that decodes to no text,
    e.g. a special one, is an empty piece), then ``done`` (or ``error``)."""
    started = time.perf_counter()
    pieces = 0
    try:
        for piece in model.stream(request.prompt(), **request.sampling(defaults)):
            pieces += 1
            yield sse("token", {"text": piece})
    except LmpipeError as exc:
        yield sse("error", {"message": one_line(exc)})
        return
    seconds = time.perf_counter() - started
    yield sse("done", {"pieces": pieces, "seconds": round(seconds, 3)})
