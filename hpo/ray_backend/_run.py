"""``hpo worker --backend ray``: run a study's queued trials as Ray Tune trials."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from hpo.errors import HpoError
from hpo.launcher import SQLITE_MAX_WORKER_PROCESSES
from hpo.ray_backend._schedulers import make_scheduler
from hpo.spec import StudySpec
from hpo.storage import is_sqlite, parse_url, redact, sqlite_path
from hpo.studies import checkpoint_folder

# Defaults for Ray's own switches (a user's environment wins): no usage statistics sent home;
# trials run in the directory hpo was started from, like plain workers, not in a Ray trial
# directory; Ray's progress tables stay off (hpo prints one line per finished trial).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Keeping one checkpoint per trial makes Tune save its (tiny, local) experiment state at
    # every epoch; that is intended here, so no warning about it.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
EXIT_INTERRUPTED = 130


def absolute_storage_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute: Ray workers start in other directories."""
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return parse_url(url).set(database=str(path.resolve())).render_as_string(hide_password=False)


def gpus_per_trial(value: float | None) -> float:
    """Validate ``--gpus-per-trial``: a fraction of one GPU, or a whole number of GPUs."""
    if value is None:
        return 0.0
    if value < 0 or (value > 1 and not float(value).is_integer()):
        raise HpoError(
            f"--gpus-per-trial {value:g}: Ray grants a fraction of one GPU or whole GPUs "
            "(fix: e.g. --gpus-per-trial 0.5, 1 or 2)"
        )
    return float(value)


