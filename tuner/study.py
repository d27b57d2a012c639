"""Optuna studies for tuner: sampler and pruner from the spec, and the worker loop that runs trials.

The loop is what makes many workers on one database safe:

- A worker takes a queued (WAITING) trial, or creates a new one, with `claim`, which records the trial's first
  heartbeat in the same transaction that makes it RUNNING (under a row lock: only one worker wins a queued
  trial): no trial is ever RUNNING without one, so none can be running forever unnoticed. New trials are
  created under the study lock, so that the budget is checked and spent in one step. A grid is seeded once,
  under the same lock, with one queued trial per missing cell; grid workers never create a trial of their
  own, so GridSampler never picks a cell twice, and a queued cell that is already running or complete is
  dropped, not trained again.
- A worker that dies stops sending heartbeats. After the grace period (3 intervals) the `Reaper` of any
  other worker (a thread of its own, every interval, even while that worker trains) fails its trial and
  queues its cell again, under the lock. The heartbeat thread only beats: no lock can hold a beat up. A
  worker with nothing to claim waits while trials still run elsewhere, so a dead worker's cell is always
  re-run by a survivor. Ctrl-C or SIGTERM hands the running trial back the same way.
- Every storage call waits out a database restart (tuner.storage), and so does every step of the loop. A
  trial's result is told again until it is stored. Right after an outage no trial is reaped for one grace
  period, so that heartbeats held up by the same outage can catch up.
"""

from __future__ import annotations

import _thread
import contextlib
import copy
import datetime
import gc
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy.engine import URL

from tuner import storage as storages
from tuner.errors import SpecError, StudyNotFound
from tuner.spec import StudySpec, cell_key

SPEC_ATTR = "tuner:spec"
POLL_S = 2.0
T = TypeVar("T")

_log = logging.getLogger(__name__)


class QueuedGridSampler(optuna.samplers.GridSampler):
    """GridSampler for grids whose cells all arrive as queued trials (seed_grid).

    Its `after_trial` decides when a grid is exhausted from grid ids that queued trials never carry (and
    raises KeyError for a one-cell grid); here the worker loop decides when the grid is done, so it does nothing.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        # Seed fixed at 0 for every worker: GridSampler's cell order must agree across processes.
        return QueuedGridSampler(spec.grid, seed=0)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if any(p.type == "categorical" for p in spec.space):
        raise SpecError("the cmaes sampler needs a space without categorical parameters; use tpe or gp")
    return optuna.samplers.CmaEsSampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.objective == "robust":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs, reduction_factor=3)
    if spec.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def worker_id() -> str:
    """Who runs a trial, as `tuner studies` shows it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _locked(storage, url: URL, name: str, step: Callable[[], object]):
    """`step()` under the study lock `name`; the whole step runs again if the database drops meanwhile."""

    def attempt():
        with storages.study_lock(url, name):
            return step()

    with storages.one_line_errors(url):
        return storages.retrying(attempt, url, _db_wait(storage))


def _db_wait(storage) -> float:
    """How long the storage's calls wait for a database that is down (under Optuna's cache, if wrapped)."""
    return getattr(getattr(storage, "_backend", storage), "db_wait_s", 0.0)


def open_study(storage, url: URL, spec: StudySpec, study_name: str) -> optuna.Study:
    """Create the study, or join it if it exists with the same design (running twice is safe)."""

    def create() -> optuna.Study:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=make_sampler(spec, spec.seed),
            pruner=make_pruner(spec),
            directions=["maximize", "maximize"] if spec.objective == "robust" else ["maximize"],
            load_if_exists=True,
        )
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        else:
            _check_same_design(StudySpec.from_dict(stored), spec, study_name)
        return study

    return _locked(storage, url, f"tuner:create:{study_name}", create)


def _check_same_design(old: StudySpec, new: StudySpec, study_name: str) -> None:
    fields = (
        "kind",
        "grid",
        "space",
        "model",
        "batch_size",
        "epochs",
        "seed",
        "subset",
        "data",
        "validation",
        "objective",
        "robust_eps",
    )
    changed = [f for f in fields if getattr(old, f) != getattr(new, f)]
    if changed:
        raise SpecError(
            f"study {study_name!r} already exists with a different {changed[0]} "
            f"({getattr(old, changed[0])!r}); pass --study-name to start a new study"
        )


