"""hpo.resilient: storage calls wait out database and proxy outages instead of failing.

Everything here runs against real servers: a PostgreSQL cluster of the test's own
(``tests/support/pg_server.py``) that the tests stop, crash and restart; real SQLite files; and
``hpo serve-storage`` processes that the tests kill and start again. The one injected fault is a
TCP relay in front of PostgreSQL that drops the server's answer to a COMMIT the server did
execute: the "committed, but the answer was lost" case a retry must not get wrong.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import optuna
import psycopg
import pytest
import sqlalchemy
from background import Output, free_port, stop
from conftest import require_real, start_cli
from optuna.storages import GrpcStorageProxy, RDBStorage, get_storage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from pg_server import PgServer, missing_reason

from hpo.errors import HpoError
from hpo.resilient import (
    RetryingStorage,
    StorageUnavailable,
    TransientErrorInterceptor,
    error_line,
    is_transient,
    retrying,
)

MIN = [StudyDirection.MINIMIZE]


class Messages:
    """An ``on_wait`` that keeps what it was told (thread-safe)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            self.lines.append(message)

    def having(self, text: str) -> list[str]:
        with self._lock:
            return [line for line in self.lines if text in line]


@pytest.fixture
def pg() -> Iterator[PgServer]:
    reason = missing_reason()
    if reason:
        require_real(reason)
    with PgServer() as server:
        yield server


def rdb(url: str, **kwargs: Any) -> RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, **kwargs)


def waiting_template() -> FrozenTrial:
    return optuna.trial.create_trial(state=TrialState.WAITING)


# -- PostgreSQL restarts and outages ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_calls_wait_out_a_postgres_restart_and_an_8_second_outage(pg: PgServer) -> None:
    # No pool_pre_ping: after each restart the pool holds dead connections, whose first use
    # fails; those failures are retried like the refused connections while the server is down.
    inner = rdb(pg.url, heartbeat_interval=1, grace_period=5)
    messages = Messages()
    storage = RetryingStorage(inner, patience=60, on_wait=messages)
    study_id = storage.create_new_study(MIN, "outages")
    current: list[int] = []
    stop_beating = threading.Event()
    beat_errors: list[BaseException] = []

    def heartbeats() -> None:  # the worker's heartbeat thread, on the same storage
        while not stop_beating.wait(0.2):
            if current:
                try:
                    storage.record_heartbeat(current[-1])
                except BaseException as exc:
                    beat_errors.append(exc)
                    return

    def chaos() -> None:
        time.sleep(1.0)
        pg.restart(down_for=2.0)  # fast shutdown, 2 s down, start
        time.sleep(2.0)
        pg.stop(mode="immediate")  # a crash, then 8 s down, then crash recovery
        time.sleep(8.0)
        pg.start()

    beater = threading.Thread(target=heartbeats, daemon=True)
    beater.start()
    with ThreadPoolExecutor(1) as pool:
        outages = pool.submit(chaos)
        ours: dict[int, float] = {}
        started = time.monotonic()
        while not outages.done() or len(ours) < 3 or time.monotonic() - started < 2:
            # One small trial the way a worker writes it.
            trial_id = storage.create_new_trial(study_id)
            current.append(trial_id)
            storage.set_trial_param(trial_id, "x", 0.5, optuna.distributions.FloatDistribution(0.0, 1.0))
            for step in range(3):
                storage.set_trial_intermediate_value(trial_id, step, float(step))
            storage.set_trial_user_attr(trial_id, "note", "written through outages")
            value = float(len(ours))
            assert storage.get_trial(trial_id).state == TrialState.RUNNING
            assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
            ours[trial_id] = value
            storage.get_all_trials(study_id, states=(TrialState.COMPLETE,))
            time.sleep(0.05)
        outages.result()
    stop_beating.set()
    beater.join(timeout=30)
    assert not beat_errors

    trials = {t._trial_id: t for t in rdb(pg.url).get_all_trials(study_id)}
    for trial_id, value in ours.items():
        trial = trials[trial_id]
        assert trial.state == TrialState.COMPLETE and trial.values == [value]
        assert trial.intermediate_values == {0: 0.0, 1: 1.0, 2: 2.0}
        assert trial.params == {"x": 0.5} and trial.user_attrs == {"note": "written through outages"}
    # A create_new_trial whose answer is lost leaves an extra RUNNING trial (documented); with
    # fast and immediate shutdowns that is at most one per outage.
    assert len(trials) - len(ours) <= 2

    down = messages.having("unreachable")
    back = messages.having("reachable again")
    assert len(down) >= 2 and len(back) >= 2, messages.lines
    assert messages.lines[0].startswith("database unreachable (postgresql+psycopg://postgres@127.0.0.1:")
    assert "retrying for up to 1 min" in messages.lines[0]
    assert messages.lines[-1].startswith("database reachable again after ")
    assert all("\n" not in line for line in messages.lines)
    # The 8 s outage is reported as one outage (both threads wait, one says so).
    longest = max(float(line.split("after ")[1].split(" s")[0]) for line in back)
    assert 7.0 < longest < 40.0, messages.lines


