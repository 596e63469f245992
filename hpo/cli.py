"""The ``hpo`` command line. Flags follow the ``optuna`` CLI's names (``--storage``, ``--study-name``)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

# Only light modules at the top: `hpo --help` and `hpo COMMAND --help` must not import Optuna,
# SQLAlchemy or pydantic. Each command imports what it runs in its own function.
from hpo._commands import add_retry_arguments, check_heartbeat_flags
from hpo._objective_path import add_objective_path_argument, objective_path
from hpo._objective_path import cli_args as objective_path_args
from hpo._storage_url import add_storage_argument, resolve_storage_url
from hpo.errors import HpoError

if TYPE_CHECKING:
    import optuna

    from hpo._trainer_handle import Trainer
    from hpo.policy import ObjectivePolicy
    from hpo.spec import StudySpec
    from hpo.storage import HeartbeatSettings


def cmd_create_study(args: argparse.Namespace) -> int:
    from hpo.spec import load_study_file
    from hpo.storage import open_storage, redact
    from hpo.studies import create_study

    spec = load_study_file(args.study_file)
    url = resolve_storage_url(args.storage)
    storage = open_storage(url)
    if args.replace:
        from hpo.lifecycle import replace_study

        study, diff = replace_study(storage, spec, args.study_name)
        if diff:
            print(diff)
        print(f"study {study.study_name!r} replaced in {redact(url)} ({spec.n_trials} trials queued)")
        return 0
    study, created = create_study(storage, spec, args.study_name, args.skip_if_exists)
    verb = "created" if created else "exists, definition unchanged:"
    print(f"study {study.study_name!r} {verb} in {redact(url)} ({spec.n_trials} trials queued by design)")
    return 0


def _worker_file(
    args: argparse.Namespace, search_path: Sequence[str] = (), early: Trainer | None = None
) -> StudySpec | None:
    """The study file given as STUDY_FILE or --spec, validated before any storage is opened, so a
    bad file never leaves an empty database behind (objectives looked for in ``search_path`` too,
    see :mod:`hpo._objective_path`). The ``early`` trainer is sent its warm-up once the file is
    parsed: the objective a study file on the command line names is trusted (hpo.policy), and
    the trainer imports it while this process imports it to check it."""
    from hpo.objective import check_objective
    from hpo.spec import parse_study_file
    from hpo.trainer import warm_job

    if args.study_file and args.spec:
        raise HpoError("give the study file either as STUDY_FILE or as --spec, not both")
    if not args.study_file and not args.study_name:
        raise HpoError(
            "hpo worker needs a STUDY_FILE or --study-name NAME "
            "(fix: e.g. hpo worker studies/digits_quickstart.yaml)"
        )
    path = args.study_file or args.spec
    if not path:
        return None
    spec = parse_study_file(path)
    if early is not None:
        early.warm_up(warm_job(spec.definition(), spec.objective, search_path))
    check_objective(spec, str(path), search_path=search_path)
    return spec


def _worker_study(
    args: argparse.Namespace, storage: optuna.storages.BaseStorage, spec: StudySpec | None
) -> tuple[optuna.Study, StudySpec, list[str]]:
    """The study, its definition, and the objectives trusted because a study file named them."""
    from hpo.studies import adopt_study, complete_queue, create_study, load_study_spec

    if args.study_file and spec is not None:
        create_study(storage, spec, args.study_name, skip_if_exists=True)
        study, stored = load_study_spec(storage, args.study_name or spec.name)
        return study, stored, [spec.objective]
    trusted = []
    if spec is not None:
        adopt_study(storage, args.study_name, spec)
        trusted.append(spec.objective)
    study, stored = load_study_spec(storage, args.study_name)
    complete_queue(storage, study, stored)  # a creation interrupted half-way is completed here
    return study, stored, trusted


def _child_args(
    args: argparse.Namespace, study_name: str, policy: ObjectivePolicy, search_path: Sequence[str] = ()
) -> list[str]:
    """The flags each ``--gpus``/``--trials-per-gpu`` child worker gets (never the storage URL)."""
    child = [
        "--study-name",
        study_name,
        "--gpus",
        "all",
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--grace-period",
        str(args.grace_period),
        "--max-retry",
        str(args.max_retry),
        "--max-consecutive-failures",
        str(args.max_consecutive_failures),
        "--checkpoint-dir",
        str(args.checkpoint_dir),
        "--storage-patience",
        str(args.storage_patience),
    ]
    child += policy.cli_args()  # the children get no study file: pass what it trusted
    child += objective_path_args(search_path)  # and where its objective was looked for
    if args.n_trials is not None:
        child += ["--n-trials", str(args.n_trials)]
    if args.timeout is not None:
        child += ["--timeout", str(args.timeout)]
    if args.threads is not None:  # cmd_worker sized it for the slots
        child += ["--threads", str(args.threads)]
    if args.no_progress:
        child.append("--no-progress")
    return child


# More PyTorch/OpenMP threads than any machine has cores: refused, not passed on.
MAX_THREADS = 4096


def _threads_from_env() -> int | None:
    """A positive OMP_NUM_THREADS the user exported: their choice of threads per trainer."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if _is_count(value) and int(value) > 0 else None


