"""Where studies live: resolving, validating and opening Optuna storages.

Studies are kept in Optuna's own relational schema (``RDBStorage``), so the ``optuna`` CLI and
optuna-dashboard read everything hpo writes. The URL is resolved exactly like the ``optuna`` CLI
does (``--storage``, then ``OPTUNA_STORAGE``), with hpo's default of an SQLite file under
``storage/``. A ``grpc://host:port`` URL talks to ``hpo serve-storage`` (Optuna's gRPC proxy).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage
from sqlalchemy.engine import URL, make_url

from hpo._optuna import rdb_backend, rdb_engine
from hpo._rdb import HpoRDBStorage

# Re-exported: the --storage flag and its resolution live in an import-light module (hpo --help).
from hpo._storage_url import DEFAULT_STORAGE, ENV_STORAGE, add_storage_argument, resolve_storage_url  # noqa: F401
from hpo.errors import StorageError

# SQLite serialises writers on one file lock; a generous busy timeout makes writers wait for it
# instead of failing with "database is locked" while another worker commits.
SQLITE_BUSY_TIMEOUT_S = 60
_EXAMPLES = "sqlite:///storage/hpo.db or postgresql+psycopg://user:password@host:5432/dbname"


@dataclass(frozen=True)
class HeartbeatSettings:
    """Heartbeats let a live worker prove a RUNNING trial is still being worked on.

    A trial whose heartbeat is older than ``grace_period`` seconds is failed by whichever worker
    notices first and re-queued (same parameters) up to ``max_retry`` times.
    """

    interval: int = 10
    grace_period: int = 30
    max_retry: int = 3


def is_grpc(url: str) -> bool:
    return url.startswith("grpc://")


def parse_url(url: str) -> URL:
    """Validate a SQLAlchemy URL and pick psycopg 3 as PostgreSQL's driver when none is named."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        shown = _hide_password(url)
        raise StorageError(f"storage URL {shown!r} is not a database URL (fix: use {_EXAMPLES})") from None
    if parsed.host and "@" in parsed.host:
        raise StorageError(
            f"storage URL {_hide_password(url)!r}: an '@' in the password or user name must be "
            "written %40 (fix: e.g. postgresql+psycopg://user:p%40ss@host:5432/dbname)"
        )
    backend = parsed.get_backend_name()
    if backend not in {"sqlite", "postgresql", "mysql"}:
        raise StorageError(
            f"storage URL {url!r}: unsupported database {backend!r} "
            f"(fix: use SQLite or PostgreSQL, e.g. {_EXAMPLES}; grpc://host:port for hpo serve-storage)"
        )
    if backend == "postgresql" and "+" not in parsed.drivername:
        # Plain postgresql:// means psycopg2 to SQLAlchemy 2.0; hpo installs psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for other databases and in-memory SQLite)."""
    if is_grpc(url):
        return None
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def is_sqlite(url: str) -> bool:
    return not is_grpc(url) and parse_url(url).get_backend_name() == "sqlite"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    if is_grpc(url):
        return url
    try:
        rendered = parse_url(url).render_as_string(hide_password=True)
    except StorageError:
        rendered = url
    # Whatever stands between "user:" and the authority's last "@" is password: a password with
    # an unescaped "@" (p@ss) is cut at its first "@" by the URL parser, which left "ss" shown,
    # and a URL the parser refuses is shown as given.
    return _hide_password(rendered)


_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^/?#]*@")


def _hide_password(url: str) -> str:
    return _PASSWORD.sub(r"\1***@", url)


