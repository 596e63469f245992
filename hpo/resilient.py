"""Storage faults are waited out, not fatal: retries with backoff around every storage call.

A PostgreSQL restart, a minutes-long outage or a restart of ``hpo serve-storage`` makes storage
calls fail with connection errors for a while. :class:`RetryingStorage` wraps any Optuna storage
(``RDBStorage``, Optuna's ``_CachedStorage``, hpo's gRPC ``ProxyStorage``) and retries each call
that failed with a *transient* error (:func:`is_transient`) with exponential backoff and jitter
(0.25 s doubling to 10 s) for up to ``patience`` seconds since that call's first failure, then
raises :class:`StorageUnavailable`, one line naming the storage, the last error and the fix.
Meanwhile ``on_wait`` hears what is happening::

    database unreachable (postgresql+psycopg://hpo:***@db:5432/hpo), retrying for up to 5 min: ...
    database still unreachable after 30 s, retrying for up to 4.5 min more: ...
    database reachable again after 41.2 s

Errors that a retry cannot fix (a missing study, a finished trial, bad data, a constraint) are
raised at once, untouched. When the first attempt succeeds the wrapper costs one ``try``.

Retrying a write whose answer was lost
---------------------------------------
A write can commit on the server and its answer be lost (the connection drops between COMMIT
and its reply). Retrying it then repeats it. Per method:

- reads, heartbeats, ``_get_stale_trial_ids``: repeatable.
- ``set_study_*_attr``, ``set_trial_*_attr``, ``set_trial_param``,
  ``set_trial_intermediate_value``: upserts of the same value, repeatable. (Should the trial be
  finished in between by someone else, the retry raises ``UpdateFinishedTrialError`` as any
  write to a finished trial does.)
- ``set_trial_state_values`` to a finished state: the retry of a transition that did happen
  raises ``UpdateFinishedTrialError``. The wrapper then re-reads the trial and returns True
  when its state and values are exactly the ones asked for (the first attempt committed);
  otherwise it re-raises.
- ``set_trial_state_values(state=RUNNING)`` (claiming a WAITING trial): the retry of a claim
  that did happen returns False, indistinguishable from a trial another worker claimed. The
  wrapper returns False, and when the trial is RUNNING and heartbeats are on, records one
  heartbeat for it: a trial this process claimed without knowing then goes stale after the
  grace period and is failed and re-queued, instead of staying RUNNING forever (Optuna never
  fails a RUNNING trial that has no heartbeat at all). For a trial another worker holds, one
  extra heartbeat is harmless.
- ``create_new_trial``: the retry may create one extra trial (Optuna's RDBStorage already
  retries trial creation itself on errors, with the same effect).
- ``create_new_study``: with a name, the retry raises ``DuplicatedStudyError`` for the study the
  first attempt created; without, it creates a second, empty study.
- ``delete_study``: the retry of a deletion that did happen raises ``KeyError``; the wrapper
  treats that as done.

Anything read through attribute forwarding (``.engine``, ``._backend``, Optuna-private methods
such as ``_get_trials``) reaches the inner storage directly, without retries; wrap raw SQL with
:meth:`RetryingStorage.call` or :func:`retrying`.

gRPC (``hpo serve-storage``): a proxy that is down or restarting answers ``UNAVAILABLE``; a
proxy whose database is down answers ``UNKNOWN`` with Optuna's generic "An exception is raised
during the commit" text (the servicer forwards no error class), which is therefore treated as
transient. :class:`TransientErrorInterceptor`, added to the proxy's gRPC server, makes such
answers ``UNAVAILABLE`` with the real reason. While retrying over gRPC the client channel is
rebuilt, so the call does not wait out gRPC's own reconnect backoff (up to two minutes).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo._optuna import FrozenStudy
from hpo.errors import HpoError

T = TypeVar("T")
OnWait = Callable[[str], None]

DEFAULT_PATIENCE_S = 300.0
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 10.0
REPORT_EVERY_S = 30.0
_MAX_CHAIN = 16


class StorageUnavailable(HpoError):
    """The storage stayed unreachable for longer than the patience; the message says what to do."""


# -- what is transient -------------------------------------------------------------------------

# Verdicts a retry cannot change: the walk along an exception chain stops at them.
_PERMANENT: tuple[type[BaseException], ...] = (
    optuna.exceptions.UpdateFinishedTrialError,
    optuna.exceptions.DuplicatedStudyError,
    KeyError,
    ValueError,
    TypeError,
    AttributeError,
    NotImplementedError,
    HpoError,
    sqlalchemy.exc.IntegrityError,
    sqlalchemy.exc.ProgrammingError,
    sqlalchemy.exc.DataError,
    sqlalchemy.exc.ArgumentError,
    sqlalchemy.exc.NoSuchModuleError,
)

# Connection-level text (any driver, gRPC details); lower case.
_CONNECTION_TEXT = (
    "connection refused",
    "connection reset",
    "connection timed out",
    "connection failed",
    "could not connect",
    "could not translate host name",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the connection is closed",
    "connection is lost",
    "connection already closed",
    "lost connection",
    "broken pipe",
    "socket closed",
    "network is unreachable",
    "no route to host",
    "timeout expired",
    "too many connections",
    "database is locked",
    "unable to open database",
    "disk i/o error",
    "cannot execute",  # ... in a read-only transaction: a standby during a fail-over
    "deadlock",
    "could not serialize access",
    "failed to connect",
    "unavailable",
    # Optuna's RDBStorage turns every SQLAlchemy error into this StorageInternalError text, and
    # the gRPC servicer sends no more than that when the proxy's database is down.
    "an exception is raised during the commit",
)

# Configuration mistakes that look like connection failures: waiting will not fix them.
_CONFIG_TEXT = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "access denied",
    "unknown database",
    "no password supplied",
    "ssl is not enabled",
    "invalid dsn",
    "invalid connection option",
)

# PostgreSQL SQLSTATEs of permanent connection-time errors (authorization, bad database name).
_PG_PERMANENT_SQLSTATE_PREFIXES = ("28", "3D")
# PostgreSQL SQLSTATEs worth retrying among non-OperationalError classes.
_PG_TRANSIENT_SQLSTATES = {"25006", "40001", "40P01", "57P01", "57P02", "57P03", "53300"}


def _text(exc: BaseException) -> str:
    return str(exc).lower()


def _config_mistake(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_PG_PERMANENT_SQLSTATE_PREFIXES):
        return True
    text = _text(exc)
    return any(pattern in text for pattern in _CONFIG_TEXT)


def _verdict(exc: BaseException) -> bool | None:
    """True/False when ``exc`` alone decides; None to look further down its chain."""
    if isinstance(exc, _PERMANENT):
        return False
    grpc = sys.modules.get("grpc")  # an RpcError exists only once grpc was imported
    if grpc is not None and isinstance(exc, grpc.RpcError):
        code_fn = getattr(exc, "code", None)
        code = code_fn() if callable(code_fn) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED):
            details_fn = getattr(exc, "details", None)
            details = str(details_fn() if callable(details_fn) else exc).lower()
            return any(pattern in details for pattern in _CONNECTION_TEXT) and not any(
                pattern in details for pattern in _CONFIG_TEXT
            )
        return False
    if isinstance(exc, sqlalchemy.exc.DisconnectionError | sqlalchemy.exc.TimeoutError):
        return True
    if isinstance(exc, sqlalchemy.exc.PendingRollbackError):
        return True  # a session left over from a dropped connection; the retry starts a new one
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        if exc.orig is not None:
            return _dbapi_verdict(exc.orig, wrapped_by=exc)
        return isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
    dbapi = _dbapi_verdict(exc, wrapped_by=None)
    if dbapi is not None:
        return dbapi
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return None


def _dbapi_verdict(exc: BaseException, wrapped_by: BaseException | None) -> bool | None:
    """Verdict on a DB-API driver's own exception (psycopg, sqlite3, others by class name)."""
    if isinstance(exc, sqlite3.OperationalError):
        text = _text(exc)
        return any(p in text for p in ("database is locked", "unable to open", "disk i/o error"))
    if isinstance(exc, sqlite3.Error):
        return False
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return not _config_mistake(exc)
        return getattr(exc, "sqlstate", None) in _PG_TRANSIENT_SQLSTATES
    # Other drivers (psycopg2, MySQL): the DB-API class names, and the connection texts.
    names = {cls.__name__ for cls in type(exc).__mro__}
    if wrapped_by is not None or "DatabaseError" in names:
        if "OperationalError" in names or "InterfaceError" in names:
            return not _config_mistake(exc)
        if names & {"IntegrityError", "ProgrammingError", "DataError", "NotSupportedError"}:
            return False
        if wrapped_by is not None:
            text = _text(exc)
            return any(p in text for p in _CONNECTION_TEXT) and not _config_mistake(exc)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (a suppressed context is not followed)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(out) < _MAX_CHAIN:
        out.append(current)
        seen.add(id(current))
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return out


