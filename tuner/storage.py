"""Every accepted form of "storage" turned into one Optuna RDBStorage, plus what it lacks for many workers.

URLs come from `--storage`, else `TUNER_STORAGE`, else an embedded SQLite file `tuner.db`. A password may
instead come from `TUNER_DB_PASSWORD` or a file named by `TUNER_DB_PASSWORD_FILE`, so it never has to be typed
on a command line. `mask()` is the only form in which a URL is ever shown, and `redact()` scrubs the password
from any driver message before it is shown.

Two things Optuna's RDBStorage leaves to its user when many workers share a database:

- A lock (`study_lock`) to serialise the steps that are racy: creating the schema on an empty database,
  seeding and claiming grid cells, taking a search's next trial, failing a dead worker's trial and queueing it
  again. It is a PostgreSQL advisory lock, a MySQL named lock, or a file lock beside a SQLite file: no table of
  our own. On PostgreSQL a search's claim takes it for its own transaction (`TunerStorage.claim_trial`).
- Riding out a database restart. RDBStorage turns a dropped connection into `StorageInternalError` and gives
  up; a ping on checkout only replaces connections that died while idle in the pool. `TunerStorage` retries
  every storage call that failed for a transient reason (server down, connection lost, starting up) with
  exponential backoff, for up to `--db-wait` seconds from the start of the outage, then raises
  `DatabaseUnavailable` with one line. Inside `study_lock` nothing is retried: the lock itself may have been
  lost with the connection, so the whole locked step is retried by the caller (`retrying`) instead.

And one thing it does slowly: every call goes through the ORM, a transaction and a read of the trial before
each write. `TunerStorage` does what a worker does on every trial (take it, read the study's new trials, set
parameters and attributes, store the outcome) in SQL statements of its own on Optuna's tables, with Optuna's
semantics (tests/test_loop.py compares them with Optuna's code on SQLite, PostgreSQL and MariaDB).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, quote_plus

import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from tuner.errors import StorageError

DEFAULT_URL = "sqlite:///tuner.db"
DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}
CONNECT_TIMEOUT_S = 5
MANY_IDS = 500  # unfinished trials a read of the study names one by one; beyond, it reads from the lowest
DEFAULT_DB_WAIT_S = 120.0  # how long a worker waits for a database that went away before giving up
MAX_BACKOFF_S = 10.0
PING_IDLE_S = 1.0  # a pooled connection idle longer than this is pinged before use (see `ping_when_idle`)
LOCK_TIMEOUT_S = 120.0  # how long a worker waits for a study lock before the wait counts as an outage

_log = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseUnavailable(StorageError):
    """The database stayed unreachable for longer than the wait allowed (`--db-wait`)."""


def resolve(url: str | None) -> URL:
    """The storage URL to use, with the password filled in from the environment if it is not in the URL."""
    text = url or os.environ.get("TUNER_STORAGE") or DEFAULT_URL
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise StorageError(
            "storage URL is not valid: expected e.g. sqlite:///tuner.db or postgresql+psycopg://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise StorageError(
            f"unsupported database {backend!r} in storage URL {mask(parsed)}: use sqlite, postgresql or mysql"
        )
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=DRIVERS.get(backend, parsed.drivername))
    if backend != "sqlite" and parsed.password is None:
        password = _password_from_env()
        if password is not None:
            parsed = parsed.set(password=password)
    return parsed


def _password_from_env() -> str | None:
    if "TUNER_DB_PASSWORD" in os.environ:
        return os.environ["TUNER_DB_PASSWORD"]
    path = os.environ.get("TUNER_DB_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StorageError(f"cannot read TUNER_DB_PASSWORD_FILE {path}: {exc.strerror}") from None
    return None


def mask(url: URL | str) -> str:
    """The URL as it may be shown anywhere: password replaced by ***."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


def redact(text: str, url: URL) -> str:
    """`text` with the URL's password (as typed, or URL-encoded) replaced by ***."""
    password = url.password
    if password:
        for form in sorted({str(password), quote_plus(str(password)), quote(str(password), safe="")}, key=len)[::-1]:
            text = text.replace(form, "***")
    return text


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL (None for other databases and for in-memory SQLite)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def engine_kwargs(url: URL) -> dict:
    """Engine options for Optuna: check connections before use, fail fast on an unreachable host."""
    backend = url.get_backend_name()
    kwargs: dict = {"pool_pre_ping": backend != "sqlite"}  # a file has no server to drop the connection
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    elif backend in ("mysql", "mariadb"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        kwargs["pool_recycle"] = 3600
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # wait on a locked file instead of failing at once
    return kwargs


def ping_when_idle(engine: sqlalchemy.Engine, idle_s: float = PING_IDLE_S) -> sqlalchemy.Engine:
    """SQLAlchemy's `pool_pre_ping`, for connections that sat in the pool longer than `idle_s` only.

    The pre-ping costs a round trip to the server on every checkout: 7 a trial in a worker's loop, each a
    moment after the last. A connection used a second ago is alive or, if the server went away since, fails
    its statement, and `retrying` runs the call again on a new one. One that sat idle through a training epoch
    is checked first, as pre-ping checks it: if the ping finds it dropped, the pool discards it and every
    connection older (`InvalidatePoolError`, as pre-ping does) and connects again. Call on an engine created
    with `pool_pre_ping=False`.
    """
    dialect = engine.dialect

    @sqlalchemy.event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection, record) -> None:
        record.info["idle_from"] = time.monotonic()

    @sqlalchemy.event.listens_for(engine, "checkout")
    def _ping(dbapi_connection, record, proxy) -> None:
        idle_from = record.info.get("idle_from")  # none yet: a new connection
        if idle_from is None or time.monotonic() - idle_from <= idle_s:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as err:
            if dialect.is_disconnect(err, dbapi_connection, None):
                raise sqlalchemy.exc.InvalidatePoolError() from err
            raise

    return engine


def _without_pre_ping(kwargs: dict) -> tuple[dict, bool]:
    """Engine options with SQLAlchemy's pre-ping off, and whether they asked for it (then `ping_when_idle`, with
    the pool handing out the connection used last: the others sit idle, and are pinged when next needed)."""
    ping = bool(kwargs.get("pool_pre_ping"))
    return {**kwargs, "pool_pre_ping": False, **({"pool_use_lifo": True} if ping else {})}, ping


