"""``hpo serve-storage``: Optuna's gRPC storage proxy in front of the study database.

Every worker that opens the database itself holds its own connections and polls it for trials;
hundreds or thousands of worker processes exhaust PostgreSQL's connection slots and load it with
identical queries. The proxy (``optuna.storages.run_grpc_proxy_server``) holds one small pool to
the database and caches finished trials; workers name it as their storage, ``grpc://HOST:PORT``.

Heartbeats through the proxy: Optuna's gRPC protocol has no heartbeat call and its client is not
a heartbeat storage, so dead workers' trials would stay RUNNING forever. hpo closes that gap on
both sides. The client (:class:`ProxyStorage`) beats by setting the trial system attribute
``hpo:heartbeat``; the server records a heartbeat in the database instead of storing it (with the
database's clock, so workers' clocks don't matter). The server is the only process that looks
for stale trials: every heartbeat interval it fails trials whose heartbeat is older than the
grace period and re-queues them with their parameters (one transaction each, see
:func:`hpo._rdb.fail_stale`), so thousands of workers don't each run that query.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

import grpc
import optuna
from optuna.storages import BaseStorage, GrpcStorageProxy
from optuna.trial import FrozenTrial

from hpo import _listen, _optuna
from hpo._commands import check_heartbeat_flags
from hpo._commands.serve_storage import DEFAULT_HOST, DEFAULT_PORT
from hpo._optuna import api_pb2, api_pb2_grpc
from hpo._rdb import fail_stale
from hpo.errors import HpoError, StorageError
from hpo.resilient import TransientErrorInterceptor
from hpo.storage import (
    HeartbeatSettings,
    is_grpc,
    open_storage,
    redact,
    resolve_storage_url,
)

# The trial system attribute a ProxyStorage client sets to beat; the server turns it into a
# heartbeat row and never stores it.
HEARTBEAT_ATTR = "hpo:heartbeat"
CONNECT_TIMEOUT_S = 10.0


class ProxyStorage(GrpcStorageProxy, _optuna.HeartbeatStorage):
    """Optuna's gRPC client that also beats for its running trials (see the module docstring).

    ``heartbeat_interval`` None turns heartbeats off (commands that run no trials).
    """

    def __init__(self, host: str, port: int, heartbeat_interval: int | None = None) -> None:
        super().__init__(host=host, port=port)
        # hpo's worker reads the interval from this attribute, as from RDBStorage.
        self.heartbeat_interval = heartbeat_interval

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, True)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # A private override on purpose (hpo._optuna.PRIVATE_OVERRIDES): BaseHeartbeat's abstract
        # method. hpo serve-storage finds and re-queues stale trials itself.
        return []

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None


def connect(url: str, heartbeat: HeartbeatSettings | None = None) -> ProxyStorage:
    """Open ``grpc://HOST:PORT``, waiting up to 10 s for the proxy; :class:`StorageError` if it is absent."""
    hostport = url.removeprefix("grpc://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(
            f"storage URL {url!r}: expected grpc://HOST:PORT (fix: e.g. grpc://127.0.0.1:13000)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = ProxyStorage(host, int(port), heartbeat.interval if heartbeat else None)
    try:
        storage.wait_server_ready(timeout=CONNECT_TIMEOUT_S)
    except ConnectionError:
        storage.close()
        raise StorageError(
            f"cannot reach the storage proxy at {url}: no answer in {CONNECT_TIMEOUT_S:g}s "
            "(fix: start it with `hpo serve-storage --storage DATABASE_URL`, and check host and port)"
        ) from None
    return storage


class _Servicer(_optuna.StorageProxyServicer):
    """Optuna's servicer, with ``hpo:heartbeat`` writes turned into heartbeats."""

    def SetTrialSystemAttribute(
        self, request: api_pb2.SetTrialSystemAttributeRequest, context: grpc.ServicerContext
    ) -> api_pb2.SetTrialSystemAttributeReply:
        if request.key != HEARTBEAT_ATTR:
            return super().SetTrialSystemAttribute(request, context)
        try:
            _optuna.record_heartbeat(_optuna.servicer_storage(self), request.trial_id)
        except KeyError as exc:
            context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(exc))
        return api_pb2.SetTrialSystemAttributeReply()


