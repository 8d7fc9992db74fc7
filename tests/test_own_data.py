"""Training on data the user already has: shipped mixtures pointed at local files
(``data.path``), a hub that cannot be reached, text files, held-out splits, and the plan
lines that say what became of records and of the tokenizer asked for."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from lmpipe.config import group_option
from lmpipe.data.local import with_local_paths
from lmpipe.data.prepare import prepare
from lmpipe.data.sources import iter_source
from lmpipe.errors import ConfigError, DataError

from conftest import TINY, assert_one_line_error, build_cpu_run, data_config, save_random_checkpoint

FILLER = " I have wondered about numbers for a long while now, and I would like to know."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Write {i} in words.", "input": "", "output": f"That is number {i}."}
        for i in range(n)
    ]


def hh_pairs(n: int, long_every: int = 0) -> list[dict]:
    """hh-rlhf transcripts; every ``long_every``-th prompt is long (it fills a short row)."""
    rows = []
    for i in range(n):
        context = FILLER if long_every and i % long_every == 0 else ""
        prompt = f"\n\nHuman:{context} What is {i} plus {i}?"
        rows.append(
            {
                "chosen": f"{prompt}\n\nAssistant: It is {2 * i}.",
                "rejected": f"{prompt}\n\nAssistant: It is {2 * i + 1}.",
            }
        )
    return rows


# --- data.path ---------------------------------------------------------------------------
def test_data_path_replaces_the_hub_source_of_a_shipped_mixture(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(60))
    cfg = {**group_option("data", "alpaca"), "path": str(path)}
    local = with_local_paths(cfg)
    (source,) = local["sources"]
    assert source["path"] == str(path)
    assert not {"hub", "split"} & source.keys() and "path" not in local
    assert source["filters"] == cfg["sources"][0]["filters"]  # what shapes records stays
    data = prepare(cfg, tmp_path / "cache", progress=False)
    assert data.manifest["splits"]["train"]["records"] + data.manifest["splits"]["val"][
        "records"
    ] == len(alpaca_rows(60))
    # The same dataset as the explicit source config: one cache entry.
    assert prepare(local, tmp_path / "cache", progress=False).directory == data.directory


def test_data_path_names_the_sources_of_a_mixture(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(10))
    mixture = group_option("data", "sft_general")
    local = with_local_paths({**mixture, "path": {"dolly": str(path)}})
    assert [s.get("path") for s in local["sources"]] == [None, str(path), None]
    assert local["sources"][0] == mixture["sources"][0]
    with pytest.raises(ConfigError, match=r"has 3 sources.*data.path=\{alpaca: <file>"):
        with_local_paths({**mixture, "path": str(path)})
    with pytest.raises(ConfigError, match="names no source 'wiki'.*alpaca, dolly, gsm8k"):
        with_local_paths({**mixture, "path": {"wiki": str(path)}})
    with pytest.raises(ConfigError, match="data.path.alpaca=None must be a file or glob"):
        with_local_paths({**mixture, "path": {"alpaca": None}})


# --- no hub --------------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "endpoint"])
def test_an_unreachable_hub_fails_fast_naming_data_path(tmp_path, monkeypatch, how):
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(switch, raising=False)
    if how == "endpoint":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    else:
        monkeypatch.setenv(how, "1")
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        prepare(group_option("data", "alpaca"), tmp_path, progress=False)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "tatsu-lab/alpaca" in message and "data.path=<file or glob>" in message
    assert "\n" not in message
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_the_command_line_says_it_in_one_line(lmpipe, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    proc = lmpipe("train", *TINY, "stage=sft", "data=sft_general", check=False)
    assert_one_line_error(proc, "lmpipe.train: error:", "'data.path={alpaca: <file>, dolly:")
    assert proc.returncode == 2


# --- text files ----------------------------------------------------------------------------
def test_a_text_file_is_paragraphs_or_lines_and_a_glob_is_files(tmp_path):
    stories = tmp_path / "stories.txt"
    stories.write_text("Tom had a cat.\nThe cat was red.\n\nAnn had a dog.\n\n\nThe end.\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    texts = lambda spec: [r["text"].strip() for r, _ in iter_source(spec)]  # noqa: E731
    assert texts({"path": str(stories)}) == [
        "Tom had a cat.\nThe cat was red.",
        "Ann had a dog.",
        "The end.",
    ]
    assert texts({"path": str(lines)}) == ["one", "two", "three"]
    assert len(texts({"path": str(tmp_path / "*.txt")})) == 2  # a file each
    assert len(texts({"path": str(stories), "text_unit": "file"})) == 1


def test_empty_splits_name_the_knob_that_fixes_them(tmp_path):
    from lmpipe.data.samplers import eval_windows

    one = tmp_path / "one.txt"
    one.write_text("x" * 50)
    cfg = {
        "name": "t",
        "sources": [{"name": "s", "path": str(one), "text_unit": "file"}],
        "split": {"by": "position", "val_fraction": 0.02},
        "tokenizer": {"kind": "char"},
    }
    data = prepare(cfg, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match=r"has 2 tokens.*data.split.val_fraction.*block_size"):
        eval_windows(data.split("val"), 64, 64, 2, 2)
    one.write_text("")
    with pytest.raises(DataError, match=r"no training records left.*val_fraction.*text_unit"):
        prepare(cfg, tmp_path / "cache", progress=False)


def test_empty_prompt_sets_name_the_knob_that_fixes_them(tmp_path):
    from lmpipe.data.samplers import PromptOptions, PromptSampler
    from lmpipe.eval.heldout import heldout_prompts

    path = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": f"Q{i}?", "answer": "A"} for i in range(9)]
    )
    cfg = {
        "name": "q",
        "sources": [{"name": "s", "path": str(path)}],
        "split": {"val_fraction": 0.0},
        "tokenizer": {"kind": "char"},
    }
    data = prepare(cfg, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match=r"no records \(data.split.val_fraction=0.0\)"):
        heldout_prompts(data, 4)
    options = PromptOptions(
        epoch_seed=0, epoch_shuffle=True, epoch_drop_last=True, max_prompt_tokens=8
    )
    with pytest.raises(DataError, match="lower trainer.batch_size or raise sampler.max_prompt"):
        PromptSampler([], 4, options, pad_id=0)


# --- runs from a checkpoint on local preference pairs ----------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A tiny random model on the demo mixture (byte-level BPE: encodes any text)."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return save_random_checkpoint(path, data_config("demo", 200), cache_dir)


def dpo_run(tmp_path, checkpoint, cache_dir, pairs: Path, *overrides: str):
    return build_cpu_run(
        tmp_path / "run",
        *TINY,
        "stage=dpo",
        "data=hh_rlhf",
        f"data.path={pairs}",
        f"init_from={checkpoint}",
        f"cache_dir={cache_dir}",
        "trainer.eval_batches=2",
        *overrides,
    )


def plan_line(plan: str, key: str) -> str:
    return next(line.strip() for line in plan.splitlines() if line.strip().startswith(key))


def test_local_pairs_hold_out_records_or_the_plan_says_loudly_there_are_none(
    tmp_path, checkpoint, cache_dir
):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(80))
    run = dpo_run(tmp_path, checkpoint, cache_dir, pairs)
    held = run.data.manifest["splits"]["val"]["records"]
    assert held == 4  # data.split.val_fraction=0.05 of conf/data/hh_rlhf.yaml
    assert run.trainer.val_sets["val"]
    assert (
        plan_line(run.plan, "held out") == "held out   4 val records, 1 batch(es) every 100 steps"
    )
    none = dpo_run(tmp_path, checkpoint, cache_dir, pairs, "data.split.val_fraction=0")
    assert not none.trainer.val_sets
    assert "NONE: data 'hh_rlhf' has no validation split" in plan_line(none.plan, "held out")


def test_the_plan_says_what_truncation_drops_and_the_block_size_keeping_95(
    tmp_path, checkpoint, cache_dir
):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(200, long_every=4))
    run = dpo_run(tmp_path, checkpoint, cache_dir, pairs, "trainer.block_size=24")
    sampling = plan_line(run.plan, "sampling")
    dropped = run.trainer.sampler.episodes.dropped["no_target_after_truncation"]
    total = run.data.manifest["splits"]["train"]["records"]
    assert f"no_target_after_truncation {dropped} ({dropped / total:.0%} of {total})" in sampling
    suggested = int(sampling.split("trainer.block_size=")[1].split()[0])
    assert 24 < suggested <= 64

    def drop_share(block_size: int) -> float:
        episodes = dpo_run(
            tmp_path, checkpoint, cache_dir, pairs, f"trainer.block_size={block_size}"
        ).trainer.sampler.episodes
        return episodes.dropped["no_target_after_truncation"] / len(episodes.starts)

    assert drop_share(suggested) <= 0.05 < drop_share(suggested - 1)


def test_a_tokenizer_asked_for_with_init_from_is_said_to_be_ignored(
    tmp_path, checkpoint, cache_dir
):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_pairs(40))
    run = dpo_run(tmp_path, checkpoint, cache_dir, pairs)  # hh_rlhf asks for bpe 8192
    note = plan_line(run.plan, "tokenizer")
    assert "data.tokenizer (kind=bpe vocab_size=8192) is ignored" in note
    assert f"vocab {run.data.tokenizer.vocab_size:,}" in note
    same = dpo_run(tmp_path, checkpoint, cache_dir, pairs, "data.tokenizer.vocab_size=512")
    assert "tokenizer  " not in same.plan  # the checkpoint's own (demo: bpe 512)


def test_a_bpe_vocabulary_smaller_than_asked_is_said(tmp_path, cache_dir):
    stories = tmp_path / "stories.txt"
    story = "Tom the cat number {} liked milk, and his sister liked the sun."
    stories.write_text("\n\n".join(story.format(i) for i in range(40)))
    run = build_cpu_run(
        tmp_path / "run",
        *TINY,
        "data=tinystories",
        f"data.path={stories}",
        f"cache_dir={cache_dir}",
        "trainer.block_size=16",
    )
    vocab = run.data.tokenizer.vocab_size
    assert vocab < 8192
    assert plan_line(run.plan, "tokenizer") == (
        f"tokenizer  BPE vocabulary {vocab:,}, not the 8,192 asked (data.tokenizer.vocab_size): "
        "the text is too small to learn more merges"
    )
    assert run.data.manifest["splits"]["val"]["records"] == 2  # 40 paragraphs, 5% held out