def _transient_culprit(exc: BaseException) -> BaseException | None:
    for link in _chain(exc):
        verdict = _verdict(link)
        if verdict is not None:
            return link if verdict else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection-level failure that waiting and retrying can fix.

    True for: SQLAlchemy ``OperationalError``/``InterfaceError``/``DisconnectionError``, pool
    timeouts and invalidated connections; psycopg ``OperationalError``/``InterfaceError`` (server
    down, restarting, shutting down, connection dropped, too many connections, deadlock,
    serialization failure) and a read-only standby during a fail-over; SQLite's "database is
    locked", "unable to open database file" and disk I/O errors; gRPC ``UNAVAILABLE`` and
    ``DEADLINE_EXCEEDED``, and ``UNKNOWN`` whose details read like a connection failure (what
    ``hpo serve-storage`` answers when its database is down); ``ConnectionError`` and
    ``TimeoutError``. Wrapped errors count: Optuna's ``StorageInternalError`` is judged by its
    ``__cause__``, and a chain is followed through ``__cause__``/``__context__``.

    False for everything else, in particular ``UpdateFinishedTrialError``,
    ``DuplicatedStudyError``, ``KeyError`` (no such study or trial), ``ValueError``,
    ``IntegrityError``, SQL errors, hpo's own one-line errors, and authentication or
    unknown-database errors (a wrong URL is not an outage).
    """
    return _transient_culprit(exc) is not None


# -- messages ------------------------------------------------------------------------------------

_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_WORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def _scrub(text: str) -> str:
    return _PASSWORD_WORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong, from the most telling error of ``exc``'s chain."""
    culprit = _transient_culprit(exc) or exc
    if isinstance(culprit, optuna.exceptions.StorageInternalError) and culprit.__cause__ is not None:
        culprit = culprit.__cause__
    if isinstance(culprit, sqlalchemy.exc.DBAPIError) and culprit.orig is not None:
        culprit = culprit.orig
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(culprit, grpc.RpcError) and callable(getattr(culprit, "code", None)):
        details_fn = getattr(culprit, "details", None)
        details = details_fn() if callable(details_fn) else ""
        text = f"gRPC {culprit.code().name}: {details}"
    else:
        first = str(culprit).strip().splitlines()
        text = f"{type(culprit).__name__}: {first[0]}" if first else type(culprit).__name__
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:297] + "..."
    return _scrub(text)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds == int(seconds) else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min".replace(".0 min", " min")
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _redact(describe: str) -> str:
    try:
        from hpo.storage import redact

        describe = redact(describe)
    except Exception:  # hpo.storage unusable: the regular expression below still hides passwords
        pass
    return _scrub(describe)