def load_study(storage, study_name: str) -> tuple[optuna.Study, StudySpec | None]:
    """An existing study and the spec stored with it (None for studies tuner did not make)."""
    rdb = getattr(storage, "_backend", storage)
    with storages.one_line_errors(rdb.tuner_url if isinstance(rdb, storages.TunerStorage) else None):
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
            raise StudyNotFound(f"no study named {study_name!r} in this database (studies: {names})") from None
        stored = study.user_attrs.get(SPEC_ATTR)
        return study, (StudySpec.from_dict(stored) if stored else None)


def _trial_params(t: FrozenTrial) -> dict:
    """A trial's cell: its queued parameters, and those it has suggested so far (a running trial may have
    suggested only some of them: its queued ones still say which cell it is)."""
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def _grid_names(study: optuna.Study) -> list[str] | None:
    """The grid's parameter names, from the spec stored with the study (None for a search)."""
    stored = study.user_attrs.get(SPEC_ATTR) or {}
    return list(stored["grid"]) if stored.get("kind") == "grid" else None


def _claim_lock(study: optuna.Study) -> str:
    return f"tuner:claim:{study.study_name}"


def seed_grid(study: optuna.Study, spec: StudySpec, url: URL, *, retry_errors: bool = True) -> int:
    """Queue one trial for every cell that has none waiting, running or complete. Returns how many.

    With `retry_errors=False` (the loop's re-check) a cell whose last trial raised an error is left alone:
    it is retried when the command is run again, not over and over by the same workers.
    """
    names = list(spec.grid)

    def seed() -> int:
        trials = study.get_trials(deepcopy=False)
        live = {TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE}
        covered = {cell_key(_trial_params(t), names) for t in trials if t.state in live}
        errored = set()
        if not retry_errors:
            last = {cell_key(_trial_params(t), names): t for t in sorted(trials, key=lambda t: t.number)}
            errored = {k for k, t in last.items() if t.state.is_finished() and "error" in t.user_attrs}
        missing = [c for c in spec.cells() if cell_key(c, names) not in covered | errored]
        for cell in missing:
            study.enqueue_trial(cell)
        return len(missing)

    return _locked(study._storage, url, _claim_lock(study), seed)


