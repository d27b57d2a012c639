"""Many workers, one database: real `tuner` worker processes against real PostgreSQL and MariaDB servers.

Each test makes a fresh database (or a throwaway PostgreSQL cluster it can stop and restart) and checks the
database afterwards: every grid cell exactly one COMPLETE trial, no two trials of a cell RUNNING at once,
nothing left RUNNING. Trials are tiny (8-unit SimpleRNN, 200 training and 100 test images, one epoch).
No test skips: a server that cannot be reached or started fails it (tests/dbservers.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import dbservers
import numpy as np
import pytest
from optuna.trial import TrialState

from tuner.spec import cell_key

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["learning_rate", "batch_size"]
BACKENDS = ["postgresql", "mariadb"]


def grid_file(tmp_path: Path, learning_rates: list[float], batch_sizes: list[int] = (32, 64)) -> Path:
    path = tmp_path / "workers.toml"
    path.write_text(
        textwrap.dedent(f"""
            [study]
            kind = "grid"
            [model]
            cell = "SimpleRNN"
            units = 8
            optimizer = "adam"
            [grid]
            learning_rate = {list(learning_rates)}
            batch_size = {list(batch_sizes)}
        """)
    )
    return path


def cells(learning_rates, batch_sizes=(32, 64)) -> set[tuple]:
    return {cell_key({"learning_rate": lr, "batch_size": bs}, NAMES) for lr in learning_rates for bs in batch_sizes}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """300 training and 100 test images from the bundled MNIST: a trial trains and tests in about a second."""
    with np.load(ROOT / "tuner" / "datasets" / "mnist.npz") as d:
        arrays = {"x_train": d["x_train"][:300], "y_train": d["y_train"][:300]}
        arrays |= {"x_test": d["x_test"][:100], "y_test": d["y_test"][:100]}
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, **arrays)
    return path


def worker_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    env |= {"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    env |= {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env | extra


class Worker:
    """One `tuner` process, its output in a file (a pipe could fill up and stall it)."""

    def __init__(self, args: list, log: Path, env: dict | None = None) -> None:
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuner.cli", *map(str, args)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env or worker_env(),
                cwd=log.parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker {self.pid} still running after {timeout}s; its output:\n{self.output}")


def start_workers(n: int, url: str, grid: Path, data: Path, tmp_path: Path, *extra, env=None) -> list[Worker]:
    args = ["grid", grid, "--storage", url, "--study-name", "w", "--epochs", "1", "--subset", "200", "--data", data]
    return [Worker([*args, *extra], tmp_path / f"worker{i}.log", env) for i in range(n)]


def wait_all(workers: list[Worker], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    return [w.wait(max(1.0, deadline - time.monotonic())) for w in workers]


def run_scripts(n: int, script: str, *args) -> None:
    """`n` Python processes running `script` with `args`, and a barrier path and `n`; all must succeed."""
    barrier = Path(tempfile.mkdtemp()) / "ready"
    cmd = [sys.executable, "-c", script, *map(str, args), str(barrier), str(n)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=worker_env()) for _ in range(n)]
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * n, "\n".join(err for _, err in results)


def logs(workers: list[Worker]) -> str:
    return "\n".join(f"--- worker {w.pid}:\n{w.output}" for w in workers)


def load_trials(url: str, name: str = "w") -> list:
    from tuner import storage, study

    store = storage.open_storage(storage.resolve(url), create=False, wait_s=0)
    try:
        return study.load_study(store, name)[0].get_trials(deepcopy=True)
    finally:
        store.engine.dispose()


def wait_for(predicate, url: str, name: str, what: str, workers: list[Worker], timeout: float = 300):
    """Poll the study until `predicate(trials)` returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate(load_trials(url, name))
        except Exception:  # the study may not exist yet
            found = None
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs(workers)}")


def cell_of(trial) -> tuple:
    """The cell a trial is for: its queued parameters (all a trial killed early has), or those it ran with."""
    return cell_key({**trial.system_attrs.get("fixed_params", {}), **trial.params}, NAMES)


def assert_exactly_once(trials: list, expected: set[tuple]) -> None:
    """Every cell exactly one COMPLETE trial; no two trials of a cell running at overlapping times."""
    by_cell = defaultdict(list)
    for t in trials:
        by_cell[cell_of(t)].append(t)
    assert set(by_cell) == expected
    assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    for key, ts in by_cell.items():
        assert [t.state for t in ts].count(TrialState.COMPLETE) == 1, (key, [(t.number, t.state) for t in ts])
        runs = sorted((t.datetime_start, t.datetime_complete or datetime.max, t.number) for t in ts if t.datetime_start)
        for (_, end, a), (start, _, b) in zip(runs, runs[1:]):
            assert end <= start, f"cell {key}: trials {a} and {b} ran at the same time"


