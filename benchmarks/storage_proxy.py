"""Workers on PostgreSQL directly against workers through ``hpo serve-storage`` (the gRPC proxy).

Each of ``--clients`` processes runs hpo's own storage traffic for a trial without the training:
claim a queued trial (``hpo._lease.claim_trial``), a heartbeat, a sampled parameter, three epoch
reports, the result; until the study's ``--trials`` trials are done. Measured in the same run, on
a fresh database each:

* direct: every process opens the database itself (``--storage postgresql+psycopg://...``);
* proxy: every process talks to one ``hpo serve-storage`` (``--storage grpc://...``).

Prints the peak number of PostgreSQL connections to the study database (``pg_stat_activity``),
trials per second, and the ratios proxy / direct. On a 2-core machine the clients, the proxy and
PostgreSQL share the cores, so trials/s there is a floor, not what a fleet on many machines sees.

Run: ``.venv/bin/python benchmarks/storage_proxy.py [--clients 24] [--trials 240]``
(needs a PostgreSQL server: ``HPO_TEST_POSTGRES_URL``, default the local one with database test).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path

import optuna
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo.storage import HeartbeatSettings, open_storage  # noqa: E402

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"hpo_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def client(url: str, barrier: Barrier, done: multiprocessing.Queue[int]) -> None:
    try:
        done.put(_client(url, barrier))
    except BaseException:
        done.put(-1)  # lets the parent stop at once instead of waiting for this client
        raise


def _client(url: str, barrier: Barrier) -> int:
    from hpo._lease import claim_trial

    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url, HeartbeatSettings())
    # TPE, the default of hpo's study files: it reads the study's trials for every new trial.
    sampler = optuna.samplers.TPESampler(seed=os.getpid())
    study = optuna.load_study(study_name="bench", storage=storage, sampler=sampler)
    barrier.wait()
    finished = 0
    while (claimed := claim_trial(study)) is not None:
        trial_id, _ = claimed
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        trial = optuna.Trial(study, trial_id)
        x = trial.suggest_float("x", -5, 5)
        for epoch in (1, 2, 3):
            trial.report(x * x + 1 / epoch, epoch)
        study.tell(trial, x * x)
        finished += 1
    return finished


def peak_connections(admin_url: str, database: str, stop: threading.Event, peak: list[int]) -> None:
    # Autocommit: within one transaction PostgreSQL would answer from the same statistics snapshot.
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db")
    with engine.connect() as conn:
        while not stop.wait(0.05):
            # This sampler's own connection is to another database, so it is not counted.
            peak[0] = max(peak[0], int(conn.execute(query, {"db": database}).scalar_one()))
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def proxy(url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "serve-storage", "--storage", url, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"on (grpc://\S+);", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"hpo serve-storage did not start: {line}{proc.stdout.read()}")
    try:
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(admin_url: str, mode: str, clients: int, trials: int) -> tuple[int, float, int]:
    with fresh_database(admin_url) as db_url:
        study = optuna.create_study(study_name="bench", storage=db_url)
        for _ in range(trials):
            study.enqueue_trial({})
        database = sqlalchemy.engine.make_url(db_url).database or ""
        with proxy(db_url) if mode == "proxy" else _same(db_url) as url:
            context = multiprocessing.get_context("spawn")
            barrier = context.Barrier(clients + 1)
            done = context.Queue()
            procs = [context.Process(target=client, args=(url, barrier, done)) for _ in range(clients)]
            for proc in procs:
                proc.start()
            stop, peak = threading.Event(), [0]
            sampler = threading.Thread(target=peak_connections, args=(admin_url, database, stop, peak))
            sampler.start()
            barrier.wait(timeout=600)
            start = time.perf_counter()
            counts = [done.get(timeout=600) for _ in procs]
            if -1 in counts:
                raise RuntimeError(f"{mode}: a client failed (its traceback is above)")
            finished = sum(counts)
            seconds = time.perf_counter() - start
            for proc in procs:
                proc.join()
            stop.set()
            sampler.join()
        states = {t.state for t in optuna.load_study(study_name="bench", storage=db_url).get_trials()}
        if finished != trials or states != {optuna.trial.TrialState.COMPLETE}:
            raise RuntimeError(f"{mode}: {finished} of {trials} trials finished, states {states}")
        return peak[0], trials / seconds, finished


@contextmanager
def _same(url: str) -> Iterator[str]:
    yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--trials", type=int, default=240)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    admin_url = os.environ.get("HPO_TEST_POSTGRES_URL", DEFAULT_PG)
    print(f"{args.clients} client processes, {args.trials} trials, {os.cpu_count()} CPU cores")
    results = {mode: run(admin_url, mode, args.clients, args.trials) for mode in ("direct", "proxy")}
    print(f"{'':8} {'peak PG connections':>20} {'trials/s':>10}")
    for mode, (connections, rate, _) in results.items():
        print(f"{mode:8} {connections:>20} {rate:>10.1f}")
    (c_direct, r_direct, _), (c_proxy, r_proxy, _) = results["direct"], results["proxy"]
    print(f"ratio proxy/direct: connections {c_proxy / c_direct:.2f}, trials/s {r_proxy / r_direct:.2f}")


if __name__ == "__main__":
    main()