def _is_count(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²" (which ``int`` refuses) and other scripts' digits."""
    return text.isascii() and text.isdigit()


def cmd_worker(args: argparse.Namespace) -> int:
    from hpo._trainer_handle import Trainer
    from hpo.launcher import available_cores, threads_per_slot
    from hpo.storage import HeartbeatSettings

    url = resolve_storage_url(args.storage)
    check_heartbeat_flags(args)
    heartbeat = HeartbeatSettings(args.heartbeat_interval, args.grace_period, args.max_retry)
    if not args.storage_patience > 0:  # NaN too
        raise HpoError(
            f"--storage-patience must be a positive number of seconds, got {args.storage_patience:g}"
        )
    if args.threads is not None and args.threads < 1:
        raise HpoError(f"--threads must be at least 1, got {args.threads}")
    chosen = args.threads or _threads_from_env()
    where = "--threads" if args.threads else "OMP_NUM_THREADS="
    if chosen is not None and chosen > MAX_THREADS:
        # OpenMP sizes its pool at once: 10**9 threads asked libgomp for 216 GB and every trial
        # died at start-up, blamed on the training code.
        raise HpoError(
            f"{where}{'' if where.endswith('=') else ' '}{chosen} is more than {MAX_THREADS} threads "
            f"per trainer (fix: at most {available_cores()}, the cores this worker may use, or leave it out)"
        )
    if chosen is not None and chosen > available_cores():
        print(
            f"note: {where}{'' if where.endswith('=') else ' '}{chosen} is more threads than the "
            f"{available_cores()} cores this worker may use: its trials train slower, not faster "
            f"(fix: at most {available_cores()}, or leave it out)"
        )
    if args.n_trials is not None and args.n_trials < 1:
        raise HpoError(
            f"--n-trials must be at least 1, got {args.n_trials} "
            "(fix: leave it out to run until the study has no trials left)"
        )
    if args.timeout is not None and not args.timeout > 0:
        raise HpoError(
            f"--timeout must be a positive number of seconds, got {args.timeout:g} "
            "(fix: leave it out to run until the study has no trials left)"
        )
    if args.max_consecutive_failures < 1:
        raise HpoError(
            f"--max-consecutive-failures must be at least 1, got {args.max_consecutive_failures} "
            "(fix: e.g. --max-consecutive-failures 5)"
        )
    fuse_arg = str(args.fuse) if args.fuse is not None else None
    if fuse_arg is not None and fuse_arg != "auto" and not (_is_count(fuse_arg) and int(fuse_arg) >= 2):
        raise HpoError(
            f"--fuse must be a number of trials >= 2 or auto, got {fuse_arg!r} (fix: e.g. --fuse 8)"
        )
    if fuse_arg is not None and args.backend == "ray":
        raise HpoError("--fuse runs with the workers backend only (fix: drop --backend ray or --fuse)")
    # The trainer process starts now, so its imports (PyTorch: seconds) overlap this process's
    # own (the storage, the study, the objective) on another core. Its thread count is the one a
    # single slot gets; a worker that turns out to run several slots (GPUs) stops it.
    early: Trainer | None = None
    if args.backend != "ray":
        early = Trainer(args.threads or _threads_from_env() or threads_per_slot(1))
        early.spawn()
    try:
        return _run_worker(args, url, heartbeat, fuse_arg, early)
    finally:
        if early is not None:  # not handed to a worker, or a worker that has stopped: a no-op
            early.kill()


def _run_worker(
    args: argparse.Namespace,
    url: str,
    heartbeat: HeartbeatSettings,
    fuse_arg: str | None,
    early: Trainer | None,
) -> int:
    """``hpo worker`` from the storage on: see :func:`cmd_worker`."""
    from hpo._optuna import cached_storage
    from hpo.launcher import (
        check_sqlite_limit,
        cuda_device_count,
        parse_gpus,
        plan_slots,
        run_children,
        sqlite_worker_slot,
        threads_per_slot,
    )
    from hpo.objective import resolve_objective
    from hpo.policy import ObjectivePolicy
    from hpo.resilient import RetryingStorage
    from hpo.storage import open_storage, redact, sqlite_path
    from hpo.trainer import warm_job
    from hpo.worker import Worker, WorkerOptions

    # Folders of the user's side only (the study file's, the current one, --objective-path);
    # the stored definition never names a folder (hpo._objective_path).
    search_path = objective_path(args.study_file or args.spec, args.objective_path)
    from_file = _worker_file(args, search_path, early)
    storage = RetryingStorage(
        cached_storage(open_storage(url, heartbeat)),
        patience=args.storage_patience,
        describe=redact(url),
    )
    study, spec, trusted = _worker_study(args, storage, from_file)
    policy = ObjectivePolicy.from_sources(cli_patterns=args.allow_objective, trusted=trusted)
    source = f"stored definition of study {study.study_name!r}"
    target = policy.check(spec.objective, source)
    if early is not None:
        # Allowed: the trainer may import the objective now, while this process imports it too.
        early.warm_up(warm_job(spec.definition(), target, search_path))
    # Importable here, before any trial starts.
    resolve_objective(spec.objective, source, policy, search_path)
    if args.backend == "ray":
        if spec.is_multi_objective:
            raise HpoError(
                f"study {study.study_name!r} has {len(spec.metrics)} metrics; the Ray backend runs "
                "single-objective studies only (fix: run it without --backend ray)"
            )
        from hpo.ray_backend import run_on_ray

        return run_on_ray(study, spec, url, args, objective_path=search_path)
    gpus = parse_gpus(args.gpus, cuda_device_count())
    slots = plan_slots(gpus, args.trials_per_gpu)
    if not gpus and args.trials_per_gpu > 1:
        print(
            f"--trials-per-gpu {args.trials_per_gpu} applies to GPUs, and this worker has none: one "
            "trainer on the CPU (start more workers, or use --fuse, to train more trials at once)"
        )
    if args.threads is None:  # each slot's trainer gets its share of the cores, not all of them
        args.threads = _threads_from_env() or threads_per_slot(len(slots))
    database = sqlite_path(url)
    if len(slots) > 1:
        if database is not None:
            check_sqlite_limit(database, len(slots))
        if early is not None:
            early.kill()  # each slot's child worker starts its own
        print(f"starting {len(slots)} worker processes: {', '.join(s.label for s in slots)}")
        fuse_child = ["--fuse", fuse_arg] if fuse_arg is not None else []
        return run_children(slots, _child_args(args, study.study_name, policy, search_path) + fuse_child, url)
    slot = slots[0]
    device = "cpu" if slot.gpu is None else f"cuda:{slot.gpu}"
    if fuse_arg == "auto":
        from hpo._fused_worker import auto_fuse

        fuse_arg = str(auto_fuse(device))
        print(f"--fuse auto: up to {fuse_arg} trials per fused group")
    options = WorkerOptions(
        n_trials=args.n_trials,
        timeout=args.timeout,
        device=device,
        label=args.slot_label or "",
        max_consecutive_failures=args.max_consecutive_failures,
        checkpoint_root=Path(args.checkpoint_dir),
        show_progress=not args.no_progress,
        threads=args.threads,
        max_retry=args.max_retry,
        fuse=1 if fuse_arg is None else int(fuse_arg),
    )
    with contextlib.ExitStack() as stack:
        if database is not None:
            stack.enter_context(sqlite_worker_slot(database))
        worker = Worker(
            study,
            spec,
            options,
            objective=target,
            storage_patience=args.storage_patience,
            objective_path=search_path,
            trainer=early,
        )
        return worker.run().exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from hpo import inspect as inspect_
    from hpo.storage import open_storage
    from hpo.studies import load_study_spec

    if args.trial is not None and not args.study_name:
        raise HpoError("--trial K needs a study name (fix: hpo status STUDY_NAME --trial K)")
    storage = open_storage(resolve_storage_url(args.storage), read_only=True)
    if args.study_name:
        study, spec = load_study_spec(storage, args.study_name)
        if args.trial is not None:
            inspect_.print_trial(study, args.trial)
        else:
            inspect_.print_status(study, spec.n_trials)
    else:
        inspect_.print_studies(storage)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from hpo import inspect as inspect_
    from hpo.storage import open_storage

    storage = open_storage(resolve_storage_url(args.storage), read_only=True)
    study = inspect_.load(storage, args.study_name)
    best = inspect_.best_trial(study)
    if args.json:
        print(json.dumps(best, indent=2, default=str))
    else:
        print(inspect_.best_text(best))  # a multi-objective study: its Pareto front
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hpo import inspect as inspect_
    from hpo.storage import open_storage

    storage = open_storage(resolve_storage_url(args.storage), read_only=True)
    study = inspect_.load(storage, args.study_name)
    text = inspect_.export(study, args.format)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:  # a folder, a missing parent, a full disk, no permission
            raise HpoError(
                f"-o {args.output}: cannot write it: {exc.strerror or exc} "
                "(fix: name a file in an existing folder this user can write, e.g. -o trials.csv)"
            ) from None
        print(f"wrote {len(study.trials)} trials to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (``--n-trial`` is not ``--n-trials``) and with a
    "did you mean" for mistyped flags and commands."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands: Mapping[str, argparse.ArgumentParser] = {}  # the sub-commands' parsers, by name

    def error(self, message: str) -> NoReturn:
        hint = self._suggestion(message)
        super().error(f"{message}{hint}")

    def _suggestion(self, message: str) -> str:
        known = [option for action in self._actions for option in action.option_strings]
        words: list[str] = []
        if message.startswith("unrecognized arguments: "):
            words = [w.split("=")[0] for w in message.removeprefix("unrecognized arguments: ").split()]
            words = [w for w in words if w.startswith("-")]
        elif "invalid choice: " in message:
            words = [message.split("invalid choice: ")[1].split("'")[1]]
            known = [c for action in self._actions for c in (getattr(action, "choices", None) or ())]
        for word in words:
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]}?)"
        return ""