def open_storage(
    url: str, heartbeat: HeartbeatSettings | None = None, must_exist: bool = False, read_only: bool = False
) -> BaseStorage:
    """Open (and on first use create) the storage behind ``url``.

    ``must_exist``: an SQLite file that does not exist is an error naming the path, not a new empty
    database. ``read_only`` (implies ``must_exist``), for commands that only read (status, best,
    export, report): SQLite is opened read-only and nothing is created, so a database this user may
    only read (a 0444 file, a read-only folder) can be read; other databases open as usual.

    Raises :class:`StorageError` with a one-line reason when the URL is malformed, the driver is
    missing, the server cannot be reached or the SQLite file cannot be created or written.
    """
    if is_grpc(url):
        return _open_grpc(url, heartbeat)
    parsed = parse_url(url)
    engine_kwargs: dict[str, object] = {}
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise StorageError(
                f"storage URL {url!r}: an in-memory SQLite database lives only as long as one "
                "process, and each hpo command (worker, status, dashboard) is a process of its own "
                "(fix: name a file, e.g. sqlite:///storage/hpo.db)"
            )
        if path.is_file():
            _check_sqlite_file(url, path)
        if (must_exist or read_only) and not path.is_file():
            raise StorageError(
                f"storage URL {url!r}: there is no database file {str(path)!r} (fix: check the path, "
                "relative to the current directory; or pass --storage / set $OPTUNA_STORAGE)"
            )
        if read_only:
            return _open_sqlite_read_only(url, path)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"storage URL {url!r}: cannot create the folder {str(path.parent)!r}: {exc.strerror} "
                    f"(fix: {_SQLITE_PATH_FIX})"
                ) from None
            # SQLite writes the file, its -wal/-shm files and hpo's lock files beside it; say so
            # now rather than fail later on a lock file or mid-transaction.
            unwritable = [p for p in (path, path.parent) if p.exists() and not os.access(p, os.W_OK)]
            if unwritable:
                raise StorageError(
                    f"storage URL {url!r}: this user cannot write {str(unwritable[0])!r} (fix: make the "
                    f"database file and its folder writable; or {_SQLITE_PATH_FIX})"
                )
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql":
            # A server behind a link that drops packets would otherwise hang a connect for the
            # OS's TCP timeout (minutes) instead of failing into the worker's retries.
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with _creating_sqlite(sqlite_path(url)):
            storage = _create_rdb_storage(
                parsed.render_as_string(hide_password=False), engine_kwargs, heartbeat
            )
        if parsed.get_backend_name() == "sqlite":
            engine = rdb_engine(storage)
            assert engine is not None  # an RDBStorage always has one
            _use_write_ahead_log(engine)
        return storage
    except ImportError as exc:
        raise StorageError(f"storage URL {redact(url)!r}: database driver missing ({exc})") from None
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        path = sqlite_path(url)
        if path is not None:  # a file SQLite cannot create or write: about the path, not a server
            raise StorageError(
                f"cannot open SQLite database {str(path)!r}: {reason} (fix: this user must be able "
                f"to write the file and its folder {str(path.absolute().parent)!r}, where SQLite keeps "
                f"its -wal and -shm files; or {_SQLITE_PATH_FIX})"
            ) from None
        raise StorageError(
            f"cannot open storage {redact(url)!r}: {reason} "
            "(fix: check host, port, database name and credentials, and that the server is running)"
        ) from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise StorageError(f"storage URL {redact(url)!r}: {exc} (fix: use {_EXAMPLES})") from None


# Optuna's schema (optuna/storages/_rdb/models.py): a database holding tables, none of them these,
# or these without their key columns, belongs to another application.
_OPTUNA_KEY_COLUMNS = {"studies": "study_name", "trials": "trial_id", "version_info": "schema_version"}