def default_db_wait(create: bool = True) -> float:
    """Seconds to wait for a database that is down: `TUNER_DB_WAIT`, else 120 for workers, 0 for readers."""
    text = os.environ.get("TUNER_DB_WAIT")
    if text:
        try:
            return max(0.0, float(text))
        except ValueError:
            raise StorageError(f"TUNER_DB_WAIT must be a number of seconds, got {text!r}") from None
    return DEFAULT_DB_WAIT_S if create else 0.0


# --- which errors are worth waiting out ------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what caused it, and the driver's own error under SQLAlchemy's wrapper."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        todo.extend([orig if isinstance(orig, BaseException) else None, e.__cause__, e.__context__])


# PostgreSQL SQLSTATEs: connection exceptions, shutdown / starting up, too many connections, serialization
# failure and deadlock (the transaction can simply be run again), lock timeout.
_PG_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03", "53300", "40001", "40P01", "55P03")
_PG_TRANSIENT_FATAL = ("starting up", "shutting down", "not yet accepting", "recovery mode", "too many clients")
# MySQL / MariaDB client and server codes: cannot connect, server gone away, lost connection, shutdown in
# progress, too many connections, lock wait timeout, deadlock, connection killed.
_MYSQL_TRANSIENT_CODES = {0, 1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055, 4031}


def is_transient(exc: BaseException) -> bool:
    """True for errors a restarting or briefly unreachable database causes; False for a wrong password, a
    missing database, bad SQL, or anything that waiting will not fix."""
    for e in _chain(exc):
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)):
            return True
        module = type(e).__module__
        if module.startswith("psycopg"):
            state = getattr(e, "sqlstate", None)
            if state:
                return state.startswith(_PG_TRANSIENT_STATES)
            if type(e).__name__ not in ("OperationalError", "InterfaceError"):
                return False
            text = str(e)
            return "FATAL" not in text or any(s in text for s in _PG_TRANSIENT_FATAL)
        if module.startswith("pymysql"):
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            return code in _MYSQL_TRANSIENT_CODES and type(e).__name__ in ("OperationalError", "InterfaceError")
        if module == "sqlite3":
            return "locked" in str(e) or "busy" in str(e)
    return False


def _driver_message(exc: BaseException) -> str:
    """The first line of the deepest database error under `exc` (the driver's words, not the wrappers')."""
    message = ""
    for e in _chain(exc):
        if isinstance(e, SQLAlchemyError) and getattr(e, "orig", None) is not None:
            message = str(e.orig)
            break
        if type(e).__module__.startswith(("psycopg", "pymysql", "sqlite3")):
            message = str(e)
            break
    lines = (message or str(exc)).strip().splitlines()
    return lines[0].strip() if lines else exc.__class__.__name__


def describe_error(exc: BaseException, url: URL) -> str:
    """One line for a database error, with the URL masked and the driver's first line kept."""
    return f"cannot use database {mask(url)}: {redact(_driver_message(exc), url)}"


@contextlib.contextmanager
def one_line_errors(url: URL | None) -> Iterator[None]:
    """Database errors raised inside become a StorageError: one line, URL masked, password scrubbed."""
    try:
        yield
    except (SQLAlchemyError, StorageInternalError) as exc:
        if url is None:
            raise
        raise StorageError(describe_error(exc, url)) from None


# --- waiting out an outage ---------------------------------------------------------------------------------------


