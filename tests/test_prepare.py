import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmpipe.data.mixer import allocate_slots, plan_mixture
from lmpipe.data.prepare import prepare
from lmpipe.errors import ConfigError, DataError


def demo_cfg(**changes) -> dict:
    cfg = {
        "name": "demo-test",
        "format": "text",
        "sources": [
            {"name": "stories", "builtin": "stories", "num_records": 300, "mix_ratio": 1.0}
        ],
        "split": {"by": "record", "val_fraction": 0.1},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "seed": 7,
    }
    cfg.update(changes)
    return cfg


def jsonl_cfg(path: Path, **changes) -> dict:
    return demo_cfg(
        sources=[{"name": "local", "path": str(path), "mix_ratio": 1.0}],
        tokenizer={"kind": "char"},
        **changes,
    )


def test_outputs_are_consistent_and_inspectable(tmp_path):
    data = prepare(demo_cfg(), tmp_path, progress=False)
    names = {p.name for p in data.directory.iterdir()}
    assert names == {
        "manifest.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "mixed_train.jsonl",
        "mixed_val.jsonl",
        "tokens_train.bin",
        "tokens_val.bin",
        "index_train.npy",
        "index_val.npy",
    }
    manifest = data.manifest
    assert manifest["splits"]["train"]["records"] == 270
    assert manifest["splits"]["val"]["records"] == 30
    train = data.split("train")
    # Each document is its record's text followed by EOS, at the offset the index says.
    records = [json.loads(line) for line in (data.directory / "mixed_train.jsonl").open()]
    assert all(r["source"] == "stories" for r in records)
    starts = list(train.doc_starts) + [len(train)]
    for i in (0, 1, len(records) - 1):
        doc = train.tokens[starts[i] : starts[i + 1]].tolist()
        assert doc[-1] == data.tokenizer.eos_id
        assert data.tokenizer.decode(doc[:-1]) == records[i]["text"]
    assert manifest["tokenizer_hash"] == data.tokenizer.hash
    # No record is in both splits.
    val = {json.loads(line)["text"] for line in (data.directory / "mixed_val.jsonl").open()}
    assert not val & {r["text"] for r in records}


def test_progress_without_a_terminal_is_a_line_at_intervals(tmp_path, capsys, monkeypatch):
    """Captured stderr is no terminal: no tqdm bar, but progress lines (every line, at
    LMPIPE_PROGRESS_S=0) with the count, the rate and, given a total, the time left."""
    monkeypatch.setenv("LMPIPE_PROGRESS_S", "0")
    prepare(demo_cfg(), tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert "load stories: 300 rec" in [line.split(" |")[0] for line in lines]
    assert any(line.startswith("train tokenizer: ") for line in lines)
    tokenize = [line for line in lines if line.startswith("tokenize train: 270/270 rec (100%)")]
    assert tokenize, lines
    assert re.fullmatch(r".* \| tokens [\d,]+ \| [\d,.]+ rec/s \| eta 0s", tokenize[-1])
    assert "\r" not in "".join(lines)  # no bar redrawn in a log file
    monkeypatch.setenv("LMPIPE_PROGRESS_S", "soon")
    with pytest.raises(ConfigError, match="LMPIPE_PROGRESS_S='soon' must be a number"):
        prepare(demo_cfg(), tmp_path, force=True)


def test_same_config_is_byte_identical_cached_and_forced(tmp_path):
    first = prepare(demo_cfg(), tmp_path / "a", progress=False)
    second = prepare(demo_cfg(), tmp_path / "b", progress=False)
    for name in ("tokens_train.bin", "mixed_val.jsonl", "tokenizer.json", "index_train.npy"):
        assert (first.directory / name).read_bytes() == (second.directory / name).read_bytes()
    stamp = (first.directory / "tokens_train.bin").stat().st_mtime_ns
    assert prepare(demo_cfg(), tmp_path / "a", progress=False).directory == first.directory
    assert (first.directory / "tokens_train.bin").stat().st_mtime_ns == stamp  # cache hit
    forced = prepare(demo_cfg(), tmp_path / "a", force=True, progress=False)
    assert (forced.directory / "tokens_train.bin").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in (tmp_path / "a" / "data").iterdir()) == [first.directory.name]