def _check_sqlite_file(url: str, path: Path) -> None:
    """Refuse, before anything is written, an existing file that is not an SQLite database or is
    another application's: Optuna would otherwise add its 23 tables and indexes to it, then fail
    on a table of the same name (a traceback, and the other application's file changed)."""
    try:
        # immutable: a look that writes nothing, not even the -wal and -shm files a read of a
        # database in WAL mode creates (tables made since the last checkpoint may be unseen:
        # then the file passes this check, and Optuna's own open decides).
        location = f"file:{urllib.parse.quote(str(path.absolute()))}?immutable=1"
        with contextlib.closing(sqlite3.connect(location, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
            tables = {
                name: {column[1] for column in db.execute(f'PRAGMA table_info("{name}")')}
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
    except sqlite3.OperationalError:
        return  # unreadable or locked: the open that follows says why, in its own words
    except sqlite3.DatabaseError as exc:
        raise StorageError(
            f"storage URL {url!r}: {str(path)!r} is not an SQLite database ({exc}) (fix: {_SQLITE_PATH_FIX})"
        ) from None
    ours = set(tables) & set(_OPTUNA_KEY_COLUMNS)
    foreign = bool(tables) and not ours
    foreign = foreign or any(_OPTUNA_KEY_COLUMNS[name] not in tables[name] for name in ours)
    if foreign:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(
            f"storage URL {url!r}: {str(path)!r} is another application's SQLite database "
            f"(tables {shown}), not an Optuna one (fix: {_SQLITE_PATH_FIX})"
        )


@contextlib.contextmanager
def _creating_sqlite(path: Path | None) -> Iterator[None]:
    """Serialise opening (and so creating) one SQLite file across processes: two processes that
    open a new database at once both run Optuna's CREATE TABLE, and the loser fails with
    "table ... already exists" (an OperationalError, unlike PostgreSQL's retried errors).
    The lock is the file study_lock uses beside the database."""
    try:
        handle = None if path is None else open(f"{path}.hpo-lock", "a")  # noqa: SIM115
    except OSError:  # an unwritable folder: SQLite's own error, reported by the caller, says it
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SQLITE_PATH_FIX = "pass another --storage, e.g. sqlite:///storage/hpo.db in a folder you can write"


def _open_sqlite_read_only(url: str, path: Path) -> HpoRDBStorage:
    """An existing SQLite database opened read-only (SQLite's ``mode=ro``): no tables, journal
    mode or version rows are written. A database in write-ahead-log mode needs its ``-shm`` file,
    which SQLite cannot create in a read-only folder; there the file is read as an immutable
    snapshot (``immutable=1``): no one can be writing it there, though a ``-wal`` file a crashed
    writer left behind is then not read.
    """
    location = f"file:{urllib.parse.quote(str(path.absolute()))}"
    reason = ""
    for mode in ("mode=ro", "immutable=1"):
        uri = f"{location}?{mode}"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as probe:
                probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            reason = reason or str(exc)
            continue
        except sqlite3.DatabaseError as exc:
            reason = str(exc)
            break
        # The URI goes to sqlite3 untouched (a creator), so no path character needs SQLAlchemy quoting.
        engine_kwargs: dict[str, object] = {
            "creator": functools.partial(
                sqlite3.connect, uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False
            )
        }
        try:
            return _create_rdb_storage(url, engine_kwargs, None, read_only=True)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            cause = exc.__cause__ or exc  # Optuna wraps the database's own error
            reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
            break
    raise StorageError(
        f"storage URL {url!r}: cannot read the SQLite database {str(path)!r}: {reason} "
        "(fix: check that the path names an hpo/Optuna database this user can read)"
    )


def _use_write_ahead_log(engine: sqlalchemy.Engine) -> None:
    """SQLite in WAL mode: readers (status, dashboard, other workers) never block the writer, and
    a commit appends to one log file instead of rewriting a rollback journal. ``synchronous=FULL``
    keeps every commit durable, so a finished trial survives even a power loss. WAL needs the
    database on a local disk (SQLite's own rule; PostgreSQL is the answer for shared storage).
    """

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while Optuna created its tables predate the listener


def _create_rdb_storage(
    url: str, engine_kwargs: dict[str, object], heartbeat: HeartbeatSettings | None, read_only: bool = False
) -> HpoRDBStorage:
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                # heartbeat_interval and grace_period are flagged experimental by Optuna.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # No Optuna stale-trial callback: hpo fails a stale trial and queues its retry
                # in one transaction (hpo._rdb.fail_stale).
                return HpoRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat.interval if heartbeat else None,
                    grace_period=heartbeat.grace_period if heartbeat else None,
                    max_retry=heartbeat.max_retry if heartbeat else HeartbeatSettings.max_retry,
                    skip_table_creation=read_only,
                )
        except (
            sqlalchemy.exc.ProgrammingError,
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
        ) as exc:
            # Several processes opening a new database at once race to create Optuna's tables
            # (PostgreSQL: "type ... already exists"; SQLite: "table ... already exists", or
            # alembic_version's UNIQUE constraint); the loser retries and finds them made. hpo's
            # own processes take turns on SQLite (_creating_sqlite), but optuna-dashboard or the
            # Optuna CLI opening the same new file do not.
            lost_race = not isinstance(exc, sqlalchemy.exc.OperationalError) or "already exists" in str(exc)
            if not lost_race or attempt == attempts:
                raise
            time.sleep(0.2 * attempt)
    raise RuntimeError("unreachable")  # the loop returns or raises


def _open_grpc(url: str, heartbeat: HeartbeatSettings | None) -> BaseStorage:
    # hpo serve-storage's client: waits for the proxy, and beats for its trials through it.
    from hpo.serve_storage import connect

    return connect(url, heartbeat)


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """Serialise creating/adopting one study across processes and machines.

    Creating a study writes several rows (study, stored definition, queued trials); two workers
    adopting the same study at once must not both queue its trials. PostgreSQL gets a session
    advisory lock; SQLite (one machine by nature) a file lock beside the database.
    """
    rdb = rdb_backend(storage)  # through Optuna's cache and hpo's retrying layer
    if rdb is None:
        yield
        return
    engine = rdb_engine(rdb)
    assert engine is not None  # an RDBStorage always has one
    key = int.from_bytes(hashlib.sha256(f"hpo:{study_name}".encode()).digest()[:8], "big", signed=True)
    backend = engine.dialect.name
    if backend == "postgresql":
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    elif backend == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock_path = Path(f"{engine.url.database}.hpo-lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield
