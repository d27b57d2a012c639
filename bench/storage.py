"""Per-trial storage and sampler overhead up to 1,000 trials (SQLite, PostgreSQL), and 1-8 workers on PostgreSQL.

    python bench/storage.py --json bench/results/storage.json      # about 10 minutes on 2 cores
    python bench/storage.py --quick
    python bench/storage.py --against /tmp/before --json bench/results/storage_against.json   # another checkout's tuner

Overhead: a trivial objective (one float, returns its square), so every millisecond is the loop's: tuner's own
(`tuner.storage.open_storage` with its default 10 s heartbeat, `tuner.study.run_trials` claiming each trial under
the study lock) against plain `study.optimize` on Optuna's RDBStorage, TPE (seed 0), and tuner's loop with the
random sampler (a quarter of the trials) to separate the sampler's share from the storage's. Reported: mean
milliseconds per trial over all trials and over the last 100 ("at 1,000 trials").

Reads: before each sampling Optuna's cache reads the study's unfinished and new trials. In a study of 1,000
and of 10,000 trials (made by tuner's loop with the random sampler, no ANALYZE: what a study's database looks
like a moment after its trials were written), that read timed as one worker makes it (the trial it runs is the
newest) and as one of several makes it (one trial still unfinished since the middle of the study): milliseconds
a read, the median of 10 blocks of 200. A read that does not grow with the study costs the same at both sizes.

Against (`--against CHECKOUT`, nothing else run): tuner's loop with this checkout's `tuner` and with another
checkout's (an earlier commit's, to measure a change), each run in a process of its own, the two taking turns
(the order reversed every other round), 300 trials of each sampler a run on a new SQLite file and a new
PostgreSQL database: milliseconds a trial of each, medians over the rounds, and their ratio.

Workers: 1, 2, 4 and 8 processes on one PostgreSQL study, an objective that sleeps 0.5 s, 16 trials per
worker, every worker starting at the same instant after its imports. Throughput as a share of ideal
(workers / 0.5 s), from the common start to the last result stored. PostgreSQL 15 at 127.0.0.1:5432 (user
postgres, trust): a throwaway database is created for the run and dropped after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import benchlib

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
SLEEP_S = 0.5


def trivial(trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    return x * x


def sleepy(trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    time.sleep(SLEEP_S)
    return x * x


def _sampler(name: str, seed: int = 0):
    import optuna

    return optuna.samplers.TPESampler(seed=seed) if name == "tpe" else optuna.samplers.RandomSampler(seed=seed)


def loop_overhead(url_text: str, loop: str, sampler: str, n: int) -> dict:
    """`n` trials of `trivial` in this process; per-trial times from the loop's own clock."""
    import optuna

    from tuner import storage as storages
    from tuner import study as studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storages.resolve(url_text)
    name = f"overhead-{loop}-{sampler}-{uuid.uuid4().hex[:6]}"
    stamps: list[float] = []
    if loop == "tuner":
        storage = storages.open_storage(url, create=True)
        study = optuna.create_study(storage=storage, study_name=name, sampler=_sampler(sampler))
        left, done = studies.search_budget(n)
        progress = studies.Progress(on_trial_end=lambda frozen: stamps.append(time.perf_counter()))
        t0 = time.perf_counter()
        studies.run_trials(study, url, trivial, new_trials_left=left, done=done, progress=progress)
    else:
        storage = optuna.storages.RDBStorage(url_text, engine_kwargs=storages.engine_kwargs(url))
        study = optuna.create_study(storage=storage, study_name=name, sampler=_sampler(sampler))
        t0 = time.perf_counter()
        study.optimize(trivial, n_trials=n, callbacks=[lambda s, t: stamps.append(time.perf_counter())])
    gaps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]
    last = gaps[-100:]
    return {
        "backend": url.get_backend_name(),
        "loop": loop,
        "sampler": sampler,
        "trials": len(stamps),
        "total_s": stamps[-1] - t0,
        "ms_per_trial_mean": 1000 * (stamps[-1] - t0) / len(stamps),
        "ms_per_trial_last100": 1000 * sum(last) / len(last),
        "ms_per_trial_first100": 1000 * sum(gaps[:100]) / len(gaps[:100]),
    }


