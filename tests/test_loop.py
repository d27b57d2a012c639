"""The worker loop's own storage steps against real databases: taking and creating trials (`claim`), reading a
study's trials (`TunerStorage._get_trials`), and telling their outcome (`_tell`), each checked against what a
fresh read of the database, or Optuna's own code, says. Claims and reads run on SQLite, PostgreSQL and
MariaDB (tests/dbservers.py: nothing skips)."""

from __future__ import annotations

import fcntl
import math
import signal
import threading
import time

import dbservers
import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState

from tuner import storage as storages
from tuner import study as studies


@pytest.fixture
def url(tmp_path):
    return storages.resolve(f"sqlite:///{tmp_path / 'loop.db'}")


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def any_url(request, tmp_path):
    """A new empty database of each kind."""
    if request.param == "sqlite":
        yield storages.resolve(f"sqlite:///{tmp_path / 'loop.db'}")
        return
    with dbservers.fresh_database(dbservers.ensure(request.param)) as url:
        yield storages.resolve(url)


def fresh(url) -> storages.TunerStorage:
    """A second storage on the same file: what another process would read."""
    return storages.open_storage(url, create=False)


def new_study(url, name: str = "s", directions=("maximize",)) -> optuna.Study:
    storage = storages.open_storage(url, create=True)
    sampler = optuna.samplers.RandomSampler(seed=0)
    return optuna.create_study(storage=storage, study_name=name, directions=list(directions), sampler=sampler)


def heartbeat_rows(storage: storages.TunerStorage, trial_id: int) -> int:
    with storage.scoped_session() as session:
        return session.query(models.TrialHeartbeatModel).filter_by(trial_id=trial_id).count()


def test_claim_creates_a_trial_running_for_this_worker_with_its_first_heartbeat(any_url):
    url = any_url
    study = new_study(url)
    left, _ = studies.search_budget(5)
    trial = studies.claim(study, url, new_trials_left=left)
    stored = fresh(url).get_trial(trial._trial_id)
    assert stored.state == TrialState.RUNNING and stored.datetime_start is not None
    assert stored.user_attrs == {"worker": studies.worker_id()}
    assert heartbeat_rows(fresh(url), trial._trial_id) == 1
    held = trial._cached_frozen_trial  # what the worker holds without reading it back
    assert (held.number, held.state, held.user_attrs, held.datetime_start) == (
        stored.number,
        stored.state,
        stored.user_attrs,
        stored.datetime_start,
    )
    # The trial takes parameters like any other (Optuna's cache knows it).
    assert -1 <= trial.suggest_float("x", -1, 1) <= 1
    assert fresh(url).get_trial(trial._trial_id).params == trial.params


def test_claim_takes_a_queued_trial_once_with_its_queued_parameters(any_url):
    url = any_url
    study = new_study(url)
    study.enqueue_trial({"x": 0.25}, user_attrs={"origin": "queued"})
    trial = studies.claim(study, url, new_trials_left=None)  # no budget for new trials: only the queued one
    assert trial is not None and trial.suggest_float("x", -1, 1) == 0.25
    stored = fresh(url).get_trial(trial._trial_id)
    assert stored.state == TrialState.RUNNING
    assert stored.user_attrs == {"origin": "queued", "worker": studies.worker_id()}
    assert heartbeat_rows(fresh(url), trial._trial_id) == 1
    assert trial._cached_frozen_trial.user_attrs == stored.user_attrs
    # Taken already: a second worker finds nothing, and a late start of the same trial loses.
    assert studies.claim(study, url, new_trials_left=None) is None
    assert fresh(url).start_trial(trial._trial_id, "someone-else") is None
    assert fresh(url).get_trial(trial._trial_id).user_attrs["worker"] == studies.worker_id()


def test_claim_keeps_the_budget(any_url):
    url = any_url
    study = new_study(url)
    left, _ = studies.search_budget(2)
    assert studies.claim(study, url, new_trials_left=left) is not None
    assert studies.claim(study, url, new_trials_left=left) is not None
    assert studies.claim(study, url, new_trials_left=left) is None
    assert len(fresh(url).get_all_trials(study._study_id)) == 2


