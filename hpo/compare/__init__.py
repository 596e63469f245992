"""Comparing search algorithms with honest statistics: ``hpo compare``, ``hpo report``, ``hpo tabulate``.

A comparison runs one study per (sampler, seed), named ``NAME/SAMPLER/seed-K``, in one storage,
with equal budgets (trials and epochs per trial); ordinary workers run them. The report shows
best-so-far curves over seeds with bands against trials, epochs and time, the tested
configurations, and a table per algorithm. A replay table (``hpo tabulate``) lets every sampler and
pruner run against recorded learning curves instead of training, in seconds.

Public API (the CLI is built on it)::

    plan = plan_comparison(spec, ["random", "tpe"], seeds=10, source="study.yaml")
    create_runs(storage, plan)                       # then workers, or `hpo compare`
    results = collect_results(storage, plan.name)    # -> ComparisonResults (plain data)
    write_report(results, Path("reports/x"), ReportOptions())
"""

from __future__ import annotations

from hpo.compare._cli import register
from hpo.compare._plan import ComparisonPlan, create_runs, plan_comparison
from hpo.compare._replay import REPLAY_OBJECTIVE, ReplayTable, check_covers, load_table
from hpo.compare._report import ReportOptions, write_report
from hpo.compare._results import ComparisonResults, collect_results, load_results
from hpo.compare._stats import curve_bands, summarize

__all__ = [
    "REPLAY_OBJECTIVE",
    "ComparisonPlan",
    "ComparisonResults",
    "ReplayTable",
    "ReportOptions",
    "check_covers",
    "collect_results",
    "create_runs",
    "curve_bands",
    "load_results",
    "load_table",
    "plan_comparison",
    "register",
    "summarize",
    "write_report",
]