@pytest.mark.slow
@pytest.mark.postgres
def test_patience_exceeded_is_one_line_without_the_password(pg: PgServer) -> None:
    # Trust authentication ignores the password; it is in the URL only to show it never leaks.
    url = pg.url.replace("postgres@", "postgres:s3cret-pw@")
    messages = Messages()
    storage = RetryingStorage(rdb(url, engine_kwargs={"pool_pre_ping": True}), patience=3, on_wait=messages)
    study_id = storage.create_new_study(MIN, "patience")
    # describe= names the storage as the user gave it (RDBStorage connects when it is made).
    described = RetryingStorage(rdb(url), patience=0.5, on_wait=messages, describe=url)
    pg.stop()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as caught:
        storage.get_all_trials(study_id)
    waited = time.monotonic() - started
    assert 3.0 <= waited < 10.0
    message = str(caught.value)
    assert isinstance(caught.value, HpoError)  # the CLI prints it as one "error: ..." line
    assert "\n" not in message
    assert message.startswith(
        f"database postgresql+psycopg://postgres:***@127.0.0.1:{pg.port}/postgres unreachable for "
    )
    assert "gave up on get_all_trials" in message
    assert "Connection refused" in message or "connection failed" in message
    assert message.endswith("(fix: check the database server; raise --storage-patience)")
    assert "s3cret" not in message and not any("s3cret" in line for line in messages.lines)
    assert messages.lines == [messages.lines[0]]  # one line at the first failure, none after 3 s
    assert "retrying for up to 3 s" in messages.lines[0]

    with pytest.raises(StorageUnavailable) as again:
        described.get_all_studies()
    assert "postgres:***@127.0.0.1" in str(again.value) and "s3cret" not in str(again.value)

    # After giving up, the server coming back makes the same storage work again.
    pg.start()
    assert [s.study_name for s in storage.get_all_studies()] == ["patience"]


def test_errors_a_retry_cannot_fix_are_raised_at_once(tmp_path: Path) -> None:
    messages = Messages()
    storage = RetryingStorage(rdb(f"sqlite:///{tmp_path / 'x.db'}"), patience=60, on_wait=messages)
    study_id = storage.create_new_study(MIN, "present")
    trial_id = storage.create_new_trial(study_id)
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])

    checks: list[tuple[Callable[[], object], type[BaseException]]] = [
        (lambda: storage.get_study_id_from_name("missing"), KeyError),
        (lambda: storage.get_trial(10_000), KeyError),
        (lambda: storage.create_new_study(MIN, "present"), optuna.exceptions.DuplicatedStudyError),
        (
            lambda: storage.set_trial_state_values(trial_id, TrialState.FAIL),
            optuna.exceptions.UpdateFinishedTrialError,
        ),
        (
            lambda: storage.set_trial_user_attr(trial_id, "k", "v"),
            optuna.exceptions.UpdateFinishedTrialError,
        ),
    ]
    for call, expected in checks:
        started = time.monotonic()
        with pytest.raises(expected):
            call()
        assert time.monotonic() - started < 1.0
    assert messages.lines == []