def _study_lock_is_free(url, name: str) -> bool:
    """Whether another process could take the study lock `name` at this moment (taking it and freeing it)."""
    if url.get_backend_name() == "sqlite":
        path = storages.sqlite_path(url)
        with open(path.with_name(path.name + ".lock"), "a+") as fh:  # a file of its own: flock conflicts
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fh, fcntl.LOCK_UN)
            return True
    key = storages._lock_key(name)
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        if url.get_backend_name() == "postgresql":
            free = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            if free:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return free
        name = storages._mysql_lock_name(key)
        return conn.execute(sqlalchemy.text("SELECT IS_FREE_LOCK(:n)"), {"n": name}).scalar() == 1


def test_a_claim_counts_and_creates_under_the_study_lock(any_url):
    """The budget is counted and the new trial made while no other worker, and no reaper queueing a dead
    worker's trial again (`study_lock`), can change the study: on PostgreSQL under a lock of the claim's own
    transaction, elsewhere under `study_lock` itself."""
    url = any_url
    study = new_study(url)
    name = studies._claim_lock(study)
    left, _ = studies.search_budget(2)
    seen = []
    rdb = storages.backend(study)
    assert rdb.claim_trial(
        study._study_id, "w", lambda counts: seen.append(_study_lock_is_free(url, name)) or left(counts), lock=name
    )
    assert seen == [False] and _study_lock_is_free(url, name)  # held while counting, free once committed
    assert (
        rdb.claim_trial(study._study_id, "w", lambda counts: seen.append(_study_lock_is_free(url, name)), lock=None)
        is None
    )
    assert seen == [False, True]  # no lock asked: none taken


def test_a_postgresql_claim_waits_for_the_study_lock_before_it_locks_the_study(tmp_path):
    """Whoever holds `study_lock` (another worker's grid step, a reaper) and then numbers a trial locks the
    study's row after the lock; a claim takes them in the same order, so the two cannot deadlock: while it waits
    for the lock, the study's row is free."""
    with dbservers.fresh_database(dbservers.ensure("postgresql")) as raw:
        url = storages.resolve(raw)
        study = new_study(url)
        name = studies._claim_lock(study)
        left, _ = studies.search_budget(5)
        holder = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        result: list = []
        key = storages._lock_key(name)
        with holder.connect() as held, holder.connect() as other:
            held.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            rdb = storages.backend(study)
            claim = threading.Thread(
                target=lambda: result.append(rdb.claim_trial(study._study_id, "w", left, lock=name))
            )
            claim.start()
            try:
                time.sleep(0.5)
                assert claim.is_alive() and result == []  # waiting for the lock
                row = other.execute(
                    sqlalchemy.text("SELECT study_id FROM studies WHERE study_id = :s FOR UPDATE NOWAIT"),
                    {"s": study._study_id},
                ).scalar()  # the row is not held meanwhile: NOWAIT would raise
                assert row == study._study_id
            finally:
                held.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                claim.join(10)
        assert not claim.is_alive() and result[0].number == 0
        with rdb.engine.connect() as conn:  # the claim's connection (the pool hands out the last used): the
            assert conn.execute(sqlalchemy.text("SHOW lock_timeout")).scalar() == "0"  # timeout was its transaction's
        holder.dispose()


def rich_study(url) -> optuna.Study:
    """Two objectives, every kind of parameter, values (infinities too), attributes, intermediate values (NaN and
    infinities too), and trials in every state."""
    study = new_study(url, "rich", ("minimize", "maximize"))
    storage = study._storage
    for number in range(6):
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1.0, log=True)
        trial.suggest_int("units", 8, 256, step=8)
        trial.suggest_categorical("cell", ["lstm", None, 3.5])
        trial.set_user_attr("note", {"k": [number, "é"]})
        storage.set_trial_system_attr(trial._trial_id, "sys", number)
        for step, value in enumerate([float("nan"), float("inf"), float("-inf"), 0.25 * number]):
            storage.set_trial_intermediate_value(trial._trial_id, step, value)
        if number in (0, 1):
            study.tell(trial, [float("-inf"), 0.5 + number])
        elif number == 2:
            study.tell(trial, state=TrialState.PRUNED)
        elif number == 3:
            study.tell(trial, state=TrialState.FAIL)
        # 4 and 5 stay RUNNING
    study.enqueue_trial({"lr": 0.5}, user_attrs={"queued": True})
    return study


