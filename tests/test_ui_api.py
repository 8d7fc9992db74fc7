"""The web UI's server through the test client: run states, live metrics, chat, and
nothing readable outside ``out_dir``."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmpipe import api  # noqa: E402
from lmpipe.eval.report import markdown_table, plot_curves  # noqa: E402
from lmpipe.tracking.jsonl import JsonlSink  # noqa: E402
from lmpipe.tracking.status import mark_running  # noqa: E402
from lmpipe.ui.app import create_app  # noqa: E402

from conftest import CHAT_RUN, data_config, save_random_checkpoint  # noqa: E402

PROMPT = "What is 2 plus 3?"
SECRET = b"\x89PNG TOP-SECRET-BYTES"
MARK_RUNNING = (
    "import sys; from lmpipe.tracking.status import mark_running; mark_running(sys.argv[1])"
)


def client_for(out: Path, *overrides: str) -> TestClient:
    return TestClient(create_app(api.compose("ui", [f"out_dir={out}", *overrides])))


def events(lines) -> list[tuple[str, dict]]:
    """(name, data) of each server-sent event in ``lines``."""
    found, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[6:])))
    return found


@pytest.fixture
def finished(tmp_path, chat_run) -> Path:
    """runs/ with the finished chat run, as runs/finished."""
    root = tmp_path / "runs"
    shutil.copytree(chat_run, root / "finished")
    return root


@pytest.fixture
def out(finished, chat_run, cache_dir, monkeypatch) -> Path:
    """runs/: the finished chat run; a run that failed (a real training whose loop
    raised); a run whose process is gone without a word (killed); a running one (this
    process, which appends its metrics during a test)."""
    root = finished

    from lmpipe.training.trainer import Trainer

    def explode(self):
        raise RuntimeError("loss is NaN\nat step 3")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", explode)
        with pytest.raises(RuntimeError):
            api.train([*CHAT_RUN, f"out_dir={root}", "run_name=failed", f"cache_dir={cache_dir}"])

    killed = root / "killed"
    shutil.copytree(chat_run, killed)
    shutil.rmtree(sorted((killed / "checkpoints").iterdir())[-1])  # killed before its last save
    subprocess.run([sys.executable, "-c", MARK_RUNNING, str(killed)], check=True)

    running = root / "running"
    running.mkdir()
    shutil.copy(chat_run / "config.yaml", running / "config.yaml")
    mark_running(running)
    return root


def test_runs_list_shows_each_runs_state(out):
    with client_for(out) as client:
        runs = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert {k: r["state"] for k, r in runs.items()} == {
        "finished": "finished",
        "failed": "failed",
        "killed": "interrupted",
        "running": "running",
    }
    assert runs["failed"]["error"] == "loss is NaN at step 3"
    finished = runs["finished"]
    assert (finished["stage"], finished["arch"], finished["data"]) == ("sft", "ar", "demo_chat")
    assert finished["step"] == finished["max_steps"] == 60
    assert finished["val"]["val/loss"] > 0 and finished["checkpoints"] == 2
    assert runs["killed"]["step"] == 60 and runs["killed"]["checkpoints"] == 1


def test_run_page_data_and_malformed_metric_lines(out):
    with (out / "finished" / "metrics.jsonl").open("a") as fh:
        fh.write('not json\n{"step": 61, "train/loss": NaN}\n{"step": 62, "train/lo')
    with client_for(out) as client:
        detail = client.get("/api/run", params={"run": "finished"}).json()
        metrics = client.get("/api/run/metrics", params={"run": "finished"}).json()
        runs = client.get("/api/runs")
    assert runs.status_code == 200
    assert detail["run"]["state"] == "finished" and "stage=sft" in detail["plan"]
    assert "max_steps: 60" in detail["config"]
    assert [c["name"] for c in detail["checkpoints"]] == ["step_000060", "step_000030"]
    assert detail["checkpoints"][0]["val"]["val/loss"] == detail["run"]["val"]["val/loss"]
    assert detail["episodes"][-1]["step"] == 60 and detail["episodes"][-1]["episodes"]
    steps = [r["step"] for r in metrics["records"]]
    assert steps[-1] == 61 and metrics["records"][-1]["train/loss"] is None  # NaN as null
    size = (out / "finished" / "metrics.jsonl").stat().st_size
    assert metrics["offset"] == size - len('{"step": 62, "train/lo')


def test_event_stream_delivers_lines_as_they_are_appended(out):
    sink = JsonlSink(out / "running" / "metrics.jsonl")
    sink.log(1, {"train/loss": 3.0})
    received: queue.Queue = queue.Queue()
    with client_for(out, "poll_interval_s=0.05") as client:
        offset = client.get("/api/run/metrics", params={"run": "running"}).json()["offset"]
        params = {"run": "running", "offset": offset}
        with client.stream("GET", "/api/run/events", params=params) as response:
            assert response.headers["content-type"].startswith("text/event-stream")

            def read():
                try:
                    for line in response.iter_lines():
                        received.put(line)
                except Exception:  # the stream closed at the end of the test
                    return

            threading.Thread(target=read, daemon=True).start()

            def next_event(name: str) -> dict:
                lines = []
                while True:
                    lines.append(received.get(timeout=20))
                    found = [data for n, data in events(lines) if n == name]
                    if found:
                        return found[0]

            assert next_event("status")["state"] == "running"
            sink.log(2, {"train/loss": 2.5})
            assert [r["step"] for r in next_event("metrics")["records"]] == [2]
            with (out / "running" / "metrics.jsonl").open("a") as fh:
                fh.write("garbage\n")
                fh.flush()
                fh.write('{"step": 3, "train/loss"')
                fh.flush()
                fh.write(": 2.0}\n")
            sink.log(4, {"val/loss": 2.2})
            records = next_event("metrics")["records"]
            while [r["step"] for r in records][-1] != 4:
                records += next_event("metrics")["records"]
            assert [r["step"] for r in records] == [3, 4]
            sink.close()


def test_chat_streams_what_the_generate_command_prints(out, lmpipe):
    cli = lmpipe(
        "generate",
        f"checkpoint={out / 'finished'}",
        "chat=true",
        f"prompt={PROMPT}",
        "temperature=0",
        "max_new_tokens=40",
    )
    body = {
        "run": "finished",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_new_tokens": 40,
    }
    with client_for(out) as client:
        response = client.post("/api/chat", json=body)
    assert response.status_code == 200
    found = events(response.text.splitlines())
    pieces = [data["text"] for name, data in found if name == "token"]
    assert found[-1][0] == "done" and found[-1][1]["pieces"] == len(pieces)
    assert len(pieces) > 1  # streamed, a token (or so) at a time
    assert "".join(pieces) == cli.stdout.removesuffix("\n")


def test_chat_turns_and_bad_requests(out):
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "The answer is 5."},
        {"role": "user", "content": "And 3 plus 4?"},
    ]
    body = {"run": "finished", "checkpoint": "step_000030", "messages": history, "temperature": 0}
    with client_for(out) as client:
        reply = events(client.post("/api/chat", json=body).text.splitlines())
        assert reply[-1][0] == "done"
        assert client.post("/api/chat", json={**body, "messages": []}).status_code == 422
        wrong = {**body, "messages": [{"role": "wizard", "content": "hi"}]}
        assert client.post("/api/chat", json=wrong).status_code == 422
        assert client.post("/api/chat", json={**body, "checkpoint": "step_9"}).status_code == 404
        assert client.post("/api/chat", json={**body, "run": "running"}).status_code == 404
        defaults = client.get("/api/chat/defaults").json()
        listed = client.get("/api/checkpoints").json()["checkpoints"]
    assert defaults["max_new_tokens"] == api.compose("chat").max_new_tokens
    assert {(c["run"], c["name"]) for c in listed} == {
        ("finished", "step_000060"),
        ("finished", "step_000030"),
        ("killed", "step_000030"),
    }


@pytest.mark.parametrize(
    "path",
    [
        "/api/run?run=../outside",
        "/api/run?run=..%2Foutside",
        "/api/run?run=%2Fetc",
        "/api/run?run=finished/../../outside",
        "/api/run?run=escape",
        "/api/run/metrics?run=escape",
        "/api/pipeline?pipeline=../outside",
        "/api/pipeline/image?pipeline=report&name=..%2F..%2Foutside%2Fsecret.png",
        "/api/pipeline/image?pipeline=report&name=leak.png",
        "/static/..%2F..%2F..%2Fapi.py",
    ],
)
def test_nothing_outside_out_dir_is_readable(finished, path):
    out = finished
    outside = out.parent / "outside"
    shutil.copytree(out / "finished", outside)
    (outside / "secret.png").write_bytes(SECRET)
    (out / "escape").symlink_to(outside)  # a symlink out of out_dir
    report = out / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    (report / "leak.png").symlink_to(outside / "secret.png")
    with client_for(out) as client:
        response = client.get(path)
        assert response.status_code == 404, response.text
        assert SECRET not in response.content and b"max_steps" not in response.content
        ids = [r["id"] for r in client.get("/api/runs").json()["runs"]]
    assert "escape" not in ids


def test_a_file_symlinked_out_of_a_run_is_not_read(out):
    outside = out.parent / "outside.jsonl"
    outside.write_text('{"step": 1, "secret": 1.0}\n')
    (out / "running" / "metrics.jsonl").symlink_to(outside)
    (out / "running" / "plan.txt").symlink_to(outside)
    with client_for(out) as client:
        assert client.get("/api/run/metrics", params={"run": "running"}).json()["records"] == []
        detail = client.get("/api/run", params={"run": "running"}).json()
    assert detail["plan"] is None


def test_pipeline_report_card(finished, chat_run):
    out = finished
    pipeline = out / "lifecycle-ar"
    shutil.copytree(chat_run, pipeline / "sft")
    row = {"stage": "sft", "steps": 60, "wall_s": 3.0, "val/loss": 1.25}
    (pipeline / "report.md").write_text(
        f"# lifecycle-ar\n\n{markdown_table([row])}\n\n![sft](curves_sft.png)\n"
    )
    (pipeline / "report.json").write_text(json.dumps({"stages": [row]}))
    plot_curves("sft", pipeline / "sft", pipeline / "curves_sft.png")
    with client_for(out) as client:
        listing = client.get("/api/runs").json()
        report = client.get("/api/pipeline", params={"pipeline": "lifecycle-ar"}).json()
        image = client.get(
            "/api/pipeline/image", params={"pipeline": "lifecycle-ar", "name": "curves_sft.png"}
        )
    assert listing["pipelines"] == ["lifecycle-ar"]
    stage = next(r for r in listing["runs"] if r["id"] == "lifecycle-ar/sft")
    assert stage["pipeline"] == "lifecycle-ar" and stage["state"] == "finished"
    assert report["images"] == ["curves_sft.png"] and report["stages"] == ["lifecycle-ar/sft"]
    assert "| sft | 60 |" in report["report_md"] and report["report"]["stages"] == [row]
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_access_token(finished):
    out = finished
    with client_for(out, "token=s3cret") as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/api/runs", headers=bearer).status_code == 200
        opened = client.get("/?token=s3cret", follow_redirects=False)
        assert opened.status_code == 307 and "token" not in opened.headers["location"]
        assert "httponly" in opened.headers["set-cookie"].lower()
        assert client.get("/api/runs").status_code == 200  # the cookie it set
        page = client.get("/")
    assert page.status_code == 200 and b'<main id="view">' in page.content


def test_chat_with_a_diffusion_checkpoint(tmp_path, cache_dir):
    """Diffusion writes its whole reply at once (the same as the API's); a reply that leaves
    no room for the prompt in its block is an error event, not a broken stream."""
    out = tmp_path / "runs"
    run_dir = out / "diffusion"
    checkpoint = save_random_checkpoint(
        run_dir / "checkpoints" / "step_000000",
        data_config("demo_chat", 200),
        cache_dir,
        arch="diffusion",
        stage="sft",
    )
    (run_dir / "config.yaml").write_text("arch: {name: diffusion}\nstage: {name: sft}\n")
    messages = [{"role": "user", "content": PROMPT}]
    body = {"run": "diffusion", "messages": messages, "temperature": 0}
    with client_for(out) as client:
        short = events(
            client.post("/api/chat", json={**body, "max_new_tokens": 8}).text.split("\n")
        )
        full = events(
            client.post("/api/chat", json={**body, "max_new_tokens": 64}).text.split("\n")
        )
    assert short[-1][0] == "done"
    expected = api.load(checkpoint).generate(messages, max_new_tokens=8, temperature=0)
    assert "".join(data["text"] for name, data in short if name == "token") == expected
    assert full[-1][0] == "error" and "leaves no room for a prompt" in full[-1][1]["message"]