def test_position_split_matches_nanogpt(tmp_path, shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    text = path.read_text()
    cfg = jsonl_cfg(path, split={"by": "position", "val_fraction": 0.1})
    cfg["sources"][0]["text_unit"] = "file"  # one stream, as nanoGPT reads it
    data = prepare(cfg, tmp_path, progress=False)
    cut = round(len(text) * 0.9)
    tok = data.tokenizer
    train, val = data.split("train"), data.split("val")
    assert tok.decode(train.tokens[:-1].tolist()) == text[:cut]
    assert tok.decode(val.tokens[:-1].tolist()) == text[cut:]
    assert tok.vocab_size == 65 + 10  # 65 characters + lmpipe's special tokens


def test_ratios_slots_and_wrap_around():
    assert allocate_slots([0.5, 0.3, 0.2], 7) == [4, 2, 1]
    assert sum(allocate_slots([1 / 3] * 3, 100)) == 100
    plan = plan_mixture([2, 100], [0.5, 0.5], seed=0, total=20)
    small = plan[plan[:, 0] == 0, 1]
    assert len(small) == 10 and set(small.tolist()) == {0, 1}  # wrapped around 5 times
    assert np.array_equal(plan, plan_mixture([2, 100], [0.5, 0.5], seed=0, total=20))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": broken}\n', ":2: invalid JSON"),
        (b'{"text": "ok"}\n\n{"body": "no text"}\n', ":3: record has no 'text' field"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not valid UTF-8"),
        (b"", "no records"),
    ],
)
def test_bad_records_name_file_and_line_and_leave_nothing(tmp_path, content, message):
    path = _write(tmp_path / "src.jsonl", content)
    with pytest.raises(DataError, match=message) as info:
        prepare(jsonl_cfg(path), tmp_path / "cache", progress=False)
    if content:
        assert str(path) in str(info.value)
    leftovers = list((tmp_path / "cache" / "data").iterdir())
    assert leftovers == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sources": [{"name": "a", "builtin": "stories", "mix_ratio": 0.5}]}, "sum to 0.5"),
        ({"sources": [{"name": "a", "builtin": "nope", "mix_ratio": 1.0}]}, "builtin='nope'"),
        ({"sources": [{"name": "a", "mix_ratio": 1.0}]}, "exactly one of builtin, path, hub"),
        ({"split": {"by": "chapter"}}, "data.split.by"),
        ({"tokenizer": {"kind": "sentencepiece"}}, "data.tokenizer.kind"),
    ],
)
def test_bad_mixture_configs_are_rejected_with_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        prepare(demo_cfg(**changes), tmp_path, progress=False)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prepare(jsonl_cfg(tmp_path / "absent.jsonl"), tmp_path, progress=False)


def test_a_local_file_rewritten_in_place_is_prepared_again(tmp_path):
    """The cache key covers the files a mixture reads (size, mtime), not only its config:
    relabelled pairs written to the same path are new data."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n")
    cfg = jsonl_cfg(path, format="auto", split={"val_fraction": 0.0})
    first = prepare(cfg, tmp_path / "c", progress=False)
    assert prepare(cfg, tmp_path / "c", progress=False).directory == first.directory
    path.write_text(path.read_text() * 2)
    second = prepare(cfg, tmp_path / "c", progress=False)
    assert second.directory != first.directory
    assert second.manifest["splits"]["train"]["documents"] == 4


def test_other_file_types_and_the_datasets_loader(tmp_path):
    """.json lists, .parquet files, globs, and HF ``datasets`` loading (``hub:`` takes a hub id
    or, as here without network, a local dataset folder) all give the same records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"record number {i} says hello" for i in range(40)]
    folder = tmp_path / "hubdata"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "list.json").write_text(json.dumps([{"body": t} for t in texts]))
    pq.write_table(pa.table({"body": texts}), tmp_path / "table.parquet")
    for part in range(2):
        (tmp_path / f"shard{part}.jsonl").write_text(
            "".join(json.dumps({"body": t}) + "\n" for t in texts[part * 20 : (part + 1) * 20])
        )
    sources = [
        {"hub": str(folder)},
        {"path": str(tmp_path / "list.json")},
        {"path": str(tmp_path / "table.parquet")},
        {"path": str(tmp_path / "shard*.jsonl")},
    ]
    for source in sources:
        cfg = demo_cfg(
            sources=[{"name": "s", "mix_ratio": 1.0, "fields": {"body": "text"}, **source}],
            tokenizer={"kind": "char"},
            split={"val_fraction": 0.0},
            shuffle=False,
        )
        data = prepare(cfg, tmp_path / "cache", progress=False)
        got = [json.loads(line)["text"] for line in (data.directory / "mixed_train.jsonl").open()]
        assert got == texts, source


