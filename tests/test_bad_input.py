"""A catalogue of bad input: each case gives one line on stderr, exit code 2, and leaves
every file as it was (only the data cache may gain an entry: it belongs to ``prepare``).

The cases run in this process through ``lmpipe.api`` and the CLI's own error layer
(``lmpipe.cli.user_errors``): what ``python -m lmpipe.train`` prints, without paying a
process start per case. The few that only Hydra's command line can show run as
subprocesses at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmpipe import api
from lmpipe.cli import user_errors
from lmpipe.data.prepare import prepare
from lmpipe.tracking.lock import run_lock

from conftest import TINY, assert_one_line_error, data_config, save_random_checkpoint

SMALL_DEMO = ["data.sources.0.num_records=1500", "data.sources.1.num_records=300"]
BASE = [*TINY, "hardware=cpu", "trainer.max_steps=4", "trainer.eval_batches=2"]


# --- what a case checks ---------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple | None]:
    """Every path under ``root``: a file's size, mtime and content hash; a directory's
    existence (its mtime moves with a lock file that comes and goes)."""
    found: dict[str, tuple | None] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
        else:
            found[str(path.relative_to(root))] = None
    return found


def fails_in_one_line(capsys, prog: str, action: Callable[[], object], *fragments: str) -> str:
    """``action`` inside the CLI's error layer: exit 2 and exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited, user_errors(prog):
        action()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _no_tracebacks(monkeypatch):
    monkeypatch.delenv("LMPIPE_TRACEBACK", raising=False)


# --- fixtures the cases start from ----------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A finished run with checkpoints at steps 2 and 4 (copied before a case uses it)."""
    out = tmp_path_factory.mktemp("trained")
    return api.train(
        [
            *BASE,
            *SMALL_DEMO,
            f"out_dir={out}",
            f"cache_dir={cache_dir}",
            "run_name=r",
            "trainer.save_interval=2",
        ]
    )


@pytest.fixture
def world(tmp_path, cache_dir, trained, monkeypatch) -> World:
    """Also a module that a crafted checkpoint names as its LM class: importing it would
    leave a file behind (and a module in sys.modules)."""
    world = World(tmp_path, cache_dir, trained)
    evil = world.file(
        f"{MARKER}.py", "import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
    )
    monkeypatch.syspath_prepend(str(evil.parent))
    return world


@dataclass
class World:
    """A case's files: ``tmp`` (out_dir ``runs``, anything a case writes) and the shared
    data cache (which may gain entries), plus a trained run to copy."""

    tmp: Path
    cache: Path
    trained: Path

    @property
    def out(self) -> Path:
        return self.tmp / "runs"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def run_copy(self, name: str = "r") -> Path:
        """A copy of the trained run as ``runs/<name>``."""
        target = self.out / name
        shutil.copytree(self.trained, target)
        return target

    def checkpoint(self, edit: Callable[[dict], None] | None = None) -> Path:
        """A copy of the trained run's newest checkpoint, its meta.json edited."""
        target = self.tmp / "inputs" / "ckpt"
        shutil.copytree(self.trained / "checkpoints" / "step_000004", target)
        if edit is not None:
            meta = json.loads((target / "meta.json").read_text())
            edit(meta)
            (target / "meta.json").write_text(json.dumps(meta))
        return target

    def train_args(self, *overrides: str) -> list[str]:
        """``lmpipe.train``'s overrides: a tiny model on a small demo mixture, unless the
        case names its own data."""
        data = [] if any(o.startswith("data=") for o in overrides) else SMALL_DEMO
        return [*BASE, *data, f"out_dir={self.out}", f"cache_dir={self.cache}", *overrides]


def _text_data(path: Path) -> list[str]:
    """A character-level text mixture of one file (``conf/data/shakespeare_char.yaml``)."""
    return ["data=shakespeare_char", f"data.sources.0.path={path}", "data.split.val_fraction=0.2"]


def _jsonl(w: World, lines: list[str], fmt: str = "auto") -> list[str]:
    path = w.file("records.jsonl", "\n".join(lines) + "\n")
    return [
        "stage=sft",
        "data=alpaca_seed_local",
        f"data.sources.0.path={path}",
        f"data.format={fmt}",
    ]


def _set(*pairs) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        for dotted, value in pairs:
            *parents, last = dotted.split(".")
            node = meta
            for part in parents:
                node = node[part]
            if value is _DELETE:
                node.pop(last)
            else:
                node[last] = value

    return edit