def build_parser(command: str | None = None, *, lazy: bool = False) -> _Parser:
    """The ``hpo`` parser, every command in full; with ``lazy``, of the commands defined in other
    modules (:data:`COMMAND_MODULES`) only ``command``'s is imported and built, the others are
    listed by name and help alone (what ``main`` needs: it runs one command at most)."""
    parser = _Parser(
        prog="hpo",
        description="Hyperparameter optimisation for PyTorch: "
        "studies in files, trials in a database, workers anywhere.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    parser.commands = sub.choices  # filled in as the commands are added below

    p = sub.add_parser(
        "create-study", help="create a study from a study file (definition stored, trials queued)"
    )
    p.add_argument("study_file", help="path to a study file, e.g. studies/digits_quickstart.yaml")
    add_storage_argument(p)
    p.add_argument("--study-name", default=None, help="name in the storage (default: the file's name:)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--skip-if-exists", action="store_true", help="reuse an existing study with the same definition"
    )
    how.add_argument(
        "--replace",
        action="store_true",
        help="delete the existing study (its trials, checkpoints and artifacts) and create it anew from "
        "the file; the difference is printed",
    )
    p.set_defaults(func=cmd_create_study)

    p = sub.add_parser("worker", help="pull trials of a study from the storage and train them")
    p.add_argument("study_file", nargs="?", default=None, help="study file (creates the study if missing)")
    p.add_argument("--study-name", default=None, help="run an existing study by name")
    p.add_argument("--spec", default=None, help="study file to adopt a study made by `optuna create-study`")
    add_storage_argument(p)
    p.add_argument(
        "--n-trials", type=int, default=None, help="stop this worker (each process) after N trials"
    )
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after SECONDS")
    p.add_argument("--gpus", default="all", help="all (default), none, or indices like 0,1")
    p.add_argument("--trials-per-gpu", type=int, default=1, help="trials run side by side on each GPU")
    p.add_argument(
        "--heartbeat-interval", type=int, default=10, help="seconds between heartbeats (default 10)"
    )
    add_retry_arguments(p)
    p.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=5,
        help="stop the worker after this many failed trials in a row (default 5)",
    )
    p.add_argument("--checkpoint-dir", default="storage/checkpoints", help="where trials keep checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, one line per trial")
    p.add_argument(
        "--backend",
        choices=["workers", "ray"],
        default="workers",
        help="workers (default): this process pulls trials; ray: run trials as Ray Tune trials",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (with --backend ray; default: local)")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="fraction of a GPU per Ray trial (with --backend ray)",
    )
    p.add_argument(
        "--allow-objective",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also run objectives from modules matching PATTERN (e.g. myproj.*); repeatable; "
        "see also $HPO_ALLOW_OBJECTIVES",
    )
    p.add_argument(
        "--storage-patience",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait out an unreachable database before giving up (default 300)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch/OpenMP threads of each trainer (default: the cores available / the worker slots)",
    )
    p.add_argument(
        "--fuse",
        default=None,
        metavar="K",
        help="train up to K queued trials that differ only in optimizer/schedule settings as one "
        "batched model (K >= 2, or auto: from free memory); see docs/fused-trials.md",
    )
    add_objective_path_argument(p)
    p.add_argument("--slot-label", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="trials by state, best so far, running trials and their workers")
    p.add_argument("study_name", nargs="?", default=None, help="a study (default: list all studies)")
    add_storage_argument(p)
    p.add_argument(
        "--trial",
        type=int,
        default=None,
        metavar="K",
        help="show trial number K in full: parameters, values, metrics, a failure's reason and traceback",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("best", help="the best trial's value and parameters")
    p.add_argument("study_name")
    add_storage_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("export", help="every trial as CSV or JSON, learning curves included")
    p.add_argument("study_name")
    add_storage_argument(p)
    p.add_argument(
        "--format",
        choices=["csv", "csv-long", "json"],
        default="csv",
        help="csv: one row per trial (a failed trial's traceback in its traceback column), each "
        "metric's curve as a JSON list in curve_METRIC; "
        "csv-long: one row per trial and epoch, one column per metric (for pandas); json: everything",
    )
    p.add_argument("--output", "-o", default=None, help="file to write (default: standard output)")
    p.set_defaults(func=cmd_export)

    for module_name, helps in COMMAND_MODULES.items():
        if not lazy or command in helps:
            importlib.import_module(module_name).register(sub)
        else:  # listed in `hpo --help` without importing the module (Optuna, SciPy, gRPC, ...)
            for name, help_ in helps.items():
                sub.add_parser(name, help=help_)
    return parser


# Modules that contribute sub-commands, each with ``register(subparsers) -> None``, and the one-line
# help of each command they add, as `hpo --help` lists it without importing them (a test checks
# these lines match what the modules register). The modules are import-light (hpo._commands,
# hpo.compare._args): they import the code that runs a command only when it runs, so that
# `hpo COMMAND --help` is as quick as `optuna --help` for every command.
COMMAND_MODULES: Mapping[str, Mapping[str, str]] = {
    "hpo._commands.dashboard": {
        "dashboard": "watch studies live in optuna-dashboard (trials, every metric's curves, "
        "study definitions)",
    },
    "hpo._commands.serve_storage": {
        "serve-storage": "serve the study database to many workers through Optuna's gRPC storage proxy",
    },
    "hpo._commands.retrain": {
        "retrain": "train the best configuration(s) of a study for longer, record full curves, "
        "save the models",
    },
    "hpo.compare": {
        "compare": "compare samplers: one study per (sampler, seed), equal budgets, report with statistics",
        "report": "write the report of a comparison (HTML, PNG, Markdown)",
        "tabulate": "train a grid once with full learning curves into a replay table",
    },
    "hpo._commands.lifecycle": {
        "extend": "queue N more trials of a study (its stored n_trials grows by N)",
        "enqueue": "run known configurations next (they take the oldest empty queued slots)",
        "delete-study": "delete a study, its checkpoints and its artifacts",
    },
}


def _quiet_optuna() -> None:
    """Optuna's experimental-feature and deprecation warnings are about hpo's code, not the user's."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first word that is not a flag is the command (`hpo` itself has no flags but --help).
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command, lazy=True)
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the command's own parser, which knows its flags for a suggestion
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    _quiet_optuna()
    try:
        return int(args.func(args))
    except HpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.command in _TRAINING_COMMANDS:
            _sweep_shared_data()


# Commands whose processes may have decoded datasets into the machine-wide shared folder.
_TRAINING_COMMANDS = frozenset({"worker", "compare", "retrain"})


def _sweep_shared_data() -> None:
    """Free the decoded datasets this command's processes left and no other process maps (tmpfs
    is memory): :mod:`hpo.shared_data`. Never fails the command."""
    import contextlib

    from hpo.shared_data import sweep_unused

    with contextlib.suppress(Exception):
        sweep_unused()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