class _Health:
    """This process's view of the database: when the current outage started, when the last error was seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outage_since: float | None = None
        self.last_failure: float | None = None

    def failed(self, url: URL, exc: BaseException, wait_s: float) -> float:
        """Record a transient failure; returns when the outage started. Says so once, if it will be waited out."""
        now = time.monotonic()
        with self._lock:
            self.last_failure = now
            if self.outage_since is None:
                self.outage_since = now
                if wait_s > 0:
                    _log.warning(
                        "database %s unavailable (%s); retrying for up to %.0fs",
                        mask(url),
                        redact(_driver_message(exc), url),
                        wait_s,
                    )
            return self.outage_since

    def ok(self, url: URL) -> None:
        if self.outage_since is None:
            return
        with self._lock:
            if self.outage_since is not None:
                _log.warning("database %s is back after %.0fs", mask(url), time.monotonic() - self.outage_since)
                self.outage_since = None

    def quiet_for(self) -> float:
        """Seconds since this process last saw the database fail (infinity if never)."""
        last = self.last_failure
        return float("inf") if last is None else time.monotonic() - last


health = _Health()
_STATE = threading.local()


@contextlib.contextmanager
def no_retry() -> Iterator[None]:
    """Storage calls in this block, in this thread, fail at once instead of waiting for the database."""
    before = getattr(_STATE, "no_retry", False)
    _STATE.no_retry = True
    try:
        yield
    finally:
        _STATE.no_retry = before


def retrying(fn: Callable[[], T], url: URL, wait_s: float) -> T:
    """`fn()`, called again with exponential backoff while it fails for a transient reason, for up to `wait_s`
    seconds from the start of the outage; then `DatabaseUnavailable`. Other errors pass through at once."""
    if getattr(_STATE, "no_retry", False):
        try:
            result = fn()
        except Exception as exc:
            if is_transient(exc):
                health.failed(url, exc, wait_s)
            raise
        health.ok(url)
        return result
    delay = 0.5
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            since = health.failed(url, exc, wait_s)
            left = since + wait_s - time.monotonic()
            if left <= 0:
                if wait_s <= 0:
                    raise DatabaseUnavailable(describe_error(exc, url)) from None
                raise DatabaseUnavailable(
                    f"database {mask(url)} unreachable for {time.monotonic() - since:.0f}s, giving up "
                    f"(--db-wait {wait_s:.0f}): {redact(_driver_message(exc), url)}"
                ) from None
            time.sleep(min(delay * random.uniform(0.75, 1.25), left))
            delay = min(delay * 2, MAX_BACKOFF_S)
            continue
        health.ok(url)
        return result


class TunerStorage(RDBStorage):
    """Optuna's RDBStorage, whose every database call waits out a restart (see the module docstring).

    Transactions of its own serve the worker loop: `claim_trial` and `start_trial` take a trial in one, where
    Optuna's calls one after another take several, each re-reading what the last one wrote.
    """

    db_wait_s: float = 0.0
    max_retry: int | None = 3

    def __init__(self, url: str, engine_kwargs: dict | None = None, *args, **kwargs) -> None:
        """Optuna's, with `pool_pre_ping` (if asked) done by `ping_when_idle`. `engine_kwargs` keeps the options as
        given: the heartbeat process, which connects with them, waits 10 s between beats and pings each time."""
        given = dict(engine_kwargs or {})
        plain, ping = _without_pre_ping(given)
        super().__init__(url, plain, *args, **kwargs)
        self.engine_kwargs = given
        if ping:
            ping_when_idle(self.engine)

    @functools.cached_property
    def tuner_url(self) -> URL:
        return make_url(self.url)

    def claim_trial(
        self,
        study_id: int,
        worker: str,
        new_allowed: Callable[[dict[TrialState, int]], bool] | None,
        *,
        lock: str | None = None,
    ) -> FrozenTrial | None:
        """The study's first queued trial, else (if `new_allowed(counts)` says so, given the study's trial counts
        by state) a new one, made RUNNING for `worker` with its first heartbeat and its `worker` user attribute,
        all in one transaction under the lock on the study's row (the one Optuna takes to number a new trial)
        and, if `lock` is given, under the study lock of that name (`study_lock`) too. Returns the trial as it
        now is, or None if there is nothing to take and no new trial allowed. The next `get_trial` of it is
        served from what this read, without reading it again.

        Step by step with Optuna's calls (look for a queued trial, count, create, record a heartbeat, set
        RUNNING, read the trial back, set the worker), taking a trial costs about 40 round trips to the
        database; here 7 (a new trial) or 9 (a queued one), in SQL statements of its own rather than the ORM,
        plus 2 to take and free `lock`. On PostgreSQL a new trial takes 5, lock included: its three rows go in
        one statement, and the lock is PostgreSQL's lock for the transaction, taken in the statement that locks
        the study's row and freed when the transaction ends (`_study_row_locked`).
        """
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        in_transaction = lock is not None and self.engine.dialect.name == "postgresql"

        def attempt() -> FrozenTrial | None:
            if lock is None or in_transaction:
                return take()
            with study_lock(self.tuner_url, lock):
                return take()

        def take() -> FrozenTrial | None:
            with self.engine.begin() as conn:
                if in_transaction:
                    locked = _study_row_locked()
                    found = conn.execute(locked, {"study_id": study_id, "key": _lock_key(lock)}).first()
                else:
                    found = conn.execute(_claim_statements()[0], {"study_id": study_id}).first()
                if found is None:
                    raise KeyError(models.NOT_FOUND_MSG)
                census = conn.execute(_claim_statements()[1], {"study_id": study_id}).all()
                counts = {TrialState(state): n for state, n, _ in census}
                waiting = next((first for state, _, first in census if TrialState(state) == TrialState.WAITING), None)
                if waiting is not None:
                    row = sqlalchemy.select(trials.c.trial_id).where(trials.c.trial_id == waiting).with_for_update()
                    conn.execute(row)
                    frozen = self._run_for(conn, study_id, waiting, worker)
                elif new_allowed is not None and new_allowed(counts):
                    frozen = self._new_for(conn, study_id, sum(counts.values()), worker)
                else:
                    return None
            self._started[frozen._trial_id] = frozen
            return frozen

        return retrying(attempt, self.tuner_url, self.db_wait_s)

    def start_trial(self, trial_id: int, worker: str) -> FrozenTrial | None:
        """Take the queued trial `trial_id` for `worker`, as `claim_trial` takes one, in one transaction under the
        lock on the trial's row. Returns the trial as it now is, or None if another worker took it first."""
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__

        def attempt() -> FrozenTrial | None:
            with self.engine.begin() as conn:
                row = conn.execute(
                    sqlalchemy.select(trials.c.study_id, trials.c.state)
                    .where(trials.c.trial_id == trial_id)
                    .with_for_update()
                ).first()
                if row is None:
                    raise KeyError(models.NOT_FOUND_MSG)
                if row.state != TrialState.WAITING:
                    return None  # taken (or dropped) meanwhile: the row lock makes this check and the update atomic
                frozen = self._run_for(conn, row.study_id, trial_id, worker)
            self._started[trial_id] = frozen
            return frozen

        return retrying(attempt, self.tuner_url, self.db_wait_s)

    def _run_for(self, conn: sqlalchemy.Connection, study_id: int, trial_id: int, worker: str) -> FrozenTrial:
        """Within the caller's transaction, which holds the lock on the row of the queued trial `trial_id`: the
        trial is RUNNING, started now, with its first heartbeat and `worker` as its `worker` user attribute.
        Returns it as read back."""
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        beats, attrs = models.TrialHeartbeatModel.__table__, models.TrialUserAttributeModel.__table__
        conn.execute(
            sqlalchemy.update(trials)
            .where(trials.c.trial_id == trial_id)
            .values(state=TrialState.RUNNING, datetime_start=_utc(datetime.datetime.now()))
        )
        if not conn.execute(
            sqlalchemy.update(beats).where(beats.c.trial_id == trial_id).values(heartbeat=sqlalchemy.func.now())
        ).rowcount:
            conn.execute(sqlalchemy.insert(beats).values(trial_id=trial_id))
        who = json.dumps(worker)
        if not conn.execute(
            sqlalchemy.update(attrs).where(attrs.c.trial_id == trial_id, attrs.c.key == "worker").values(value_json=who)
        ).rowcount:
            conn.execute(sqlalchemy.insert(attrs).values(trial_id=trial_id, key="worker", value_json=who))
        only = _trials_and_related(False, "only", conn.dialect.name)
        rows = conn.execute(only, {"study_id": study_id, "ids": [trial_id]}).all()
        return _frozen_trials(rows)[0]

    def _new_for(self, conn: sqlalchemy.Connection, study_id: int, number: int, worker: str) -> FrozenTrial:
        """Within the caller's transaction, which holds the lock on the study's row (so `number`, the count of
        the study's trials, is the new one's number, as Optuna numbers it): a new trial, RUNNING for `worker`
        from now, with its first heartbeat and `worker` as its `worker` user attribute. Nothing else is in it
        yet, so it is not read back."""
        now = datetime.datetime.now()
        if conn.dialect.name == "mysql":  # Optuna's DATETIME columns there keep whole seconds: hold what is stored
            now = now.replace(microsecond=0)
        given = {
            "new_number": number,
            "new_study_id": study_id,
            "new_start": _utc(now),
            "new_worker": json.dumps(worker),
        }
        if conn.dialect.name == "postgresql":  # the three rows in one statement: one round trip instead of three
            trial_id = conn.execute(_new_trial_statements(True)[0], given).scalar_one()
        else:
            trial, beat, attr = _new_trial_statements(False)
            who = given.pop("new_worker")
            trial_id = conn.execute(trial, given).inserted_primary_key[0]
            conn.execute(beat, {"new_trial_id": trial_id})
            conn.execute(attr, {"new_trial_id": trial_id, "new_worker": who})
        return FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=now,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={"worker": worker},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )

    # Writes a trial takes while it runs and when it ends. Optuna's versions each read the trial through the ORM
    # (to check it is still running) and then write, in a transaction; these check and write in one statement
    # where they can (the write applies only to a trial that is still running or queued), and look at the
    # trial only when nothing was written, to raise what Optuna raises.

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """Optuna's `set_trial_state_values`: store `values` (if given) and make the trial `state`, unless it
        finished already (UpdateFinishedTrialError). Returns False if `state` is RUNNING and the trial was not
        queued (another worker took it first)."""
        from optuna.storages._rdb import models

        def attempt() -> bool:
            rows = [models.TrialValueModel.value_to_stored_repr(value) for value in values or ()]
            given = {"move_trial_id": trial_id, "move_now": _utc(datetime.datetime.now())}
            one_statement = self.engine.dialect.name == "postgresql"  # one round trip in autocommit, not four
            try:
                with self._unwrapped() if one_statement else self.engine.begin() as conn:
                    if one_statement:
                        given.update(_bound_values(rows))
                        moved = conn.execute(_moved_with_values(state, len(rows)), given).scalar_one()
                    else:
                        moved = conn.execute(_move(state), given).rowcount
                    if not moved:
                        current = self._state(conn, trial_id)
                        self.check_trial_is_updatable(trial_id, current)
                        return False  # RUNNING asked of a trial that is RUNNING already
                    for objective, (number, kind) in enumerate([] if one_statement else rows):
                        row = {"trial_id": trial_id, "objective": objective, "value": number, "value_type": kind}
                        conn.execute(_value_upsert(conn.dialect.name), row)
            except sqlalchemy.exc.IntegrityError:
                return False
            return True

        return retrying(attempt, self.tuner_url, self.db_wait_s)

    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution,
                         previous_distribution) -> None:  # fmt: skip
        """Optuna's: store a parameter of a running trial, after checking its distribution against the one the
        study already has for that name (read from the database unless given)."""
        from optuna import distributions
        from optuna.storages._rdb import models

        trials, params = models.TrialModel.__table__, models.TrialParamModel.__table__

        def attempt() -> None:
            with self._unwrapped() as conn:
                previous = previous_distribution
                if previous is None:
                    study = sqlalchemy.select(trials.c.study_id).where(trials.c.trial_id == trial_id).scalar_subquery()
                    first = conn.execute(
                        sqlalchemy.select(params.c.distribution_json)
                        .select_from(params.join(trials, params.c.trial_id == trials.c.trial_id))
                        .where(trials.c.study_id == study, params.c.param_name == param_name)
                        .limit(1)
                    ).scalar()
                    previous = None if first is None else distributions.json_to_distribution(first)
                if previous is not None:
                    distributions.check_distribution_compatibility(previous, distribution)
                row = {
                    "trial_id": trial_id, "param_name": param_name, "param_value": param_value_internal,
                    "distribution_json": distributions.distribution_to_json(distribution),
                }  # fmt: skip
                insert = _insert_if_updatable(conn.dialect.name, params.name, tuple(row))
                try:
                    written = conn.execute(insert, row).rowcount
                except sqlalchemy.exc.IntegrityError:
                    return  # set already: Optuna ignores this too
                if not written:
                    self.check_trial_is_updatable(trial_id, self._state(conn, trial_id))

        retrying(attempt, self.tuner_url, self.db_wait_s)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        """Optuna's: set (or replace) the value reported at `step` by a trial that is running or queued."""
        from optuna.storages._rdb import models

        table = models.TrialIntermediateValueModel.__table__
        value, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        row = {"trial_id": trial_id, "step": step, "intermediate_value": value, "intermediate_value_type": kind}
        self._write_if_updatable(table, row, ("intermediate_value", "intermediate_value_type"))

    def set_trial_user_attr(self, trial_id: int, key: str, value) -> None:
        from optuna.storages._rdb import models

        self._set_attr(models.TrialUserAttributeModel.__table__, trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        from optuna.storages._rdb import models

        self._set_attr(models.TrialSystemAttributeModel.__table__, trial_id, key, value)

    def _set_attr(self, table: sqlalchemy.Table, trial_id: int, key: str, value) -> None:
        """Optuna's: set (or replace) an attribute of a trial that is running or queued."""
        self._write_if_updatable(
            table, {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}, ("value_json",)
        )

    def _write_if_updatable(self, table: sqlalchemy.Table, row: dict, replace: tuple[str, ...]) -> None:
        """Insert `row`, or set its `replace` columns where a row with the same unique key exists, if its trial is
        running or queued; else raise what Optuna raises (KeyError, UpdateFinishedTrialError)."""

        def attempt() -> None:
            with self._unwrapped() as conn:
                upsert = _insert_if_updatable(conn.dialect.name, table.name, tuple(row), replace)
                if not conn.execute(upsert, row).rowcount:
                    self.check_trial_is_updatable(row["trial_id"], self._state(conn, row["trial_id"]))

        retrying(attempt, self.tuner_url, self.db_wait_s)

    @contextlib.contextmanager
    def _unwrapped(self) -> Iterator[sqlalchemy.Connection]:
        """A connection for one or two statements that need no transaction around them: on PostgreSQL in
        autocommit (no BEGIN and COMMIT round trips; psycopg sets it on the client side), elsewhere in one
        (with pymysql and pysqlite, setting and resetting autocommit would cost more than it saves)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
            else:
                with conn.begin():
                    yield conn

    @staticmethod
    def _state(conn: sqlalchemy.Connection, trial_id: int) -> TrialState:
        """The trial's state, or KeyError as Optuna raises it for a trial that does not exist."""
        from optuna.storages._rdb import models

        trials = models.TrialModel.__table__
        state = conn.execute(sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)).scalar()
        if state is None:
            raise KeyError(models.NOT_FOUND_MSG)
        return state

    @functools.cached_property
    def _started(self) -> dict[int, FrozenTrial]:
        return {}

    def _get_trials(
        self, study_id: int, states, included_trial_ids: set[int], trial_id_greater_than: int
    ) -> list[FrozenTrial]:
        """The study's trials (in `states`, if given) that are in `included_trial_ids` or have an id above
        `trial_id_greater_than` (all of them if that is -1): what Optuna's RDBStorage reads here, read in one SQL
        statement instead of seven, without the ORM.

        Optuna's trial cache calls this on every `study.trials` and TPE reads the study up to twice a trial, each
        time for the trials that are new or unfinished since the last read: the ORM version costs about 5 ms on
        PostgreSQL for one or two trials (a transaction, a query for the trials and one per related table, 4 ms of
        it the client's CPU); this one about 1 ms (0.4 ms of client CPU, the server's as before, with planner
        statistics up to date: PostgreSQL's autovacuum keeps them so unless it is turned off).
        """
        return retrying(
            lambda: self._read_trials(study_id, states, included_trial_ids, trial_id_greater_than),
            self.tuner_url,
            self.db_wait_s,
        )

    def _read_trials(self, study_id: int, states, included: set[int], greater_than: int) -> list[FrozenTrial]:
        from optuna.storages._rdb import models

        included = {i for i in included if i <= greater_than}
        many = len(included) > MANY_IDS  # a range then, filtered below, keeps the statement small
        mode = "all" if greater_than < 0 else "ids" if included and not many else "above"
        params: dict = {"study_id": study_id}
        if states is not None:
            params["states"] = list(states)
        if mode != "all":
            params["above"] = min(included) - 1 if many else greater_than
        if mode == "ids":
            params["ids"] = sorted(included)
        with self._unwrapped() as conn:  # one statement sees one snapshot
            rows = conn.execute(_trials_and_related(states is not None, mode, conn.dialect.name), params).all()
            if not rows:
                studies = models.StudyModel.__table__
                if conn.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)).first():
                    return []
                raise KeyError(models.NOT_FOUND_MSG)
        if many:
            keep = {r.trial_id for r in rows if r.kind == 0 and (r.trial_id in included or r.trial_id > greater_than)}
            rows = [r for r in rows if r.trial_id in keep]
        return _frozen_trials(rows)


@functools.cache  # built once per shape (eight per kind of database): building a union of six selects costs about 1 ms
def _trials_and_related(with_states: bool, mode: str, dialect: str) -> sqlalchemy.Select:
    """One statement (so one snapshot) for a study's trials and everything Optuna keeps beside them: rows
    (kind, trial_id, key, number, value, text, start, complete), ordered by kind and the order the database
    stored them. Kind 0 is a trial (number, state as text, start, complete); then its parameters (1: name,
    internal value, distribution as JSON), values (2: objective, value, type), user and system attributes
    (3, 4: key, JSON) and intermediate values (5: step, value, type). Bound: `study_id`, `states` if
    `with_states`, and by `mode`: "all" nothing more; "above" `above` (the trials with a greater id); "ids"
    `above` and `ids` (those trials too); "only" `ids` (those trials only).

    Reading a few trials of a large study must not cost in proportion to the study. Without up-to-date planner
    statistics (SQLite never gathers any unless told to; PostgreSQL's autovacuum gathers them a minute or more
    after the rows changed) the databases looked the trials up through the study's index and filtered out all
    the others, and PostgreSQL also scanned the attribute and value tables whole: at 10,000 trials, reading one
    took 5.1 ms on SQLite and 11.5 ms on PostgreSQL. So, except for "all", the study's index is left out of the
    choice (`study_id + 0`: the trials are found by their ids), and on PostgreSQL each trial found has its rows
    in the other tables read by their index on trial_id (a LATERAL subquery, kept apart from the join by
    OFFSET 0, so that the planner cannot make it a scan of the whole table, whatever the statistics say)."""
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    by_ids = mode != "all"
    study = trials.c.study_id + sqlalchemy.literal_column("0") if by_ids else trials.c.study_id
    where = study == sqlalchemy.bindparam("study_id")
    if with_states:
        where &= trials.c.state.in_(sqlalchemy.bindparam("states", expanding=True))
    if mode == "only":
        where &= trials.c.trial_id.in_(sqlalchemy.bindparam("ids", expanding=True))
    elif mode == "ids":
        where &= sqlalchemy.or_(
            trials.c.trial_id.in_(sqlalchemy.bindparam("ids", expanding=True)),
            trials.c.trial_id > sqlalchemy.bindparam("above"),
        )
    elif mode == "above":
        where &= trials.c.trial_id > sqlalchemy.bindparam("above")

    def branch(kind: int, table, fields):
        """The select of one kind of row: `fields(c)`, given the table's columns `c`, gives the key, number,
        value, text, start, complete and row id (None for NULL; the row id None for the table's primary key)."""
        if table is trials:
            c, source, chosen = trials.c, trials, where
        elif by_ids and dialect == "postgresql":  # for each trial found, its rows by the index on trial_id
            found = sqlalchemy.select(trials.c.trial_id).where(where).subquery()
            rows = sqlalchemy.select(table).where(table.c.trial_id == found.c.trial_id)
            rows = rows.offset(sqlalchemy.literal_column("0")).lateral()
            c, source, chosen = rows.c, found.join(rows, sqlalchemy.true()), None
        else:
            c, source, chosen = table.c, table.join(trials, table.c.trial_id == trials.c.trial_id), where
        key, number, value, text, start, complete, row_id = fields(c)
        row_id = c[table.primary_key.columns.values()[0].name] if row_id is None else row_id
        labels = ("kind", "trial_id", "row_id", "key", "number", "value", "text", "start", "complete")
        values = (sqlalchemy.literal(kind, sqlalchemy.Integer), c.trial_id, row_id, key, number, value, text,
                  start, complete)  # fmt: skip
        # A bare NULL takes the type of the other selects' column (PostgreSQL resolves a union's types pair by
        # pair, and every pair here has one typed side); casting a real column could lose precision (MySQL's
        # CAST AS FLOAT is single precision), so only enums are cast, to text.
        select = sqlalchemy.select(
            *((sqlalchemy.null() if x is None else x).label(label) for x, label in zip(values, labels))
        ).select_from(source)
        return select if chosen is None else select.where(chosen)

    def as_text(c):
        return sqlalchemy.cast(c, sqlalchemy.Text)

    p, v, u, s, i = (
        m.__table__
        for m in (
            models.TrialParamModel, models.TrialValueModel, models.TrialUserAttributeModel,
            models.TrialSystemAttributeModel, models.TrialIntermediateValueModel,
        )
    )  # fmt: skip
    union = sqlalchemy.union_all(
        branch(
            0,
            trials,
            lambda c: (None, c.number, None, as_text(c.state), c.datetime_start, c.datetime_complete, c.trial_id),
        ),
        branch(1, p, lambda c: (c.param_name, None, c.param_value, c.distribution_json, None, None, None)),
        branch(2, v, lambda c: (None, c.objective, c.value, as_text(c.value_type), None, None, None)),
        branch(3, u, lambda c: (c.key, None, None, c.value_json, None, None, None)),
        branch(4, s, lambda c: (c.key, None, None, c.value_json, None, None, None)),
        branch(
            5, i, lambda c: (None, c.step, c.intermediate_value, as_text(c.intermediate_value_type), None, None, None)
        ),
    ).subquery()
    columns = [c for c in union.c if c.name != "row_id"]
    return sqlalchemy.select(*columns).order_by(union.c.kind, union.c.trial_id, union.c.row_id)


def _dialect_insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "mysql":
        from sqlalchemy.dialects.mysql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _upsert_statement(dialect: str, table: sqlalchemy.Table, row, keys, values):
    """The dialect's own upsert, as Optuna writes attributes: ON CONFLICT DO UPDATE (PostgreSQL, SQLite) or ON
    DUPLICATE KEY UPDATE (MySQL). `row` is a select of the values in table column order, or None: the row is
    given when the statement runs, as parameters named by column."""
    insert = _dialect_insert(dialect)(table)
    stmt = insert if row is None else insert.from_select(list(keys) + list(values), row)
    if dialect == "mysql":
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in values})
    return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in values})


# Statements a trial runs every time, built once: bound parameters take each call's values, named apart from the
# columns they fill. Built every call, SQLAlchemy's building of them and of their cache keys took more of a trial
# than running them on SQLite; built once, tuner's loop ran 1.33x (random sampler) and 1.43x (TPE) faster a trial
# on SQLite, 1.37x and 1.09x on PostgreSQL (`bench/storage.py --against`, BENCHMARKS.md's seventeenth round).


@functools.cache
def _claim_statements() -> tuple[sqlalchemy.Select, sqlalchemy.Select]:
    """For `claim_trial` outside PostgreSQL: the lock on the study's row (`study_id`), and the study's trials
    counted by state, with the first id in each state."""
    from optuna.storages._rdb import models

    studies, trials = models.StudyModel.__table__, models.TrialModel.__table__
    study = sqlalchemy.bindparam("study_id", type_=sqlalchemy.Integer)
    locked = sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study).with_for_update()
    census = sqlalchemy.select(
        trials.c.state, sqlalchemy.func.count(trials.c.trial_id), sqlalchemy.func.min(trials.c.trial_id)
    ).where(trials.c.study_id == study).group_by(trials.c.state)  # fmt: skip
    return locked, census