# --- starting together on an empty database ------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_four_workers_start_together_on_an_empty_database_and_train_each_cell_once(kind, tmp_path, small_data):
    lrs = [0.001, 0.01]
    grid = grid_file(tmp_path, lrs)
    with dbservers.fresh_database(dbservers.ensure(kind)) as url:
        workers = start_workers(4, url, grid, small_data, tmp_path)
        codes = wait_all(workers)
        assert codes == [0] * 4, logs(workers)
        trials = load_trials(url)
    assert_exactly_once(trials, cells(lrs))
    assert len(trials) == 4, [(t.number, t.state, t.params) for t in trials]
    ran = {t.user_attrs["worker"] for t in trials}
    assert len(ran) >= 2, f"only {ran} ran trials: the workers did not overlap\n{logs(workers)}"
    assert "Traceback" not in logs(workers)


# --- many workers, cheap objective: the claim protocol under pressure -------------------------------------------

STRESS = """
import glob, random, sys, time
from tuner import spec as specs, storage, study as studies
url, file, barrier, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec = specs.load(file)
u = storage.resolve(url)
open(f"{barrier}.{random.random()}", "w").close()  # all together (once imports are done): the schema race
while len(glob.glob(barrier + ".*")) < n:
    time.sleep(0.01)
store = storage.open_storage(u, create=True, heartbeat_s=2)
study = studies.open_study(store, u, spec, "stress")
if spec.kind == "grid":
    studies.seed_grid(study, spec, u)
    left, done = None, studies.grid_done(spec)
else:
    left, done = studies.search_budget(12)

def objective(trial):
    for name, values in spec.grid.items():
        trial.suggest_categorical(name, values)
    for p in spec.space:
        trial.suggest_float(p.name, p.low, p.high, log=p.log)
    time.sleep(random.uniform(0.05, 0.3))
    return random.random()

studies.run_trials(study, u, objective, new_trials_left=left, done=done)
"""


@pytest.mark.parametrize("kind", BACKENDS)
def test_six_workers_start_at_once_on_an_empty_database_and_share_30_cells_exactly_once(kind, tmp_path):
    """Six processes create the schema at the same instant (plain Optuna crashes here: PostgreSQL's
    `type "studydirection" already exists`, MariaDB's duplicate table), then claim cells as fast as they can."""
    lrs = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 0.9]
    grid = grid_file(tmp_path, lrs, [16, 32, 64])
    with dbservers.fresh_database(dbservers.ensure(kind)) as url:
        run_scripts(6, STRESS, url, grid)
        trials = load_trials(url, "stress")
    expected = {cell_key({"learning_rate": lr, "batch_size": bs}, NAMES) for lr in lrs for bs in (16, 32, 64)}
    assert_exactly_once(trials, expected)
    assert len(trials) == 30


def test_a_sqlite_reader_does_not_block_a_worker_writing(tmp_path):
    """The embedded default runs in WAL mode (tuner.storage.use_wal): a reader holding a read transaction open
    (optuna-dashboard, `tuner studies`) does not make a worker's commit fail with "database is locked"."""
    import sqlite3

    from tuner import storage

    path = tmp_path / "tuner.db"
    store = storage.open_storage(storage.resolve(f"sqlite:///{path}"), create=True, wait_s=0)
    store.engine.dispose()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM trials").fetchone() == (0,)  # holds its read snapshot
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)  # no waiting: a lock fails at once
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE version_info SET schema_version = schema_version")
    writer.execute("COMMIT")  # with a rollback journal: sqlite3.OperationalError: database is locked
    assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.execute("COMMIT")


def test_search_workers_create_exactly_the_trials_asked_for(tmp_path):
    search = tmp_path / "search.toml"
    search.write_text(
        textwrap.dedent("""
            [study]
            kind = "search"
            [model]
            cell = "SimpleRNN"
            units = 8
            [search.learning_rate]
            low = 0.0001
            high = 0.1
            log = true
        """)
    )
    with dbservers.fresh_database(dbservers.ensure_postgres()) as url:
        run_scripts(4, STRESS, url, search)
        trials = load_trials(url, "stress")
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 12
    assert [t.number for t in trials if t.state != TrialState.COMPLETE] == []


# --- workers that die or are stopped ---------------------------------------------------------------------------


