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

import importlib
from typing import TYPE_CHECKING, Any

from hpo.compare._args import register

if TYPE_CHECKING:
    from hpo.compare._plan import ComparisonPlan, create_runs, plan_comparison
    from hpo.compare._replay import REPLAY_OBJECTIVE, ReplayTable, check_covers, load_table
    from hpo.compare._report import ReportOptions, write_report
    from hpo.compare._results import ComparisonResults, collect_results, load_results
    from hpo.compare._stats import curve_bands, summarize

# Public name -> its module, imported on first use: `hpo compare --help` needs only ``register``,
# not SciPy and plotly.
_EXPORTS = {
    "ComparisonPlan": "hpo.compare._plan",
    "create_runs": "hpo.compare._plan",
    "plan_comparison": "hpo.compare._plan",
    "REPLAY_OBJECTIVE": "hpo.compare._replay",
    "ReplayTable": "hpo.compare._replay",
    "check_covers": "hpo.compare._replay",
    "load_table": "hpo.compare._replay",
    "ReportOptions": "hpo.compare._report",
    "write_report": "hpo.compare._report",
    "ComparisonResults": "hpo.compare._results",
    "collect_results": "hpo.compare._results",
    "load_results": "hpo.compare._results",
    "curve_bands": "hpo.compare._stats",
    "summarize": "hpo.compare._stats",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpo.compare' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