@pytest.mark.slow
@pytest.mark.postgres
def test_real_errors_are_classified(pg: PgServer, tmp_path: Path) -> None:
    def raised(call: Callable[[], object]) -> BaseException:
        try:
            call()
        except Exception as exc:
            return exc
        raise AssertionError("no error")

    # PostgreSQL: server down (refused), through SQLAlchemy and through Optuna's wrapping.
    down_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    refused = raised(lambda: psycopg.connect(down_url.replace("+psycopg", ""), connect_timeout=5))
    assert isinstance(refused, psycopg.OperationalError) and is_transient(refused)
    engine = sqlalchemy.create_engine(down_url)
    wrapped = raised(lambda: engine.connect())
    assert isinstance(wrapped, sqlalchemy.exc.OperationalError) and is_transient(wrapped)
    storage = rdb(pg.url)
    study_id = storage.create_new_study(MIN, "classified")
    pg.stop()
    internal = raised(lambda: storage.get_all_trials(study_id))
    assert isinstance(internal, optuna.exceptions.StorageInternalError) and is_transient(internal)
    # The pooled connection hears of the shutdown; a new one is refused.
    assert error_line(internal).startswith(
        (
            "AdminShutdown: terminating connection due to administrator command",
            "OperationalError: connection failed",
        )
    )
    internal = raised(lambda: storage.get_all_trials(study_id))
    assert error_line(internal).startswith("OperationalError: connection failed: connection to server at")
    pg.start()
    # ... but a database that does not exist, or bad SQL, is no outage.
    missing_db = raised(lambda: sqlalchemy.create_engine(pg.url_for("nope")).connect())
    assert not is_transient(missing_db)
    with sqlalchemy.create_engine(pg.url).connect() as conn:
        bad_sql = raised(lambda: conn.execute(sqlalchemy.text("SELECT * FROM no_such_table")))
    assert not is_transient(bad_sql)

    # SQLite: a locked database is transient, a missing table is not.
    path = tmp_path / "locks.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    locked = raised(lambda: other.execute("SELECT * FROM t"))
    assert "database is locked" in str(locked) and is_transient(locked)
    holder.execute("ROLLBACK")
    assert not is_transient(raised(lambda: other.execute("SELECT * FROM nothing")))

    # gRPC: nobody listening is UNAVAILABLE; Optuna's KeyError for a missing study is not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = GrpcStorageProxy(host="127.0.0.1", port=free_port())
    unavailable = raised(proxy.get_all_studies)
    assert isinstance(unavailable, grpc.RpcError) and unavailable.code() == grpc.StatusCode.UNAVAILABLE
    assert is_transient(unavailable)
    proxy.close()
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(KeyError("no study"))
    assert not is_transient(optuna.exceptions.UpdateFinishedTrialError("finished"))
    assert not is_transient(ValueError("bad"))
    # A permanent verdict raised while handling a transient error stays permanent.
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError:
            raise KeyError("study gone") from None
    except KeyError as exc:
        assert not is_transient(exc)


# -- committed, but the answer was lost ------------------------------------------------------------


class CommitAnswerDropper:
    """A TCP relay in front of PostgreSQL. Once armed, it lets the next COMMIT through to the
    server, waits for the server's answer, drops that answer and cuts the connection: the
    transaction is committed and the client gets a connection error (once; then it relays)."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # psycopg sends COMMIT as a simple query
    COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # the server's CommandComplete for it

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.fired = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"commit_sent": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if self.armed.is_set() and not self.fired.is_set() and self.COMMIT in chunk:
                    state["commit_sent"] = True
                server.sendall(chunk)
        self._cut(client, server)

    def _down(self, server: socket.socket, client: socket.socket, state: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if state["commit_sent"] and self.COMMITTED in chunk:
                    self.fired.set()
                    self.armed.clear()
                    break  # committed on the server; the client never hears of it
                client.sendall(chunk)
        self._cut(client, server)

    @staticmethod
    def _cut(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_finished_trial_whose_commit_answer_was_lost_is_reported_as_done(pg: PgServer) -> None:
    relay = CommitAnswerDropper(pg.port)
    try:
        messages = Messages()
        storage = RetryingStorage(rdb(relay.url()), patience=30, on_wait=messages)
        study_id = storage.create_new_study(MIN, "lost-answer")
        trial_id = storage.create_new_trial(study_id)

        relay.armed.set()
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.25]) is True
        assert relay.fired.is_set(), "the relay never dropped a COMMIT answer"
        trial = rdb(pg.url).get_trial(trial_id)
        assert trial.state == TrialState.COMPLETE and trial.values == [0.25]
        assert messages.having("unreachable") and messages.having("reachable again")

        # A different outcome than the one asked for is still an error.
        other = storage.create_new_trial(study_id)
        assert rdb(pg.url).set_trial_state_values(other, TrialState.FAIL)
        relay.armed.set()
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_state_values(other, TrialState.COMPLETE, [1.0])
        relay.armed.clear()
    finally:
        relay.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_claim_whose_commit_answer_was_lost_is_not_left_running_forever(pg: PgServer) -> None:
    relay = CommitAnswerDropper(pg.port)
    try:
        messages = Messages()
        inner = rdb(relay.url(), heartbeat_interval=1, grace_period=2)
        storage = RetryingStorage(inner, patience=30, on_wait=messages)
        study_id = storage.create_new_study(MIN, "lost-claim")
        trial_id = storage.create_new_trial(study_id, waiting_template())

        relay.armed.set()
        # The claim committed, its answer was lost, the retry finds the trial RUNNING: nobody can
        # tell whose claim that was, so the answer is False...
        assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is False
        assert relay.fired.is_set()
        assert rdb(pg.url).get_trial(trial_id).state == TrialState.RUNNING
        assert messages.having("claiming it was retried after a dropped connection and found it RUNNING")
        # ... and the trial got a heartbeat, so if nobody runs it, it goes stale and is retried
        # (Optuna never fails a RUNNING trial that has no heartbeat at all).
        time.sleep(3.5)
        assert storage._get_stale_trial_ids(study_id) == [trial_id]
    finally:
        relay.close()


def test_lost_answer_branch_on_a_real_sqlite_trial(tmp_path: Path) -> None:
    """The branch without network tricks: the first attempt fails on a locked database while
    the trial's completion is committed by the holder of the lock (as if by that attempt)."""
    path = tmp_path / "lost.db"
    inner = rdb(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 0.1}})
    messages = Messages()
    storage = RetryingStorage(inner, patience=30, on_wait=messages)
    study_id = storage.create_new_study(MIN, "sqlite")
    trial_id = storage.create_new_trial(study_id)

    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def commit_then_release() -> None:
        time.sleep(1.0)
        holder.execute("UPDATE trials SET state = 'COMPLETE', datetime_complete = CURRENT_TIMESTAMP")
        holder.execute(
            "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?, 0, 2.5, 'FINITE')",
            (trial_id,),
        )
        holder.execute("COMMIT")

    releaser = threading.Thread(target=commit_then_release)
    releaser.start()
    try:
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [2.5]) is True
    finally:
        releaser.join()
        holder.close()
    assert messages.having("database is locked")
    assert inner.get_trial(trial_id).values == [2.5]