# -- the retry loop ------------------------------------------------------------------------------


class _Retrier:
    """Backoff, patience and the wait messages, shared by the threads using one storage."""

    def __init__(
        self,
        *,
        patience: float,
        on_wait: OnWait | None,
        describe: str,
        noun: str,
        fix: str,
        reconnect: Callable[[BaseException], None] | None = None,
    ) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0 seconds, got {patience}")
        self.patience = float(patience)
        self.on_wait: OnWait = on_wait or _print_to_stderr
        self.describe = describe
        self.noun = noun
        self.fix = fix
        self.reconnect = reconnect
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self._last_report = 0.0
        self._waiting = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_outage_since"] = None
        state["_waiting"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        """Pass ``message`` to ``on_wait``; an error there is ignored."""
        with contextlib.suppress(Exception):  # a broken log must not turn a wait into a failure
            self.on_wait(message)

    def _failed(self, exc: BaseException, started: float) -> None:
        now = time.monotonic()
        message = None
        with self._lock:
            if self._outage_since is None:
                self._outage_since = started
                self._last_report = now
                message = (
                    f"{self.noun} unreachable ({self.describe}), retrying for up to "
                    f"{_duration(self.patience)}: {error_line(exc)}"
                )
            elif now - self._last_report >= REPORT_EVERY_S:
                self._last_report = now
                left = max(0.0, self.patience - (now - started))
                message = (
                    f"{self.noun} still unreachable after {_duration(now - self._outage_since)}, "
                    f"retrying for up to {_duration(left)} more: {error_line(exc)}"
                )
        if message:
            self.say(message)

    def _answered(self) -> None:
        message = None
        with self._lock:
            if self._outage_since is not None:
                message = (
                    f"{self.noun} reachable again after {_duration(time.monotonic() - self._outage_since)}"
                )
                self._outage_since = None
        if message:
            self.say(message)

    def wait_out(self, first: BaseException, what: str, attempt: Callable[[], T]) -> T:
        """Retry ``attempt`` after its transient failure ``first`` until it answers or patience ends."""
        started = time.monotonic()
        deadline = started + self.patience
        delay = FIRST_DELAY_S
        last = first
        with self._lock:
            self._waiting += 1
        try:
            self._failed(first, started)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._give_up(last, what, time.monotonic() - started) from last
                time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
                delay = min(delay * 2, MAX_DELAY_S)
                if self.reconnect is not None:
                    with contextlib.suppress(Exception):  # best effort; the attempt tells
                        self.reconnect(last)
                try:
                    result = attempt()
                except Exception as exc:
                    if not is_transient(exc):
                        self._answered()  # it answered, with an error a retry cannot fix
                        raise
                    last = exc
                    self._failed(exc, started)
                    continue
                self._answered()
                return result
        finally:
            with self._lock:
                self._waiting -= 1
                if self._waiting == 0 and time.monotonic() >= deadline:
                    self._outage_since = None  # gave up: the next failure announces itself again

    def _give_up(self, last: BaseException, what: str, waited: float) -> StorageUnavailable:
        return StorageUnavailable(
            f"{self.noun} {self.describe} unreachable for {_duration(waited)}, gave up on {what}: "
            f"{error_line(last)} (fix: {self.fix})"
        )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            return self.wait_out(exc, what, fn)


_DB_FIX = "check the database server; raise --storage-patience"
_PROXY_FIX = "check that hpo serve-storage runs and reaches its database; raise --storage-patience"


def retrying(
    call: Callable[[], T],
    *,
    patience: float = DEFAULT_PATIENCE_S,
    on_wait: OnWait | None = None,
    describe: str = "the study database",
    what: str = "a storage call",
) -> T:
    """``call()``, retried like a :class:`RetryingStorage` call while it fails transiently.

    For raw SQL outside the storage API (``with engine.connect() as conn: ...``): ``call`` must be
    safe to repeat (one transaction, or idempotent statements). ``describe`` names the storage in
    messages (a URL is shown with its password hidden).
    """
    grpc_like = describe.startswith("grpc://")
    retrier = _Retrier(
        patience=patience,
        on_wait=on_wait,
        describe=_redact(describe),
        noun="storage proxy" if grpc_like else "database",
        fix=_PROXY_FIX if grpc_like else _DB_FIX,
    )
    return retrier.call(what, call)


# -- the storage ---------------------------------------------------------------------------------


def _describe(storage: BaseStorage) -> str:
    engine = _optuna.rdb_engine(storage)
    if engine is not None:
        try:
            return str(engine.url.render_as_string(hide_password=True))
        except Exception:
            pass
    address = _optuna.grpc_address(storage)
    if address is not None:
        host, port = address
        return f"grpc://{host}:{port}"
    return type(storage).__name__


def _is_grpc(storage: BaseStorage) -> bool:
    try:
        from optuna.storages import GrpcStorageProxy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(storage, GrpcStorageProxy)


def _is_unavailable(exc: BaseException) -> bool:
    grpc = sys.modules.get("grpc")
    if grpc is None:
        return False
    for link in _chain(exc):
        if isinstance(link, grpc.RpcError) and callable(getattr(link, "code", None)):
            return bool(link.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def _new_grpc_channel(proxy: BaseStorage) -> None:
    """Point Optuna's gRPC client at a new channel of its own.

    A channel whose server went away waits out gRPC's reconnect backoff (growing to 2 min)
    before it tries again, so a proxy that is back would stay unreachable for up to that long;
    and channels with the same target and options share one connection (gRPC's global
    subchannel pool), backoff included. The new channel has its own pool and a 10 s backoff cap.
    Calls in flight on the old channel finish there; it closes when the last one lets it go.
    The client's trial cache is kept: only its stub changes (:func:`hpo._optuna.grpc_use_channel`).
    """
    import grpc

    address = _optuna.grpc_address(proxy)
    if address is None:
        return  # not (and wrapping no) gRPC client
    host, port = address
    channel = grpc.insecure_channel(
        f"{host}:{port}",
        options=[
            ("grpc.max_receive_message_length", -1),  # as Optuna's own channel
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", int(FIRST_DELAY_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(MAX_DELAY_S * 1000)),
        ],
    )
    try:
        _optuna.grpc_use_channel(proxy, channel)  # no lock: a call hanging in the cache must not hang this
    except BaseException:
        channel.close()
        raise


def _same_values(stored: Sequence[float] | None, asked: Sequence[float] | None) -> bool:
    if asked is None or stored is None:
        return asked is None and stored is None
    if len(stored) != len(asked):
        return False
    return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(stored, asked, strict=True))


class RetryingStorage(BaseStorage, _optuna.HeartbeatStorage):
    """``inner`` with every storage call retried while it fails transiently (module docstring).

    ``patience``: seconds a call keeps retrying after its first failure before it raises
    :class:`StorageUnavailable`. ``on_wait``: receives the progress lines (default: stderr).
    ``describe``: the storage's URL or name for messages (its password is hidden); default
    from ``inner``. Unknown attributes are read from ``inner`` (``.engine``, ``._backend``,
    ``heartbeat_interval``...); ``.inner`` is the wrapped storage.
    """

    def __init__(
        self,
        inner: BaseStorage,
        *,
        patience: float = DEFAULT_PATIENCE_S,
        on_wait: OnWait | None = None,
        describe: str | None = None,
    ) -> None:
        self.inner = inner
        grpc_like = _is_grpc(inner) or (describe or "").startswith("grpc://")
        self._retrier = _Retrier(
            patience=patience,
            on_wait=on_wait,
            describe=_redact(describe) if describe else _describe(inner),
            noun="storage proxy" if grpc_like else "database",
            fix=_PROXY_FIX if grpc_like else _DB_FIX,
            reconnect=self._reconnect,
        )
        self._grpc = _is_grpc(inner)
        self._rebuild_lock = threading.Lock()
        self._last_rebuild = 0.0

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def patience(self) -> float:
        return self._retrier.patience

    @patience.setter
    def patience(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"patience must be >= 0 seconds, got {seconds}")
        self._retrier.patience = float(seconds)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks; never for ``inner`` once it is set.
        if name.startswith("__") or name in ("inner", "_retrier"):
            raise AttributeError(name)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_rebuild_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rebuild_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RetryingStorage({self.inner!r}, patience={self.patience:g})"

    def call(self, fn: Callable[[], T], what: str = "a storage call") -> T:
        """``fn()`` with this storage's retries, patience and messages (for raw SQL; ``fn`` must
        be safe to repeat)."""
        return self._retrier.call(what, fn)

    def _reconnect(self, error: BaseException) -> None:
        """Before a retry: drop this thread's SQLAlchemy session, or give gRPC a new channel."""
        backend = _optuna.rdb_backend(self.inner)
        for storage in (self.inner, backend if backend is not self.inner else None):
            if isinstance(storage, BaseStorage):
                storage.remove_session()
        if self._grpc and _is_unavailable(error):
            now = time.monotonic()
            with self._rebuild_lock:
                # Threads retrying at the same time share one new channel.
                if now - self._last_rebuild >= FIRST_DELAY_S:
                    _new_grpc_channel(self.inner)
                    self._last_rebuild = now

    def _do(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            return self._retrier.wait_out(exc, what, fn)

    # -- studies -------------------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._do(
            "create_new_study", lambda: self.inner.create_new_study(directions, study_name=study_name)
        )

    def delete_study(self, study_id: int) -> None:
        try:
            return self.inner.delete_study(study_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            first = exc

        def again() -> None:
            # KeyError: the first attempt deleted it and its answer was lost.
            with contextlib.suppress(KeyError):
                self.inner.delete_study(study_id)

        return self._retrier.wait_out(first, "delete_study", again)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._do("set_study_user_attr", lambda: self.inner.set_study_user_attr(study_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._do("set_study_system_attr", lambda: self.inner.set_study_system_attr(study_id, key, value))

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._do("get_study_id_from_name", lambda: self.inner.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._do("get_study_name_from_id", lambda: self.inner.get_study_name_from_id(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._do("get_study_directions", lambda: self.inner.get_study_directions(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_user_attrs", lambda: self.inner.get_study_user_attrs(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._do("get_study_system_attrs", lambda: self.inner.get_study_system_attrs(study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._do("get_all_studies", self.inner.get_all_studies)

    # -- trials --------------------------------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._do("create_new_trial", lambda: self.inner.create_new_trial(study_id, template_trial))

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        self._do(
            "set_trial_param",
            lambda: self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution),
        )

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._do(
            "get_trial_id_from_study_id_trial_number",
            lambda: self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number),
        )

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._do("get_trial_number_from_id", lambda: self.inner.get_trial_number_from_id(trial_id))

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._do("get_trial_param", lambda: self.inner.get_trial_param(trial_id, param_name))

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        try:
            return self.inner.set_trial_state_values(trial_id, state=state, values=values)
        except Exception as exc:
            if not is_transient(exc):
                raise
            first = exc
        what = f"set_trial_state_values(trial id {trial_id}, {state.name})"
        return self._retrier.wait_out(first, what, lambda: self._set_state_again(trial_id, state, values))

    def _set_state_again(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        """The retry of a state change whose first attempt may have committed (module docstring)."""
        try:
            changed = self.inner.set_trial_state_values(trial_id, state=state, values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            trial = self.inner.get_trial(trial_id)
            if trial.state == state and _same_values(trial.values, values):
                return True  # the first attempt made this very change; its answer was lost
            raise
        if not changed and state == TrialState.RUNNING:
            self._claim_may_be_ours(trial_id)
        return changed

    def _claim_may_be_ours(self, trial_id: int) -> None:
        inner = self.inner
        if not isinstance(inner, _optuna.HeartbeatStorage) or inner.get_heartbeat_interval() is None:
            return
        trial = inner.get_trial(trial_id)
        if trial.state != TrialState.RUNNING:
            return
        inner.record_heartbeat(trial_id)
        self._retrier.say(
            f"trial {trial.number}: claiming it was retried after a dropped connection and found it "
            "RUNNING (claimed by another worker, or by the first attempt, whose answer was lost); "
            "it got a heartbeat, so if nobody runs it, it is failed and retried after the grace period"
        )

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._do(
            "set_trial_intermediate_value",
            lambda: self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value),
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._do("set_trial_user_attr", lambda: self.inner.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._do("set_trial_system_attr", lambda: self.inner.set_trial_system_attr(trial_id, key, value))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._do("get_trial", lambda: self.inner.get_trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._do(
            "get_all_trials", lambda: self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        )

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._do("get_n_trials", lambda: self.inner.get_n_trials(study_id, state))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._do("get_best_trial", lambda: self.inner.get_best_trial(study_id))

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_params", lambda: self.inner.get_trial_params(trial_id))

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_user_attrs", lambda: self.inner.get_trial_user_attrs(trial_id))

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._do("get_trial_system_attrs", lambda: self.inner.get_trial_system_attrs(trial_id))

    def remove_session(self) -> None:
        self.inner.remove_session()

    # -- heartbeats ----------------------------------------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        inner = self.inner
        if isinstance(inner, _optuna.HeartbeatStorage):
            self._do("record_heartbeat", lambda: inner.record_heartbeat(trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        inner = self.inner
        if not isinstance(inner, _optuna.HeartbeatStorage):
            return []
        return self._do("_get_stale_trial_ids", lambda: _optuna.stale_trial_ids(inner, study_id))

    def get_heartbeat_interval(self) -> int | None:
        # ``optuna.storages._heartbeat.is_heartbeat_enabled`` asks this (and isinstance
        # BaseHeartbeat, ``_optuna.HeartbeatStorage``, which the wrapper always is): heartbeats
        # are on exactly when the inner storage has them on.
        inner = self.inner
        return inner.get_heartbeat_interval() if isinstance(inner, _optuna.HeartbeatStorage) else None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        inner = self.inner
        return (
            inner.get_heartbeat_stale_trial_callback()
            if isinstance(inner, _optuna.HeartbeatStorage)
            else None
        )


# -- the gRPC proxy's side -----------------------------------------------------------------------


class TransientErrorInterceptor:
    """For ``hpo serve-storage``'s gRPC server (``grpc.server(..., interceptors=[...])``): a call
    that fails because the proxy's database is unreachable is answered ``UNAVAILABLE`` with the
    reason, instead of ``UNKNOWN`` with Optuna's generic text, so clients know to wait and say why.

    A ``grpc.ServerInterceptor`` by duck typing (gRPC only calls ``intercept_service``), so that
    importing this module does not import grpc.
    """

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        import grpc

        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def guarded(request: Any, context: Any) -> Any:
            try:
                return behaviour(request, context)
            except Exception as exc:
                if is_transient(exc):
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"storage database unavailable: {error_line(exc)}"
                    )
                raise

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