_DELETE = object()
MARKER = "lmpipe_evil_marker"


# --- the catalogue: lmpipe.train ------------------------------------------------------
# (id, overrides or a function of the World giving them, fragments of the one line)
TRAIN_CASES = [
    ("unknown-key", ["trainer.max_stepz=5"], ["unknown config key 'trainer.max_stepz'"]),
    ("unknown-group-option", ["arch=transformer"], ["no config 'arch/transformer'"]),
    ("unknown-model", ["model=huge"], ["no config 'model/huge'"]),
    ("unknown-stage", ["stage=nonesuch"], ["no config 'stage/nonesuch'"]),
    ("unknown-logger", ["logger=nonesuch"], ["no config 'logger/nonesuch'"]),
    ("lr-zero", ["optim.lr=0"], ["optim.lr=0 must be a finite number > 0"]),
    ("lr-negative", ["optim.lr=-1e-3"], ["optim.lr=-0.001"]),
    ("lr-inf", ["optim.lr=inf"], ["optim.lr=inf must be a finite number > 0"]),
    ("lr-nan", ["optim.lr=nan"], ["optim.lr=nan must be a finite number > 0"]),
    ("lr-text", ["optim.lr=fast"], ["optim.lr='fast'"]),
    ("weight-decay-negative", ["optim.weight_decay=-1"], ["optim.weight_decay=-1"]),
    ("weight-decay-nan", ["optim.weight_decay=nan"], ["optim.weight_decay=nan"]),
    ("grad-clip-negative", ["trainer.grad_clip=-1"], ["trainer.grad_clip=-1"]),
    ("grad-clip-inf", ["trainer.grad_clip=inf"], ["trainer.grad_clip=inf"]),
    ("max-steps-zero", ["trainer.max_steps=0"], ["trainer.max_steps=0 must be an integer >= 1"]),
    ("batch-size-zero", ["trainer.batch_size=0"], ["trainer.batch_size=0"]),
    ("batch-size-fraction", ["trainer.batch_size=2.5"], ["trainer.batch_size=2.5"]),
    ("log-interval-zero", ["trainer.log_interval=0"], ["trainer.log_interval=0"]),
    ("eval-batches-negative", ["trainer.eval_batches=-1"], ["trainer.eval_batches=-1"]),
    ("keep-last-zero", ["trainer.keep_last=0"], ["trainer.keep_last=0"]),
    ("max-bad-steps-zero", ["trainer.max_bad_steps=0"], ["trainer.max_bad_steps=0"]),
    ("seed-text", ["seed=abc"], ["seed='abc' must be an integer"]),
    ("block-size-too-long", ["trainer.block_size=4096"], ["is larger than the model supports"]),
    ("heads-do-not-divide", ["model.n_head=3"], ["divisible"]),
    ("d-model-zero", ["model.d_model=0"], ["model.d_model=0"]),
    ("dropout-over-one", ["model.dropout=1.5"], ["model.dropout=1.5"]),
    ("mlp-unknown", ["model.mlp=relu"], ["model.mlp='relu' is not one of"]),
    ("model-unknown-key", ["+model.n_experts=8"], ["model config has unknown keys: n_experts"]),
    ("device-unknown", ["hardware.device=tpu"], ["hardware.device='tpu'"]),
    ("precision-unknown", ["hardware.precision=fp8"], ["hardware.precision='fp8'"]),
    ("micro-batch-zero", ["hardware.micro_batch_size=0"], ["hardware.micro_batch_size=0"]),
    ("strategy-unknown", ["hardware.strategy=magic"], ["hardware.strategy='magic'"]),
    ("fsdp-fp16", ["hardware=fsdp", "hardware.precision=fp16"], ["fsdp computes in bf16 or fp32"]),
    (
        "fsdp-objective-with-a-head",
        ["hardware=fsdp", "stage=rm", "data=demo_pref"],
        ["hardware.strategy=fsdp cannot train stage objective 'rm' yet", "use hardware=ddp"],
    ),
    (
        "fsdp-muon",
        ["hardware=fsdp", "optim=muon"],
        ["hardware.strategy=fsdp gathers AdamW's state only", "optim=adamw"],
    ),
    (
        "fsdp-lora",
        ["hardware=fsdp", "finetune=lora"],
        ["hardware.strategy=fsdp trains every weight (finetune=full)", "use hardware=ddp"],
    ),
    (
        "ddp-without-torchrun",
        ["hardware=ddp"],
        ["hardware.strategy=ddp runs one process per device", "torchrun --nproc_per_node"],
    ),
    (
        "fsdp-without-torchrun",
        ["hardware=fsdp"],
        ["hardware.strategy=fsdp runs one process per device", "torchrun --nproc_per_node"],
    ),
    ("muon-lr-zero", ["optim=muon", "optim.muon.lr=0"], ["optim.muon.lr=0"]),
    ("schedule-unknown", ["schedule.name=step"], ["schedule.name='step'"]),
    ("warmup-ratio-over-one", ["schedule.warmup_ratio=1.5"], ["schedule.warmup_ratio=1.5"]),
    ("warmup-longer-than-run", ["schedule.warmup_steps=100"], ["schedule.warmup_steps=100"]),
    ("min-lr-ratio-over-one", ["schedule.min_lr_ratio=2"], ["schedule.min_lr_ratio=2"]),
    ("optimizer-unknown", ["optim.name=sgd"], ["optim.name='sgd'"]),
    ("betas-out-of-range", ["optim.betas=[0.9,1.5]"], ["optim.betas=[0.9, 1.5]"]),
    ("sampler-unknown", ["sampler.kind=magic"], ["sampler.kind=magic"]),
    ("sink-unknown", ["logger.sinks=[nonesuch]"], ["logger.sinks has unknown sink(s)"]),
    ("lm-class-missing", ["arch._target_=no.such.LM"], ["is not an importable class"]),
    ("lm-class-not-an-lm", ["arch._target_=collections.OrderedDict"], ["not an lmpipe LM"]),
    ("sft-on-text", ["stage=sft"], ["trains on", "but data=demo is text data"]),
    ("dpo-without-init", ["stage=dpo"], ["pass init_from="]),
    ("resume-missing", ["resume=/no/such/checkpoint"], ["resume='/no/such/checkpoint'"]),
    ("init-from-missing", ["init_from=/no/such/run"], ["checkpoint not found: /no/such/run"]),
    ("init-from-hf-missing", ["init_from=hf:/no/such/model"], ["HF model folder not found"]),
    (
        "init-from-hf-without-config",
        lambda w: [f"init_from=hf:{w.file('empty/x.txt', 'x').parent}"],
        ["has no config.json (not a save_pretrained folder)"],
    ),
    (
        "init-from-hf-bert",
        lambda w: [
            "init_from=hf:"
            + str(w.file("bert/config.json", json.dumps({"model_type": "bert"})).parent)
        ],
        ["model_type='bert' cannot be imported"],
    ),
    (
        "init-from-not-a-checkpoint",
        lambda w: [f"init_from={w.file('x.txt', 'x').parent}"],
        ["is not a checkpoint (no meta.json)"],
    ),
    ("run-name-traversal", ["run_name=../../x"], ["run_name='../../x' must be a plain"]),
    ("run-name-nested", ["run_name=a/b"], ["run_name='a/b'"]),
    ("run-name-dot-dot", ["run_name=.."], ["run_name='..'"]),
    ("data-name-traversal", ["data.name=../../x"], ["'ar-../../x-tiny-pretrain' must be a plain"]),
    (
        "data-name-traversal-named-run",
        ["data.name=../../x", "run_name=ok"],
        ["data.name='../../x' must be a plain name"],
    ),
    ("data-no-sources", ["data.sources=[]"], ["data.sources is empty"]),
    ("data-ratio-negative", ["data.sources.0.mix_ratio=-1"], ["mix_ratio=-1"]),
    ("data-ratios-not-one", ["data.sources.0.mix_ratio=0.5"], ["mix_ratio values sum to"]),
    ("data-format-unknown", ["data.format=yaml"], ["data.format='yaml'"]),
    ("tokenizer-unknown", ["data.tokenizer.kind=word"], ["data.tokenizer.kind='word'"]),
    ("adapter-unknown", ["+data.sources.0.adapter=nope"], ["unknown adapter 'nope'"]),
    ("filter-unknown", ["+data.sources.0.filters=[{name: nope}]"], ["nope"]),
    ("total-records-zero", ["+data.total_records=0"], ["data.total_records=0"]),
    ("source-two-loaders", ["+data.sources.0.hub=x/y"], ["must set exactly one of"]),
    (
        "data-file-missing",
        ["data=shakespeare_char", "data.sources.0.path=/no/such/input.txt"],
        ["file not found: /no/such/input.txt"],
    ),
    (
        "data-file-empty",
        lambda w: _text_data(w.file("empty.txt", "")),
        ["no training records left"],
    ),
    (
        "jsonl-broken-line",
        lambda w: _jsonl(w, ['{"instruction": "a", "output": "b"}', "{"]),
        ["records.jsonl:2: invalid JSON"],
    ),
    (
        "jsonl-not-an-object",
        lambda w: _jsonl(w, ['{"instruction": "a", "output": "b"}', "[1, 2]"]),
        ["records.jsonl:2", "expected a JSON object"],
    ),
    (
        "chat-unknown-role",
        lambda w: _jsonl(w, ['{"messages": [{"role": "wizard", "content": "x"}]}'], "chat"),
        ["records.jsonl:1", "wizard"],
    ),
    (
        "format-undetectable",
        lambda w: _jsonl(w, ['{"foo": "bar"}']),
        ["records.jsonl:1: cannot detect the record format"],
    ),
    ("not-utf8", lambda w: _text_data(w.file("latin.txt", b"caf\xe9 " * 50)), ["not valid UTF-8"]),
    ("out-dir-is-a-file", lambda w: [f"out_dir={w.file('f', '')}"], ["cannot be a directory"]),
    (
        "out-dir-under-a-file",
        lambda w: [f"out_dir={w.file('g', '')}/runs"],
        ["cannot be a directory"],
    ),
    ("cache-dir-is-a-file", lambda w: [f"cache_dir={w.file('c', '')}"], ["cache_dir="]),
    # checkpoints a stage starts from
    (
        "init-from-truncated-weights",
        lambda w: [f"init_from={_truncate(w.checkpoint() / 'model.safetensors')}"],
        ["model.safetensors is corrupt"],
    ),
    (
        "meta-without-model-config",
        lambda w: [f"init_from={w.checkpoint(_set(('model_config', _DELETE)))}"],
        ["has no model_config"],
    ),
    (
        "meta-with-empty-files",
        lambda w: [f"init_from={w.checkpoint(_set(('files', {})))}"],
        ["lists no files"],
    ),
    (
        "meta-not-json",
        lambda w: [f"init_from={_write(w.checkpoint() / 'meta.json', '{')}"],
        ["meta.json is unreadable"],
    ),
    (
        "meta-step-not-a-number",
        lambda w: [f"init_from={w.checkpoint(_set(('global_step', 'x')))}"],
        ["global_step='x'"],
    ),
    (
        "meta-foreign-class",
        lambda w: [f"init_from={w.checkpoint(_set(('model_config.lm_class', MARKER + '.LM')))}"],
        ["lm_class='lmpipe_evil_marker.LM' is not an lmpipe LM class"],
    ),
    (
        "meta-not-an-lm",
        lambda w: [
            f"init_from={w.checkpoint(_set(('model_config.lm_class', 'lmpipe.models.base.TokenScores')))}"
        ],
        ["is not an lmpipe LM class"],
    ),
    (
        "meta-shape-missing",
        lambda w: [f"init_from={w.checkpoint(_set(('model_config.model', _DELETE)))}"],
        ["model_config does not describe a model"],
    ),
    (
        "arch-mismatch",
        lambda w: ["arch=diffusion", f"init_from={w.checkpoint()}"],
        ["architecture mismatch"],
    ),
    # resuming a run
    ("run-exists-without-resume", lambda w: [f"run_name={w.run_copy().name}"], ["resume=auto"]),
    (
        "resume-with-other-batch-size",
        lambda w: [f"run_name={w.run_copy().name}", "resume=auto", "trainer.batch_size=4"],
        ["trainer.batch_size (8 -> 4)", "resume_changed=true"],
    ),
    (
        "resume-with-other-data",
        lambda w: [f"run_name={w.run_copy().name}", "resume=auto", "data.seed=7"],
        ["data.seed (1234 -> 7)"],
    ),
    (
        "resume-with-other-model",
        lambda w: [f"run_name={w.run_copy().name}", "resume=auto", "model.dropout=0.2"],
        ["model.dropout (0.0 -> 0.2)"],
    ),
    (
        "resume-all-checkpoints-broken",
        lambda w: [f"run_name={_break_all(w.run_copy()).name}", "resume=auto"],
        ["none of its 2 checkpoints is usable"],
    ),
    (
        "resume-foreign-init-checkpoint",
        lambda w: [
            f"run_name={_meta(w.run_copy(), init_checkpoint=str(w.checkpoint())).name}",
            "resume=auto",
        ],
        ["meta.json's init_checkpoint=", "lies outside"],
    ),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:1000])
    return path.parent