def test_reading_trials_gives_what_optunas_read_gives(any_url, monkeypatch):
    """TunerStorage reads a study's trials in one statement of its own: the same trials as Optuna's ORM read,
    field for field (compared as text, since NaN != NaN), for every shape of request Optuna's cache makes."""
    study = rich_study(any_url)
    ours = fresh(any_url)
    ids = [t._trial_id for t in RDBStorage._get_trials(ours, study._study_id, None, set(), -1)]
    assert len(ids) == 7
    shapes = [
        (None, set(), -1),  # everything
        (None, {ids[4], ids[5]}, ids[3]),  # the cache's usual: unfinished ones and anything newer
        (None, set(), ids[5]),  # only newer
        ((TrialState.COMPLETE, TrialState.PRUNED), set(), -1),
        ((TrialState.RUNNING,), {ids[4]}, ids[1]),
        (None, set(), ids[-1]),  # nothing new
    ]
    for states, included, above in shapes:
        theirs = RDBStorage._get_trials(ours, study._study_id, states, included, above)
        assert repr(ours._get_trials(study._study_id, states, included, above)) == repr(theirs)
    monkeypatch.setattr(storages, "MANY_IDS", 1)  # many unfinished ids: read from the lowest, filtered after
    theirs = RDBStorage._get_trials(ours, study._study_id, None, {ids[1], ids[4]}, ids[5])
    assert repr(ours._get_trials(study._study_id, None, {ids[1], ids[4]}, ids[5])) == repr(theirs)
    assert [t.number for t in theirs] == [1, 4, 6]
    with pytest.raises(KeyError):
        ours._get_trials(study._study_id + 1000, None, set(), -1)


def test_reading_a_few_trials_of_a_study_does_not_walk_all_of_its_trials(url):
    """The cache's usual read (the unfinished trials and any newer) finds the trials by their ids. SQLite keeps
    no planner statistics unless told to: it had looked them up through the study's index, filtering out all
    the study's other trials, twice a trial (a read of one trial took 0.15 ms at 1,000 trials, 5.1 ms at
    10,000; bench/storage.py measures it)."""
    storage = storages.open_storage(url, create=True)
    statement = storages._trials_and_related(False, "ids", "sqlite")
    bound = statement.params(study_id=1, ids=[5], above=9)
    with storage.engine.connect() as conn:
        sql = bound.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True, "render_postcompile": True})
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
    steps = [row[-1] for row in plan]
    on_trials = [s for s in steps if s.startswith(("SCAN trials", "SEARCH trials"))]
    assert len(on_trials) == 12, steps  # the trials, and for each table of what they hold: by id, and above an id
    assert all("PRIMARY KEY" in s for s in on_trials), steps
    assert not any("ix_trials_study_id" in s for s in steps), steps


CASES = [
    # (directions, reports, tell arguments)
    (("maximize",), [], {"values": 0.5}),
    (("maximize",), [], {"values": float("nan")}),
    (("maximize",), [], {"values": None}),
    (("maximize",), [], {"values": "not a number"}),
    (("maximize",), [], {"values": float("inf")}),
    (("maximize",), [], {"values": [0.1, 0.2]}),
    (("maximize",), [0.3, 0.7], {"state": TrialState.PRUNED}),
    (("maximize",), [0.3, float("nan")], {"state": TrialState.PRUNED}),
    (("maximize",), [], {"state": TrialState.PRUNED}),
    (("maximize",), [0.3], {"state": TrialState.FAIL}),
    (("maximize", "maximize"), [], {"values": [0.9, 0.8]}),
    (("maximize", "maximize"), [], {"values": 0.9}),
]


