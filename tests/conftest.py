"""Shared fixtures: a tiny grid study file, an isolated SQLite database, and a CLI runner."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY_GRID = """
[study]
kind = "grid"
description = "tiny test grid"

[model]
cell = "SimpleRNN"
units = 8
optimizer = "adam"

[grid]
learning_rate = [0.001, 0.01]
batch_size = [32, 64]

[report]
rows = "learning_rate"
tables = "batch_size"

[[reference]]
table = { batch_size = 32 }
rows = [{ row = 0.001, train = [0.5], test = 0.5 }]

[[claims]]
quote = "0.01 diverges"
check = "chance_level"
where = { learning_rate = 0.01 }
threshold = 0.2
"""


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY_GRID))
    return path


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def run():
    """Invoke the CLI in-process; returns the click Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from tuner.cli import cli

    def invoke(*args: str, env: dict | None = None):
        return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke
