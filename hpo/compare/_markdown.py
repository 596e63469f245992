"""The comparison table and the Markdown report (text only; the numbers come from ``_stats``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hpo.compare._results import ComparisonResults
from hpo.compare._stats import SamplerSummary

HEADER = (
    "algorithm",
    "seeds",
    "final best: median [IQR]",
    "best of all seeds",
    "epochs to reach target: median (runs that reached it)",
    "trials pruned",
    "trials failed",
    "epochs per seed (median)",
    "device-hours (all seeds)",
    "P(beats reference)",
    "p (Mann-Whitney U)",
)


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def table_rows(rows: Sequence[SamplerSummary]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.target is None or r.epochs_to_target_median is None:
            reach = "-"
        elif math.isinf(r.epochs_to_target_median):
            reach = f"not reached ({r.reached_target}/{r.runs})"
        else:
            reach = f"{r.epochs_to_target_median:g} ({r.reached_target}/{r.runs})"
        out.append(
            [
                r.sampler,
                f"{r.runs}" + ("" if r.complete_runs == r.runs else f" ({r.complete_runs} complete)"),
                f"{fmt(r.best_median)} [{fmt(r.best_q25)}, {fmt(r.best_q75)}]",
                fmt(r.best_overall),
                reach,
                f"{r.trials_pruned}/{r.trials_finished}",
                f"{r.trials_failed}/{r.trials_finished}",
                fmt(r.epochs_median),
                fmt(r.device_hours, 3),
                fmt(r.prob_beats_reference, 2),
                fmt(r.p_value_vs_reference, 2),
            ]
        )
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def describe(results: ComparisonResults, statistic: str, band: str) -> list[str]:
    """Paragraphs that say what was compared and how to read it (shared by Markdown and HTML)."""
    seeds = sorted({r.seed for r in results.runs})
    spread = "the 25-75 % range of the seeds" if band == "iqr" else "a 95 % bootstrap confidence interval"
    parts = [
        f"{len(results.samplers)} algorithms ({', '.join(results.samplers)}) x {len(seeds)} seeds; every run "
        f"has the same budget: {results.n_trials} trials of at most {results.max_epochs} epochs. "
        f"Metric: {results.metric} ({results.direction}).",
        f"Curves: the {'median' if statistic == 'median' else 'interquartile mean'} over seeds of each run's "
        f"best-so-far, with {spread}"
        " as the band; a curve starts once every seed has a completed trial. The time axis is each run's "
        "active time (the union of its trials' running intervals).",
    ]
    if results.replay_table:
        parts.append(
            f"REPLAYED from the table {results.replay_table}: no model was trained. Each configuration has "
            "one tabulated learning curve, so replayed curves carry no training noise: the spread between "
            "seeds is the algorithms' own randomness only, real runs would spread more. Times are simulated "
            "from the tabulated seconds per epoch (one worker); parameters are mapped to the nearest "
            "tabulated configuration."
        )
    return parts


def target_note(rows: Sequence[SamplerSummary], reference: str, target_given: bool) -> str:
    target = rows[0].target if rows else None
    if target is None:
        return f"No target: the comparison has no {reference} run with a completed trial (pass --target)."
    origin = "given with --target" if target_given else f"{reference} search's median final best"
    return (
        f"Target {fmt(target)} ({origin}): epochs a run had consumed when its best-so-far first reached "
        "it; the median counts a run that never reached it as infinitely many epochs. "
        f"P(beats reference): the probability that a run of the algorithm ends better than a run of "
        f"{reference} search, with the Mann-Whitney U test's two-sided p-value. Device-hours: summed trial "
        "durations (GPU-hours when trials ran on GPUs, CPU-hours otherwise)."
    )


def report_markdown(
    results: ComparisonResults,
    rows: Sequence[SamplerSummary],
    images: Sequence[tuple[str, str]],
    statistic: str,
    band: str,
    reference: str,
    target_given: bool,
) -> str:
    lines = [f"# Comparison `{results.name}`", ""]
    for paragraph in describe(results, statistic, band):
        lines += [("> " if paragraph.startswith("REPLAYED") else "") + paragraph, ""]
    header = [h.replace("reference", reference) for h in HEADER]
    lines += [markdown_table(header, table_rows(rows)), "", target_note(rows, reference, target_given), ""]
    for title, path in images:
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)