def _drop_duplicates(study: optuna.Study, trials: list[FrozenTrial], names: list[str]) -> list[FrozenTrial]:
    """The queued trials worth running: a queued cell that is already running or complete (or queued twice,
    which only an ambiguous commit during a database restart can cause) is failed, with `duplicate_of`."""
    storage = study._storage
    busy = (TrialState.RUNNING, TrialState.COMPLETE)
    taken = {cell_key(_trial_params(t), names): t.number for t in trials if t.state in busy}
    keep = []
    for t in sorted((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t._trial_id):
        key = cell_key(_trial_params(t), names)
        if key in taken:
            storage.set_trial_user_attr(t._trial_id, "duplicate_of", taken[key])
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        else:
            taken[key] = t.number
            keep.append(t)
    return keep


def claim(
    study: optuna.Study,
    url: URL,
    *,
    new_trials_left: Callable[[dict[TrialState, int]], bool] | None,
    grid_names: list[str] | None = None,
) -> optuna.Trial | None:
    """The next trial for this worker, RUNNING, or None: a queued one, else (if `new_trials_left(counts)`
    allows, with the study's trial counts by state) a new one.

    A trial's first heartbeat is recorded in the transaction that makes it RUNNING, so it is never RUNNING
    without one. A search takes its trial in one transaction (`TunerStorage.claim_trial`) under the study
    lock, so that the budget is counted and spent in one step, and the lock also keeps it apart from a reaper
    failing a dead worker's trial and queueing it again. A grid drops duplicate cells under the same lock,
    then takes a queued cell under the trial's row lock (`TunerStorage.start_trial`): a worker that loses the
    race for a cell looks again. The sampler runs after all that, outside any lock, so workers do not queue up
    behind it.
    """
    storage = study._storage
    rdb = storages.backend(study)
    if rdb is not None and grid_names is None:  # a search: one transaction under the study lock
        with storages.one_line_errors(url):
            frozen = rdb.claim_trial(study._study_id, worker_id(), new_trials_left, lock=_claim_lock(study))
        if frozen is None:
            return None
        storages.remember(study, frozen)
        return _open_trial(study, frozen._trial_id, url)

    def create() -> int | None:
        if new_trials_left is None or not new_trials_left(_counts(study)):
            return None
        # A new trial, queued: the sampler fills it in when it runs.
        return storage.create_new_trial(study._study_id, template_trial=create_trial(state=TrialState.WAITING))

    def take_grid() -> int | None:
        waiting = _drop_duplicates(study, study.get_trials(deepcopy=False), grid_names)
        return waiting[0]._trial_id if waiting else create()

    def first_waiting() -> int | None:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return min((t._trial_id for t in waiting), default=None)

    while True:
        if grid_names is not None:
            trial_id = _locked(storage, url, _claim_lock(study), take_grid)
        else:
            trial_id = first_waiting()
            if trial_id is None:
                trial_id = _locked(storage, url, _claim_lock(study), create)
        if trial_id is None:
            return None
        if rdb is not None:  # one transaction, under the trial's row lock
            frozen = rdb.start_trial(trial_id, worker_id())
            if frozen is not None:
                storages.remember(study, frozen)
                break
            continue  # another worker took it first: look again
        storage.record_heartbeat(trial_id)
        with contextlib.suppress(UpdateFinishedTrialError):  # taken and finished (or dropped) meanwhile
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                storage.set_trial_user_attr(trial_id, "worker", worker_id())
                break
        # Another worker took it first (its heartbeat is its own now): look again.
    return _open_trial(study, trial_id, url)


def _open_trial(study: optuna.Study, trial_id: int, url: URL) -> optuna.Trial:
    """Optuna's Trial for a trial this worker holds RUNNING (a TunerStorage serves the trial it just read)."""

    def start() -> optuna.Trial:
        study._thread_local.cached_all_trials = None  # as Study.ask does
        return optuna.Trial(study, trial_id)

    try:
        return storages.retrying(start, url, _db_wait(study._storage))
    except KeyboardInterrupt:  # taken, not run yet: handed back as if it had started
        hand_back(study, trial_id, "interrupted", url)
        raise


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def fail_and_requeue(study: optuna.Study, trial_id: int, reason: str, *, max_retry: int | None = None) -> bool:
    """Fail a RUNNING trial and queue its parameters again, with Optuna's retry bookkeeping (`failed_trial`,
    `retry_history`, as RetryHeartbeatStaleTrialCallback keeps it) and the reason in `interrupted`. After
    `max_retry` retries of the same parameters it is given up instead, with an `error` saying why.

    Call under the study lock. Returns False if the trial had finished meanwhile (nothing is done then).
    """
    storage = study._storage
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return False
    history = [*frozen.system_attrs.get("retry_history", []), frozen.number]
    give_up = max_retry is not None and len(history) > max_retry
    try:  # attributes first: a finished trial takes none
        storage.set_trial_user_attr(trial_id, "interrupted", reason)
        if give_up:
            storage.set_trial_user_attr(trial_id, "error", f"not retried: {reason}, {len(history)} times in a row")
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:  # its worker told its result just now
        return False
    if not give_up:
        system_attrs = {
            "fixed_params": _trial_params(frozen),
            "failed_trial": frozen.system_attrs.get("failed_trial", frozen.number),
            "retry_history": history,
        }
        waiting = create_trial(
            state=TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            system_attrs=system_attrs,
        )
        study.add_trial(waiting)
    return True


class Reaper:
    """Fails the trials whose heartbeat stopped (their worker died or lost the database) and queues them again.

    Skipped for one grace period after this process saw the database fail: other workers' heartbeats were
    held up by the same outage and get a chance to resume first.
    """

    def __init__(self, study: optuna.Study, url: URL) -> None:
        self.study, self.url = study, url
        rdb = storages.backend(study)
        interval = rdb.get_heartbeat_interval() if rdb else None
        self.enabled = interval is not None
        self.grace = (rdb.grace_period or 2 * interval) if self.enabled else 0
        self.max_retry = rdb.max_retry if rdb else None
        self.last = -math.inf

    def __call__(self, *, min_gap_s: float = 0.0) -> int:
        """Reap now (unless this reaper looked less than `min_gap_s` ago); returns how many trials were failed
        and queued again."""
        if not self.enabled or storages.health.quiet_for() < self.grace:
            return 0
        if time.monotonic() - self.last < min_gap_s:
            return 0
        self.last = time.monotonic()
        storage, study_id = self.study._storage, self.study._study_id
        if not storage._get_stale_trial_ids(study_id):  # the common case, without taking the lock
            return 0

        def reap() -> int:
            stale = storage._get_stale_trial_ids(study_id)  # again, under the lock
            return sum(
                fail_and_requeue(self.study, trial_id, self._reason(trial_id), max_retry=self.max_retry)
                for trial_id in stale
            )

        return _locked(storage, self.url, _claim_lock(self.study), reap)

    def _reason(self, trial_id: int) -> str:
        who = self.study._storage.get_trial_user_attrs(trial_id).get("worker", "its worker")
        return f"no heartbeat from {who} for {self.grace}s"


class StopRequest:
    """Ctrl-C and SIGTERM, made to stick while trials run.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and when that is inside a garbage
    collector callback (SQLAlchemy and TensorFlow have many) the exception is printed and dropped: the worker
    would train on as if nothing was asked. So the signal is also noted here; the loop checks the note between
    steps, and the heartbeat thread raises KeyboardInterrupt in the main thread again if it was lost. Raised
    inside C code that calls back into Python, it can also come out as another error (SystemError: "bad
    argument to internal function", seen in a worker stopped while it trained): so when an error ends a trial
    while a stop is pending, the loop hands the trial back instead of failing it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.at: float | None = None
        self.signum = signal.SIGINT
        self.handled = False
        self.armed = False  # set while a trial's objective runs: the only time `nudge` interrupts
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            if callable(previous):  # only signals that already raise; default or ignored ones are left alone
                self._previous[sig] = previous
                signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        self.at, self.signum = time.monotonic(), signum
        self._previous[signum](signum, frame)

    def pending(self) -> bool:
        """A stop was asked for and not acted on yet."""
        return self.at is not None and not self.handled

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for and not acted on yet."""
        if self.pending():
            self.handled = True
            raise KeyboardInterrupt

    def nudge(self) -> None:
        """From another thread: interrupt the main thread again if the first interrupt was lost."""
        if self.armed and self.at is not None and not self.handled and time.monotonic() - self.at > 1.0:
            self.at = time.monotonic()
            _thread.interrupt_main(self.signum)  # runs the handler above again, in the main thread


# The heartbeat process: its first line on stdin says where to write (so the URL, password included, is in no
# command line or environment); then it beats every interval for the trial id last read ("-": none), the first
# time one interval after reading it (`claim` recorded the trial's first heartbeat as it took it), and exits
# at EOF, that is when its worker exits or is killed. It imports Optuna only, when its first beat is due.
_BEATER = r"""
import json, os, select, sys, time
interval, grace = float(sys.argv[1]), float(sys.argv[2])
config, storage, trial, due, last, buf = None, None, None, 0.0, None, b""
while True:
    wait = None if trial is None else max(0.0, due - time.monotonic())
    if select.select([0], [], [], wait)[0]:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            if config is None:
                config = json.loads(line)
            else:
                trial, due, last = (None if line.strip() == b"-" else int(line)), time.monotonic() + interval, None
        continue
    started = time.monotonic()
    try:
        if storage is None:  # it reads the schema version: the database must be up
            import optuna  # here, not at start: eight workers starting at once on 2 cores lost 1 s to the imports
            from optuna.storages import RDBStorage
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            storage = RDBStorage(config["url"], engine_kwargs=config["engine"], skip_compatibility_check=True,
                                 skip_table_creation=True)
        storage.record_heartbeat(trial)
    except Exception:
        last = None  # a database blip: the next beat retries (and the gap is the outage's, not slowness)
    else:
        now = time.monotonic()
        if last is not None and now - last > grace / 2:
            print(f"heartbeat of trial id {trial} came {now - last:.1f}s after the last one (grace {grace:.0f}s): "
                  "the machine or the database is slow for this --heartbeat", file=sys.stderr, flush=True)
        last = now
    due = started + interval
"""


class Beater:
    """Records the running trial's heartbeat from a small process of its own.

    A thread is not enough: TensorFlow's main thread holds the GIL for long stretches on a busy machine (beats
    seen 7s apart with a 2s interval), and a trial whose beats come later than the grace period is taken for
    dead while it runs. The process shares nothing with TensorFlow; it stops beating when its worker dies.
    If it cannot be started, or dies, the heartbeat thread beats instead.
    """

    def __init__(self, study: optuna.Study) -> None:
        self.proc: subprocess.Popen | None = None
        self.rdb = storages.backend(study)
        self.interval = self.rdb.get_heartbeat_interval() if self.rdb else None
        self.started = False

    def _start(self) -> None:
        """Start the process, at the first trial (not when the worker starts: eight workers starting together on
        2 cores each paid for the others' interpreters while they took their first trials under the study lock)."""
        self.started = True
        rdb, interval = self.rdb, self.interval
        if rdb is None or interval is None:
            return
        grace = rdb.grace_period or 2 * interval
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BEATER, str(interval), str(grace)],
                stdin=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C at the terminal is for the worker, which then closes stdin
            )
        except OSError as exc:
            _log.warning("no heartbeat process (%s): heartbeats come from a thread", exc)
            return
        self._send(json.dumps({"url": rdb.url, "engine": rdb.engine_kwargs}))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _send(self, line: str) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(f"{line}\n".encode())
                self.proc.stdin.flush()

    def beat(self, trial_id: int | None) -> None:
        if trial_id is not None and not self.started:
            self._start()
        self._send("-" if trial_id is None else str(trial_id))

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def heartbeat(
    study: optuna.Study, trial_id: int, stop: StopRequest | None = None, beater: Beater | None = None
) -> Iterator[None]:
    """Record this trial's heartbeat while it runs: from `beater`'s process if it is alive, else from a
    thread. The thread also makes sure a Ctrl-C or SIGTERM reaches the main thread."""
    storage = study._storage
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    if beater is not None:
        beater.beat(trial_id)
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            started = time.monotonic()
            if beater is None or not beater.alive:
                with storages.no_retry(), contextlib.suppress(Exception):  # a blip: the next beat retries
                    storage.record_heartbeat(trial_id)
            if stop is not None:
                stop.nudge()
            pause = min(interval, 1.0) if stop is not None and stop.at is not None else interval
            done.wait(max(0.0, pause - (time.monotonic() - started)))

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        if beater is not None:
            beater.beat(None)
        thread.join(timeout=2 * storages.CONNECT_TIMEOUT_S)