def test_killed_worker_cell_is_rerun_and_terminated_worker_hands_back(tmp_path, small_data):
    """SIGKILL one worker mid-trial and SIGTERM another: the survivor re-runs both cells; the study ends complete."""
    lrs = [0.001, 0.01]
    grid = grid_file(tmp_path, lrs)
    with dbservers.fresh_database(dbservers.ensure_postgres()) as url:
        # six epochs of 200 images: long enough to be caught mid-trial
        workers = start_workers(3, url, grid, small_data, tmp_path, "--heartbeat", "1", "--epochs", "6")
        by_pid = {w.pid: w for w in workers}

        def two_early(trials):  # two workers, each with a trial that has at least 4 epochs to go
            early = {
                int(t.user_attrs["worker"].rsplit(":", 1)[1]): t
                for t in trials
                if t.state == TrialState.RUNNING and len(t.intermediate_values) <= 2 and "worker" in t.user_attrs
            }
            return early if len(early) >= 2 else None

        running = wait_for(two_early, url, "w", "two workers early in a trial", workers)
        (killed_pid, killed_trial), (stopped_pid, stopped_trial) = sorted(running.items())[:2]
        by_pid[killed_pid].proc.kill()
        killed_at = datetime.now()
        by_pid[stopped_pid].proc.send_signal(signal.SIGTERM)
        codes = {w.pid: w.wait() for w in workers}
        trials = load_trials(url)
    assert codes[killed_pid] == -signal.SIGKILL
    assert codes[stopped_pid] == 130, by_pid[stopped_pid].output
    assert "interrupted: the running trial was handed back" in by_pid[stopped_pid].output
    survivor = next(pid for pid in codes if pid not in (killed_pid, stopped_pid))
    assert codes[survivor] == 0, by_pid[survivor].output
    assert_exactly_once(trials, cells(lrs))
    by_number = {t.number: t for t in trials}
    dead, handed = by_number[killed_trial.number], by_number[stopped_trial.number]
    assert dead.state == handed.state == TrialState.FAIL, logs(workers)
    assert "no heartbeat" in dead.user_attrs.get("interrupted", ""), (dead.user_attrs, logs(workers))
    assert "interrupted" in handed.user_attrs.get("interrupted", ""), (handed.user_attrs, logs(workers))
    for old in (dead, handed):
        rerun = [t for t in trials if t.system_attrs.get("failed_trial") == old.number]
        assert [t.state for t in rerun] == [TrialState.COMPLETE], (old.number, rerun)
        assert cell_of(rerun[0]) == cell_of(old)
    rerun_start = next(t.datetime_start for t in trials if t.system_attrs.get("failed_trial") == dead.number)
    print(
        f"\nheartbeat 1s: SIGKILL -> trial failed as stale {(dead.datetime_complete - killed_at).total_seconds():.1f}s,"
        f" -> its cell re-run {(rerun_start - killed_at).total_seconds():.1f}s"
    )


# --- the database goes away ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    dbservers.ensure_postgres()  # the binaries, and a sane machine
    pg = dbservers.ThrowawayPostgres()
    yield pg
    pg.destroy()


@pytest.fixture
def pg(cluster):
    if not cluster.running:
        cluster.start()
    return cluster


def test_workers_ride_out_a_database_restart(pg, tmp_path, small_data):
    # enough work left after the first trial for the restart to fall mid-study: with 4 one-epoch cells, a fast
    # machine finished them all before the database went down
    lrs = [0.001, 0.003, 0.01, 0.03]
    grid = grid_file(tmp_path, lrs)
    url = pg.url(password="")  # the password comes from TUNER_DB_PASSWORD
    env = worker_env(TUNER_DB_PASSWORD=pg.password, TUNER_DB_WAIT="60")
    extra = ("--study-name", "restart", "--heartbeat", "1", "--epochs", "3")
    workers = start_workers(2, url, grid, small_data, tmp_path, *extra, env=env)
    done_one = lambda trials: any(t.state == TrialState.COMPLETE for t in trials)  # noqa: E731
    wait_for(done_one, pg.url(), "restart", "a first complete trial", workers)
    pg.stop()
    time.sleep(2)
    pg.start()
    codes = wait_all(workers)
    output = logs(workers)
    assert codes == [0, 0], output
    assert "unavailable" in output and "is back after" in output, output
    assert "Traceback" not in output and pg.password not in output
    assert_exactly_once(load_trials(pg.url(), "restart"), cells(lrs))


def test_database_that_stays_down_gives_one_line_within_the_bound(pg, tmp_path, small_data):
    grid = grid_file(tmp_path, [0.001, 0.003, 0.01, 0.03])
    env = worker_env(TUNER_DB_WAIT="5")
    (worker,) = start_workers(1, pg.url(), grid, small_data, tmp_path, "--study-name", "down", env=env)
    running = lambda trials: any(t.state == TrialState.RUNNING for t in trials)  # noqa: E731
    wait_for(running, pg.url(), "down", "a running trial", [worker])
    pg.stop()
    stopped = time.monotonic()
    code = worker.wait()
    took = time.monotonic() - stopped
    pg.start()
    lines = worker.output.strip().splitlines()
    assert code == 3, worker.output
    assert lines[-1].startswith(f"error: database {pg.url(password='***')} unreachable for"), lines[-1]
    assert "--db-wait 5" in lines[-1]
    assert "Traceback" not in worker.output and pg.password not in worker.output
    # The bound is --db-wait (5s here) plus the rest of the epoch being trained: far below the default 120s.
    assert took < 100, f"gave up only after {took:.0f}s"


