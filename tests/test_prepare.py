import json
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
    data = prepare(
        jsonl_cfg(path, split={"by": "position", "val_fraction": 0.1}), tmp_path, progress=False
    )
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