@contextlib.contextmanager
def reaping(reaper: Reaper, interval: float) -> Iterator[None]:
    """Run the reaper every `interval` seconds in a thread of its own, so that a dead worker's trial is
    noticed on time even while this worker trains (its own heartbeat thread never waits on the lock)."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(interval):
            with storages.no_retry(), contextlib.suppress(Exception):  # the loop's own reaper call retries
                reaper()

    thread = threading.Thread(target=run, name="reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2 * storages.CONNECT_TIMEOUT_S)


@dataclass
class Progress:
    """What the loop tells the terminal; the CLI supplies the callbacks."""

    on_trial_start: Callable[[optuna.Trial], None] = lambda trial: None
    on_trial_end: Callable[[FrozenTrial], None] = lambda frozen: None
    on_wait: Callable[[int], None] = lambda running: None


def hand_back(
    study: optuna.Study, trial_id: int, reason: str, url: URL | None = None, *, number: int | None = None
) -> None:
    """Fail the trial, if it is still running, and queue its parameters again, as for a trial whose worker
    died. One attempt: this runs on the way out (Ctrl-C, SIGTERM); if the database is down, the heartbeat
    timeout does it later."""
    url = url or storages.backend(study).tuner_url
    try:
        with storages.study_lock(url, _claim_lock(study)):
            fail_and_requeue(study, trial_id, reason)
    except Exception as exc:  # best effort, on the way out
        which = f"trial {number}" if number is not None else f"the trial with id {trial_id}"
        _log.warning("could not hand %s back (%s): it is re-run once its heartbeat is stale", which, exc)


def _finish(study: optuna.Study, trial: optuna.Trial, url: URL, wait_s: float, **tell) -> tuple[FrozenTrial, bool]:
    """Tell the trial's outcome, again and again until the database takes it. Returns the stored trial and
    whether it was lost: failed meanwhile by another worker that took this one for dead."""
    storage, trial_id = study._storage, trial._trial_id
    error = tell.pop("error", None)
    value = tell.get("values")
    values = value if isinstance(value, (list, tuple)) else [value]  # one objective, or several
    finite = value is not None and all(v is not None and math.isfinite(v) for v in values)
    expected = tell.get("state") or (TrialState.COMPLETE if finite else TrialState.FAIL)

    def attempt() -> tuple[FrozenTrial, bool]:
        try:
            if error is not None:
                storage.set_trial_user_attr(trial_id, "error", error)
                trial._cached_frozen_trial.user_attrs["error"] = error
            return _tell(study, trial, **tell), False
        except (ValueError, UpdateFinishedTrialError):
            frozen = storage.get_trial(trial_id)
            if not frozen.state.is_finished():
                raise
            # Finished already: by our own earlier attempt whose reply the outage swallowed, or by a reaper.
            return frozen, frozen.state != expected or "interrupted" in frozen.user_attrs

    return storages.retrying(attempt, url, wait_s)


def _tell(study: optuna.Study, trial: optuna.Trial, *, values=None, state: TrialState | None = None) -> FrozenTrial:
    """`Study.tell`, from the trial as this worker holds it instead of reading it back twice (before and after
    the write: 12 statements on top of the write's 3, or 1 on PostgreSQL).

    The same rules: a value that is NaN, not a number, or of the wrong count fails the trial; a pruned trial's
    value is its last intermediate value; the sampler's `after_trial` runs first, and the state is written
    even if it raises. Raises `UpdateFinishedTrialError` if the trial was finished meanwhile.
    """
    frozen = copy.copy(trial._cached_frozen_trial)  # Optuna keeps it current: params, reports, user attributes
    told = [] if values is None else list(values) if isinstance(values, (list, tuple)) else [values]
    if state == TrialState.PRUNED:
        last = frozen.last_step
        told = [] if last is None else [frozen.intermediate_values[last]]
    if state in (None, TrialState.PRUNED):
        feasible = len(told) == len(study.directions) and all(_is_number(v) for v in told)
        if state is None:
            state = TrialState.COMPLETE if feasible else TrialState.FAIL
        told = told if feasible else []
    values_ = [float(v) for v in told] if told and state != TrialState.FAIL else None
    try:
        study.sampler.after_trial(optuna.pruners._filter_study(study, frozen), frozen, state, values_)
    finally:
        study._storage.set_trial_state_values(trial._trial_id, state, values_)
    study._thread_local.cached_all_trials = None
    frozen.state, frozen.values, frozen.datetime_complete = state, values_, datetime.datetime.now()
    return frozen


def _is_number(v) -> bool:
    try:
        return not math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def run_trials(
    study: optuna.Study,
    url: URL,
    objective: Callable[[optuna.Trial], float],
    *,
    new_trials_left: Callable[[list], bool] | None,
    done: Callable[[list], bool],
    progress: Progress | None = None,
    deadline: float | None = None,
) -> None:
    """Run trials until `done(trials)`; wait (re-checking for dead workers' trials) while others still run some.

    Raises `DatabaseUnavailable` if the database stays down longer than the storage's `db_wait_s` (the trial
    being run is then left RUNNING, and re-run by another worker once its heartbeat is stale), and a one-line
    StorageError for any other database error.
    """
    _freeze_once()
    stop = StopRequest()
    stop.install()
    try:
        with storages.one_line_errors(url):
            _Loop(study, url, objective, progress or Progress(), stop).run(new_trials_left, done, deadline)
    finally:
        stop.uninstall()


_FROZEN = threading.Event()


def _freeze_once() -> None:
    """Move what is alive when a process first runs trials (the imported libraries, the data, the study: all of
    it lives as long as the worker) out of the garbage collector's sight, so that its full collections no longer
    walk it. Without this each worker's first full collection came in its first trials: 50 ms of CPU in a worker
    that had imported Optuna alone, eight workers starting together on 2 cores lost 0.2 s to it. Once per
    process: a later call would also keep whatever cyclic garbage was waiting then."""
    if not _FROZEN.is_set():
        _FROZEN.set()
        gc.freeze()


class _Loop:
    """One worker's loop: reap, claim, run, tell; wait while others run; stop when done."""

    def __init__(self, study: optuna.Study, url: URL, objective, progress: Progress, stop: StopRequest) -> None:
        self.study, self.url, self.objective, self.progress, self.stop = study, url, objective, progress, stop
        self.wait_s = _db_wait(study._storage)
        self.interval = study._storage.get_heartbeat_interval()
        self.poll_s = min(POLL_S, self.interval) if self.interval else POLL_S
        self.reaper = Reaper(study, url)

    def retry(self, step: Callable[[], T]) -> T:
        return storages.retrying(step, self.url, self.wait_s)

    def run(self, new_trials_left, done, deadline: float | None) -> None:
        study, url = self.study, self.url
        grid_names = self.retry(lambda: _grid_names(study))
        spec = None if grid_names is None else self.retry(lambda: StudySpec.from_dict(study.user_attrs[SPEC_ATTR]))
        self.beater = Beater(study)
        with contextlib.closing(self.beater), reaping(self.reaper, self.interval or POLL_S):
            while True:
                self.stop.check()
                self.reaper(min_gap_s=self.poll_s)  # the reaping thread looks every interval too
                if deadline is not None and time.monotonic() > deadline:
                    return
                trial = claim(study, url, new_trials_left=new_trials_left, grid_names=grid_names)
                if trial is not None:
                    self.run_one(trial)
                    continue
                trials = self.retry(lambda: study.get_trials(deepcopy=False))
                if done(trials):
                    return
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if running == 0:
                    # Nothing queued, nothing running, not done: a cell whose requeue was lost (e.g. its reaper
                    # died midway) is queued again; cells that raised errors are left for the next run.
                    if spec is not None and seed_grid(study, spec, url, retry_errors=False):
                        continue
                    return
                self.progress.on_wait(running)
                time.sleep(self.poll_s)

    def run_one(self, trial: optuna.Trial) -> None:
        """Run one claimed trial and store its outcome; on Ctrl-C or SIGTERM, hand it back and re-raise."""
        try:
            self.progress.on_trial_start(trial)
            with heartbeat(self.study, trial._trial_id, self.stop, self.beater):  # until the result is stored
                try:
                    self.stop.armed = True  # from here the heartbeat thread re-raises a lost interrupt
                    try:
                        outcome: dict = {"values": self.objective(trial)}
                    finally:
                        self.stop.armed = False
                except optuna.TrialPruned:
                    outcome = {"state": TrialState.PRUNED}
                except storages.DatabaseUnavailable:
                    raise
                except Exception as exc:
                    if self.stop.pending():  # the interrupt, turned into another error on its way out
                        raise KeyboardInterrupt from exc
                    # a failing trial is recorded and the worker goes on to the next
                    outcome = {"state": TrialState.FAIL, "error": f"{exc.__class__.__name__}: {exc}"[:2000]}
                frozen, lost = _finish(self.study, trial, self.url, self.wait_s, **outcome)
        except KeyboardInterrupt:  # at any point: a trial whose outcome is stored already is left as it is
            self.stop.handled = True
            hand_back(self.study, trial._trial_id, "interrupted", self.url, number=trial.number)
            raise
        if lost:
            _log.warning(
                "trial %d was taken for dead while it ran (no heartbeat reached the database in time): "
                "its result is discarded and its parameters were queued again",
                frozen.number,
            )
        self.progress.on_trial_end(frozen)


def grid_done(spec: StudySpec) -> Callable[[list], bool]:
    names, n = list(spec.grid), spec.n_cells

    def done(trials: list) -> bool:
        complete = {cell_key(t.params, names) for t in trials if t.state == TrialState.COMPLETE}
        return len(complete) >= n

    return done


def search_budget(n_trials: int) -> tuple[Callable[[dict[TrialState, int]], bool], Callable[[list], bool]]:
    """`--trials N` counts the study's trials in total: finished (complete or pruned) plus running.

    Returns `left(counts)`, on the study's trial counts by state, and `done(trials)`. `left` counts queued
    trials too: a worker queues a new trial and takes it a moment later, outside the lock, and another worker
    checking the budget meanwhile must see it.
    """
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

    def left(counts: dict[TrialState, int]) -> bool:
        return sum(counts.get(state, 0) for state in counted) < n_trials

    def done(trials: list) -> bool:
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) >= n_trials

    return left, done