def _break_all(run_dir: Path) -> Path:
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"garbage")
    return run_dir


def _meta(run_dir: Path, **changes) -> Path:
    """Edit meta.json of every checkpoint of ``run_dir`` (a crafted run)."""
    for checkpoint in (run_dir / "checkpoints").iterdir():
        meta = json.loads((checkpoint / "meta.json").read_text())
        (checkpoint / "meta.json").write_text(json.dumps({**meta, **changes}))
    return run_dir


@pytest.mark.parametrize(
    ("overrides", "fragments"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_train_refuses_bad_input_in_one_line(world, capsys, overrides, fragments):
    args = overrides(world) if callable(overrides) else overrides
    before = snapshot(world.tmp)
    fails_in_one_line(
        capsys, "lmpipe.train", lambda: api.train(world.train_args(*args)), *fragments
    )
    assert snapshot(world.tmp) == before
    assert MARKER not in sys.modules  # a checkpoint's class name is never imported


def test_the_catalogue_is_large():
    assert len(TRAIN_CASES) + len(EVALUATE_CASES) + len(CLI_CASES) + 4 >= 60


# --- the catalogue: lmpipe.evaluate of crafted checkpoints ------------------------------
def _own_data(w: World, **source) -> Callable[[dict], None]:
    """Meta whose training data is no longer cached and whose config names ``source``."""

    def edit(meta: dict) -> None:
        meta.pop("data_dir")
        meta["train_config"]["data"]["sources"] = [{"name": "s", "mix_ratio": 1.0, **source}]

    return edit


EVALUATE_CASES = [
    ("checkpoint-missing", lambda w: "/no/such/checkpoint", {}, ["checkpoint not found"]),
    ("metric-unknown", lambda w: w.checkpoint(), {"metrics": ["nope"]}, ["unknown metric 'nope'"]),
    ("num-samples-zero", lambda w: w.checkpoint(), {"num_samples": 0}, ["eval.num_samples=0"]),
    (
        "data-name-traversal",
        lambda w: w.checkpoint(
            _set(("data_dir", _DELETE), ("train_config.data.name", "../../escaped"))
        ),
        {},
        ["data.name='../../escaped' must be a plain name"],
    ),
    (
        "data-reads-a-local-file",
        lambda w: w.checkpoint(_own_data(w, path=str(w.file("secret.txt", "the secret " * 99)))),
        {},
        ["reads no files or hub datasets a checkpoint names"],
    ),
    (
        "data-path-reads-a-local-file",
        lambda w: w.checkpoint(
            _set(
                ("data_dir", _DELETE),
                ("train_config.data.path", {"stories": str(w.file("secret.txt", "secret " * 99))}),
            )
        ),
        {},
        ["reads no files or hub datasets a checkpoint names (sources: stories)"],
    ),
    (
        "data-from-the-hub",
        lambda w: w.checkpoint(_own_data(w, hub="someone/dataset")),
        {},
        ["reads no files or hub datasets a checkpoint names"],
    ),
    (
        "data-dir-outside-the-cache",
        lambda w: w.checkpoint(_data_dir_elsewhere(w)),
        {},
        ["reads no files or hub datasets a checkpoint names"],
    ),
    (
        "no-training-data",
        lambda w: w.checkpoint(_set(("data_dir", _DELETE), ("train_config", _DELETE))),
        {},
        ["meta.json names no training data"],
    ),
    (
        "foreign-class",
        lambda w: w.checkpoint(_set(("model_config.lm_class", f"{MARKER}.LM"))),
        {},
        ["is not an lmpipe LM class"],
    ),
    (
        "no-model-config",
        lambda w: w.checkpoint(_set(("model_config", _DELETE))),
        {},
        ["has no model_config"],
    ),
    (
        "empty-files",
        lambda w: w.checkpoint(_set(("files", {}))),
        {},
        ["lists no files"],
    ),
]


def _data_dir_elsewhere(w: World) -> Callable[[dict], None]:
    """Meta whose data_dir is a prepared dataset outside cache_dir (a copy of the real
    one: were it opened, evaluation would succeed) and whose config reads a local file."""
    meta = json.loads((w.trained / "checkpoints" / "step_000004" / "meta.json").read_text())
    elsewhere = shutil.copytree(meta["data_dir"], w.tmp / "inputs" / "data_copy")

    def edit(meta: dict) -> None:
        _own_data(w, path="/etc/hostname")(meta)
        meta["data_dir"] = str(elsewhere)

    return edit


@pytest.mark.parametrize(
    ("checkpoint", "settings", "fragments"),
    [c[1:] for c in EVALUATE_CASES],
    ids=[c[0] for c in EVALUATE_CASES],
)
def test_evaluate_refuses_bad_or_crafted_checkpoints_in_one_line(
    world, capsys, checkpoint, settings, fragments
):
    path = checkpoint(world)
    before = snapshot(world.tmp)
    options = {"cache_dir": str(world.cache), "device": "cpu", "num_samples": 4, **settings}
    fails_in_one_line(capsys, "lmpipe.evaluate", lambda: api.evaluate(path, **options), *fragments)
    assert snapshot(world.tmp) == before
    assert MARKER not in sys.modules
    assert not list(Path(world.cache).glob("data/*escaped*"))
    assert not (world.cache.parent / "escaped").exists()


# --- the same layer seen through the real command line (Hydra's own composition) -------
CLI_CASES = [
    ("unknown-key", ["trainer.max_stepz=5"], ["unknown config key 'trainer.max_stepz'"]),
    ("lm-class-missing", ["arch._target_=no.such.LM"], ["arch._target_='no.such.LM'"]),
    ("run-name-traversal", ["run_name=../../x"], ["run_name='../../x' must be a plain"]),
    ("out-dir-is-a-file", ["out_dir=afile"], ["out_dir='afile' cannot be a directory"]),
]


@pytest.mark.parametrize(
    ("args", "fragments"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_the_command_line_says_one_line_too(lmpipe, tmp_path, args, fragments):
    (tmp_path / "afile").write_text("")
    before = snapshot(tmp_path)
    proc = lmpipe("train", *TINY, "out_dir=runs", *args, check=False)
    assert_one_line_error(proc, "lmpipe.train: error:", *fragments)
    assert proc.returncode == 2
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "system=Be brief, kind",
            "for one text, quote the value inside the override, e.g. "
            """'system="Be brief, kind"'""",
        ),
        ("prompt=Bob's cat", "cannot parse prompt=Bob's cat (a quote or bracket in it?); quote"),
        ('prompt=say "hi"', "or prompt_file=<path>, or prompt=- to read it from stdin"),
    ],
)
def test_a_value_hydra_cannot_read_says_how_to_quote_it(capsys, override, fragment):
    fails_in_one_line(
        capsys, "lmpipe.generate", lambda: api.compose("generate", [override]), fragment
    )


# --- cases with a setup of their own ------------------------------------------------------
def test_a_character_tokenizer_names_the_characters_it_never_saw(world, capsys):
    """A char-level checkpoint meets data with characters outside its vocabulary (the
    realistic tokenizer mismatch): which characters, and where the first one is."""
    known = world.file("known.txt", "abc abc\n" * 200)
    data_cfg = OmegaConf.to_container(api.compose("train", _text_data(known)).data)
    checkpoint = save_random_checkpoint(world.tmp / "inputs" / "char", data_cfg, world.cache)
    unseen = world.file("unseen.txt", "abc abc\n" * 200 + "zebra café\n" * 50)
    before = snapshot(world.tmp)
    line = fails_in_one_line(
        capsys,
        "lmpipe.train",
        lambda: api.train(world.train_args(*_text_data(unseen), f"init_from={checkpoint}")),
        "has no token for 5 character(s)",
        "'z'",
        "'é'",
        "source 'tinyshakespeare'",
    )
    assert "first in train record" in line or "first in val record" in line
    assert snapshot(world.tmp) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write, even as root (chattr +i), or a skip."""
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):  # root: permissions do not stop it
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("cannot make a directory read-only for this user (root without chattr)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


@pytest.mark.parametrize("key", ["out_dir", "cache_dir"])
def test_a_read_only_out_dir_or_cache_dir_is_one_line(world, capsys, read_only_dir, key):
    target = read_only_dir / "sub"
    args = world.train_args("run_name=ro", "data.seed=99")  # data not in the cache yet
    fails_in_one_line(
        capsys, "lmpipe.train", lambda: api.train([*args, f"{key}={target}"]), f"{key}="
    )
    assert not target.exists()


def test_a_run_in_use_is_refused_naming_its_process_and_a_dead_ones_lock_is_taken(world, capsys):
    run_dir = world.run_copy()
    args = world.train_args("run_name=r", "resume=auto", "trainer.max_steps=6")
    with run_lock(run_dir):
        before = snapshot(world.tmp)
        fails_in_one_line(
            capsys, "lmpipe.train", lambda: api.train(args), f"in use by process {os.getpid()}"
        )
        assert snapshot(world.tmp) == before
    # A lock file whose process died (SIGKILL leaves it): taken over, and removed after.
    (run_dir / ".lock").write_text("999999999 elsewhere\n")
    (run_dir / "checkpoints" / ".step_000006.tmp-999999999").mkdir()
    api.train(args)
    out = capsys.readouterr().out
    assert "removed the unfinished save(s) of a killed process: .step_000006.tmp-999999999" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "step_000006"
    assert not (run_dir / ".lock").exists()


def test_resume_changed_continues_with_the_new_settings_and_says_which(world, capsys):
    run_dir = world.run_copy()
    api.train(
        world.train_args(
            "run_name=r",
            "resume=auto",
            "resume_changed=true",
            "trainer.max_steps=6",
            "optim.lr=1e-3",
        )
    )
    out = capsys.readouterr().out
    assert "resuming with changed settings (resume_changed=true): optim.lr (0.003 -> 0.001)" in out
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


def test_a_run_resumes_with_activation_checkpointing_switched_on(world, capsys):
    """It changes the memory a step takes, not what it computes: no refusal, and the
    resumed model recomputes its blocks (its checkpoints say so)."""
    run_dir = world.run_copy()
    api.train(
        world.train_args(
            "run_name=r",
            "resume=auto",
            "trainer.max_steps=6",
            "model.activation_checkpointing=true",
        )
    )
    assert "changed settings" not in capsys.readouterr().out
    meta = json.loads((run_dir / "checkpoints" / "step_000006" / "meta.json").read_text())
    assert meta["model_config"]["model"]["activation_checkpointing"] is True


def test_a_resume_on_other_numerics_says_so(world, capsys):
    """Bitwise-exact resume assumes the same torch build, device, precision and threads."""
    world.run_copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        api.train(world.train_args("run_name=r", "resume=auto", "trainer.max_steps=6"))
    finally:
        torch.set_num_threads(threads)
    assert f"resuming with other numerics (threads {threads} -> {threads + 1})" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "missing"])
def test_a_damaged_cache_entry_is_rebuilt_saying_so(tmp_path, damage):
    """A cached ``tokens_train.bin`` truncated to 1,000 bytes (or a block of it
    overwritten, or the file gone) is not trained on: the entry is rebuilt, saying so."""
    cfg = data_config("demo", 300)
    first = prepare(cfg, tmp_path, progress=False, log=pytest.fail)
    tokens = first.directory / "tokens_train.bin"
    original = tokens.read_bytes()
    assert len(original) > 1000
    if damage == "truncated":
        tokens.write_bytes(original[:1000])
    elif damage == "overwritten":  # same size: only the checksum can tell
        tokens.write_bytes(original[:100] + bytes(len(original) - 200) + original[-100:])
    else:
        tokens.unlink()
    said: list[str] = []
    again = prepare(cfg, tmp_path, progress=False, log=said.append)
    assert again.directory == first.directory
    assert tokens.read_bytes() == original
    assert len(said) == 1 and said[0].startswith("rebuilding a damaged cache entry: ")
    assert "tokens_train.bin" in said[0]


def test_an_option_added_since_a_checkpoint_was_saved_is_unchanged_while_off():
    from lmpipe.training.resume import changed_settings

    saved = {"model": {"n_layer": 2}, "trainer": {"max_steps": 5}}
    now = {
        "model": {"n_layer": 2, "qkv_bias": False},
        "trainer": {"max_steps": 5, "max_time": None},
    }
    assert changed_settings(saved, now) == []
    now["model"]["qkv_bias"] = True
    assert changed_settings(saved, now) == ["model.qkv_bias ((none) -> True)"]
