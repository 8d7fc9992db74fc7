"""The web UI in a real browser (headless Chromium driven by Playwright): the runs page, a
run page whose curves grow while a training run writes its metrics, and a chat with a
streamed reply. Screenshots of each page go to the test's tmp folder.

Playwright cannot download its own browser here, so it drives the system's Chromium
(Debian's ``chromium``; ``make chromium`` installs it as root, CI does so). Without one
the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lmpipe import api

from conftest import CHAT_RUN, cli_env

CHROMIUM = os.environ.get("LMPIPE_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "What is 2 plus 3?"
ENDLESS = "one two three four five"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found for the browser test: install Debian's chromium "
    "(`make chromium` as root) or set LMPIPE_CHROMIUM=<path>",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def endless(chat_run: Path) -> None:
    """The chat run's greedy continuation of ENDLESS as a document never reaches EOS (it
    ends turns instead): a reply to stop. Checked here, so that the test cannot race."""
    model = api.load(chat_run, device="cpu")
    reply = model.stream(ENDLESS, temperature=0, max_new_tokens=1000)
    assert sum(1 for _ in reply) >= 990, "the reply to stop ended by itself"


@pytest.fixture
def server(tmp_path, chat_run):
    """``python -m lmpipe.ui`` on a free port, serving runs/ with the finished chat run."""
    out = tmp_path / "runs"
    shutil.copytree(chat_run, out / "chat")
    endless(chat_run)
    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmpipe.ui",
            f"out_dir={out}",
            f"port={port}",
            "poll_interval_s=0.2",
        ],
        cwd=tmp_path,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: responds(base) or process.poll() is not None, 120, "the UI server")
        assert process.poll() is None, (tmp_path / "ui.log").read_text()
        yield base, out
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_runs_live_curves_and_chat_in_a_browser(server, tmp_path, cache_dir):
    playwright = pytest.importorskip("playwright.sync_api")
    base, out = server
    training = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmpipe.train",
            *CHAT_RUN,
            "trainer.max_steps=5000",
            "trainer.log_interval=2",
            f"out_dir={out}",
            "run_name=live",
            f"cache_dir={cache_dir}",
        ],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=tmp_path),  # a fresh profile
                executable_path=CHROMIUM,
                args=BROWSER_ARGS,
                viewport={"width": 1280, "height": 860},
            )
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Runs: the finished run, then the live one (the page refreshes itself).
            page.goto(base + "#/")
            row = page.locator('tr[data-run="chat"]')
            row.locator('[data-state="finished"]').wait_for(timeout=30_000)
            live = page.locator('tr[data-run="live"] [data-state="running"]')
            live.wait_for(timeout=120_000)
            assert "sft" in row.inner_text() and "60 / 60" in row.inner_text()
            page.screenshot(path=shots / "runs.png", full_page=True)

            # Run: its loss curve gains points with no reload while the run trains.
            page.locator('tr[data-run="live"] a').first.click()
            page.evaluate("window.sameDocument = true")
            loss = page.locator('canvas[data-group="loss"]')
            loss.wait_for(timeout=60_000)

            def points() -> int:
                return int(loss.get_attribute("data-points"))

            before = wait_until(points, 60, "points on the loss chart")
            wait_until(lambda: points() >= before + 3, 120, "the loss chart to grow")
            assert page.evaluate("window.sameDocument") is True
            assert page.locator('[data-state="running"]').count() >= 1
            page.screenshot(path=shots / "run.png", full_page=True)
            training.kill()

            # Chat: a question to the finished run, the reply streamed into the page.
            page.goto(base + "#/chat?run=chat")
            page.fill('input[name="temperature"]', "0")
            page.fill('textarea[name="message"]', PROMPT)
            page.click("#send")
            reply = page.locator('.message[data-role="assistant"]')
            page.locator('.message[data-role="assistant"][data-state="done"]').wait_for(
                timeout=60_000
            )
            assert int(reply.get_attribute("data-pieces")) > 1
            assert reply.locator(".text").inner_text().strip()
            page.screenshot(path=shots / "chat.png", full_page=True)

            # Stop: a reply that would go on for 8000 tokens stops when asked, mid-stream.
            page.click("text=New conversation")
            page.select_option('select[name="mode"]', "text")
            page.fill('input[name="max_new_tokens"]', "8000")
            page.fill('textarea[name="message"]', ENDLESS)
            page.click("#send")
            wait_until(lambda: int(reply.get_attribute("data-pieces")) >= 20, 60, "a reply")
            page.click("#stop")
            page.locator('.message[data-role="assistant"][data-state="stopped"]').wait_for()
            pieces = int(reply.get_attribute("data-pieces"))
            time.sleep(1.0)
            assert int(reply.get_attribute("data-pieces")) == pieces < 990
            assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
            page.screenshot(path=shots / "chat_stopped.png", full_page=True)
            assert errors == []
            browser.close()
    finally:
        training.kill()
        training.wait()
    print(f"screenshots: {shots}")