@functools.cache
def _new_trial_statements(postgresql: bool) -> tuple:
    """For `_new_for`: a RUNNING trial (`new_number`, `new_study_id`, `new_start`), its heartbeat and its
    `worker` user attribute (`new_worker`, JSON). On PostgreSQL one statement for the three rows, returning the
    trial's id; elsewhere three, the last two bound to `new_trial_id`."""
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    beats, attrs = models.TrialHeartbeatModel.__table__, models.TrialUserAttributeModel.__table__
    trial = sqlalchemy.insert(trials).values(
        number=sqlalchemy.bindparam("new_number", type_=trials.c.number.type),
        study_id=sqlalchemy.bindparam("new_study_id", type_=trials.c.study_id.type),
        state=TrialState.RUNNING,
        datetime_start=sqlalchemy.bindparam("new_start", type_=trials.c.datetime_start.type),
    )
    who = sqlalchemy.bindparam("new_worker", type_=attrs.c.value_json.type)
    if not postgresql:
        new_id = sqlalchemy.bindparam("new_trial_id", type_=sqlalchemy.Integer)
        beat = sqlalchemy.insert(beats).values(trial_id=new_id)
        return trial, beat, sqlalchemy.insert(attrs).values(trial_id=new_id, key="worker", value_json=who)
    created = trial.returning(trials.c.trial_id).cte("created")
    beat = sqlalchemy.insert(beats).from_select(
        ["trial_id", "heartbeat"], sqlalchemy.select(created.c.trial_id, sqlalchemy.func.current_timestamp())
    )
    attr = sqlalchemy.insert(attrs).from_select(
        ["trial_id", "key", "value_json"], sqlalchemy.select(created.c.trial_id, sqlalchemy.literal("worker"), who)
    )
    return (sqlalchemy.select(created.c.trial_id).add_cte(beat.cte("beat"), attr.cte("attr")),)


@functools.cache
def _move(state: TrialState) -> sqlalchemy.Update:
    """The trial `move_trial_id` made `state`, if it is in a state that can become `state` (a queued trial can
    start; a running or queued one can finish or be queued again), started or finished at `move_now`."""
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    now = sqlalchemy.bindparam("move_now", type_=trials.c.datetime_start.type)
    change: dict = {"state": state}
    if state == TrialState.RUNNING:
        change["datetime_start"] = now
    if state.is_finished():
        change["datetime_complete"] = now
    takes = [TrialState.WAITING] if state == TrialState.RUNNING else [TrialState.RUNNING, TrialState.WAITING]
    trial = sqlalchemy.bindparam("move_trial_id", type_=sqlalchemy.Integer)
    return sqlalchemy.update(trials).where(trials.c.trial_id == trial, trials.c.state.in_(takes)).values(**change)


@functools.cache
def _value_upsert(dialect: str):
    """A trial's value for one objective, set or replaced (bound: the columns' names)."""
    from optuna.storages._rdb import models

    return _upsert_statement(dialect, models.TrialValueModel.__table__, None, ["trial_id", "objective"],
                             ["value", "value_type"])  # fmt: skip


def _bound_values(rows: list[tuple]) -> dict:
    """The parameters of `_moved_with_values` for `rows` (each a stored number and its kind, by objective)."""
    return {f"{name}_{objective}": x for objective, row in enumerate(rows) for name, x in zip(("value", "kind"), row)}


@functools.cache
def _moved_with_values(state: TrialState, n_values: int) -> sqlalchemy.Select:
    """PostgreSQL: the trial's move to `state` (`_move`) and its values (`n_values` of them, bound as `value_N`
    and `kind_N` for objective N, a stored number and its kind) in one statement, which counts the rows moved (0
    or 1): the values are stored only if the trial moved. One statement is atomic on its own, with no
    transaction around."""
    from optuna.storages._rdb import models

    stored = models.TrialValueModel.__table__
    move = _move(state)
    moved = move.returning(move.table.c.trial_id).cte("moved")
    count = sqlalchemy.select(sqlalchemy.func.count()).select_from(moved)
    if not n_values:
        return count
    value_type, kind_type = stored.c.value.type, stored.c.value_type.type  # cast: in a UNION, a parameter is text
    each = [
        sqlalchemy.select(
            moved.c.trial_id, sqlalchemy.literal(objective),
            sqlalchemy.cast(sqlalchemy.bindparam(f"value_{objective}", type_=value_type), value_type),
            sqlalchemy.cast(sqlalchemy.bindparam(f"kind_{objective}", type_=kind_type), kind_type),
        )
        for objective in range(n_values)
    ]  # fmt: skip
    values = each[0] if len(each) == 1 else sqlalchemy.union_all(*each)
    upsert = _upsert_statement("postgresql", stored, values, ["trial_id", "objective"], ["value", "value_type"])
    return count.add_cte(upsert.cte("stored"))


