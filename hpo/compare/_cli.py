"""The ``hpo compare``, ``hpo report`` and ``hpo tabulate`` sub-commands."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import TrialState
from rich.console import Console

from hpo._progress import ComparisonProgress, count_trials
from hpo.compare._markdown import HEADER, markdown_table, table_rows
from hpo.compare._paths import (
    check_output_dir,
    check_output_file,
    check_report_flags,
    check_target,
    parse_axes,
)
from hpo.compare._plan import ComparisonPlan, base_spec, create_runs, parse_samplers, plan_comparison
from hpo.compare._replay import load_table
from hpo.compare._report import Report, ReportOptions, write_report
from hpo.compare._results import ComparisonResults, collect_results, load_results
from hpo.compare._tabulate import table_from_study, tabulate_spec, timed
from hpo.errors import HpoError
from hpo.launcher import cuda_device_count
from hpo.objective import check_objective, resolve_objective
from hpo.spec import load_study_file
from hpo.storage import HeartbeatSettings, open_storage, redact, resolve_storage_url
from hpo.studies import create_study, load_study_spec
from hpo.worker import Worker, WorkerOptions


def _device(value: str | None) -> str:
    if value:
        return value
    return "cuda:0" if cuda_device_count() > 0 else "cpu"


def _report_options(args: argparse.Namespace) -> ReportOptions:
    return ReportOptions(
        statistic=args.statistic,
        band=args.band,
        target=args.target,
        reference=_reference(args),
        axes=parse_axes(args.axes),
        png=not args.no_png,
    )


def _reference(args: argparse.Namespace) -> str:
    return "random" if args.reference is None else str(args.reference)


def _report_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.output) if args.output is not None else Path("reports") / name.replace("/", "_")


def _check_report(args: argparse.Namespace, name: str, params: list[str], samplers: tuple[str, ...]) -> None:
    """Refuse report flags and a report folder that cannot work, before any run or drawing."""
    check_report_flags(parse_axes(args.axes), args.target, args.reference, params, samplers)
    check_output_dir(args.output if args.output is not None else _report_dir(args, name))


def _is(check: str, path: Path) -> bool:
    """``path.is_file()`` / ``path.is_dir()``, False for a path the system cannot even look up (a
    name too long, for one): such an argument is a comparison name, or a mistake said later."""
    try:
        return bool(getattr(path, check)())
    except OSError:
        return False


def _write_report(results: ComparisonResults, directory: Path, options: ReportOptions) -> Report:
    try:
        return write_report(results, directory, options)
    except OSError as exc:  # checked up front, so rare (a full disk)
        raise HpoError(
            f"-o {directory}: cannot write the report: {exc.strerror or exc} (fix: free the space or name "
            f"another folder with -o, then redraw it with hpo report)"
        ) from None


def _print_report(report: Report, reference: str) -> None:
    header = [h.replace("reference", reference) for h in HEADER]
    print(markdown_table(header, table_rows(list(report.rows))))
    for path in report.files:
        print(f"wrote {path}")


def _run_workers(
    storage: BaseStorage, plan: ComparisonPlan, device: str, quiet: bool, checkpoint_root: Path
) -> str | None:
    """Run every planned study to the end in this process; why it stopped early, if it did.

    In a replay a failure is data (a configuration that failed when it was tabulated), so a run of
    failures does not stop the worker there.
    """
    console = Console(highlight=False, soft_wrap=True, quiet=quiet)
    cache: dict[str, object] = {}
    overall = _overall_progress(storage, plan)

    def after_trial(state: TrialState | None, requeued: bool) -> None:
        overall.trial_ended(state, requeued)
        console.print(overall.line(time.monotonic()), markup=False)

    for run in plan.runs:
        study, spec = load_study_spec(storage, run.study_name)
        options = WorkerOptions(
            device=device,
            label=f"{run.sampler}/seed-{run.seed}",
            checkpoint_root=checkpoint_root,
            show_progress=not quiet,
            max_consecutive_failures=spec.n_trials + 1 if plan.replay_table else 5,
        )
        # In this process, with one data cache: datasets and replay tables are loaded once for
        # all the (many, short) runs of the comparison.
        objective = resolve_objective(spec.objective, f"stored definition of study {run.study_name!r}")
        worker = Worker(
            study, spec, options, objective=objective, console=console, cache=cache, after_trial=after_trial
        )
        summary = worker.run()
        if quiet:  # no line per trial: one per study
            print(overall.line(time.monotonic()))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:  # interrupted, or stopped after failures
            failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
            reason = failed[-1].system_attrs.get("fail_reason") if failed else None
            where = f"at study {run.study_name}: {summary.stopped_because}"
            return f"{where}; last failure: {reason}" if reason else where
    return None


def _overall_progress(storage: BaseStorage, plan: ComparisonPlan) -> ComparisonProgress:
    """The comparison's progress over all its studies (created by now), as stored at its start."""
    total = done = 0
    for run in plan.runs:
        trials = storage.get_all_trials(storage.get_study_id_from_name(run.study_name), deepcopy=False)
        counts = count_trials(trials, plan.base.n_trials, None)
        total, done = total + counts.planned, done + counts.done
    return ComparisonProgress(total, done, time.monotonic())