def read_cost(url_text: str, n: int) -> dict:
    """A study of `n` trials, then the cache's read (the trials unfinished or newer than the last one finished)
    timed, the median of 10 blocks of 200: as one worker makes it (the last trial unfinished, as it runs: read
    by the range of ids above the last finished) and as one of several makes it (also a trial from the middle
    of the study still unfinished, read by its id)."""
    import statistics

    import optuna

    from tuner import storage as storages
    from tuner import study as studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storages.resolve(url_text)
    storage = storages.open_storage(url, create=True)
    name = f"reads-{n}-{uuid.uuid4().hex[:6]}"
    study = optuna.create_study(storage=storage, study_name=name, sampler=_sampler("random"))
    left, done = studies.search_budget(n)
    studies.run_trials(study, url, trivial, new_trials_left=left, done=done)
    ids = sorted(t._trial_id for t in study.get_trials(deepcopy=False))
    last, middle = ids[-1], ids[len(ids) // 2]

    def timed(unfinished: int) -> float:
        blocks = []
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(200):
                read = storage._get_trials(study._study_id, None, {unfinished}, last - 1)
            blocks.append((time.perf_counter() - t0) / 200)
        assert {t._trial_id for t in read} == {unfinished, last}
        return 1000 * statistics.median(blocks)

    # one worker: the trial it runs is the newest (read by its id range); several: one runs since long ago
    return {"backend": url.get_backend_name(), "trials": n, "ms_per_read": timed(last),
            "ms_per_read_older": timed(middle)}  # fmt: skip


def worker(url_text: str, name: str, loop: str, n_total: int, start_at: float) -> None:
    """One worker process: wait for the common start, then take trials until the study has `n_total`."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from tuner import storage as storages
    from tuner import study as studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storages.resolve(url_text)
    if loop == "tuner":
        storage = storages.open_storage(url, create=True)
    else:
        storage = optuna.storages.RDBStorage(url_text, engine_kwargs=storages.engine_kwargs(url))
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler("tpe", seed=os.getpid()))
    time.sleep(max(0.0, start_at - time.time()))
    if loop == "tuner":
        left, done = studies.search_budget(n_total)
        studies.run_trials(study, url, sleepy, new_trials_left=left, done=done)
    else:
        study.optimize(sleepy, n_trials=n_total, callbacks=[MaxTrialsCallback(n_total, states=(TrialState.COMPLETE,))])


def workers_throughput(url_text: str, loop: str, n_workers: int, per_worker: int) -> dict:
    import optuna

    from tuner import storage as storages

    url = storages.resolve(url_text)
    name = f"workers-{loop}-{n_workers}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(storage=storages.open_storage(url, create=True), study_name=name)
    n_total = n_workers * per_worker
    start_at = time.time() + 6.0 + 0.8 * n_workers  # after every worker's imports, on 2 cores
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", json.dumps([url_text, name, loop, n_total, start_at])])
        for _ in range(n_workers)
    ]
    codes = [p.wait() for p in procs]
    study = optuna.load_study(study_name=name, storage=storages.open_storage(url, create=False))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    end = max(t.datetime_complete.timestamp() for t in complete)
    first = min(t.datetime_start.timestamp() for t in study.trials if t.datetime_start is not None)
    elapsed = end - start_at
    ideal = len(complete) * SLEEP_S / n_workers
    return {
        "loop": loop,
        "workers": n_workers,
        "trials": len(complete),
        "trials_total": len(study.trials),
        "elapsed_s": elapsed,
        "ideal_s": ideal,
        "share_of_ideal": ideal / elapsed,
        "late_start_s": first - start_at,  # the first trial began this long after the common start (slow imports)
        "share_of_ideal_from_first_trial": ideal / (end - first),
        "exit_codes": codes,
    }


class ThrowawayPostgres:
    """A fresh database on the local PostgreSQL for this run, dropped afterwards."""

    def __enter__(self) -> str:
        import psycopg

        self.name = f"tuner_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"

    def __exit__(self, *exc) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def against(other: str, rounds: int, n: int, tmp: str) -> dict:
    """tuner's loop with this checkout's `tuner` and with the checkout `other`'s (an earlier commit, say), each
    in a process of its own taking turns, the order reversed every other round: `n` trials of each sampler on a
    new SQLite file and a new PostgreSQL database. Returns every run and, by database and sampler, the median
    milliseconds a trial of each and their ratio (the other's over this one's: this one's speed-up)."""
    import statistics

    here = str(Path(__file__).resolve().parents[1])

    def commit(path: str) -> str:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    runs = []
    for r in range(rounds):
        for code in [here, other] if r % 2 == 0 else [other, here]:
            for backend in ("sqlite", "postgresql"):
                for sampler in ("random", "tpe"):
                    fresh = ThrowawayPostgres() if backend == "postgresql" else contextlib.nullcontext()
                    with fresh as pg:
                        url = f"sqlite:///{tmp}/against-{len(runs)}.db" if pg is None else pg
                        cmd = [sys.executable, __file__, "--loop", json.dumps([url, sampler, n])]
                        env = {**os.environ, "PYTHONPATH": code}
                        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"the loop failed with {code}'s tuner: {done.stderr.strip()[-2000:]}")
                    run = json.loads(done.stdout.splitlines()[-1])
                    if not run.pop("tuner").startswith(code):
                        raise SystemExit(f"the loop did not import {code}'s tuner")
                    runs.append({"code": "this" if code == here else "other", "round": r, **run})
                    print(f"round {r} {runs[-1]['code']:5} {backend:10} {sampler:6}: {run['ms_per_trial_mean']:6.2f} "
                          f"ms/trial mean over {n} trials", flush=True)  # fmt: skip
    summary = []
    for backend in ("sqlite", "postgresql"):
        for sampler in ("random", "tpe"):
            ms = {code: statistics.median(x["ms_per_trial_mean"] for x in runs if x["code"] == code
                                          and x["backend"] == backend and x["sampler"] == sampler)
                  for code in ("this", "other")}  # fmt: skip
            summary.append({"backend": backend, "sampler": sampler, "trials": n, "this_ms": ms["this"],
                            "other_ms": ms["other"], "speedup": ms["other"] / ms["this"]})  # fmt: skip
            print(f"{backend:10} {sampler:6}: this checkout {ms['this']:6.2f} ms a trial, the other "
                  f"{ms['other']:6.2f} (median of {rounds}): {ms['other'] / ms['this']:.2f}x", flush=True)  # fmt: skip
    return {"this": here, "this_commit": commit(here), "other": other, "other_commit": commit(other),
            "rounds": rounds, "runs": runs, "summary": summary}  # fmt: skip


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=benchlib_hidden())
    p.add_argument("--loop", help=benchlib_hidden())
    p.add_argument("--workers-only", action="store_true", help="only the 1-8 worker throughput runs")
    p.add_argument("--reads-only", action="store_true", help="only the reads at 1,000 and 10,000 trials")
    p.add_argument("--against", metavar="CHECKOUT",
                   help="only tuner's loop, against another checkout's tuner, in turns")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="turns of each checkout with --against (3)")
    args = p.parse_args()
    if args.worker:
        worker(*json.loads(args.worker))
        return
    if args.loop:  # one run of `against`: what it prints last is the run, and which tuner ran it
        import tuner

        url, sampler, n = json.loads(args.loop)
        print(json.dumps({**loop_overhead(url, "tuner", sampler, n), "tuner": tuner.__file__}))
        return
    machine = benchlib.machine()
    print(f"machine: {machine}")
    if args.against:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            found = against(str(Path(args.against).resolve()), args.rounds, 50 if args.quick else 300, tmp)
        benchlib.write_json(args.json, {"machine": machine, "against": found})
        return
    n = 100 if args.quick else 1_000
    per_worker = 4 if args.quick else 16
    counts = [1, 2] if args.quick else [1, 2, 4, 8]
    import tempfile

    out: dict = {"machine": machine, "overhead": [], "reads": [], "workers": []}
    with tempfile.TemporaryDirectory() as tmp, ThrowawayPostgres() as pg:
        for url in () if args.workers_only or args.reads_only else (f"sqlite:///{tmp}/bench.db", pg):
            for loop, sampler, trials in (("tuner", "tpe", n), ("optuna", "tpe", n), ("tuner", "random", n // 4)):
                r = loop_overhead(url, loop, sampler, trials)
                out["overhead"].append(r)
                print(f"{r['backend']:10} {loop:6} loop, {sampler:6}: {r['trials']} trials, "
                      f"{r['ms_per_trial_mean']:6.1f} ms/trial mean, first 100 {r['ms_per_trial_first100']:6.1f}, "
                      f"last 100 {r['ms_per_trial_last100']:6.1f} (goal <= 20 at 1,000)", flush=True)  # fmt: skip
        for url in () if args.workers_only else (f"sqlite:///{tmp}/reads.db", pg):
            for size in (100, 1_000) if args.quick else (1_000, 10_000):
                r = read_cost(url, size)
                out["reads"].append(r)
                print(f"{r['backend']:10} read of the new and unfinished trials in a study of {size:,}: "
                      f"{r['ms_per_read']:.3f} ms (one worker), {r['ms_per_read_older']:.3f} ms (one more trial "
                      f"unfinished since the middle of the study)", flush=True)  # fmt: skip
        for loop in ("tuner", "optuna") if not args.reads_only else ():
            for w in counts:
                r = workers_throughput(pg, loop, w, per_worker)
                out["workers"].append(r)
                print(f"postgresql {loop:6} loop, {w} workers x {per_worker} trials of {SLEEP_S}s: "
                      f"{r['elapsed_s']:5.1f}s vs ideal {r['ideal_s']:4.1f}s = {100 * r['share_of_ideal']:5.1f}% of "
                      f"ideal (goal >= 90% at 8); from the first trial's start "
                      f"{100 * r['share_of_ideal_from_first_trial']:5.1f}%; exit codes {r['exit_codes']}",
                      flush=True)  # fmt: skip
    benchlib.write_json(args.json, out)


def benchlib_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