class _DropMisleadingHints(logging.Filter):
    """Hide Ray Tune's advice to resume with ``Tuner.restore`` (hpo resumes from the Optuna
    storage, by running ``hpo worker`` again, and removes Ray's run folder) and its complaint
    about trials without result files (interrupted before their first epoch)."""

    HINTS = ("Tuner.restore", "Failed to fetch metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(hint in message for hint in self.HINTS)


@contextlib.contextmanager
def _quiet_ray_hints() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    hint_filter = _DropMisleadingHints()
    for logger in loggers:
        logger.addFilter(hint_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hint_filter)


def _starts_local(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a private instance on this machine."""
    return address is None and not os.environ.get("RAY_ADDRESS")


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself keeps retrying for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise HpoError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
            "(fix: check --address, e.g. auto on a cluster node or HEAD_IP:6379, and that `ray status` works)"
        ) from None


def _init_ray(address: str | None) -> None:
    import ray

    if address is not None and address.startswith("ray://"):
        # Ray Client would run Tune's driver (this search, its heartbeats) inside the cluster.
        raise HpoError(
            f"--address {address}: Ray Client addresses are not supported (fix: run hpo on a node of "
            "the cluster with --address auto, or submit it: ray job submit -- hpo worker ... --backend ray)"
        )
    if address is not None:
        _check_reachable(address)
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        # Trial processes: the objective's own output and Ray's warnings, not a line per checkpoint.
        "logging_config": ray.LoggingConfig(log_level="WARNING"),
        "log_to_driver": True,
    }
    if _starts_local(address):
        kwargs["include_dashboard"] = False  # no web server (and no port) for a private instance
    else:
        # Remote worker processes don't inherit this environment; send Ray's switches along.
        kwargs["runtime_env"] = {"env_vars": {k: os.environ[k] for k in RAY_ENV_DEFAULTS}}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "(local)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HpoError(
            f"cannot start or reach the Ray cluster {where}: {first} "
            "(fix: check --address, e.g. auto on a cluster node or HEAD_IP:6379, and that `ray status` works)"
        ) from None


def _check_cluster(gpus: float, storage_url: str, local: bool) -> dict[str, float]:
    import ray

    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    if gpus > 0 and resources.get("GPU", 0.0) == 0.0 and local:
        raise HpoError(
            f"--gpus-per-trial {gpus:g} but this machine's Ray instance has no GPU "
            "(fix: drop --gpus-per-trial, or pass --address of a cluster with GPU nodes)"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if is_sqlite(storage_url) and len(nodes) > 1:
        raise HpoError(
            f"the Ray cluster has {len(nodes)} nodes but the storage is an SQLite file only this "
            "machine can open (fix: use PostgreSQL, e.g. --storage postgresql+psycopg://user@host/db)"
        )
    return resources


def _max_concurrent(resources: dict[str, float], gpus: float, url: str, local: bool) -> int | None:
    """How many trials may run (and be claimed) at once; None: as many as Ray can place.

    On this machine's own instance the capacity is known, so no trial is claimed only to wait
    for a free CPU; a cluster may grow (autoscaling), so its capacity is left to Ray. SQLite
    serialises writers, so it keeps to hpo's safe number of writing processes.
    """
    limit: int | None = None
    if local:
        limit = max(1, int(resources.get("CPU", 1.0)))
        if gpus > 0:
            limit = min(limit, max(1, int(resources.get("GPU", 0.0) / gpus)))
    if is_sqlite(url):
        limit = min(limit or SQLITE_MAX_WORKER_PROCESSES, SQLITE_MAX_WORKER_PROCESSES)
    return limit


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: Ray Tune stops, and the trials are handed back."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_on_ray(
    study: optuna.Study,
    spec: StudySpec,
    storage_url: str,
    args: argparse.Namespace,
    objective_path: Sequence[str] = (),
) -> int:
    """Run the study's queued trials on Ray Tune; the exit status (0, 1 after repeated failures,
    130 when interrupted).

    Connects to ``args.address`` (``ray.init(address=...)``; ``$RAY_ADDRESS`` or a new local
    instance when absent). Each trial gets one CPU and ``args.gpus_per_trial`` GPU. The study's
    sampler proposes parameters through Ray's ``OptunaSearch``; the study's pruner becomes a Ray
    scheduler (:mod:`hpo.ray_backend._schedulers`); Ray restores a trial whose process died up to
    ``args.max_retry`` times from its last checkpoint. Every trial, value, intermediate value
    and state lands in the study's Optuna storage, as with plain workers. ``objective_path``: the
    folders the trials look in for the objective's module (the driver's command line chose them;
    on a multi-node cluster they must exist at the same place on every node).
    """
    plan = make_scheduler(spec)  # an unsupported pruner is reported before Ray starts
    gpus = gpus_per_trial(args.gpus_per_trial)
    url = absolute_storage_url(storage_url)
    checkpoint_root = Path(args.checkpoint_dir).expanduser().resolve()
    console = Console(highlight=False, soft_wrap=True)

    def say(message: str) -> None:
        console.print(message, markup=False)

    for option in plan.ignored_options:
        say(f"note: pruner option {option} has no counterpart in Ray's {plan.name}; ignored")

    import ray
    from ray import tune

    from hpo.ray_backend._search import SearchLimits, StudySearch
    from hpo.ray_backend._trainable import RayJob, run_trial

    local = _starts_local(args.address)
    _init_ray(args.address)
    search: StudySearch | None = None
    experiment_root = checkpoint_folder(checkpoint_root, study) / "ray"
    run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        resources = _check_cluster(gpus, url, local)
        limits = SearchLimits(
            n_trials=args.n_trials,
            timeout=args.timeout,
            max_consecutive_failures=args.max_consecutive_failures,
            max_failures=args.max_retry,
        )
        search = StudySearch(study, spec, limits, checkpoint_root, say)
        job = RayJob(
            storage_url=url,
            study_name=study.study_name,
            checkpoint_root=str(checkpoint_root),
            gpus_per_trial=gpus,
            objective=spec.objective,
            objective_path=tuple(objective_path),
        )
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": 1, "gpu": gpus})
        max_concurrent = _max_concurrent(resources, gpus, url, local)
        say(
            f"Ray Tune: study {study.study_name!r} in {redact(url)}, {_waiting(study)} queued trial(s); "
            f"cluster {resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU, "
            f"1 CPU + {gpus:g} GPU per trial; scheduler {plan.name}"
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode="min" if spec.direction == "minimize" else "max",
                search_alg=search,
                scheduler=plan.scheduler,
                num_samples=-1,  # the search algorithm ends the run when the queue is empty
                max_concurrent_trials=max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=str(experiment_root),
                failure_config=tune.FailureConfig(max_failures=args.max_retry),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )
        with _sigterm_as_sigint(), _quiet_ray_hints():
            tuner.fit()
    finally:
        handed_back = search.release_unfinished() if search is not None else 0
        ray.shutdown()
        # Ray's copies of the trials' checkpoints: no longer needed once the run is over.
        shutil.rmtree(experiment_root / run_name, ignore_errors=True)
        for folder in (experiment_root, experiment_root.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: other runs' or trials' files stay
    report = search.report
    if not report.stopped_because:
        report.stopped_because = "interrupted"
    counts = ", ".join(f"{n} {state}" for state, n in report.finished.items())
    back = f"; {handed_back} trial(s) handed back to the queue" if handed_back else ""
    say(f"Ray run stopped: {report.stopped_because} ({counts}{back})")
    if report.stopped_because == "interrupted":
        return EXIT_INTERRUPTED
    return 1 if report.too_many_failures else 0