def cmd_compare(args: argparse.Namespace) -> int:
    spec = load_study_file(args.study_file)
    samplers = parse_samplers(args.samplers)
    source = str(args.study_file)
    base = base_spec(spec, source, args.subset)
    if args.subset is not None:
        check_objective(base, f"{source} with --subset {args.subset}")
    if args.replay == "":
        raise HpoError(
            "--replay: the table's file name is empty (fix: e.g. --replay storage/tables/NAME.json)"
        )
    table = load_table(args.replay) if args.replay is not None else None
    plan = plan_comparison(
        base,
        samplers,
        args.seeds,
        source=source,
        name=args.name,
        replay=table,
        replay_path=args.replay,
        vary_training_seed=args.vary_training_seed,
    )
    if not args.no_run and not args.no_report:
        _check_report(args, plan.name, list(plan.base.definition()["search_space"]), plan.samplers)
    in_memory = table is not None and not args.storage
    if in_memory:
        storage: BaseStorage = InMemoryStorage()
        where = "an in-memory storage"
        url = None
    else:
        url = resolve_storage_url(args.storage)
        storage = open_storage(url, HeartbeatSettings())
        where = redact(url)
    created = create_runs(storage, plan)
    print(
        f"comparison {plan.name!r}: {len(plan.runs)} studies ({len(plan.samplers)} samplers x "
        f"{len(plan.seeds)} seeds, {plan.base.n_trials} trials each) in {where}; {created} new"
    )
    if url is not None:
        shown = redact(url)  # never print a password
        again = shlex.join(["hpo", *(shown if a == url else a for a in sys.argv[1:] if a != "--no-run")])
        print(f"more workers (any machine that reaches the storage) share the work by running: {again}")
        print(
            f"or per study: hpo worker --study-name {plan.name}/SAMPLER/seed-K --storage {shlex.quote(shown)}"
        )
    if args.no_run:
        return 0
    stopped = _run_workers(storage, plan, _device(args.device), in_memory, Path(args.checkpoint_dir))
    if stopped is not None:
        print(f"comparison stopped {stopped} (fix the cause, then run the same command again to continue)")
        return 130 if "interrupted by" in stopped else 1
    if args.no_report:
        return 0
    results = collect_results(storage, plan.name, plan.samplers)
    report = _write_report(results, _report_dir(args, plan.name), _report_options(args))
    _print_report(report, _reference(args))
    if in_memory:
        print(f"the in-memory studies are gone; redraw with: hpo report {report.directory / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.output is not None:  # a bad -o is said before the comparison is read
        check_output_dir(args.output)
    check_target(args.target)
    parse_axes(args.axes)
    target = Path(args.comparison)
    if target.suffix == ".json" and _is("is_file", target):
        results = load_results(target)
    elif _is("is_dir", target) and _is("is_file", target / "results.json"):
        results = load_results(target / "results.json")
    else:
        # Drawing a report only reads: a mistyped path must not create an empty database.
        storage = open_storage(resolve_storage_url(args.storage), read_only=True)
        results = collect_results(storage, args.comparison)
    _check_report(args, results.name, list(results.space), tuple(results.samplers))
    report = _write_report(results, _report_dir(args, results.name), _report_options(args))
    _print_report(report, _reference(args))
    return 0


def cmd_tabulate(args: argparse.Namespace) -> int:
    spec = load_study_file(args.study_file)
    source = str(args.study_file)
    base = base_spec(spec, source, args.subset)
    if args.subset is not None:
        check_objective(base, f"{source} with --subset {args.subset}")
    table_spec = tabulate_spec(base, source, args.points_per_param)
    name = args.study_name or table_spec.name
    output = (
        Path(args.output)
        if args.output is not None
        else Path("storage") / "tables" / f"{base.name.replace('/', '_')}.json"
    )
    if not args.no_run:  # a bad -o is said before the grid trains, not after
        check_output_file(args.output if args.output is not None else output)
    url = resolve_storage_url(args.storage)
    storage = open_storage(url, HeartbeatSettings())
    create_study(storage, table_spec, name, skip_if_exists=True)
    study = optuna.load_study(study_name=name, storage=storage)
    print(
        f"tabulating {table_spec.n_trials} configurations x {table_spec.budget.max_epochs} epochs in study "
        f"{name!r} ({redact(url)}); other machines can help: hpo worker --study-name {name} --storage "
        f"{shlex.quote(redact(url))}"
    )
    if args.no_run:
        return 0
    options = WorkerOptions(
        device=_device(args.device), label="tabulate", checkpoint_root=Path(args.checkpoint_dir)
    )
    objective = timed(resolve_objective(table_spec.objective, "study file"))
    summary = Worker(study, table_spec, options, objective=objective).run()
    if summary.stopped_because.startswith("interrupted"):
        return 130
    table = table_from_study(study, table_spec)
    try:
        table.save(output)
    except OSError as exc:  # checked up front, so rare (a full disk): the trained study is kept
        raise HpoError(
            f"-o {output}: cannot write the table: {exc.strerror or exc} (fix: free the space or name "
            f"another file with -o; rerunning takes the trained configurations from study {name!r})"
        ) from None
    failed = sum(e.state == "FAIL" for e in table.entries)
    print(f"wrote {output}: {len(table.entries)} configurations ({failed} failed, replayed as failures)")
    print(
        f"replay it: hpo compare {shlex.quote(source)} --replay {shlex.quote(str(output))} "
        "--samplers random,tpe --seeds 30"
    )
    return 0