@pytest.mark.parametrize(("directions", "reports", "told"), CASES)
def test_tell_stores_what_optunas_tell_stores(url, directions, reports, told):
    """The same outcome told through Optuna's `Study.tell` and through tuner's `_tell`: the same state, values,
    intermediate values and attributes in the database, and the returned trial is what is stored."""
    stored = {}
    for way in ("optuna", "tuner"):
        study = new_study(url, way, directions)
        left, _ = studies.search_budget(1)
        trial = studies.claim(study, url, new_trials_left=left)
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("note", way)
        for step, value in enumerate(reports):
            trial.report(value, step)
        if way == "optuna":
            with pytest.warns(UserWarning) if _fails_quietly(told, directions) else _nothing():
                study.tell(trial, **told)
        else:
            returned = studies._tell(study, trial, **told)
        stored[way] = fresh(url).get_trial(trial._trial_id)
    ours, theirs = stored["tuner"], stored["optuna"]
    assert ours.state == theirs.state
    assert ours.values == theirs.values or (ours.values and all(map(math.isnan, ours.values + theirs.values)))
    assert ours.intermediate_values.keys() == theirs.intermediate_values.keys()
    assert (ours.params, ours.user_attrs["note"]) == (theirs.params, "tuner")
    assert ours.datetime_complete is not None
    assert (returned.state, returned.values, returned.params, returned.number) == (
        ours.state,
        ours.values,
        ours.params,
        ours.number,
    )
    assert returned.user_attrs == ours.user_attrs


def _fails_quietly(told: dict, directions) -> bool:
    """Optuna's tell warns (instead of raising) when values given without a state cannot be stored."""
    if "state" in told:
        return False
    values = told["values"]
    values = values if isinstance(values, list) else [values]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        return True
    return any(map(math.isnan, floats)) or len(floats) != len(directions)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_tell_of_a_trial_finished_meanwhile_raises(url):
    study = new_study(url)
    left, _ = studies.search_budget(1)
    trial = studies.claim(study, url, new_trials_left=left)
    fresh(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)  # a reaper took it for dead
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        studies._tell(study, trial, values=1.0)
    assert fresh(url).get_trial(trial._trial_id).state == TrialState.FAIL


def test_the_heartbeat_process_starts_with_the_first_trial_and_keeps_a_long_trial_alive(url, monkeypatch):
    """The worker's heartbeat process is started when its first trial starts (not with the loop), and beats for
    a trial that runs longer than the grace period (1 s beats, 2 s grace, a 3.5 s trial): the trial completes,
    and its heartbeat moved while it ran, with the process alive (the thread beats only when it is not)."""
    storage = storages.open_storage(url, create=True, heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="long", sampler=optuna.samplers.RandomSampler(seed=0))
    beaters: list = []

    class Recorded(studies.Beater):
        def __init__(self, study):
            super().__init__(study)
            beaters.append(self)
            self.proc_at_start = self.proc

    def beat_of(trial_id: int):
        with fresh(url).scoped_session() as session:
            return session.query(models.TrialHeartbeatModel).filter_by(trial_id=trial_id).one().heartbeat

    seen = {}

    def objective(trial):
        seen["first"] = beat_of(trial._trial_id)
        time.sleep(3.5)
        seen["last"], seen["alive"] = beat_of(trial._trial_id), beaters[0].alive
        return 1.0

    monkeypatch.setattr(studies, "Beater", Recorded)
    left, done = studies.search_budget(1)
    studies.run_trials(study, url, objective, new_trials_left=left, done=done)
    assert beaters[0].proc_at_start is None and beaters[0].proc is not None
    assert seen["alive"] and (seen["last"] - seen["first"]).total_seconds() >= 2
    (trial,) = fresh(url).get_all_trials(study._study_id)
    assert trial.state == TrialState.COMPLETE and "interrupted" not in trial.user_attrs


def _outcome(call):
    try:
        return ("returned", call())
    except Exception as exc:  # the type is what is compared
        return ("raised", type(exc).__name__)


