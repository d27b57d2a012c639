"""`tuner dashboard` in a real headless browser: Debian's Chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import optuna
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_study(run, tmp_path):
    """A finished two-trial search and a dashboard serving its database on a free local port."""
    db = f"sqlite:///{tmp_path / 'dash.db'}"
    assert run("search", "--trials", "2", "--epochs", "2", "--subset", "200", "--storage", db,
               "--study-name", "dash-study").exit_code == 0  # fmt: skip
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "dashboard", "--port", str(port), "--storage", db],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"dashboard did not listen on 127.0.0.1:{port}: {proc.communicate()[0]}")
    yield db, port, proc
    proc.terminate()
    proc.wait(timeout=10)


def test_dashboard_lists_the_study_and_renders_intermediate_values(served_study):
    from playwright.sync_api import sync_playwright

    db, port, _ = served_study
    assert shutil.which(CHROMIUM), "Debian's chromium is needed: apt-get install chromium"
    trial = optuna.load_study(study_name="dash-study", storage=db).trials[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        page.get_by_text("dash-study").first.wait_for(timeout=30_000)
        page.get_by_text("dash-study").first.click()
        page.wait_for_url("**/dashboard/studies/*", timeout=30_000)
        page.get_by_text("Hyperparameter Importance").first.wait_for(timeout=30_000)
        page.goto(page.url.rstrip("/") + "/trials")
        page.get_by_text("Intermediate Values").first.wait_for(timeout=30_000)
        body = page.inner_text("body")
        browser.close()
    for step, value in trial.intermediate_values.items():
        assert f"{step} {value}" in body  # the values recorded per epoch, as the dashboard shows them


def test_dashboard_binds_to_localhost_by_default(served_study):
    _, port, proc = served_study
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.splitlines()
    addresses = [line.split()[3] for line in listening if line.split()[3].endswith(f":{port}")]
    assert addresses == [f"127.0.0.1:{port}"]


def test_dashboard_masks_the_password(run):
    result = run("dashboard", "--storage", "postgresql+psycopg://tuner:pa55word-x@127.0.0.1:1/tuner")
    assert result.exit_code != 0 and "pa55word-x" not in result.output and "tuner:***@" in result.output
