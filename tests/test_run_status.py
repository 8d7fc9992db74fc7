"""Reading runs back: status records, tolerant metrics reading, the run index and its
refusal to read outside the output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

from lmpipe.tracking.jsonl import JsonlSink, read_metrics, read_metrics_from
from lmpipe.tracking.runs import NotInside, discover, find_runs, inside, run_state
from lmpipe.tracking.status import mark_running, process_alive, read_status, recorded


def test_recorded_writes_how_a_marked_run_ends(tmp_path):
    for name, exc, state in (
        ("ok", None, "finished"),
        ("bad", RuntimeError("weights exploded\nat step 7"), "failed"),
        ("stop", KeyboardInterrupt(), "interrupted"),
    ):
        run_dir = tmp_path / name
        run_dir.mkdir()
        with pytest.raises(type(exc)) if exc else nullcontext(), recorded(run_dir):
            mark_running(run_dir)
            assert read_status(run_dir)["state"] == "running"
            if exc:
                raise exc
        status = read_status(run_dir)
        assert status["state"] == state
        assert status["pid"] == os.getpid()
    assert read_status(tmp_path / "bad")["error"] == "weights exploded at step 7"


def test_recorded_leaves_a_run_it_never_marked_as_it_was(tmp_path):
    (tmp_path / "new").mkdir()
    with pytest.raises(ValueError), recorded(tmp_path / "new"):
        raise ValueError("refused before writing anything")
    assert list((tmp_path / "new").iterdir()) == []  # nothing half-written

    done = tmp_path / "done"
    done.mkdir()
    with recorded(done):
        mark_running(done)
    with pytest.raises(ValueError), recorded(done):  # e.g. "already has checkpoints"
        raise ValueError("a second attempt refused at once")
    assert read_status(done)["state"] == "finished"


def test_a_process_killed_without_a_word_is_gone(tmp_path):
    code = "import sys; from lmpipe.tracking.status import mark_running; mark_running(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    status = read_status(tmp_path)
    assert status["state"] == "running" and status["pid"] != os.getpid()
    assert process_alive(status) is False
    mark_running(tmp_path)
    assert process_alive(read_status(tmp_path)) is True
    assert process_alive({**read_status(tmp_path), "host": "elsewhere"}) is None
    assert read_status(tmp_path)["started"] == status["started"]  # the first start is kept


def test_half_written_and_malformed_metric_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"train/loss": 2.0})
    sink.close()
    with path.open("a") as fh:
        fh.write('{"step": 2, "train/lo')  # killed mid-write...
        fh.write('{"step": 3, "train/loss": 1.5}\n')  # ...then resumed on the same line
        fh.write("not json\n[1, 2]\n")
        fh.write('{"step": 4, "train/loss": NaN}\n')
        fh.write('{"step": 5, "train/loss": 1.0')  # still being written
    records, offset = read_metrics_from(path)
    assert [r["step"] for r in records] == [1, 4]
    assert offset == path.read_bytes().rindex(b"\n") + 1
    with path.open("a") as fh:
        fh.write("}\n")
    more, end = read_metrics_from(path, offset)
    assert [r["step"] for r in more] == [5] and end == path.stat().st_size
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 4, 5]
    assert read_metrics_from(path, end + 100) == (read_metrics(tmp_path), end)  # replaced


@pytest.mark.parametrize(
    "name", ["..", "../x", "a/../../x", "/etc", "a/./b", "", "a\\..\\b", "a\x00b", "link/x"]
)
def test_names_leading_outside_are_refused(tmp_path, name):
    root = tmp_path / "runs"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(NotInside):
        inside(root, name)
    assert inside(root, "a/b") == (root / "a" / "b").resolve()


def _run(root: Path, name: str, max_steps: int, saved: list[int]) -> Path:
    run_dir = root / name
    (run_dir / "checkpoints").mkdir(parents=True)
    config = {
        "stage": {"name": "pretrain"},
        "arch": {"name": "ar"},
        "trainer": {"max_steps": max_steps},
    }
    (run_dir / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    for step in saved:
        (run_dir / "checkpoints" / f"step_{step:06d}").mkdir()
    return run_dir


def test_runs_without_a_status_record_are_judged_by_their_files(tmp_path):
    root = tmp_path / "runs"
    _run(root, "done", 10, [5, 10])
    _run(root, "fresh", 10, [5])
    old = _run(root, "stale", 10, [5])
    past = time.time() - 3600
    for path in (old / "checkpoints", old):
        os.utime(path, (past, past))
    (root / "sweep" / "0-lr=1").mkdir(parents=True)
    _run(root / "sweep", "1-lr=2", 10, [10])
    _run(root / "x", "checkpoints", 10, [])  # never a run: a run's own folder name
    states = {r.id: (r.state, r.step, r.stage) for r in find_runs(root, stale_after_s=60)}
    assert states == {
        "done": ("finished", 10, "pretrain"),
        "fresh": ("running", 5, "pretrain"),
        "stale": ("interrupted", 5, "pretrain"),
        "sweep/1-lr=2": ("finished", 10, "pretrain"),
    }
    assert discover(root / "missing") == ([], [])


def test_a_recorded_end_wins_and_a_final_checkpoint_means_finished():
    assert run_state({"state": "failed", "error": "boom"}, True, None, 60) == ("failed", "boom")
    gone = {"state": "running", "host": "elsewhere", "pid": 1}
    assert run_state(gone, True, None, 60) == ("finished", None)
    assert run_state(gone, False, time.time(), 60) == ("running", None)
    assert run_state(gone, False, time.time() - 61, 60)[0] == "interrupted"