# --- passwords are never shown -----------------------------------------------------------------------------------


def _tuner(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_password_is_never_printed(pg, tmp_path):
    """Wrong passwords (in the URL, from TUNER_DB_PASSWORD or its file), an unreachable server: one line,
    the URL masked, the password nowhere; a wrong password fails at once, even when waiting is allowed."""
    secret = "Secr3t-p@ss/word"
    quoted = secret.replace("@", "%40").replace("/", "%2F")
    pwfile = tmp_path / "pw"
    pwfile.write_text(secret + "\n")
    nowhere = f"postgresql://tuner:{quoted}@127.0.0.1:{dbservers.free_port()}/x"
    wait = {"TUNER_DB_WAIT": "30"}
    cases = {  # what: (URL, environment, lines expected)
        "wrong password in the URL": (pg.url(password=quoted), wait, 1),
        "wrong password from TUNER_DB_PASSWORD": (pg.url(password=""), {"TUNER_DB_PASSWORD": secret}, 1),
        "wrong password from its file": (pg.url(password=""), {"TUNER_DB_PASSWORD_FILE": str(pwfile)}, 1),
        "MariaDB, wrong password": (f"mysql://root:{quoted}@127.0.0.1:3306/test", wait, 1),
        "unreachable server": (nowhere, {}, 1),
        "unreachable server, waited for": (nowhere, {"TUNER_DB_WAIT": "1"}, 2),  # a notice, then the error
    }
    dbservers.ensure_mariadb()
    for what, (url, extra, n_lines) in cases.items():
        started = time.monotonic()
        done = _tuner("studies", "--storage", url, env=worker_env(**extra))
        out = done.stdout + done.stderr
        lines = out.strip().splitlines()
        assert done.returncode == 3, (what, out)
        assert len(lines) == n_lines and lines[-1].startswith("error: "), (what, out)
        assert "***" in lines[-1] and "Traceback" not in out, (what, out)
        for form in (secret, quoted, "Secr3t", "p@ss", "%40ss"):
            assert form not in out, (what, out)
        assert time.monotonic() - started < 25, (what, "a wrong password must fail at once, not after --db-wait")
    # and with the right password, in the URL, shown nowhere either
    done = _tuner("studies", "--storage", pg.url(), env=worker_env())
    assert done.returncode == 0, done.stderr
    assert pg.password not in done.stdout + done.stderr


# --- tuner.workers: N local workers on one command --------------------------------------------------------------


def test_run_workers_prefixes_each_line_and_returns_the_worst_exit_code():
    import io

    from tuner import workers

    out = io.StringIO()
    assert workers.run_workers(3, ["--version"], out=out, env=worker_env()) == 0
    assert sorted(out.getvalue().splitlines()) == [f"[w{i}] tuner {tuner_version()}" for i in (1, 2, 3)]
    out = io.StringIO()
    assert workers.run_workers(2, ["grid", "no-such-study"], out=out, env=worker_env()) == 2
    assert sorted(line[:5] for line in out.getvalue().splitlines()) == ["[w1] ", "[w2] "]
    assert "unknown study 'no-such-study'" in out.getvalue()


def tuner_version() -> str:
    from importlib.metadata import version

    return version("tuner")


RUN_WORKERS = """
import sys
from tuner import workers
sys.exit(workers.run_workers(2, sys.argv[1:]))
"""


def test_run_workers_passes_sigterm_on_and_each_worker_hands_back(tmp_path, small_data):
    """SIGTERM to the parent reaches both workers (waiting here for a database that is down) once; they
    stop cleanly (130), and so does the parent."""
    grid = grid_file(tmp_path, [0.001])
    url = f"postgresql://tuner:hunter2@127.0.0.1:{dbservers.free_port()}/x"
    args = ["grid", grid, "--storage", url, "--data", small_data, "--subset", "200"]
    log = tmp_path / "parent.log"
    with open(log, "w") as fh:
        parent = subprocess.Popen(
            [sys.executable, "-c", RUN_WORKERS, *map(str, args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=worker_env(TUNER_DB_WAIT="120"),
        )
    deadline = time.monotonic() + 60
    while log.read_text().count("unavailable") < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.2)
    assert log.read_text().count("unavailable") == 2, log.read_text()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(120) == 130, log.read_text()
    lines = log.read_text().splitlines()
    assert {line[:5] for line in lines} == {"[w1] ", "[w2] "}
    assert sum("interrupted" in line for line in lines) == 2, lines
    assert "hunter2" not in log.read_text()
