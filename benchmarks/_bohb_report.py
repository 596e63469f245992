"""Statistics and the Markdown table of ``benchmarks/bohb_compare.py``.

A run is a step function: its incumbent's regret after each number of epochs trained (``points``:
``(epochs, regret)`` where it changed; +inf before the first full-budget evaluation). Medians and
quartiles are numpy's linear-interpolation percentiles over the seeds, +inf where an interpolated
neighbour is +inf (a run with no full-budget value yet). The rank test is scipy's Mann-Whitney U,
one-sided: a method's regrets lower than random search's (ties and +inf handled by ranks).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

_HUGE = 1e300  # stands for +inf in interpolation (inf - inf is nan)


@dataclass(frozen=True)
class Run:
    seed: int
    epochs: int
    evaluations: int
    points: tuple[tuple[int, float], ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Run:
        points = tuple((int(e), math.inf if r is None else float(r)) for e, r in data["points"])
        return cls(int(data["seed"]), int(data["epochs"]), int(data["evaluations"]), points)

    def regret_at(self, epochs: float) -> float:
        """The incumbent's regret once ``epochs`` epochs were trained (+inf: none at full budget yet)."""
        i = bisect.bisect_right([e for e, _ in self.points], epochs)
        return self.points[i - 1][1] if i else math.inf


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentile (+inf where an interpolated neighbour is +inf)."""
    finite = np.minimum(np.asarray(values, dtype=float), _HUGE)
    q = np.percentile(finite, [25, 50, 75])
    return tuple(math.inf if v >= _HUGE / 2 else float(v) for v in q)  # type: ignore[return-value]


def less_p(values: Sequence[float], reference: Sequence[float]) -> float:
    """One-sided Mann-Whitney U p-value of ``values`` being lower than ``reference``."""
    a = np.minimum(np.asarray(values, dtype=float), _HUGE)
    b = np.minimum(np.asarray(reference, dtype=float), _HUGE)
    if len(a) < 2 or len(b) < 2 or (np.all(a == a[0]) and np.all(b == a[0])):
        return math.nan
    return float(mannwhitneyu(a, b, alternative="less").pvalue)


def epochs_to_reach(runs: Sequence[Run], target: float, limit: int) -> int | None:
    """The fewest epochs after which the median regret over ``runs`` is at most ``target``
    (None: not within ``limit`` epochs)."""
    steps = sorted({e for run in runs for e, _ in run.points if e <= limit})
    for epochs in steps:
        if quartiles([run.regret_at(epochs) for run in runs])[1] <= target:
            return epochs
    return None


def fmt(value: float) -> str:
    if math.isinf(value):
        return "none"
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def cell(values: Sequence[float]) -> str:
    q1, median, q3 = quartiles(values)
    return f"{fmt(median)} [{fmt(q1)}-{fmt(q3)}]"


def table(
    results: Mapping[str, Mapping[str, Sequence[Run]]],
    max_epochs: Mapping[str, int],
    checkpoints: Sequence[float],
    labels: Mapping[str, str],
    reference: str = "random",
) -> list[str]:
    """The Markdown table: one row per problem and method (see the module docstring)."""
    last = checkpoints[-1]
    head = ["problem", "method", "seeds", "evals (median)"]
    head += [f"regret at {c:g}R: median [IQR]" for c in checkpoints]
    head += [f"p vs random at {last:g}R", f"epochs to random's {last:g}R median (fraction)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for problem, by_method in results.items():
        r = max_epochs[problem]
        limit = int(last * r)
        ref = by_method.get(reference, [])
        target = quartiles([run.regret_at(limit) for run in ref])[1] if ref else math.nan
        for method, runs in by_method.items():
            if not runs:
                continue
            row = [problem, labels.get(method, method), str(len(runs))]
            row.append(f"{np.median([run.evaluations for run in runs]):g}")
            row += [cell([run.regret_at(c * r) for run in runs]) for c in checkpoints]
            finals = [run.regret_at(limit) for run in runs]
            ref_finals = [run.regret_at(limit) for run in ref]
            row.append("-" if method == reference or not ref else fmt_p(less_p(finals, ref_finals)))
            reach = None if math.isnan(target) else epochs_to_reach(runs, target, limit)
            row.append("not reached" if reach is None else f"{reach} ({reach / limit:.2f})")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def goal_lines(
    results: Mapping[str, Mapping[str, Sequence[Run]]],
    max_epochs: Mapping[str, int],
    checkpoints: Sequence[float],
    labels: Mapping[str, str],
    ours: str,
    replay: str,
    reference: str = "random",
) -> list[str]:
    """The issue's two goals, stated from the same runs as the table."""
    last = checkpoints[-1]
    lines = [f"Goal 1: {labels[ours]} reaches random search's median regret at {last:g}R with <= 1/5 of its"]
    lines[0] += " epochs"
    for problem, by_method in results.items():
        limit = int(last * max_epochs[problem])
        if not by_method.get(reference) or not by_method.get(ours):
            continue
        target = quartiles([run.regret_at(limit) for run in by_method[reference]])[1]
        reach = epochs_to_reach(by_method[ours], target, limit)
        if reach is None:
            verdict = f"not within {limit} epochs: not met"
        else:
            met = "met" if reach <= limit / 5 else "not met"
            verdict = f"{reach} of {limit} epochs = {reach / limit:.2f}: {met}"
        lines.append(f"- {problem}: target {fmt(target)}; {verdict}")
    by_method = results.get(replay)
    if by_method and by_method.get(ours):
        lines.append(f"\nGoal 2: {labels[ours]} beats every other method at equal epochs on {replay}")
        r = max_epochs[replay]
        for c in checkpoints:
            mine = [run.regret_at(c * r) for run in by_method[ours]]
            median = quartiles(mine)[1]
            parts, lowest = [], True
            for method, runs in by_method.items():
                if method == ours or not runs:
                    continue
                theirs = [run.regret_at(c * r) for run in runs]
                other = quartiles(theirs)[1]
                lowest = lowest and median < other
                parts.append(f"{labels.get(method, method)} {fmt(other)} (p={fmt_p(less_p(mine, theirs))})")
            verdict = "lowest median" if lowest else "NOT the lowest median"
            lines.append(f"- at {c:g}R: {fmt(median)}, {verdict}; others: " + ", ".join(parts))
        lines.append("  (p: one-sided Mann-Whitney U, hpo continuation lower than that method)")
    return lines
