"""The Python API: what the entrypoints do, callable from a notebook, a script or the web UI.

Every function is the code path of a command line, with the defaults of the same config
tree (``conf/``)::

    from lmpipe import api

    cfg = api.compose("train", ["model=tiny", "trainer.max_steps=50"])   # lmpipe.train's config
    run_dir = api.train(cfg)                                  # python -m lmpipe.train ...
    api.evaluate(run_dir, metrics=["perplexity"])            # python -m lmpipe.evaluate ...
    model = api.load(run_dir)                                 # its newest checkpoint
    model.generate("Ada has", temperature=0)                  # python -m lmpipe.generate ...

(The functions live here rather than on the ``lmpipe`` package itself because
``lmpipe.train``, ``lmpipe.prepare``, ``lmpipe.evaluate`` and ``lmpipe.generate`` are the
entrypoint modules.) User errors raise ``lmpipe.errors.LmpipeError`` subclasses with a
one-line message.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

from lmpipe.config import CONF_DIR
from lmpipe.errors import ConfigError
from lmpipe.rundir import register_resolvers
from lmpipe.tracking.jsonl import read_metrics
from lmpipe.tracking.runs import RunInfo
from lmpipe.tracking.runs import find_runs as find_runs_in

if TYPE_CHECKING:
    import torch

    from lmpipe.data.prepare import PreparedData
    from lmpipe.data.tokenizer import Tokenizer
    from lmpipe.models import LM
    from lmpipe.training.checkpoint import Checkpoint

__all__ = [
    "Model",
    "RunInfo",
    "compose",
    "evaluate",
    "find_runs",
    "load",
    "prepare",
    "read_metrics",
    "train",
]

SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # generate.yaml keys


def compose(config: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config an entrypoint (``train``, ``prepare``, ``evaluate``, ``generate``,
    ``chat``, ``pipeline``, ``ui``) composes from ``conf/`` with these command-line
    overrides (``--cfg job``: without Hydra's own settings)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmpipe.cli import one_line

    register_resolvers()
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app of lmpipe's: conf/ too
            return hydra_compose(config, list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config, list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"{config}: {one_line(exc)}") from None


def _config(config: DictConfig | Sequence[str], name: str) -> DictConfig:
    return config if isinstance(config, DictConfig) else compose(name, config)


def find_runs(out_dir: str | Path | None = None) -> list[RunInfo]:
    """The runs under ``out_dir`` (default: ``conf/ui.yaml``'s), newest first, with their
    stage, model, data, state (running, finished, failed, interrupted), step and last
    held-out metrics: the web UI's list of runs."""
    cfg = compose("ui")
    return find_runs_in(out_dir or cfg.out_dir, stale_after_s=cfg.stale_after_s)


def run_dir_of(cfg: DictConfig) -> Path:
    """Where ``train(cfg)`` writes: the rule of ``hydra.run.dir`` in ``conf/train.yaml``
    (a new version per run unless ``run_name`` names it; ``resume=auto``: the newest)."""
    hydra_run = OmegaConf.load(CONF_DIR / "train.yaml").hydra.run
    rule = OmegaConf.to_container(hydra_run, resolve=False)["dir"]
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe["_run_dir"] = rule
    OmegaConf.clear_cache(probe)  # the resolver caches within one config: resolve afresh
    return Path(probe["_run_dir"])


def train(config: DictConfig | Sequence[str] = ()) -> Path:
    """Train one stage (``python -m lmpipe.train``): a composed config or the overrides to
    compose one. Returns the run directory (its newest checkpoint is the result)."""
    from lmpipe.rundir import remove_if_empty
    from lmpipe.training.run import train as run_training

    cfg = _config(config, "train")
    run_dir = run_dir_of(cfg)
    try:
        return run_training(cfg, run_dir)
    finally:
        remove_if_empty(run_dir)


def prepare(config: DictConfig | Sequence[str] = ()) -> PreparedData:
    """Prepare (or find in the cache) a data mixture (``python -m lmpipe.prepare``)."""
    from lmpipe.data.prepare import prepare as prepare_data

    cfg = _config(config, "prepare")
    tokenizer = load_checkpoint(cfg.tokenizer_from).tokenizer() if cfg.tokenizer_from else None
    return prepare_data(
        OmegaConf.to_container(cfg.data, resolve=True),
        cfg.cache_dir,
        tokenizer=tokenizer,
        force=cfg.force,
        progress=False,
    )


def evaluate(checkpoint: str | Path, *, data: str | None = None, **settings) -> dict[str, float]:
    """Evaluate a checkpoint or run directory (``python -m lmpipe.evaluate``): ``data`` a
    mixture of ``conf/data`` (default: the run's own held-out data); ``settings`` override
    the ``eval.*`` keys of ``conf/evaluate.yaml`` (``metrics``, ``num_samples``, ...),
    ``cache_dir`` and ``device``."""
    from lmpipe.eval.runner import evaluate_checkpoint

    cfg = compose("evaluate", [f"data={data}"] if data else [])
    options = {
        **OmegaConf.to_container(cfg.eval, resolve=True),
        "cache_dir": cfg.cache_dir,
        "device": cfg.device,
    }
    del options["output"]  # results are returned, not written
    unknown = sorted(set(settings) - set(options))
    if unknown:
        raise ConfigError(f"evaluate: unknown setting(s) {unknown}; known: {sorted(options)}")
    options.update(settings)
    reference = options.pop("kl_reference")  # the ``kl`` metric's reference checkpoint
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if data else None
    return evaluate_checkpoint(
        load_checkpoint(checkpoint),
        data_cfg=data_cfg,
        progress=False,
        reference=reference,
        **options,
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or a run directory's newest usable checkpoint (verified)."""
    from lmpipe.training.checkpoint import resolve_checkpoint

    return resolve_checkpoint(path, log=lambda _: None)


@dataclass
class Model:
    """A checkpoint loaded to generate with. ``defaults``: the sampling settings of
    ``conf/generate.yaml``, which keyword arguments override."""

    checkpoint: Checkpoint
    lm: LM
    tokenizer: Tokenizer
    device: torch.device
    defaults: dict

    def stream(self, prompt: str | list[dict], *, chat: bool = False, **sampling) -> Iterator[str]:
        """The completion of ``prompt`` piece by piece as it is generated (AR streams token by
        token; diffusion yields its whole completion at the end). A list of messages
        (``{role, content}``), or a string with ``chat=True`` (one user turn), is a chat and
        the reply ends at the end of the assistant's turn; a plain string is continued."""
        from lmpipe.eval.generation import encode_prompt, stream_completion

        unknown = sorted(set(sampling) - set(SAMPLING))
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}; known: {list(SAMPLING)}")
        if chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids, stop_ids = encode_prompt(self.tokenizer, prompt)
        tokens = stream_completion(
            self.lm, ids, stop_ids=stop_ids, device=self.device, **{**self.defaults, **sampling}
        )
        return self.tokenizer.iter_decode(tokens)

    def generate(self, prompt: str | list[dict], *, chat: bool = False, **sampling) -> str:
        """The whole completion of ``prompt`` (see ``stream``)."""
        return "".join(self.stream(prompt, chat=chat, **sampling))


def load(checkpoint: str | Path | Checkpoint, device: str | None = None) -> Model:
    """Load a checkpoint (or a run directory's newest one) to generate with; ``device``
    as in ``conf/generate.yaml`` (``auto``: CUDA, then MPS, then the CPU)."""
    from lmpipe.training.checkpoint import Checkpoint
    from lmpipe.training.hardware import resolve_device

    defaults = compose("generate")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    target = resolve_device(device or defaults.device)
    return Model(
        checkpoint=checkpoint,
        lm=checkpoint.build_model().to(target),
        tokenizer=checkpoint.tokenizer(),
        device=target,
        defaults={key: defaults[key] for key in SAMPLING},
    )
