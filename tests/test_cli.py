"""The grid commands end to end: real training on a small MNIST subset, real SQLite, report from the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

QUICK = ("--epochs", "1", "--subset", "300")


def trials(db: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=db).get_trials()


def test_grid_trains_every_cell_once_and_report_rebuilds_from_the_database(run, tiny_grid, db, tmp_path):
    result = run("grid", tiny_grid, *QUICK, "--storage", db)
    assert result.exit_code == 0, result.output
    done = trials(db, "tiny-epochs1-subset300")
    assert sorted((t.params["learning_rate"], t.params["batch_size"]) for t in done) == [
        (0.001, 32), (0.001, 64), (0.01, 32), (0.01, 64),
    ]  # fmt: skip
    assert all(t.state == TrialState.COMPLETE for t in done)
    for t in done:
        (epoch,) = t.user_attrs["history"]
        assert 0.0 <= epoch["accuracy"] <= 1.0
        # the document's figure: accuracy on the last mini-batch, a whole number of correct answers
        last = 300 - (300 // t.params["batch_size"]) * t.params["batch_size"] or t.params["batch_size"]
        assert round(epoch["last_batch_accuracy"] * last, 6).is_integer()
        assert t.value == pytest.approx(t.user_attrs["test_accuracy"])
        assert t.user_attrs["n_train"] == 300 and t.user_attrs["n_test"] == 10000
        assert set(t.user_attrs["versions"]) >= {"optuna", "tensorflow", "keras"}
        assert t.intermediate_values == {1: pytest.approx(epoch["accuracy"])}  # step = epochs trained

    tiny_grid.unlink()  # the report needs the database only
    report = run("report", "tiny-epochs1-subset300", "--storage", db, "--format", "json")
    assert report.exit_code == 0, report.output
    body = json.loads(report.output)
    ours = [r for r in body["rows"] if r["source"] == "ours"]
    assert len(ours) == 4 and {r["table"] for r in ours} == {"batch_size = 32", "batch_size = 64"}
    assert [r for r in body["rows"] if r["source"] == "document"] == [
        {"table": "batch_size = 32", "row": 0.001, "source": "document", "train": [0.5], "test": 0.5,
         "spread": None, "seconds": None}
    ]  # fmt: skip
    (claim,) = body["claims"]
    assert claim["verdict"] in ("holds", "does not hold") and "cells end below 0.2" in claim["because"]

    md = run("report", "tiny-epochs1-subset300", "--storage", db, "--format", "markdown").output
    assert "| lr | source | Train 1 | Test |" in md and "### batch_size = 32" in md
    csv_text = run("report", "tiny-epochs1-subset300", "--storage", db, "--format", "csv").output
    assert csv_text.splitlines()[0] == "table,learning_rate,source,train_1,test,test_spread,fit_seconds"
    assert len(csv_text.splitlines()) == 1 + 4 + 1

    listing = run("studies", "--storage", db).output
    assert "tiny-epochs1-subset300" in listing and "grid" in listing


def test_rerun_resumes_without_retraining(run, tiny_grid, db):
    assert run("grid", tiny_grid, *QUICK, "--storage", db).exit_code == 0
    first = {t.number: t.datetime_complete for t in trials(db, "tiny-epochs1-subset300")}
    again = run("grid", tiny_grid, *QUICK, "--storage", db)
    assert again.exit_code == 0
    assert "4 cells, 0 queued now" in again.output
    assert {t.number: t.datetime_complete for t in trials(db, "tiny-epochs1-subset300")} == first


def test_a_cell_rerun_with_the_same_seed_gives_the_same_metrics(run, tiny_grid, db):
    for name in ("first", "second"):
        assert run("grid", tiny_grid, *QUICK, "--seed", "7", "--storage", db, "--study-name", name).exit_code == 0
    key = lambda t: (t.params["learning_rate"], t.params["batch_size"])  # noqa: E731
    first = {key(t): (t.user_attrs["history"][0]["loss"], t.value) for t in trials(db, "first")}
    second = {key(t): (t.user_attrs["history"][0]["loss"], t.value) for t in trials(db, "second")}
    assert first == second


def test_several_runs_of_one_grid_combine_into_mean_and_spread(run, tiny_grid, db):
    for seed in ("1", "2"):
        assert run("grid", tiny_grid, *QUICK, "--seed", seed, "--storage", db).exit_code == 0
    body = json.loads(
        run("report", "tiny-epochs1-subset300-seed1", "tiny-epochs1-subset300-seed2", "--storage", db,
            "--format", "json").output
    )  # fmt: skip
    ours = [r for r in body["rows"] if r["source"] == "ours"]
    values = {
        seed: {(t.params["learning_rate"], t.params["batch_size"]): t.value
               for t in trials(db, f"tiny-epochs1-subset300-seed{seed}")}
        for seed in ("1", "2")
    }  # fmt: skip
    for row in ours:
        cell = (row["row"], int(row["table"].split("= ")[1]))
        a, b = values["1"][cell], values["2"][cell]
        assert row["test"] == pytest.approx((a + b) / 2)
        assert row["spread"] == pytest.approx(abs(a - b))


def start_long_grid(tiny_grid: Path, db: str, name: str) -> subprocess.Popen:
    """A grid worker in its own process, returned once one of its trials is RUNNING (and 2 s into it). Its
    trials are long enough (500 epochs) to be running still on the fastest machine: with 30 epochs, one
    finished within those 2 s, and the signal came between trials, with nothing to hand back."""
    cmd = [sys.executable, "-m", "tuner.cli", "grid", str(tiny_grid), "--epochs", "500", "--subset", "2000",
           "--storage", db, "--study-name", name]  # fmt: skip
    # SIGINT as at a terminal: a shell without job control starts background commands (`pytest &`) with it
    # ignored, and the worker would then rightly ignore Ctrl-C.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 180
    seen: list = []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            seen = [t.state for t in trials(db, name)]
        except KeyError:  # the study is not created yet
            continue
        if TrialState.RUNNING in seen:
            time.sleep(2)
            return proc
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"no trial seen RUNNING (last states {seen}, exit {proc.returncode}): {out[-2000:]}")


def test_ctrl_c_leaves_no_trial_running_and_queues_the_cell_again(tiny_grid, tmp_path):
    db = f"sqlite:///{tmp_path / 'int.db'}"
    proc = start_long_grid(tiny_grid, db, "int")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    states = [t.state for t in trials(db, "int")]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.WAITING) == 4 - states.count(
        TrialState.COMPLETE
    )


def test_sigterm_hands_the_trial_back(tiny_grid, tmp_path):
    db = f"sqlite:///{tmp_path / 'term.db'}"
    proc = start_long_grid(tiny_grid, db, "term")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    done = trials(db, "term")
    assert TrialState.RUNNING not in [t.state for t in done]
    (failed,) = [t for t in done if t.state == TrialState.FAIL]
    assert failed.user_attrs["interrupted"] == "interrupted"
    requeued = [
        t for t in done if t.state == TrialState.WAITING and t.system_attrs.get("failed_trial") == failed.number
    ]
    assert len(requeued) == 1 and requeued[0].params == failed.params


def test_help_explains_every_option(run):
    text = run("grid", "--help").output
    for option in ("--storage", "--study-name", "--epochs", "--subset", "--seed", "--data", "--heartbeat"):
        assert option in text
    assert "TUNER_STORAGE" in text
    assert "report" in run("--help").output


def test_progress_names_trials_and_epochs(run, tiny_grid, db):
    out = run("grid", tiny_grid, *QUICK, "--storage", db).output
    assert "epoch 1/1" in out and "-> trial 3 complete" in out and "4 complete" in out
    assert " loss=" in out and " accuracy=" in out and "last_batch" not in out  # the epoch's figures, not the metric's


def test_tensorflow_start_up_noise_is_silenced(tiny_grid, tmp_path):
    db = f"sqlite:///{tmp_path / 'quiet.db'}"
    env = {**os.environ}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "grid", str(tiny_grid), *QUICK, "--storage", db],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for noise in ("absl::InitializeLog", "cuda", "oneDNN", "I0000", "Traceback", "Warning"):
        assert noise not in out.stderr + out.stdout


def test_default_storage_is_tuner_db_in_the_working_directory(run, tiny_grid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNER_STORAGE", raising=False)
    assert run("grid", tiny_grid, *QUICK).exit_code == 0
    assert (tmp_path / "tuner.db").is_file()
    assert len(trials(f"sqlite:///{tmp_path / 'tuner.db'}", "tiny-epochs1-subset300")) == 4


def test_workers_command_shares_one_grid_between_local_processes(tiny_grid, tmp_path):
    db = f"sqlite:///{tmp_path / 'w.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "workers", "2", "--", "grid", str(tiny_grid), *QUICK, "--storage", db,
         "--study-name", "w"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[w1]" in out.stderr and "[w2]" in out.stderr
    done = trials(db, "w")
    assert [t.state for t in done].count(TrialState.COMPLETE) == 4
    assert (
        len({(t.params["learning_rate"], t.params["batch_size"]) for t in done if t.state == TrialState.COMPLETE}) == 4
    )


def test_a_one_cell_grid_runs(run, tmp_path, db):
    path = tmp_path / "one.toml"
    path.write_text("[model]\nunits = 8\n[grid]\nlearning_rate = [0.001]\n")
    result = run("grid", path, *QUICK, "--storage", db, "--study-name", "one")
    assert result.exit_code == 0, result.output
    assert [t.state for t in trials(db, "one")] == [TrialState.COMPLETE]
