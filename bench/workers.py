"""Many workers, one PostgreSQL database: a grid shared by N worker processes, then one of them killed.

    python bench/workers.py --quick          # lr-batch (16 cells), 4 workers, --epochs 1 --subset 500

Prints, for the shared grid: trials run, duplicates (cells trained more than once, runs of a cell that
overlapped), wall time, trials per worker. Then the same grid again under a new study name, with one worker
SIGKILLed mid-trial once every cell has been claimed: the time until its trial is failed as stale, and
until a survivor starts its cell again (survivors finish their own trial first), with the heartbeat used.
Each run gets a fresh database on the server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import sqlalchemy
from optuna.trial import TrialState

warnings.filterwarnings("ignore", message=".*(experimental|Heartbeat of storage).*")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner import storage as storages  # noqa: E402
from tuner import study as studies  # noqa: E402
from tuner.spec import cell_key  # noqa: E402


def fresh_database(admin_url: str) -> tuple[str, callable]:
    admin = sqlalchemy.engine.make_url(admin_url)
    name = f"tuner_bench_{secrets.token_hex(4)}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

    return admin.set(database=name).render_as_string(hide_password=False), drop


def start(n: int, args: list[str], logdir: Path, tag: str) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for i in range(n):
        with open(logdir / f"{tag}-w{i + 1}.log", "w") as log:
            cmd = [sys.executable, "-m", "tuner.cli", *args]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def trials_of(url: str, name: str) -> list:
    store = storages.open_storage(storages.resolve(url), create=False, wait_s=0)
    try:
        return studies.load_study(store, name)[0].get_trials(deepcopy=True)
    except Exception:
        return []
    finally:
        store.engine.dispose()


def cell(t, names) -> tuple:
    return cell_key({**t.system_attrs.get("fixed_params", {}), **t.params}, names)


def duplicates(trials: list, names: list[str]) -> tuple[int, int]:
    """(cells with more than one COMPLETE trial, pairs of runs of one cell that overlapped in time)."""
    by_cell = defaultdict(list)
    for t in trials:
        by_cell[cell(t, names)].append(t)
    twice = sum(1 for ts in by_cell.values() if sum(t.state == TrialState.COMPLETE for t in ts) > 1)
    overlaps = 0
    for ts in by_cell.values():
        runs = sorted((t.datetime_start, t.datetime_complete or datetime.max) for t in ts if t.datetime_start)
        overlaps += sum(1 for (_, end), (begin, _) in zip(runs, runs[1:]) if end > begin)
    return twice, overlaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="--epochs 1 --subset 500 (else --subset 2000)")
    parser.add_argument("--grid", default="lr-batch")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--heartbeat", type=int, default=2, help="for the kill run (grace: 3 intervals)")
    parser.add_argument(
        "--admin-url", default=os.environ.get("TUNER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--logs", type=Path, default=Path("/tmp/tuner-bench-workers"))
    opts = parser.parse_args()
    subset = "500" if opts.quick else "2000"
    opts.logs.mkdir(parents=True, exist_ok=True)
    from tuner import spec as specs

    spec = specs.load(opts.grid)
    names = list(spec.grid)
    common = ["grid", opts.grid, "--epochs", "1", "--subset", subset]
    print(f"{opts.grid}: {spec.n_cells} cells, {opts.workers} workers, --epochs 1 --subset {subset}, PostgreSQL")

    # 1. The shared grid.
    url, drop = fresh_database(opts.admin_url)
    try:
        t0 = time.monotonic()
        procs = start(opts.workers, [*common, "--storage", url, "--study-name", "bench"], opts.logs, "grid")
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - t0
        trials = trials_of(url, "bench")
    finally:
        drop()
    states = Counter(t.state.name for t in trials)
    twice, overlaps = duplicates(trials, names)
    per_worker = Counter(t.user_attrs.get("worker", "?").rsplit(":", 1)[-1] for t in trials)
    print(f"  (worker logs in {opts.logs})")
    print(f"shared grid: exit codes {codes}; wall time {wall:.0f}s (from start, TensorFlow start-up included)")
    complete = len({cell(t, names) for t in trials if t.state == TrialState.COMPLETE})
    print(f"  trials run: {len(trials)} ({dict(states)}); cells complete: {complete}/{spec.n_cells}")
    print(f"  duplicates: {twice} cells completed twice, {overlaps} overlapping runs of one cell")
    print(f"  trials per worker (pid: n): {dict(per_worker)}")

    # 2. One worker SIGKILLed mid-trial, once every cell has been claimed.
    url, drop = fresh_database(opts.admin_url)
    try:
        args = [*common, "--storage", url, "--study-name", "bench-kill", "--heartbeat", str(opts.heartbeat)]
        procs = start(opts.workers, args, opts.logs, "kill")
        by_pid = {p.pid: p for p in procs}
        victim = None
        while victim is None and all(p.poll() is None for p in procs):
            trials = trials_of(url, "bench-kill")
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker")]
            if trials and not any(t.state == TrialState.WAITING for t in trials) and running:
                victim = max(running, key=lambda t: t.datetime_start)
            else:
                time.sleep(0.2)
        if victim is None:
            print("kill run: every cell finished before one could be killed; use a bigger --subset")
            return
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        by_pid[pid].send_signal(signal.SIGKILL)
        killed_at = datetime.now()
        codes = [p.wait() for p in procs]
        trials = trials_of(url, "bench-kill")
    finally:
        drop()
    dead = next(t for t in trials if t.number == victim.number)
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    twice, overlaps = duplicates(trials, names)
    print(f"kill run (--heartbeat {opts.heartbeat}, grace {3 * opts.heartbeat}s): worker {pid} SIGKILLed in trial "
          f"{victim.number}; exit codes {codes}")  # fmt: skip
    print(f"  SIGKILL -> trial failed as stale: {(dead.datetime_complete - killed_at).total_seconds():.1f}s")
    if rerun:
        print(f"  SIGKILL -> cell re-run started: {(rerun[0].datetime_start - killed_at).total_seconds():.1f}s, "
              f"re-run {rerun[0].state.name}")  # fmt: skip
    states = Counter(t.state.name for t in trials)
    print(f"  trials: {len(trials)} ({dict(states)}); duplicates: {twice} cells completed twice, {overlaps} overlaps")


if __name__ == "__main__":
    main()