@functools.cache
def _insert_if_updatable(dialect: str, table_name: str, columns: tuple[str, ...], replace: tuple[str, ...] = ()):
    """INSERT a row of `columns` (bound by name; replacing the columns `replace` of an existing row with the same
    unique key, if any) only if its trial (`trial_id`) is running or queued: one statement, whose row count says
    whether it was written. Built once for each shape."""
    from optuna.storages._rdb import models

    table = models.BaseModel.metadata.tables[table_name]
    trials = models.TrialModel.__table__
    updatable = sqlalchemy.exists().where(
        trials.c.trial_id == sqlalchemy.bindparam("trial_id", type_=sqlalchemy.Integer),
        trials.c.state.in_([TrialState.RUNNING, TrialState.WAITING]),
    )
    source = sqlalchemy.select(*(sqlalchemy.bindparam(c, type_=table.c[c].type) for c in columns)).where(updatable)
    if not replace:
        stmt = table.insert().from_select(list(columns), source)
    else:
        stmt = _upsert_statement(dialect, table, source, [c for c in columns if c not in replace], list(replace))
    return stmt.execution_options(preserve_rowcount=True)  # SQLAlchemy keeps an INSERT's row count only if asked


def _frozen_trials(rows) -> list[FrozenTrial]:
    """Optuna's FrozenTrials from the rows of `_trials_and_related`, in the rows' order of trials."""
    from optuna import distributions
    from optuna.storages._rdb import models

    value_type = models.TrialValueModel.TrialValueType
    step_type = models.TrialIntermediateValueModel.TrialIntermediateValueType
    found: dict[int, dict] = {}
    for kind, tid, key, number, value, text, start, complete in rows:
        if kind == 0:
            found[tid] = {
                "number": number, "state": TrialState[text], "start": start, "complete": complete,
                "params": {}, "dists": {}, "values": {}, "user": {}, "system": {}, "steps": {},
            }  # fmt: skip
            continue
        t = found[tid]
        if kind == 1:
            d = distributions.json_to_distribution(text)
            t["dists"][key] = d
            t["params"][key] = d.to_external_repr(value)
        elif kind == 2:
            t["values"][number] = models.TrialValueModel.stored_repr_to_value(value, value_type[text])
        elif kind == 5:
            t["steps"][number] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                value, step_type[text]
            )
        else:
            t["user" if kind == 3 else "system"][key] = json.loads(text)
    return [
        FrozenTrial(
            number=t["number"],
            state=t["state"],
            value=None,
            values=[t["values"][k] for k in range(len(t["values"]))] if t["values"] else None,
            datetime_start=_local(t["start"]),
            datetime_complete=_local(t["complete"]),
            params=t["params"],
            distributions=t["dists"],
            user_attrs=t["user"],
            system_attrs=t["system"],
            intermediate_values=t["steps"],
            trial_id=tid,
        )
        for tid, t in found.items()
    ]


def _utc(local: datetime.datetime) -> datetime.datetime:
    """A naive local time as the naive UTC time Optuna's trials table stores."""
    return local.astimezone(datetime.UTC).replace(tzinfo=None)


def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    """A naive UTC time from Optuna's trials table as the naive local time Optuna's trials carry."""
    return None if utc is None else utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


# Every RDBStorage method that talks to the database, including the private ones _CachedStorage calls (those
# TunerStorage has of its own, `_get_trials`, `_set_trial_param`, `set_trial_state_values`,
# `set_trial_intermediate_value` and the trial attributes', retry inside).
_DB_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param", "get_trial_param",
    "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "get_best_trial",
    "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids",
)  # fmt: skip


def _waiting(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: TunerStorage, *args, **kwargs):
        return retrying(lambda: method(self, *args, **kwargs), self.tuner_url, self.db_wait_s)

    return call


for _name in _DB_METHODS:
    setattr(TunerStorage, _name, _waiting(_name))


def remember(study, frozen: FrozenTrial) -> None:
    """Tell Optuna's trial cache over a study's storage about a trial that `TunerStorage` created or took, as
    Optuna's own `_CachedStorage.create_new_trial` does: setting the trial's parameters then needs no read."""
    cache = study._storage
    add = getattr(cache, "_add_trials_to_cache", None)
    if add is None:
        return
    with cache._lock:
        if study._study_id in cache._studies:  # else the study's first read of its trials brings this one in
            add(study._study_id, [frozen])


def _get_trial(self: TunerStorage, trial_id: int) -> FrozenTrial:
    started = self._started.pop(trial_id, None)  # read by `start_trial` a moment ago: no need to read it again
    return started if started is not None else _waiting_get_trial(self, trial_id)


_waiting_get_trial = TunerStorage.get_trial
TunerStorage.get_trial = functools.wraps(_waiting_get_trial)(_get_trial)


def check_reachable(url: URL, *, wait_s: float = 0.0) -> None:
    """Connect once (waiting up to `wait_s` seconds for a database that is down) or raise a one-line error.

    A wrong password or a missing database fails at once: waiting would not fix it.
    """
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_plain(engine_kwargs(url)))
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise StorageError(f"no driver for {mask(url)}: {exc}") from None

    def connect() -> None:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))

    try:
        retrying(connect, url, wait_s)
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(str(exc).replace(" unreachable for", " still unreachable after", 1)) from None
    except SQLAlchemyError as exc:
        raise StorageError(describe_error(exc, url)) from None
    finally:
        engine.dispose()


def _plain(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "pool_pre_ping"}