# --- shipped mixtures on the real datasets in ../shared/data ---------------------------
CONF = Path(__file__).resolve().parents[1] / "conf"


def shipped(name: str, **changes) -> dict:
    """conf/data/<name>.yaml as train would resolve it (LMPIPE_DATA_DIR or ../shared/data)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"), resolve=True)
    cfg.update(changes)
    return cfg


def records(data, split: str) -> list[dict]:
    return [json.loads(line) for line in (data.directory / f"mixed_{split}.jsonl").open()]


@pytest.fixture
def shared_env(shared_data, monkeypatch):
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(shared_data))
    return shared_data


def test_gsm8k_as_chats_with_its_own_test_split(tmp_path, shared_env):
    data = prepare(shipped("gsm8k_local"), tmp_path, progress=False)
    train, val = records(data, "train"), records(data, "val")
    assert (len(train), len(val)) == (7473, 1319)
    assert train[0]["messages"][0]["role"] == "user"
    test_file = shared_env / "gsm8k" / "test.jsonl"
    expected = sorted(json.loads(line)["answer"] for line in test_file.open())
    assert sorted(r["messages"][1]["content"] for r in val) == expected
    shards = data.split("val")
    assert shards.mask is not None and len(shards.doc_starts) == 1319
    first = shards.tokens[: shards.doc_starts[1]].tolist()
    mask = shards.mask[: shards.doc_starts[1]].tolist()
    answer = data.tokenizer.decode([t for t, m in zip(first, mask, strict=True) if m])
    assert answer == val[0]["messages"][1]["content"]


def test_gsm8k_as_prompts_with_answers(tmp_path, shared_env):
    data = prepare(shipped("gsm8k_prompts_local"), tmp_path, progress=False)
    val = records(data, "val")
    assert len(val) == 1319 and all("####" in r["answer"] for r in val)
    assert all(r["prompt"][0]["role"] == "user" for r in val)


def test_gsm8k_as_question_answer_text(tmp_path, shared_env):
    data = prepare(shipped("gsm8k_text_local"), tmp_path, progress=False)
    texts = [r["text"] for r in records(data, "train") + records(data, "val")]
    assert len(texts) == 7473 and data.split("train").mask is None
    first = json.loads((shared_env / "gsm8k" / "train.jsonl").open().readline())
    assert f"Question: {first['question']}\nAnswer: {first['answer']}" in texts


def test_model_solutions_as_preference_pairs(tmp_path, shared_env):
    data = prepare(shipped("gsm8k_pref_local"), tmp_path, progress=False)
    (source,) = data.manifest["sources"]
    assert source["records"] == 1163 and source["dropped"] == {"no_incorrect_solution": 156}
    assert data.manifest["documents_per_record"] == 2
    pairs = records(data, "train") + records(data, "val")
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert len(data.split("train").doc_starts) == 2 * len(records(data, "train"))


def test_alpaca_seed_tasks_as_chats(tmp_path, shared_env):
    data = prepare(shipped("alpaca_seed_local"), tmp_path, progress=False)
    chats = records(data, "train") + records(data, "val")
    assert len(chats) == 175
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in chats)


def test_tiny_shakespeare_as_text(tmp_path, shared_env):
    data = prepare(shipped("shakespeare_char"), tmp_path, progress=False)
    assert data.manifest["format"] == "text" and data.tokenizer.vocab_size == 65 + 10


def test_realised_ratios_match_the_configured_ones(tmp_path, shared_env):
    """80% GSM8K, 20% Alpaca seed tasks (wrapping around): realised slots are within one
    record of ratio x total, filters counted per source."""
    data = prepare(shipped("shared_sft_local"), tmp_path, progress=False)
    sources = {s["name"]: s for s in data.manifest["sources"]}
    total = sum(s["slots"]["train"] for s in sources.values())
    assert total == sum(s["records_per_split"]["train"] for s in sources.values())
    for name, ratio in (("gsm8k", 0.8), ("alpaca_seed", 0.2)):
        assert abs(sources[name]["slots"]["train"] - ratio * total) <= 1
        assert sources[name]["realised_ratio"]["train"] == pytest.approx(ratio, abs=1 / total)
    by_source = Counter(r["source"] for r in records(data, "train"))
    assert by_source == {n: s["slots"]["train"] for n, s in sources.items()}
    assert sources["alpaca_seed"]["records"] < sources["alpaca_seed"]["slots"]["train"]


def test_filters_drop_and_count_per_source(tmp_path):
    lines = [
        {"text": "A fine sentence about a cat."},
        {"text": "A fine sentence about a cat."},  # duplicate
        {"text": "1234 5678 9999 0000 1111"},  # not prose
        {"text": "short"},
        {"text": "Another fine sentence, about a dog."},
    ]
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    filters = [
        {"name": "length", "min_chars": 10},
        {"name": "quality", "min_alpha_ratio": 0.6},
        {"name": "dedup"},
    ]
    cfg = jsonl_cfg(path, split={"val_fraction": 0.0})
    cfg["sources"][0]["filters"] = filters
    data = prepare(cfg, tmp_path / "cache", progress=False)
    (source,) = data.manifest["sources"]
    assert source["dropped"] == {"dedup": 1, "length": 1, "quality": 1}
    assert source["records"] == 2


def test_chat_records_keep_masks_and_unusable_pairs_are_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(6)]
    rows.append({"prompt": "Q?", "chosen": "same", "rejected": "same"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(
        jsonl_cfg(path, format="auto", split={"val_fraction": 0.0}), tmp_path / "c", progress=False
    )
    assert data.manifest["format"] == "preference"
    assert data.manifest["sources"][0]["dropped"] == {"chosen_equals_rejected": 1}
    assert data.manifest["splits"]["train"]["documents"] == 12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "cat", "content": "b"}]}\n',
            ":2: message 0 has unknown role 'cat'",
        ),
        (
            b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n',
            ":2: preference record has no 'rejected' field",
        ),
    ],
)
def test_bad_chat_and_preference_records_name_file_and_line(tmp_path, content, message):
    path = _write(tmp_path / "src.jsonl", content)
    with pytest.raises(DataError, match=message):
        prepare(jsonl_cfg(path, format="auto"), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_unknown_filter_and_adapter_are_config_errors(tmp_path):
    cfg = demo_cfg()
    cfg["sources"][0]["filters"] = [{"name": "lenght"}]
    with pytest.raises(ConfigError, match="data source 'stories': unknown filter 'lenght'"):
        prepare(cfg, tmp_path, progress=False)
    cfg["sources"][0]["filters"] = []
    cfg["sources"][0]["adapter"] = "nope"
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        prepare(cfg, tmp_path, progress=False)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.parametrize("name", ["demo", "demo_mid", "demo_chat", "demo_pref", "demo_prompts"])
def test_builtin_demo_mixtures_cover_the_four_formats(tmp_path, name):
    cfg = shipped(name)
    for source in cfg["sources"]:
        source["num_records"] = 200
    data = prepare(cfg, tmp_path, progress=False)
    assert data.manifest["splits"]["val"]["records"] > 0
    expected = {"demo": "text", "demo_mid": "text", "demo_chat": "chat"}
    assert data.manifest["format"] == expected.get(
        name, {"demo_pref": "preference"}.get(name, "prompt")
    )