def test_trial_writes_do_what_optunas_do(any_url):
    """Parameters, attributes, intermediate values and state changes written by TunerStorage's own statements
    against the same calls to Optuna's RDBStorage, on two identical studies: the same return value or exception
    at every step (running, queued, finished and missing trials; a clashing distribution; a parameter set twice;
    a reported value replaced), and the same trials stored in the end."""
    from optuna.distributions import FloatDistribution, IntDistribution

    results, stored = {}, {}
    for way in ("optuna", "tuner"):
        study = new_study(any_url, way, ("minimize", "maximize"))
        ours = fresh(any_url)
        a, b = study.ask()._trial_id, study.ask()._trial_id
        study.enqueue_trial({})
        queued = ours._get_trials(study._study_id, (TrialState.WAITING,), set(), -1)[0]._trial_id
        missing = queued + 10_000

        def call(name, *args, _way=way, _ours=ours):
            if _way == "optuna":
                return lambda: getattr(RDBStorage, name)(_ours, *args)
            return lambda: getattr(_ours, name)(*args)

        lr, units = FloatDistribution(1e-4, 1.0, log=True), IntDistribution(8, 64)
        steps = [
            call("_set_trial_param", a, "lr", 0.01, lr, None),  # the study's first "lr": nothing to check
            call("_set_trial_param", b, "lr", 0.02, lr, None),  # checked against a's, read from the database
            call("_set_trial_param", b, "units", 1.0, FloatDistribution(0, 1), lr),  # clashes: ValueError
            call("_set_trial_param", a, "units", 16, units, None),
            call("_set_trial_param", a, "units", 16, units, units),  # set twice: ignored
            call("_set_trial_param", missing, "lr", 0.5, lr, lr),
            call("set_trial_user_attr", a, "note", {"x": [1, "é"]}),
            call("set_trial_user_attr", a, "note", "replaced"),
            call("set_trial_system_attr", b, "sys", 3),
            call("set_trial_system_attr", queued, "sys", 4),  # a queued trial takes attributes
            call("set_trial_system_attr", missing, "sys", 5),
            call("set_trial_intermediate_value", a, 0, 0.5),
            call("set_trial_intermediate_value", a, 0, float("nan")),  # replaced
            call("set_trial_intermediate_value", a, 1, float("-inf")),
            call("set_trial_intermediate_value", missing, 0, 0.5),
            call("set_trial_state_values", a, TrialState.RUNNING),  # running already: False
            call("set_trial_state_values", queued, TrialState.RUNNING),  # taken: True
            call("set_trial_state_values", queued, TrialState.RUNNING),  # taken again: False
            call("set_trial_state_values", a, TrialState.COMPLETE, [float("inf"), 0.5]),
            call("set_trial_state_values", a, TrialState.FAIL),  # finished: UpdateFinishedTrialError
            call("set_trial_user_attr", a, "late", 1),
            call("set_trial_system_attr", a, "late", 1),
            call("set_trial_intermediate_value", a, 2, 1.0),
            call("_set_trial_param", a, "late", 0.5, lr, lr),
            call("set_trial_state_values", b, TrialState.PRUNED),
            call("set_trial_state_values", missing, TrialState.FAIL),
        ]
        results[way] = [_outcome(step) for step in steps]
        stored[way] = [
            (
                t.number,
                t.state,
                t.values,
                t.params,
                t.user_attrs,
                t.system_attrs,
                repr(t.intermediate_values),
                t.datetime_complete is None,
            )
            for t in ours._get_trials(study._study_id, None, set(), -1)
        ]
    assert results["tuner"] == results["optuna"]
    assert ("raised", "ValueError") in results["tuner"] and ("raised", "UpdateFinishedTrialError") in results["tuner"]
    assert ("raised", "KeyError") in results["tuner"] and ("returned", False) in results["tuner"]
    assert stored["tuner"] == stored["optuna"]