def use_wal(path: Path) -> None:
    """Put a SQLite file in write-ahead-log mode (the file keeps it: once is enough; a no-op after that).

    In WAL mode a reader (optuna-dashboard, `tuner studies`, another worker's query) and a writer no longer
    block each other, and a commit costs one fsync of the log instead of the rollback journal's several:
    0.17 against 0.64 ms a commit on this project's benchmark machine, and a trial makes about ten. Durability
    is unchanged (synchronous stays FULL). Both files (`-wal`, `-shm`) live beside the database; SQLite folds
    the log back in when the last connection closes.
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


_LOCAL = threading.Lock()


@contextlib.contextmanager
def study_lock(url: URL, name: str, *, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold a lock named `name` across every process sharing this database, for a few milliseconds' work.

    Storage calls inside do not wait out an outage (the lock may have gone with the connection): the block
    raises, and the caller runs the whole step again under `retrying`.
    """
    backend = url.get_backend_name()
    with _LOCAL, no_retry():
        if backend == "sqlite":
            path = sqlite_path(url)
            if path is None:
                yield
                return
            lock_file = path.with_name(path.name + ".lock")
            with open(lock_file, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return
        engine = _lock_engine(url, timeout_s)
        key = _lock_key(name)
        with engine.connect() as conn:  # in autocommit mode: one round trip to take the lock, one to free it
            if backend == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                release = sqlalchemy.text("SELECT pg_advisory_unlock(:k)")
                params: dict = {"k": key}
            else:
                lock_name = _mysql_lock_name(key)
                got = conn.execute(
                    sqlalchemy.text("SELECT GET_LOCK(:n, :t)"), {"n": lock_name, "t": int(timeout_s)}
                ).scalar()
                if got != 1:
                    raise StorageError(f"timed out after {timeout_s:.0f}s waiting for the study lock on {mask(url)}")
                release = sqlalchemy.text("SELECT RELEASE_LOCK(:n)")
                params = {"n": lock_name}
            try:
                yield
            finally:
                try:
                    conn.execute(release, params)
                except SQLAlchemyError as exc:
                    # The connection died, and the server released the lock with it. Drop the connection;
                    # an error from the block itself (if any) is the one that matters.
                    if not is_transient(exc):
                        raise
                    conn.invalidate()


def _lock_key(name: str) -> int:
    """The 64-bit key of the study lock `name` (PostgreSQL's advisory locks are numbered)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _mysql_lock_name(key: int) -> str:
    """The name of MySQL's lock for the study lock of key `key` (its names are strings of up to 64 characters)."""
    return f"tuner:{key:x}"[:64]


@functools.cache
def _study_row_locked(timeout_s: float = LOCK_TIMEOUT_S) -> sqlalchemy.TextClause:
    """PostgreSQL: one statement that takes the study lock for the transaction (`pg_advisory_xact_lock`, which
    waits for `study_lock`'s hold on the same key and makes it wait), then locks the study's row, as
    `study_lock` followed by a SELECT ... FOR UPDATE would, without the two round trips to take and free the
    lock. The lock comes first, as everywhere else: the sub-select is run once, before the scan (an InitPlan),
    and FOR UPDATE locks the row found by the scan. Waiting for the lock gives up after `timeout_s`, as
    `study_lock`'s wait does; the setting holds for this transaction only. Returns the study's id, or no row."""
    return sqlalchemy.text(
        "SELECT studies.study_id FROM studies WHERE studies.study_id = :study_id"
        " AND (SELECT pg_advisory_xact_lock(:key)"
        f" FROM (SELECT set_config('lock_timeout', '{int(timeout_s * 1000)}', true)) AS timeout) IS NOT NULL"
        " FOR UPDATE"
    )


_ENGINES: dict[str, sqlalchemy.Engine] = {}


def _lock_engine(url: URL, timeout_s: float) -> sqlalchemy.Engine:
    """One pooled connection per database for the study locks, in autocommit mode (the locks belong to the
    session, not to a transaction); on PostgreSQL a lock wait gives up after `timeout_s`, set once per
    connection."""
    key = url.render_as_string(hide_password=False)
    if key not in _ENGINES:
        kwargs, ping = _without_pre_ping(engine_kwargs(url))
        engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT", **kwargs)
        if ping:
            ping_when_idle(engine)
        if url.get_backend_name() == "postgresql":

            @sqlalchemy.event.listens_for(engine, "connect")
            def _lock_timeout(dbapi_connection, record) -> None:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute(f"SET lock_timeout = {int(timeout_s * 1000)}")

        _ENGINES[key] = engine
    return _ENGINES[key]


def open_storage(
    url: URL,
    *,
    create: bool,
    heartbeat_s: int = 10,
    grace_s: int | None = None,
    wait_s: float | None = None,
    max_retry: int | None = 3,
) -> TunerStorage:
    """An Optuna RDBStorage on `url`, with heartbeats so a killed worker's trial is noticed and re-run.

    `create=False` is for commands that only read: a SQLite file that does not exist is an error, not a new
    empty database. Schema creation is done under the lock, so workers starting together on an empty
    database do not race each other.

    `wait_s` (default: `default_db_wait`) bounds how long any call waits for a database that went away, for
    the life of the storage. A database that cannot be reached at all when the storage is opened is an error
    at once, unless a wait was asked for (`wait_s` or TUNER_DB_WAIT): a wrong host or port should not look
    like a hang, while workers started before their database can be told to wait for it.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    asked = wait_s is not None or bool(os.environ.get("TUNER_DB_WAIT"))
    wait_s = default_db_wait(create) if wait_s is None else wait_s
    path = sqlite_path(url)
    if path is not None and not create and not path.is_file():
        raise StorageError(f"no database at {path}: run a study first, or pass --storage")
    if path is not None and not path.parent.is_dir():
        raise StorageError(f"cannot create database {path}: folder {path.parent} does not exist")
    check_reachable(url, wait_s=wait_s if asked else 0.0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def make() -> TunerStorage:
        with study_lock(url, "tuner:schema"):
            if path is not None and create:
                use_wal(path)
            storage = TunerStorage(
                url.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s or 3 * heartbeat_s,
                # Used if Optuna's own loop (study.optimize) ever runs on this storage; tuner's loop requeues
                # a dead worker's trial itself (tuner.study.Reaper), under the study lock.
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
        storage.db_wait_s, storage.max_retry = wait_s, max_retry
        return storage

    try:
        with one_line_errors(url):
            return retrying(make, url, wait_s)
    except RuntimeError as exc:  # e.g. a schema made by a newer Optuna
        raise StorageError(f"cannot use database {mask(url)}: {redact(str(exc).splitlines()[0], url)}") from None


def backend(study) -> TunerStorage | None:
    """The TunerStorage under a study (Optuna wraps it in a cache), or None for any other storage."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, TunerStorage) else None
