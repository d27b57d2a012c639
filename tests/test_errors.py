"""Bad input: one line naming the problem, a non-zero exit, no traceback, nothing written to the database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def assert_one_line_error(result, *needles: str) -> None:
    text = result.output
    assert result.exit_code != 0, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def no_db(tmp_path: Path):
    path = tmp_path / "never.db"
    yield f"sqlite:///{path}"
    assert not path.exists(), "a bad command created the database"


def grid_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


BASE = """
[model]
cell = "SimpleRNN"
units = 8
[grid]
learning_rate = [0.001]
"""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[model\ncell = 1", "malformed TOML"),
        (BASE + "[training]\nepochz = 3\n", "unknown key 'epochz' in [training]"),
        (BASE + "[surprise]\n", "unknown key 'surprise' in [top level]"),
        (BASE.replace("0.001]", "0.0]"), "learning_rate must be > 0"),
        (BASE.replace("0.001]", "-1.0]"), "learning_rate must be > 0"),
        (BASE.replace("units = 8", "units = 0"), "units must be >= 1"),
        (BASE.replace('"SimpleRNN"', '"Transformer"'), "cell 'Transformer' is not one of"),
        (BASE + 'optimizer = ["adam", "lion"]\n', "optimizer 'lion' is not one of"),
        (BASE + "[training]\nepochs = 0\n", "epochs must be >= 1"),
        (BASE.replace("units = 8", 'units = "many"'), "[model] units has the wrong type"),
        ("[study]\nkind = 'grid'\n", "a grid study needs a [grid] table"),
        (BASE + "[report]\nrows = 'units'\n", "report.rows names 'units'"),
    ],
)
def test_malformed_study_files(run, tmp_path, no_db, text, needle):
    assert_one_line_error(run("grid", grid_file(tmp_path, text), "--storage", no_db), "error:", needle)


def test_unknown_grid_name_lists_the_shipped_ones(run, no_db):
    assert_one_line_error(run("grid", "lr-bach", "--storage", no_db), "unknown study 'lr-bach'", "lr-batch")


def test_missing_study_file(run, no_db, tmp_path):
    assert_one_line_error(run("grid", tmp_path / "nope.toml", "--storage", no_db), "study file not found")


def test_out_of_range_options_are_refused_by_the_cli(run, tiny_grid, no_db):
    for option in (("--epochs", "0"), ("--subset", "3"), ("--heartbeat", "0")):
        result = run("grid", tiny_grid, *option, "--storage", no_db)
        assert result.exit_code == 2 and "Traceback" not in result.output and option[0] in result.output


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("not a url", "storage URL is not valid"),
        ("oracle://scott@host/db", "unsupported database 'oracle'"),
        ("postgresql+psycopg://tuner:s3cr3t-pw@127.0.0.1:1/tuner", "cannot use database"),
        ("mysql+pymysql://tuner:s3cr3t-pw@127.0.0.1:1/tuner", "cannot use database"),
        ("sqlite:////no/such/folder/x.db", "folder /no/such/folder does not exist"),
    ],
)
def test_bad_or_unreachable_storage(run, tiny_grid, url, needle):
    result = run("grid", tiny_grid, "--epochs", "1", "--subset", "100", "--storage", url)
    assert_one_line_error(result, needle)
    assert "s3cr3t-pw" not in result.output
    if "s3cr3t" in url:
        assert "tuner:***@127.0.0.1:1" in result.output


def test_password_from_environment_is_never_shown(run, tiny_grid):
    url = "postgresql+psycopg://tuner@127.0.0.1:1/tuner"
    result = run("grid", tiny_grid, "--epochs", "1", "--storage", url, env={"TUNER_DB_PASSWORD": "hunter2-xyz"})
    assert_one_line_error(result, "cannot use database", "tuner:***@127.0.0.1:1")
    assert "hunter2-xyz" not in result.output


def test_missing_data_file(run, tiny_grid, no_db, tmp_path):
    missing = tmp_path / "missing.npz"
    assert_one_line_error(run("grid", tiny_grid, "--data", missing, "--storage", no_db), "data file not found")


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x_train": np.zeros((20, 28, 28)), "y_train": np.zeros(20, int)}, "missing array(s) x_test, y_test"),
        ({"x_train": np.zeros((20, 32, 32)), "y_train": np.zeros(20, int), "x_test": np.zeros((5, 28, 28)),
          "y_test": np.zeros(5, int)}, "x_train has shape (20, 32, 32)"),
        ({"x_train": np.zeros((20, 28, 28)), "y_train": np.zeros(19, int), "x_test": np.zeros((5, 28, 28)),
          "y_test": np.zeros(5, int)}, "y_train has shape (19,)"),
        ({"x_train": np.zeros((20, 28, 28)), "y_train": np.full(20, 11), "x_test": np.zeros((5, 28, 28)),
          "y_test": np.zeros(5, int)}, "labels 0..9"),
    ],
)  # fmt: skip
def test_mis_shaped_data_file(run, tiny_grid, no_db, tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert_one_line_error(run("grid", tiny_grid, "--data", path, "--storage", no_db), needle)


def test_data_file_that_is_not_npz(run, tiny_grid, no_db, tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    assert_one_line_error(run("grid", tiny_grid, "--data", path, "--storage", no_db), "not a readable .npz")


def test_report_for_a_study_that_does_not_exist(run, tiny_grid, db):
    assert run("grid", tiny_grid, "--epochs", "1", "--subset", "100", "--storage", db).exit_code == 0
    assert_one_line_error(run("report", "nope", "--storage", db), "no study named 'nope'", "tiny-epochs1-subset100")


def test_report_on_a_database_that_does_not_exist(run, no_db):
    assert_one_line_error(run("report", "lr-batch", "--storage", no_db), "no database at")
    assert_one_line_error(run("studies", "--storage", no_db), "no database at")


def test_same_name_different_design_is_refused_and_writes_nothing(run, tiny_grid, db):
    assert (
        run("grid", tiny_grid, "--epochs", "1", "--subset", "100", "--storage", db, "--study-name", "x").exit_code == 0
    )
    import optuna

    before = len(optuna.load_study(study_name="x", storage=db).trials)
    result = run("grid", tiny_grid, "--epochs", "2", "--subset", "100", "--storage", db, "--study-name", "x")
    assert_one_line_error(result, "already exists with a different epochs")
    assert len(optuna.load_study(study_name="x", storage=db).trials) == before
