"""Checkpoints: one directory per step, written atomically, verified on load.

    checkpoints/step_000500/
      model.safetensors   weights only
      objective.safetensors  modules the objective trains (a value head), if any
      trainer_state.pt    optimizer, scaler, step (= sampler position); weights_only-loadable
      tokenizer.json      the tokenizer, with tokenizer_config.json (chat template)
      meta.json           written last: step, architecture, configs, hashes, file checksums

Everything is written into a hidden temporary sibling, fsynced and renamed into place, so a
checkpoint directory either is complete or does not exist. ``meta.json`` records the size
and sha256 of every other file, so truncation or corruption is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from lmpipe.cli import one_line
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import CheckpointError
from lmpipe.models import LM, build_from_config_dict
from lmpipe.rundir import CHECKPOINT_DIR

FILES = ("model.safetensors", "trainer_state.pt", "tokenizer.json", "tokenizer_config.json")
MODULES_FILE = "objective.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    trainer_state: dict,
    tokenizer: Tokenizer,
    meta: dict,
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Write a complete checkpoint at ``path`` (replacing one that is there) atomically.
    ``modules``: what an objective trains besides the model, saved by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        names = list(FILES)
        if modules:
            tensors = {
                f"{name}.{key}": value.detach().contiguous()
                for name, module in modules.items()
                for key, value in module.state_dict().items()
            }
            save_file(tensors, str(tmp / MODULES_FILE))
            names.append(MODULES_FILE)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        tokenizer.save(tmp)
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in names
        }
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "files": files}, indent=2, default=str) + "\n"
        )
        for name in (*names, "meta.json"):
            _fsync(tmp / name)
        _fsync(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Checkpoint:
    """A verified checkpoint directory."""

    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["global_step"])

    def load_weights(self, model: nn.Module) -> None:
        """Load the weights into ``model`` (tied weights are stored once and re-shared)."""
        try:
            load_model(model, str(self.path / "model.safetensors"), strict=True)
        except Exception as exc:
            raise CheckpointError(
                f"{self.path}: weights do not fit the model ({one_line(exc)})"
            ) from None

    def build_model(self) -> LM:
        """The LM this checkpoint holds, with its weights (on the CPU, in eval mode)."""
        model = build_from_config_dict(self.meta["model_config"])
        self.load_weights(model)
        return model.eval()

    def module_states(self) -> dict[str, dict[str, Tensor]]:
        """The objective-owned modules' weights by module name (empty if it has none)."""
        if MODULES_FILE not in self.meta["files"]:
            return {}
        states: dict[str, dict[str, Tensor]] = {}
        for key, value in load_file(str(self.path / MODULES_FILE)).items():
            name, _, param = key.partition(".")
            states.setdefault(name, {})[param] = value
        return states

    def load_modules(self, modules: dict[str, nn.Module]) -> None:
        """Load the objective's modules (resume); each must be in the checkpoint."""
        states = self.module_states()
        for name, module in modules.items():
            if name not in states:
                raise CheckpointError(f"{self.path} has no weights for the objective's '{name}'")
            try:
                module.load_state_dict(states[name])
            except RuntimeError as exc:
                raise CheckpointError(
                    f"{self.path}: the objective's '{name}' does not fit ({one_line(exc)})"
                ) from None

    def trainer_state(self) -> dict:
        try:
            return torch.load(self.path / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self.path}/trainer_state.pt cannot be read ({exc})") from None

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory; with ``verify``, check every file against meta.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        int(meta["global_step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path} is unreadable ({exc})") from None
    if verify:
        for name in (*FILES, *([MODULES_FILE] if MODULES_FILE in files else [])):
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path} is incomplete: {name} is missing")
            if name not in files:
                raise CheckpointError(f"{meta_path} records no size or checksum for {name}")
            size = file.stat().st_size
            if size != files[name]["bytes"]:
                raise CheckpointError(
                    f"{file} is corrupt: {size} bytes, expected {files[name]['bytes']}"
                )
            if _sha256(file) != files[name]["sha256"]:
                raise CheckpointError(f"{file} is corrupt: checksum mismatch")
    return Checkpoint(path=path, meta=meta)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary ones excluded)."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest complete checkpoint of a run, skipping (and reporting) broken ones.

    None when the run has no checkpoints; an error when it has some but none is usable.
    """
    candidates = list_checkpoints(run_dir)
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log(f"skipping unusable checkpoint: {exc}")
    if candidates:
        raise CheckpointError(f"{run_dir}: none of its {len(candidates)} checkpoints is usable")
    return None


def resolve_checkpoint(path: str | Path, log: Callable[[str], None] = print) -> Checkpoint:
    """A checkpoint directory, or a run directory (meaning its newest usable checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file() or not (path / CHECKPOINT_DIR).is_dir():
        return load_checkpoint(path)
    checkpoint = latest_checkpoint(path, log)
    if checkpoint is None:
        raise CheckpointError(f"{path} is a run directory without checkpoints")
    return checkpoint


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
