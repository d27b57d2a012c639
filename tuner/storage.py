"""Every accepted form of "storage" turned into one Optuna RDBStorage, plus the cross-process lock it lacks.

URLs come from `--storage`, else `TUNER_STORAGE`, else an embedded SQLite file `tuner.db`. A password may
instead come from `TUNER_DB_PASSWORD` or a file named by `TUNER_DB_PASSWORD_FILE`, so it never has to be typed
on a command line. `mask()` is the only form in which a URL is ever shown.

The lock (`study_lock`) serialises the two steps Optuna leaves racy when many workers share a database:
creating the schema on an empty database, and claiming the next grid cell. It is a PostgreSQL advisory lock,
a MySQL named lock, or a file lock beside a SQLite file: no table of our own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

from tuner.errors import StorageError

DEFAULT_URL = "sqlite:///tuner.db"
DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql"}
CONNECT_TIMEOUT_S = 5


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


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL (None for other databases and for in-memory SQLite)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def engine_kwargs(url: URL) -> dict:
    """Engine options for Optuna: check connections before use, fail fast on an unreachable host."""
    kwargs: dict = {"pool_pre_ping": True}
    backend = url.get_backend_name()
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    elif backend in ("mysql", "mariadb"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        kwargs["pool_recycle"] = 3600
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # wait on a locked file instead of failing at once
    return kwargs


def describe_error(exc: BaseException, url: URL) -> str:
    """One line for a database error, with the URL masked and the driver's first line kept."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = detail[0] if detail else exc.__class__.__name__
    password = url.password
    if password:
        first = first.replace(str(password), "***")
    return f"cannot use database {mask(url)}: {first}"


def check_reachable(url: URL, *, wait_s: float = 0.0) -> None:
    """Connect once (retrying with backoff for up to `wait_s` seconds) or raise a one-line StorageError."""
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_plain(engine_kwargs(url)))
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise StorageError(f"no driver for {mask(url)}: {exc}") from None
    deadline = time.monotonic() + wait_s
    delay = 0.5
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT 1"))
                return
            except OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageError(describe_error(exc, url)) from None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except SQLAlchemyError as exc:
                raise StorageError(describe_error(exc, url)) from None
    finally:
        engine.dispose()


def _plain(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "pool_pre_ping"}


_LOCAL = threading.Lock()


@contextlib.contextmanager
def study_lock(url: URL, name: str, *, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold a lock named `name` across every process sharing this database, for a few milliseconds' work."""
    backend = url.get_backend_name()
    with _LOCAL:
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
        engine = _lock_engine(url)
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with engine.connect() as conn:
            if backend == "postgresql":
                conn.execute(sqlalchemy.text("SET lock_timeout = :ms").bindparams(ms=f"{int(timeout_s * 1000)}"))
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                release = sqlalchemy.text("SELECT pg_advisory_unlock(:k)")
                params: dict = {"k": key}
            else:
                lock_name = f"tuner:{key:x}"[:64]
                got = conn.execute(
                    sqlalchemy.text("SELECT GET_LOCK(:n, :t)"), {"n": lock_name, "t": int(timeout_s)}
                ).scalar()
                if got != 1:
                    raise StorageError(f"timed out after {timeout_s:.0f}s waiting for the study lock on {mask(url)}")
                release = sqlalchemy.text("SELECT RELEASE_LOCK(:n)")
                params = {"n": lock_name}
            conn.commit()
            try:
                yield
            finally:
                conn.execute(release, params)
                conn.commit()


_ENGINES: dict[str, sqlalchemy.Engine] = {}


def _lock_engine(url: URL) -> sqlalchemy.Engine:
    key = url.render_as_string(hide_password=False)
    if key not in _ENGINES:
        _ENGINES[key] = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, **engine_kwargs(url))
    return _ENGINES[key]


def open_storage(
    url: URL,
    *,
    create: bool,
    heartbeat_s: int = 10,
    grace_s: int | None = None,
    wait_s: float = 0.0,
    max_retry: int | None = 3,
):
    """An Optuna RDBStorage on `url`, with heartbeats so a killed worker's trial is noticed and re-run.

    `create=False` is for commands that only read: a SQLite file that does not exist is an error, not a new
    empty database. Schema creation is done under the lock, so workers starting together on an empty
    database do not race each other.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    path = sqlite_path(url)
    if path is not None and not create and not path.is_file():
        raise StorageError(f"no database at {path}: run a study first, or pass --storage")
    if path is not None and not path.parent.is_dir():
        raise StorageError(f"cannot create database {path}: folder {path.parent} does not exist")
    check_reachable(url, wait_s=wait_s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with study_lock(url, "tuner:schema"):
            return RDBStorage(
                url.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s or 3 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )
    except SQLAlchemyError as exc:
        raise StorageError(describe_error(exc, url)) from None
    except RuntimeError as exc:  # e.g. a schema made by a newer Optuna
        raise StorageError(f"cannot use database {mask(url)}: {str(exc).splitlines()[0]}") from None