class _StaleTrialReaper(threading.Thread):
    """Every ``interval`` seconds, fail and re-queue the stale trials of every study."""

    def __init__(self, storage: BaseStorage, interval: float) -> None:
        super().__init__(name="hpo-stale-trials", daemon=True)
        self._storage = storage
        self._interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self._interval):
            try:
                for summary in self._storage.get_all_studies():
                    # Fail and re-queue each stale trial in one transaction (hpo._rdb).
                    fail_stale(self._storage, self._storage.get_study_id_from_name(summary.study_name))
            except Exception as exc:  # the database may be briefly away; try again next round
                print(f"warning: checking for stale trials failed: {exc}", file=sys.stderr)


@dataclass
class RunningProxy:
    """A started proxy (:func:`start`): its gRPC server, its stale-trial reaper and the URL
    workers should use."""

    server: grpc.Server
    reaper: _StaleTrialReaper
    url: str

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; ``grace`` seconds let the calls in flight finish."""
        self.reaper.stop.set()
        self.server.stop(grace=grace)


def start(
    storage_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    heartbeat: HeartbeatSettings | None = None,
    threads: int = 16,
) -> RunningProxy:
    """Start serving ``storage_url`` (a database URL) over gRPC on ``host:port``.

    Raises :class:`HpoError` before serving when the URL or the database is unusable or the
    port cannot be bound.
    """
    if is_grpc(storage_url):
        raise StorageError(
            f"hpo serve-storage serves a database, not another proxy ({storage_url}) "
            "(fix: --storage postgresql+psycopg://user:password@host:5432/dbname)"
        )
    heartbeat = heartbeat or HeartbeatSettings()
    address = _listen.resolve(host, port)
    _listen.check_free(address)
    # Optuna's cache layer (get_storage) keeps finished trials in memory: the proxy answers the
    # workers' polling from it instead of querying the database each time.
    backend = _optuna.cached_storage(open_storage(storage_url, heartbeat))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hpo-grpc"),
        # gRPC binds with SO_REUSEPORT by default: a second proxy on the same port would share
        # it silently instead of failing.
        options=[("grpc.so_reuseport", 0)],
        # A database outage reaches the workers as UNAVAILABLE (which they wait out), not as
        # Optuna's generic "invalid data" UNKNOWN.
        interceptors=[TransientErrorInterceptor()],
    )
    api_pb2_grpc.add_StorageServiceServicer_to_server(_Servicer(backend), server)
    try:
        bound = server.add_insecure_port(f"{address.url_host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise HpoError(f"port {port} on {host} is in use (fix: --port N with a free port)")
    warning = _listen.exposure_warning(address, "the storage proxy")
    if warning:
        print(warning, file=sys.stderr)
    reaper = _StaleTrialReaper(backend, heartbeat.interval)
    server.start()
    reaper.start()
    return RunningProxy(server, reaper, f"grpc://{address.public_host}:{bound}")


def serve(
    storage_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    heartbeat: HeartbeatSettings | None = None,
    threads: int = 16,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """:func:`start`, then serve until SIGINT/SIGTERM. ``on_ready`` receives the ``grpc://`` URL
    workers should use."""
    proxy = start(storage_url, host, port, heartbeat, threads)

    def stop(signum: int, frame: FrameType | None) -> None:
        proxy.server.stop(grace=5)  # lets calls in flight finish, so no write is cut in half

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if on_ready is not None:
            on_ready(proxy.url)
        proxy.server.wait_for_termination()
    finally:
        signal.signal(signal.SIGTERM, previous)
        proxy.stop(grace=None)


def cmd_serve_storage(args: argparse.Namespace) -> int:
    url = resolve_storage_url(args.storage)
    check_heartbeat_flags(args)
    heartbeat = HeartbeatSettings(args.heartbeat_interval, args.grace_period, args.max_retry)
    if args.threads < 1:
        raise HpoError("--threads must be at least 1")

    def announce(proxy_url: str) -> None:
        print(
            f"storage proxy for {redact(url)} on {proxy_url}; run workers with --storage {proxy_url} "
            f"and --heartbeat-interval below {heartbeat.grace_period}; Ctrl-C to stop",
            flush=True,
        )

    serve(url, args.host, args.port, heartbeat, args.threads, on_ready=announce)
    return 0
