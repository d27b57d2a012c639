"""Optuna studies for tuner: sampler and pruner from the spec, and the worker loop that runs trials.

The loop is what makes many workers on one database safe. A grid is seeded once, under the study lock, with
one queued trial per missing cell; workers only ever take queued trials (again under the lock), so no cell is
trained twice while its first run is alive. A worker that dies stops sending heartbeats; the next worker to
look fails its trial and Optuna's retry callback queues the cell again. Ctrl-C or SIGTERM hands the running
trial back the same way before the worker exits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState
from sqlalchemy.engine import URL

from tuner import storage as storages
from tuner.errors import SpecError, StudyNotFound
from tuner.spec import StudySpec, cell_key

SPEC_ATTR = "tuner:spec"
POLL_S = 2.0


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        # Seed fixed at 0 for every worker: GridSampler's cell order must agree across processes.
        return optuna.samplers.GridSampler(spec.grid, seed=0)
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
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs, reduction_factor=3)
    if spec.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def open_study(storage, url: URL, spec: StudySpec, study_name: str) -> optuna.Study:
    """Create the study, or join it if it exists with the same design (running twice is safe)."""
    with storages.study_lock(url, f"tuner:create:{study_name}"):
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=make_sampler(spec, spec.seed),
            pruner=make_pruner(spec),
            direction="maximize",
            load_if_exists=True,
        )
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is None:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        else:
            _check_same_design(StudySpec.from_dict(stored), spec, study_name)
    return study


def _check_same_design(old: StudySpec, new: StudySpec, study_name: str) -> None:
    fields = ("kind", "grid", "space", "model", "batch_size", "epochs", "seed", "subset", "data", "validation")
    changed = [f for f in fields if getattr(old, f) != getattr(new, f)]
    if changed:
        raise SpecError(
            f"study {study_name!r} already exists with a different {changed[0]} "
            f"({getattr(old, changed[0])!r}); pass --study-name to start a new study"
        )


def load_study(storage, study_name: str) -> tuple[optuna.Study, StudySpec | None]:
    """An existing study and the spec stored with it (None for studies tuner did not make)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        raise StudyNotFound(f"no study named {study_name!r} in this database (studies: {names})") from None
    stored = study.user_attrs.get(SPEC_ATTR)
    return study, (StudySpec.from_dict(stored) if stored else None)


def _trial_params(t: optuna.trial.FrozenTrial) -> dict:
    return t.params or t.system_attrs.get("fixed_params", {})


def seed_grid(study: optuna.Study, spec: StudySpec, url: URL) -> int:
    """Queue one trial for every cell that has none waiting, running or complete. Returns how many."""
    names = list(spec.grid)
    with storages.study_lock(url, f"tuner:claim:{study.study_name}"):
        live = {TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE}
        covered = {cell_key(_trial_params(t), names) for t in study.get_trials(deepcopy=False) if t.state in live}
        missing = [c for c in spec.cells() if cell_key(c, names) not in covered]
        for cell in missing:
            study.enqueue_trial(cell)
    return len(missing)


def claim(study: optuna.Study, url: URL, *, new_trials_left: Callable[[list], bool] | None) -> optuna.Trial | None:
    """The next trial for this worker, or None. Only queued trials, unless `new_trials_left` allows a new one."""
    with storages.study_lock(url, f"tuner:claim:{study.study_name}"):
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or (
            new_trials_left is not None and new_trials_left(trials)
        ):
            trial = study.ask()  # pops a queued trial first: nobody else can pop while we hold the lock
            # A running trial without a heartbeat is never taken for dead: record one before letting go.
            study._storage.record_heartbeat(trial._trial_id)
            return trial
    return None


@contextlib.contextmanager
def heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Record this trial's heartbeat in the background while it runs."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a database blip: the next beat tries again
                storage.record_heartbeat(trial_id)
            stop.wait(interval)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class Progress:
    """What the loop tells the terminal; the CLI supplies the callbacks."""

    on_trial_start: Callable[[optuna.Trial], None] = lambda trial: None
    on_trial_end: Callable[[optuna.trial.FrozenTrial], None] = lambda frozen: None
    on_wait: Callable[[int], None] = lambda running: None


def hand_back(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail the trial and queue its parameters again, as Optuna does for a trial whose worker died."""
    study._storage.set_trial_user_attr(trial._trial_id, "interrupted", reason)
    frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    RetryHeartbeatStaleTrialCallback()(study, frozen)


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
    """Run trials until `done(trials)`; wait (re-checking for stale trials) while others still run some."""
    progress = progress or Progress()
    storage = study._storage
    while True:
        fail_stale_trials(study)  # a dead worker's trial: failed here, queued again by the retry callback
        if deadline is not None and time.monotonic() > deadline:
            return
        trial = claim(study, url, new_trials_left=new_trials_left)
        if trial is None:
            trials = study.get_trials(deepcopy=False)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if done(trials) or running == 0:
                return
            progress.on_wait(running)
            time.sleep(POLL_S)
            continue
        progress.on_trial_start(trial)
        try:
            with heartbeat(storage, trial._trial_id):
                value = objective(trial)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            hand_back(study, trial, "interrupted")
            raise
        except Exception as exc:  # a failing trial is recorded and the worker goes on to the next
            storage.set_trial_user_attr(trial._trial_id, "error", f"{exc.__class__.__name__}: {exc}"[:2000])
            frozen = study.tell(trial, state=TrialState.FAIL)
        else:
            frozen = study.tell(trial, value)
        progress.on_trial_end(frozen)


def grid_done(spec: StudySpec) -> Callable[[list], bool]:
    names, n = list(spec.grid), spec.n_cells

    def done(trials: list) -> bool:
        complete = {cell_key(t.params, names) for t in trials if t.state == TrialState.COMPLETE}
        return len(complete) >= n

    return done


def search_budget(n_trials: int) -> tuple[Callable[[list], bool], Callable[[list], bool]]:
    """`--trials N` counts the study's trials in total: finished (complete or pruned) plus running."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def left(trials: list) -> bool:
        return sum(t.state in counted for t in trials) < n_trials

    def done(trials: list) -> bool:
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) >= n_trials

    return left, done
