"""The ``compare``, ``report`` and ``tabulate`` flags, import-light: ``hpo compare --help`` must not
import SciPy, plotly and the training stack; the commands themselves are in :mod:`hpo.compare._cli`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from hpo._storage_url import add_storage_argument


def _run(name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``hpo.compare._cli.<name>``, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module("hpo.compare._cli"), name
        )
        return command(args)

    return run


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default=None, help="report folder (default: reports/NAME)")
    p.add_argument(
        "--statistic",
        choices=["median", "iqm"],
        default="median",
        help="centre line over seeds (default median)",
    )
    p.add_argument(
        "--band",
        choices=["iqr", "bootstrap"],
        default="iqr",
        help="band: 25-75%% of the seeds (iqr, default) or a 95%% bootstrap CI of the statistic",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="metric value for 'epochs to reach target' (default: the reference's median final best)",
    )
    p.add_argument(
        "--reference", default=None, help="algorithm the others are compared with (default random)"
    )
    p.add_argument(
        "--axes", default=None, help="two parameters for the configurations plot, e.g. lr,batch_size"
    )
    p.add_argument("--no-png", action="store_true", help="skip PNG images (they need kaleido and Chromium)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``compare``, ``report`` and ``tabulate`` to the ``hpo`` command line."""
    p = subparsers.add_parser(
        "compare",
        help="compare samplers: one study per (sampler, seed), equal budgets, report with statistics",
    )
    p.add_argument("study_file", help="study file of the problem, e.g. studies/digits_compare.yaml")
    p.add_argument(
        "--samplers", default="random,tpe", help="comma-separated sampler names (default random,tpe)"
    )
    p.add_argument("--seeds", type=int, default=10, help="runs per sampler (default 10)")
    p.add_argument(
        "--subset", type=float, default=None, help="override data.subset, e.g. 0.1 for 10%% of the data"
    )
    add_storage_argument(
        p,
        note="; with --replay the default is an in-memory storage (fastest; the report's results.json "
        "keeps the outcome)",
    )
    p.add_argument(
        "--name", default=None, help="comparison name (default: the study's name; NAME-replay with --replay)"
    )
    p.add_argument(
        "--replay", default=None, metavar="TABLE", help="replay a table from hpo tabulate instead of training"
    )
    p.add_argument("--vary-training-seed", action="store_true", help="run K also uses training seed seed+K")
    p.add_argument("--no-run", action="store_true", help="only create the studies (run them with hpo worker)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument(
        "--device", default=None, help="device for training (default cuda:0 if available, else cpu)"
    )
    p.add_argument("--checkpoint-dir", default="storage/checkpoints", help="where trials keep checkpoints")
    _add_report_flags(p)
    p.set_defaults(func=_run("cmd_compare"))

    p = subparsers.add_parser("report", help="write the report of a comparison (HTML, PNG, Markdown)")
    p.add_argument("comparison", help="comparison name in the storage, or a results.json / report folder")
    add_storage_argument(p)
    _add_report_flags(p)
    p.set_defaults(func=_run("cmd_report"))

    p = subparsers.add_parser(
        "tabulate", help="train a grid once with full learning curves into a replay table"
    )
    p.add_argument("study_file", help="study file whose search space (grid: values) is tabulated")
    add_storage_argument(p)
    p.add_argument("--output", "-o", default=None, help="table file (default storage/tables/NAME.json)")
    p.add_argument("--subset", type=float, default=None, help="override data.subset, e.g. 0.1")
    p.add_argument(
        "--points-per-param",
        type=int,
        default=None,
        help="also tabulate K evenly spaced values of each numeric parameter (log-spaced for log ones)",
    )
    p.add_argument("--study-name", default=None, help="tabulating study's name (default NAME/table)")
    p.add_argument("--no-run", action="store_true", help="only create the study (run it with hpo worker)")
    p.add_argument(
        "--device", default=None, help="device for training (default cuda:0 if available, else cpu)"
    )
    p.add_argument("--checkpoint-dir", default="storage/checkpoints", help="where trials keep checkpoints")
    p.set_defaults(func=_run("cmd_tabulate"))
