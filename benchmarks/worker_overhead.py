"""Per-trial overhead of ``hpo worker`` against plain ``optuna`` ``study.optimize``, same storage.

Both sides run the same trivial objective (two suggested floats, three reported epochs) on the
same kind of storage, in this process, one after the other, alternating, several rounds; the
ratio of median seconds per trial is printed (machines here are noisy: compare only within a run).

    python benchmarks/worker_overhead.py [--trials 60] [--rounds 3] [--postgres URL]

hpo's side includes what a user gets from it: the definition check, queued trials claimed
atomically, a sampler per trial, heartbeats, each epoch's metrics stored with the trial, storage
calls that wait out outages, and the training in a supervised trainer process (every report and
pruning decision crosses a pipe). The trainer process is started once per worker; its start is
printed separately and not counted per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from rich.console import Console

from hpo.objective import TrialRun
from hpo.resilient import RetryingStorage
from hpo.spec import parse_study
from hpo.storage import HeartbeatSettings, open_storage
from hpo.studies import create_study
from hpo.worker import Worker, WorkerOptions

EPOCHS = 3


def plain_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5, 5)
    y = trial.suggest_float("y", -5, 5)
    value = (x - 2) ** 2 + (y + 1) ** 2
    for epoch in range(1, EPOCHS + 1):
        trial.report(value + 1 / epoch, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value + 1 / EPOCHS


def hpo_train(run: TrialRun) -> float:
    value = (run.config["x"] - 2) ** 2 + (run.config["y"] + 1) ** 2
    for epoch in range(1, EPOCHS + 1):
        if run.report(epoch, {"loss": value + 1 / epoch}):
            break
    return run.final_value()


SPEC = {
    "name": "bench",
    "objective": "bench",
    "search_space": {
        "x": {"type": "float", "low": -5, "high": 5},
        "y": {"type": "float", "low": -5, "high": 5},
    },
    "metric": "loss",
    "direction": "minimize",
    "budget": {"max_epochs": EPOCHS},
    "sampler": {"name": "random", "seed": 0},
}


def time_plain(url: str, n: int, heartbeat: bool) -> float:
    storage = open_storage(url, HeartbeatSettings() if heartbeat else None)
    study = optuna.create_study(
        storage=storage, study_name=f"plain-{uuid.uuid4().hex[:8]}", sampler=optuna.samplers.RandomSampler(0)
    )
    start = time.perf_counter()
    study.optimize(plain_objective, n_trials=n)
    return (time.perf_counter() - start) / n


def time_hpo(url: str, n: int) -> tuple[float, float]:
    """(seconds per trial with the trainer process already started, seconds to start it)."""
    storage = RetryingStorage(optuna.storages.get_storage(open_storage(url, HeartbeatSettings())))
    spec = parse_study({**SPEC, "n_trials": n}, "benchmark")
    study, _ = create_study(storage, spec, f"hpo-{uuid.uuid4().hex[:8]}")
    worker = Worker(
        study,
        spec,
        WorkerOptions(show_progress=False),
        objective="worker_overhead:hpo_train",  # the trainer process imports it (sys.path is copied)
        console=Console(quiet=True),
    )
    t0 = time.perf_counter()
    worker.trainer.ensure_started(worker.interrupts)  # once per worker, not per trial
    start = time.perf_counter()
    summary = worker.run()
    elapsed = time.perf_counter() - start
    assert summary.total == n, summary
    return elapsed / n, start - t0


def fresh_postgres(admin_url: str) -> tuple[str, sqlalchemy.Engine, str]:
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"hpo_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, admin, name


def bench(label: str, url: str, trials: int, rounds: int) -> None:
    plain, plain_hb, ours, starts = [], [], [], []
    for _ in range(rounds):
        plain.append(time_plain(url, trials, heartbeat=False))
        plain_hb.append(time_plain(url, trials, heartbeat=True))
        per_trial, started = time_hpo(url, trials)
        ours.append(per_trial)
        starts.append(started)
    p, ph, h = (statistics.median(v) * 1000 for v in (plain, plain_hb, ours))
    print(
        f"{label:10s} ms/trial: optuna {p:6.1f} | optuna+heartbeat {ph:6.1f} | hpo worker {h:6.1f} "
        f"| ratio hpo/optuna {h / p:4.2f}x, hpo/optuna+heartbeat {h / ph:4.2f}x "
        f"| trainer process start (once per worker) {statistics.median(starts):.2f}s"
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("HPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    print(
        f"{args.trials} trials x {args.rounds} rounds, {EPOCHS} reported epochs per trial, median per trial"
    )
    with tempfile.TemporaryDirectory() as tmp:
        bench("SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}", args.trials, args.rounds)
    try:
        url, admin, name = fresh_postgres(args.postgres)
    except Exception as exc:  # the benchmark still reports SQLite without a server
        print(f"PostgreSQL skipped: {exc.__class__.__name__}: {exc}")
        return
    try:
        bench("PostgreSQL", url, args.trials, args.rounds)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
