"""The comparison table and the Markdown report (text only; the numbers come from ``_stats``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hpo.compare._results import ComparisonResults
from hpo.compare._stats import Axis, Coincidence, SamplerSummary, shared_first_trials

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
            "tabulated configuration, and the configurations picture draws that configuration."
        )
    return parts


def _span(c: Coincidence, axis: Axis) -> str:
    if axis == "time":
        return f"{c.start:.3g}-{c.end:.3g} s" if c.end > c.start else f"{c.start:.3g} s"
    return f"{c.start:g}-{c.end:g}" if c.end > c.start else f"{c.start:g}"


def coincidence_note(coincidences: Sequence[Coincidence], axis: Axis) -> str | None:
    """Where algorithms' curves lie on top of each other (computed from the drawn data), or None."""
    spans: dict[tuple[str, str], list[Coincidence]] = {}
    for c in coincidences:
        spans.setdefault(c.samplers, []).append(c)
    if not spans:
        return None
    unit = {"trials": "trials ", "epochs": "epochs ", "time": ""}[axis]
    pairs = "; ".join(
        f"{a} and {b} ({unit}{', '.join(_span(c, axis) for c in found)})" for (a, b), found in spans.items()
    )
    return (
        f"curves on top of each other: {pairs}. The algorithm later in the legend is drawn over the "
        "earlier one, dashed or dotted, so both show."
    )


def shared_trials_notes(results: ComparisonResults) -> list[str]:
    """Pairs of algorithms whose runs start with the same trials in every seed (why curves coincide)."""
    notes = []
    for i, a in enumerate(results.samplers):
        for b in results.samplers[i + 1 :]:
            shared = shared_first_trials(results, a, b)
            if shared:
                notes.append(
                    f"{a} and {b} run the same first {shared} trials in every seed (the same configurations "
                    "with the same results, from the same sampler seed: e.g. TPE's random start-up "
                    "trials), so their curves coincide at first."
                )
    return notes


def target_note(rows: Sequence[SamplerSummary], reference: str, target_given: bool) -> str:
    target = rows[0].target if rows else None
    if target is None:
        return f"No target: the comparison has no {reference} run with a completed trial (pass --target)."
    origin = (
        "given with --target"
        if target_given
        else f"the final best of {reference} search's median run; with an even number of seeds the worse "
        f"of the two middle ones, so that more than half of {reference} search's runs reach it"
    )
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
    figure_notes: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The Markdown report; ``figure_notes`` maps a figure's title to what must be said about it."""
    lines = [f"# Comparison `{results.name}`", ""]
    for paragraph in describe(results, statistic, band):
        lines += [("> " if paragraph.startswith("REPLAYED") else "") + paragraph, ""]
    header = [h.replace("reference", reference) for h in HEADER]
    lines += [markdown_table(header, table_rows(rows)), "", target_note(rows, reference, target_given), ""]
    notes = [(title, n) for title, ns in (figure_notes or {}).items() for n in ns]
    if notes:
        lines += ["Reading the figures:", ""] + [f"* {title}: {n}" for title, n in notes] + [""]
    for title, path in images:
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)