def test_a_process_freezes_what_it_holds_once_when_it_first_runs_trials(url, monkeypatch):
    """The loop moves what is alive at its first start out of the garbage collector's sight (gc.freeze), once
    per process: a second study run in the same process does not freeze again (it would keep the garbage
    waiting then)."""
    import gc
    import threading

    frozen = []
    monkeypatch.setattr(studies, "_FROZEN", threading.Event())
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(gc.get_count()))
    for name in ("first", "second"):
        study = new_study(url, name)
        left, done = studies.search_budget(2)
        studies.run_trials(study, url, lambda trial: trial.suggest_float("x", 0, 1), new_trials_left=left, done=done)
        assert len(fresh(url).get_all_trials(study._study_id)) == 2
    assert len(frozen) == 1


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["opening the claimed trial", "the progress display", "the objective"])
def test_ctrl_c_anywhere_between_claiming_a_trial_and_storing_its_outcome_hands_it_back(url, monkeypatch, where):
    """Not only in the objective: a trial taken and not yet told is failed and queued again at once, not left
    RUNNING until its heartbeat goes stale (or for ever, on a storage without heartbeats, as here)."""
    study = new_study(url)
    left, done = studies.search_budget(3)
    progress = studies.Progress()
    if where == "opening the claimed trial":
        monkeypatch.setattr(studies.optuna, "Trial", _interrupt)
    elif where == "the progress display":
        progress.on_trial_start = _interrupt
    with pytest.raises(KeyboardInterrupt):
        studies.run_trials(
            study, url, lambda t: _interrupt(t.suggest_float("x", -1, 1)), new_trials_left=left, done=done,
            progress=progress,
        )  # fmt: skip
    handed, queued = fresh(url).get_all_trials(study._study_id)
    assert handed.state == TrialState.FAIL and handed.user_attrs["interrupted"] == "interrupted"
    assert queued.state == TrialState.WAITING and queued.system_attrs["failed_trial"] == handed.number


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as at a terminal (`pytest &` in a script starts with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_that_comes_out_as_another_error_hands_the_trial_back(url, ctrl_c_raises):
    """Raised inside C code, Ctrl-C or SIGTERM can come out of the objective as another error (a worker stopped
    while it trained failed its trial with `SystemError: ... bad argument to internal function`, and the
    cell was not re-run). With a stop pending, the trial is handed back and the worker stops; the same error
    with no stop pending fails the trial and the worker goes on."""
    study = new_study(url)
    left, done = studies.search_budget(3)

    def objective(trial):
        trial.suggest_float("x", -1, 1)
        if trial.number == 0:
            raise SystemError("bad argument to internal function")
        try:
            signal.raise_signal(signal.SIGINT)  # Python's own handler: KeyboardInterrupt, here
        except KeyboardInterrupt as exc:
            raise SystemError("bad argument to internal function") from exc
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        studies.run_trials(study, url, objective, new_trials_left=left, done=done)
    first, handed, queued = fresh(url).get_all_trials(study._study_id)
    assert first.state == TrialState.FAIL and "SystemError" in first.user_attrs["error"]
    assert "interrupted" not in first.user_attrs
    assert handed.state == TrialState.FAIL and handed.user_attrs["interrupted"] == "interrupted"
    assert "error" not in handed.user_attrs
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["failed_trial"] == handed.number and queued.params == handed.params


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_a_pooled_connection_is_pinged_only_after_sitting_idle_and_replaced_if_dropped(kind, monkeypatch):
    """A worker's storage calls come milliseconds apart: pinging each checkout cost a round trip 7 times a
    trial. A connection is pinged when it sat in the pool longer than PING_IDLE_S; one the server dropped
    meanwhile is then replaced before use. One dropped and used at once fails its statement, and the storage
    call is run again on a new connection."""
    with dbservers.fresh_database(dbservers.ensure(kind)) as raw:
        url = storages.resolve(raw)
        storage = storages.open_storage(url, create=True)
        assert storage.engine_kwargs["pool_pre_ping"]  # as given: what the heartbeat process connects with
        engine = storage.engine
        pings = []
        ping = engine.dialect.do_ping
        monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or ping(c))
        who = "SELECT pg_backend_pid()" if kind == "postgresql" else "SELECT CONNECTION_ID()"
        kill = "SELECT pg_terminate_backend(:id)" if kind == "postgresql" else "KILL :id"
        admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)

        def backend() -> int:
            with engine.connect() as conn:
                return conn.execute(sqlalchemy.text(who)).scalar()

        def drop(backend_id: int) -> None:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(kill), {"id": backend_id})
            time.sleep(0.2)  # the server closes the socket

        engine.dispose()  # one connection in the pool from here
        try:
            first = backend()
            assert backend() == first and pings == []  # used a moment ago: no ping
            drop(first)
            time.sleep(storages.PING_IDLE_S + 0.2)
            second = backend()  # idle past the limit: pinged, found dropped, replaced
            assert len(pings) == 1 and second != first
            drop(second)
            assert storage.get_all_studies() == []  # not pinged: its first statement fails, the call is retried
            assert len(pings) == 1 and backend() not in (first, second)
        finally:
            admin.dispose()
            engine.dispose()
