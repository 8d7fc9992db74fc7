"""Checkpoints: one directory per step, written atomically, verified on load.

    checkpoints/step_000500/
      model.safetensors   weights only
      objective.safetensors  modules the objective trains (a value head), if any
      adapters.safetensors   a LoRA run's adapters (model.safetensors holds them merged)
      trainer_state.pt    optimizer, scaler, step (= sampler position); weights_only-loadable
      tokenizer.json      the tokenizer, with tokenizer_config.json (chat template)
      meta.json           written last: step, architecture, configs, hashes, file checksums

Everything is written into a hidden temporary sibling, fsynced and renamed into place, so a
checkpoint directory either is complete or does not exist. ``meta.json`` records the size
and sha256 of every other file, so truncation or corruption is detected on load.

``model.safetensors`` is always the model's own state dict, so every reader (init_from,
evaluate, generate, export) loads a LoRA run's checkpoint as a plain model. Its resume
rebuilds the frozen base from the checkpoint the stage started from (``init_checkpoint``
in meta.json) and loads the adapters, exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import Tensor, nn

from lmpipe.cli import one_line
from lmpipe.data.tokenizer import Tokenizer
from lmpipe.errors import CheckpointError
from lmpipe.models import LM, build_from_config_dict
from lmpipe.models.lora import adapter_state
from lmpipe.rundir import CHECKPOINT_DIR

FILES = ("model.safetensors", "trainer_state.pt", "tokenizer.json", "tokenizer_config.json")
MODULES_FILE = "objective.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
OPTIONAL_FILES = (MODULES_FILE, ADAPTERS_FILE)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SAVE_TMP = re.compile(r"^\.step_\d+\.tmp-\d+$")  # a save in progress, or cut short
HF_PREFIX = "hf:"  # a checkpoint named hf:<folder> is a Hugging Face model (lmpipe.hf)
# Tests only: "<checkpoint dir name>:<moment>" makes the writer SIGKILL its own process at
# that moment of a save (after a file, before or after the rename), so that a kill inside
# a save is a test case rather than a matter of luck.
KILL_IN_SAVE_ENV = "LMPIPE_TEST_KILL_IN_SAVE"
SAVE_MOMENTS = ("model.safetensors", "trainer_state.pt", "meta.json", "renamed")


def _reached(path: Path, moment: str) -> None:
    if os.environ.get(KILL_IN_SAVE_ENV) == f"{path.name}:{moment}":
        os.kill(os.getpid(), signal.SIGKILL)


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


def save_weights(weights: dict[str, Tensor], file: Path) -> None:
    """A model's state dict as safetensors; a tensor tied under several names (the
    embedding and the LM head) is stored once, under the first name (as safetensors'
    ``save_model`` does, and ``load_model`` expects)."""
    stored: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name in sorted(weights):
        tensor = weights[name]
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            continue  # tied to a name stored already
        seen.add(storage)
        stored[name] = tensor.detach().contiguous()
    save_file(stored, str(file))


def save_checkpoint(
    path: Path,
    *,
    weights: dict[str, Tensor],
    adapters: dict[str, Tensor] | None = None,
    trainer_state: dict,
    tokenizer: Tokenizer,
    meta: dict,
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Write a complete checkpoint at ``path`` (replacing one that is there) atomically.
    ``weights``: the model's full state dict (LoRA adapters merged in); ``adapters``: the
    LoRA adapters, to resume; ``modules``: what an objective trains besides the model, saved
    by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(weights, tmp / "model.safetensors")
        _reached(path, "model.safetensors")
        names = list(FILES)
        if adapters:
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / ADAPTERS_FILE))
            names.append(ADAPTERS_FILE)
        if modules:
            tensors = {
                f"{name}.{key}": value.detach().contiguous()
                for name, module in modules.items()
                for key, value in module.state_dict().items()
            }
            save_file(tensors, str(tmp / MODULES_FILE))
            names.append(MODULES_FILE)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _reached(path, "trainer_state.pt")
        tokenizer.save(tmp)
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in names
        }
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "files": files}, indent=2, default=str) + "\n"
        )
        _reached(path, "meta.json")
        for name in (*names, "meta.json"):
            _fsync(tmp / name)
        _fsync(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        _reached(path, "renamed")
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

    @property
    def reference(self) -> str:
        """What ``resolve_checkpoint`` opens it from again (recorded by the runs it starts)."""
        return str(self.path)

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

    def load_adapters(self, model: nn.Module) -> None:
        """Load a LoRA run's adapters (resume): the checkpoint has adapters exactly when the
        model has, with the same names and shapes."""
        saved = (
            load_file(str(self.path / ADAPTERS_FILE)) if ADAPTERS_FILE in self.meta["files"] else {}
        )
        wanted = adapter_state(model)
        if saved.keys() != wanted.keys() or any(
            saved[k].shape != v.shape for k, v in wanted.items()
        ):
            raise CheckpointError(
                f"{self.path}: its LoRA adapters ({len(saved)} tensors) do not fit the run's "
                f"finetune settings ({len(wanted)} tensors)"
            )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])

    def trainer_state(self) -> dict:
        try:
            return torch.load(self.path / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{self.path}/trainer_state.pt cannot be read ({exc})") from None

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)

    def path_in_meta(self, key: str, *roots: str | Path) -> Path | None:
        """The path meta.json records under ``key`` (None when it records none), if it
        lies inside one of ``roots``, symlinks followed: a checkpoint is data, and may not
        send a reader to a file of its choosing. CheckpointError when it lies outside."""
        recorded = self.meta.get(key)
        if not recorded:
            return None
        path = _folder(recorded).resolve()
        if any(path.is_relative_to(_folder(root).resolve()) for root in roots):
            return path
        where = " or ".join(str(root) for root in roots)
        raise CheckpointError(f"{self.path}: meta.json's {key}={recorded} lies outside {where}")


def _folder(reference: str | Path) -> Path:
    """The directory a checkpoint reference names (an HF folder without its ``hf:``)."""
    return Path(str(reference).removeprefix(HF_PREFIX))


def _check_meta(meta, meta_path: Path) -> None:
    """The fields every reader relies on, with their types (a crafted or damaged meta.json
    is refused here, not as a KeyError somewhere later)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not a JSON object")
    step = meta.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{meta_path}: global_step={step!r} is not a step number")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{meta_path} lists no files (its 'files' map is missing or empty)")
    for name, record in files.items():
        if not (
            isinstance(record, dict)
            and isinstance(record.get("bytes"), int)
            and isinstance(record.get("sha256"), str)
        ):
            raise CheckpointError(f"{meta_path}: the record of {name!r} has no bytes and sha256")
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{meta_path} has no model_config (which model it holds)")
    if not isinstance(model_config.get("model"), dict):
        raise CheckpointError(f"{meta_path}: model_config does not describe a model (no shape)")


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
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{meta_path} is unreadable ({exc})") from None
    _check_meta(meta, meta_path)
    files = meta["files"]
    if verify:
        for name in (*FILES, *(name for name in OPTIONAL_FILES if name in files)):
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
    """A checkpoint directory, a run directory (meaning its newest usable checkpoint), or
    ``hf:<folder>``: a Hugging Face model saved with ``save_pretrained`` (``lmpipe.hf``)."""
    if str(path).startswith(HF_PREFIX):
        from lmpipe.hf import hf_checkpoint

        return hf_checkpoint(str(path).removeprefix(HF_PREFIX))
    path = Path(path)
    if (path / "meta.json").is_file() or not (path / CHECKPOINT_DIR).is_dir():
        return load_checkpoint(path)
    checkpoint = latest_checkpoint(path, log)
    if checkpoint is None:
        raise CheckpointError(f"{path} is a run directory without checkpoints")
    return checkpoint


def remove_unfinished_saves(run_dir: Path) -> list[str]:
    """Remove the temporary directories of saves a killed process left behind; the caller
    holds the run's lock, so no other process is saving. Returns their names."""
    root = run_dir / CHECKPOINT_DIR
    found = sorted(p for p in root.iterdir() if _SAVE_TMP.match(p.name)) if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in found]


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