# -- the gRPC proxy ----------------------------------------------------------------------------


def start_proxy(
    storage_url: str, port: int, deadline_s: float = 90.0
) -> tuple[subprocess.Popen[str], Output]:
    """``hpo serve-storage`` on ``port``; retried while the port is still held.

    After a proxy is killed with clients connected, its side of those connections sits in
    TIME_WAIT for 60 s, and hpo's free-port probe (hpo._listen.check_free, a bind without
    SO_REUSEADDR) reports the port as in use until then.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        proc = start_cli(["serve-storage", "--storage", storage_url, "--port", str(port)])
        out = Output(proc)
        match = out.wait_for(r"on grpc://|is in use", timeout=90)
        if "is in use" not in match.group(0):
            return proc, out
        out.finish(timeout=30)
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} stayed in use: {out.text}")
        time.sleep(1.0)


@pytest.mark.slow
def test_calls_wait_out_a_killed_and_restarted_proxy(tmp_path: Path) -> None:
    from hpo.serve_storage import connect

    db = f"sqlite:///{tmp_path / 'proxied.db'}"
    port = free_port()
    proc, _ = start_proxy(db, port)
    procs = [proc]
    try:
        messages = Messages()
        storage = RetryingStorage(connect(f"grpc://127.0.0.1:{port}"), patience=120, on_wait=messages)
        study_id = storage.create_new_study(MIN, "proxied")
        before = storage.create_new_trial(study_id)
        storage.set_trial_intermediate_value(before, 0, 1.0)

        proc.kill()
        proc.wait(timeout=30)
        restarted: list[float] = []

        def restart() -> None:
            time.sleep(2.0)
            new, _ = start_proxy(db, port)
            procs.append(new)
            restarted.append(time.monotonic())

        restarter = threading.Thread(target=restart)
        restarter.start()
        # These calls start while the proxy is dead and finish once it is back.
        storage.set_trial_intermediate_value(before, 1, 2.0)
        assert storage.set_trial_state_values(before, TrialState.COMPLETE, [2.0])
        after = storage.create_new_trial(study_id)
        assert storage.set_trial_state_values(after, TrialState.COMPLETE, [3.0])
        restarter.join(timeout=120)
        assert restarted, "the proxy did not come back"
        # Back within a few seconds of the proxy's return, not after gRPC's reconnect backoff.
        assert time.monotonic() - restarted[0] < 15

        trials = rdb(db).get_all_trials(study_id)
        assert [(t.state, t.values) for t in trials] == [
            (TrialState.COMPLETE, [2.0]),
            (TrialState.COMPLETE, [3.0]),
        ]
        assert trials[0].intermediate_values == {0: 1.0, 1: 2.0}
        assert messages.lines[0].startswith(f"storage proxy unreachable (grpc://127.0.0.1:{port})")
        assert "gRPC UNAVAILABLE" in messages.lines[0]
        assert messages.having("storage proxy reachable again after")
    finally:
        for p in procs:
            stop(p)


@pytest.mark.slow
@pytest.mark.postgres
def test_calls_through_the_proxy_wait_out_a_restart_of_its_database(pg: PgServer) -> None:
    from hpo.serve_storage import connect

    port = free_port()
    proc, _ = start_proxy(pg.url, port)
    try:
        messages = Messages()
        storage = RetryingStorage(connect(f"grpc://127.0.0.1:{port}"), patience=60, on_wait=messages)
        study_id = storage.create_new_study(MIN, "behind-proxy")
        trial_id = storage.create_new_trial(study_id)
        pg.stop()
        threading.Timer(3.0, pg.start).start()
        # The proxy answers UNKNOWN with Optuna's generic commit-error text while PostgreSQL is
        # down; the client waits it out.
        storage.set_trial_intermediate_value(trial_id, 0, 0.5)
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
        assert rdb(pg.url).get_trial(trial_id).values == [0.5]
        # Without hpo.resilient.TransientErrorInterceptor on the proxy this client waited on
        # UNKNOWN answers, with it on UNAVAILABLE ones; a proxy that retries itself answers late.
        if messages.lines:
            assert "gRPC UNKNOWN" in messages.lines[0] or "gRPC UNAVAILABLE" in messages.lines[0]
            assert messages.lines[-1].startswith("storage proxy reachable again after ")
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.postgres
def test_the_interceptor_makes_a_proxys_database_outage_unavailable(pg: PgServer) -> None:
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    from hpo.serve_storage import _Servicer, connect

    server = grpc.server(ThreadPoolExecutor(4), interceptors=[TransientErrorInterceptor()])
    api_pb2_grpc.add_StorageServiceServicer_to_server(_Servicer(get_storage(rdb(pg.url))), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = connect(f"grpc://127.0.0.1:{port}")
        study_id = client.create_new_study(MIN, "intercepted")
        with pytest.raises(KeyError):  # NOT_FOUND still comes through as NOT_FOUND
            client.get_study_id_from_name("missing")
        pg.stop()
        try:
            client.get_study_directions(10_000)
            raise AssertionError("no error while the database is down")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            # The pooled connection hears of the shutdown, a new one is refused.
            assert exc.details().startswith(
                (
                    "storage database unavailable: AdminShutdown: terminating connection",
                    "storage database unavailable: OperationalError: connection failed",
                )
            )
            assert is_transient(exc)
        pg.start()
        assert client.get_study_directions(study_id) == MIN
    finally:
        server.stop(grace=None)


# -- the wrapper as an Optuna storage --------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["rdb", "cached"])
def test_optuna_studies_run_on_the_wrapper(tmp_path: Path, cached: bool) -> None:
    inner_rdb = rdb(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=5, grace_period=20)
    inner = get_storage(inner_rdb) if cached else inner_rdb
    storage = RetryingStorage(inner, patience=5, on_wait=Messages())
    study = optuna.create_study(storage=storage, study_name="plain")
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=5)
    assert len(study.trials) == 5 and study.best_value < 1.0
    assert is_heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 5
    assert storage.inner is inner
    # Attributes the wrapper lacks are the inner storage's.
    if cached:
        assert storage._backend is inner_rdb and storage._backend.engine is inner_rdb.engine
    else:
        assert storage.engine is inner_rdb.engine
        assert storage.heartbeat_interval == 5 and storage.grace_period == 20
    with pytest.raises(AttributeError):
        _ = storage.no_such_attribute
    without = RetryingStorage(rdb(f"sqlite:///{tmp_path / 'nobeat.db'}"))
    assert not is_heartbeat_enabled(without)


def test_retrying_runs_raw_sql_through_a_locked_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "raw.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.5, lambda: holder.execute("ROLLBACK")).start()
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    messages = Messages()

    def insert() -> int:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
            return int(conn.execute(sqlalchemy.text("SELECT count(*) FROM t")).scalar_one())

    assert retrying(insert, patience=20, on_wait=messages, describe=f"sqlite:///{path}") == 1
    assert messages.lines[0].startswith(f"database unreachable (sqlite:///{path}), retrying for up to 20 s: ")
    assert "database is locked" in messages.lines[0]
    assert messages.lines[-1].startswith("database reachable again after ")
    with pytest.raises(StorageUnavailable, match=r"gave up on a storage call: OperationalError"):
        holder.execute("BEGIN EXCLUSIVE")
        retrying(insert, patience=0.5, on_wait=messages, describe=f"sqlite:///{path}")
    holder.execute("ROLLBACK")
    holder.close()
