"""The numbers behind a comparison report, computed apart from drawing (pure functions).

* best-so-far curves of each run against finished trials, consumed epochs and active time;
* per algorithm, the median (or interquartile mean) over seeds at each point with a band: the
  25-75 % quantiles, or a bootstrap 95 % confidence interval of the statistic;
* a summary per algorithm: final best (median, IQR), epochs needed to reach a target, trials
  pruned, device-hours, and how often it beats random search (Mann-Whitney U).

Conventions: a run's best-so-far is undefined (NaN) until its first COMPLETE trial; after its last
finished trial it stays flat when the run is complete, and is undefined when the run was cut
short. An algorithm's statistic is only drawn where every one of its runs has a value, so early
points are never computed from the lucky seeds alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats as scipy_stats

from hpo.compare._results import ComparisonResults, RunResult

Axis = Literal["trials", "epochs", "time"]
Statistic = Literal["median", "iqm"]
BandKind = Literal["iqr", "bootstrap"]
AXES: tuple[Axis, ...] = ("trials", "epochs", "time")
_TIME_POINTS = 200


def sign(direction: str) -> float:
    """+1 for minimize, -1 for maximize: ``sign * value`` is lower-is-better."""
    return 1.0 if direction == "minimize" else -1.0


def best_so_far(values: Sequence[float | None], direction: str) -> list[float]:
    """Running best of ``values`` (None: no value, e.g. pruned); NaN before the first value."""
    s = sign(direction)
    best = math.nan
    out = []
    for value in values:
        if value is not None and (math.isnan(best) or s * value < s * best):
            best = value
        out.append(best)
    return out


@dataclass(frozen=True)
class RunCurve:
    """One run's best-so-far after each finished trial, with that moment on each axis."""

    trials: tuple[float, ...]
    epochs: tuple[float, ...]
    time: tuple[float, ...]
    best: tuple[float, ...]
    complete: bool

    def x(self, axis: Axis) -> tuple[float, ...]:
        return {"trials": self.trials, "epochs": self.epochs, "time": self.time}[axis]


def run_curve(run: RunResult, direction: str) -> RunCurve:
    finished = run.finished
    epochs = np.cumsum([t.epochs for t in finished]).tolist()
    return RunCurve(
        trials=tuple(float(i) for i in range(1, len(finished) + 1)),
        epochs=tuple(float(e) for e in epochs),
        time=tuple(float(t.finished_at or 0.0) for t in finished),
        best=tuple(best_so_far([t.value for t in finished], direction)),
        complete=run.is_complete,
    )


def step_values(xs: Sequence[float], ys: Sequence[float], grid: np.ndarray, carry: bool) -> np.ndarray:
    """Evaluate the right-continuous step function through ``(xs, ys)`` on ``grid``.

    NaN before ``xs[0]``; after ``xs[-1]`` the last value if ``carry`` else NaN.
    """
    out = np.full(grid.shape, np.nan)
    if not xs:
        return out
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    index = np.searchsorted(x, grid, side="right") - 1
    valid = index >= 0
    out[valid] = y[index[valid]]
    if not carry:
        out[grid > x[-1]] = np.nan
    return out


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50 % (robust, yet uses more data than the median)."""
    return np.asarray(scipy_stats.trim_mean(values, 0.25, axis=axis))


def _center(values: np.ndarray, statistic: Statistic, axis: int = 0) -> np.ndarray:
    return np.median(values, axis=axis) if statistic == "median" else iqm(values, axis=axis)


@dataclass(frozen=True)
class Band:
    """A statistic over seeds at each x, with its band; NaN where not every run has a value."""

    x: tuple[float, ...]
    center: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    n_runs: int


def aggregate(
    matrix: np.ndarray, statistic: Statistic = "median", band: BandKind = "iqr", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of ``matrix`` (runs x points): the statistic and the band's low and high edges.

    ``iqr``: the 25th and 75th percentiles of the runs. ``bootstrap``: a 95 % percentile-bootstrap
    confidence interval of the statistic (resampling runs, 2000 resamples, seeded). Columns with a
    NaN are NaN.
    """
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    n_points = matrix.shape[1]
    center = np.full(n_points, np.nan)
    low = np.full(n_points, np.nan)
    high = np.full(n_points, np.nan)
    full = ~np.isnan(matrix).any(axis=0)
    if not full.any():
        return center, low, high
    data = matrix[:, full]
    center[full] = _center(data, statistic)
    if band == "iqr":
        low[full], high[full] = np.percentile(data, [25, 75], axis=0)
    elif data.shape[0] < 2:
        low[full] = high[full] = center[full]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate columns (all runs equal) give a zero-width CI
            result = scipy_stats.bootstrap(
                (data,),
                lambda sample, axis: _center(sample, statistic, axis=axis),
                vectorized=True,
                axis=0,
                n_resamples=2000,
                method="percentile",
                rng=np.random.default_rng(seed),
            )
        low[full] = np.where(
            np.isnan(result.confidence_interval.low), center[full], result.confidence_interval.low
        )
        high[full] = np.where(
            np.isnan(result.confidence_interval.high), center[full], result.confidence_interval.high
        )
    return center, low, high


def axis_grid(curves: Sequence[RunCurve], axis: Axis, n_trials: int) -> np.ndarray:
    """The common x values for ``axis``: every trial count, every epoch, or 200 time points."""
    ends = [c.x(axis)[-1] for c in curves if c.x(axis)]
    end = max(ends, default=0.0)
    if axis == "trials":
        return np.arange(1, max(int(end), n_trials) + 1, dtype=float)
    if axis == "epochs":
        return np.arange(1, int(end) + 1, dtype=float)
    start = min((c.time[0] for c in curves if c.time), default=0.0)
    return np.linspace(start, end, _TIME_POINTS) if end > start else np.array([end])


def curve_bands(
    results: ComparisonResults,
    axis: Axis,
    statistic: Statistic = "median",
    band: BandKind = "iqr",
) -> dict[str, Band]:
    """Per algorithm, the best-so-far statistic over seeds against ``axis`` (one shared x grid)."""
    curves = {s: [run_curve(r, results.direction) for r in results.runs_of(s)] for s in results.samplers}
    grid = axis_grid([c for cs in curves.values() for c in cs], axis, results.n_trials)
    out = {}
    for sampler, runs in curves.items():
        matrix = np.vstack(
            [step_values(c.x(axis), c.best, grid, carry=c.complete and axis != "trials") for c in runs]
        )
        center, low, high = aggregate(matrix, statistic, band)
        out[sampler] = Band(
            tuple(grid.tolist()), tuple(center.tolist()), tuple(low.tolist()), tuple(high.tolist()), len(runs)
        )
    return out


@dataclass(frozen=True)
class Coincidence:
    """Two algorithms' curves drawn on top of each other: equal statistics from ``start`` to ``end``
    (x values on the figure's axis), so the curve drawn first is hidden under the other."""

    samplers: tuple[str, str]
    start: float
    end: float


def coinciding_curves(bands: Mapping[str, Band]) -> list[Coincidence]:
    """Every stretch of consecutive x values over which two algorithms' statistics are equal.

    Computed from the drawn data, whatever the cause (e.g. TPE's random start-up trials are random
    search's trials when both use the same seed, or both ended at the same tabulated value).
    """
    names = list(bands)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x = np.asarray(bands[a].x, dtype=float)
            ca, cb = np.asarray(bands[a].center, dtype=float), np.asarray(bands[b].center, dtype=float)
            if len(x) != len(cb):  # bands of one figure share their x grid (curve_bands)
                continue
            equal = ~np.isnan(ca) & ~np.isnan(cb) & np.isclose(ca, cb, rtol=1e-12, atol=0.0)
            start = None
            for k in range(len(x) + 1):
                if k < len(x) and equal[k]:
                    start = k if start is None else start
                elif start is not None:
                    out.append(Coincidence((a, b), float(x[start]), float(x[k - 1])))
                    start = None
    return out


def shared_first_trials(results: ComparisonResults, a: str, b: str) -> int:
    """How many first trials (by number) algorithms ``a`` and ``b`` share in every seed: the same
    configurations with the same states and values (0 when a seed is missing on either side)."""
    runs_b = {r.seed: r for r in results.runs_of(b)}
    shared = []
    for run_a in results.runs_of(a):
        run_b = runs_b.get(run_a.seed)
        if run_b is None:
            return 0
        n = 0
        for ta, tb in zip(
            sorted(run_a.trials, key=lambda t: t.number),
            sorted(run_b.trials, key=lambda t: t.number),
            strict=False,
        ):
            if (dict(ta.params), ta.state, ta.value) != (dict(tb.params), tb.state, tb.value):
                break
            n += 1
        shared.append(n)
    return min(shared, default=0)


# --------------------------------------------------------------------------- summary table


def final_best(run: RunResult, direction: str) -> float | None:
    values = [t.value for t in run.finished if t.value is not None]
    if not values:
        return None
    return min(values) if direction == "minimize" else max(values)


def epochs_to_reach(run: RunResult, target: float, direction: str) -> float | None:
    """Epochs the run had consumed when its best-so-far first reached ``target`` (None: never)."""
    curve = run_curve(run, direction)
    s = sign(direction)
    for epochs, best in zip(curve.epochs, curve.best, strict=True):
        if not math.isnan(best) and s * best <= s * target:
            return epochs
    return None


def median_run_best(bests: Sequence[float], direction: str) -> float | None:
    """The final best of the reference's median run: the middle value of ``bests``, and with an even
    number of runs the worse of the two middle ones.

    Not the usual median (the mean of the two middle values): with two runs ending at 0.42 and 0.46,
    a target of 0.44 is reached by one run only, so the reference would be reported as "not reached
    (1/2)" against its own target. The worse middle value is reached by more than half of the
    reference's runs, so the reference always reaches its own target in the median.
    """
    if not bests:
        return None
    s = sign(direction)
    ordered = sorted(bests, key=lambda v: s * v)  # best first
    return float(ordered[len(ordered) // 2])


def default_target(results: ComparisonResults, reference: str = "random") -> float | None:
    """The final best of the reference algorithm's median run (random search's, by default)."""
    bests = [b for r in results.runs_of(reference) if (b := final_best(r, results.direction)) is not None]
    return median_run_best(bests, results.direction)


@dataclass(frozen=True)
class SamplerSummary:
    """One row of the comparison table."""

    sampler: str
    runs: int
    complete_runs: int
    best_median: float | None
    best_q25: float | None
    best_q75: float | None
    best_overall: float | None
    target: float | None
    epochs_to_target_median: float | None  # inf: fewer than half the runs reached the target
    reached_target: int
    trials_finished: int
    trials_pruned: int
    trials_failed: int
    epochs_median: float | None
    device_hours: float
    prob_beats_reference: float | None
    p_value_vs_reference: float | None


def _quantiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Median, 25th and 75th percentile (None without values)."""
    if not values:
        return None, None, None
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def _vs_reference(
    values: Sequence[float], reference: Sequence[float], direction: str
) -> tuple[float | None, float | None]:
    """P(a run of this algorithm ends better than a run of the reference), and the two-sided
    Mann-Whitney U p-value of that difference (None with fewer than 2 runs on either side)."""
    if len(values) < 2 or len(reference) < 2:
        return None, None
    s = sign(direction)
    result = scipy_stats.mannwhitneyu([-s * v for v in values], [-s * v for v in reference])
    return float(result.statistic) / (len(values) * len(reference)), float(result.pvalue)


def summarize(
    results: ComparisonResults, target: float | None = None, reference: str = "random"
) -> list[SamplerSummary]:
    """The table per algorithm; ``target`` defaults to the reference's median final best."""
    if target is None:
        target = default_target(results, reference)
    direction = results.direction
    reference_bests = [b for r in results.runs_of(reference) if (b := final_best(r, direction)) is not None]
    rows = []
    for sampler in results.samplers:
        runs = results.runs_of(sampler)
        bests = [b for r in runs if (b := final_best(r, direction)) is not None]
        median, q25, q75 = _quantiles(bests)
        reach: list[float] = []
        if target is not None:
            reach = [math.inf if (e := epochs_to_reach(r, target, direction)) is None else e for r in runs]
        finished = [t for r in runs for t in r.finished]
        prob, p_value = (
            (None, None) if sampler == reference else _vs_reference(bests, reference_bests, direction)
        )
        rows.append(
            SamplerSummary(
                sampler=sampler,
                runs=len(runs),
                complete_runs=sum(r.is_complete for r in runs),
                best_median=median,
                best_q25=q25,
                best_q75=q75,
                best_overall=(min(bests) if direction == "minimize" else max(bests)) if bests else None,
                target=target,
                # the median of epochs with "never" counted as infinitely many
                epochs_to_target_median=float(np.median(reach)) if reach else None,
                reached_target=sum(math.isfinite(e) for e in reach),
                trials_finished=len(finished),
                trials_pruned=sum(t.state == "PRUNED" for t in finished),
                trials_failed=sum(t.state == "FAIL" for t in finished),
                epochs_median=float(np.median([sum(t.epochs for t in r.finished) for r in runs]))
                if runs
                else None,
                device_hours=sum(t.seconds for r in runs for t in r.trials) / 3600.0,
                prob_beats_reference=prob,
                p_value_vs_reference=p_value,
            )
        )
    return rows


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class ConfigPoints:
    """The tested configurations of one algorithm (all seeds), for the search-space picture.

    In a replay, ``x`` and ``y`` are the tabulated configuration's values that were looked up and
    replayed (what was evaluated), and ``sampled_x``/``sampled_y`` what the sampler asked for;
    otherwise both are the trial's parameters.
    """

    x: tuple[Any, ...]
    y: tuple[Any, ...]
    value: tuple[float | None, ...]
    state: tuple[str, ...]
    seed: tuple[int, ...]
    is_run_best: tuple[bool, ...]
    sampled_x: tuple[Any, ...] = ()
    sampled_y: tuple[Any, ...] = ()
    replayed: bool = False


def plot_axes(space: Mapping[str, Any], requested: Sequence[str] | None = None) -> tuple[str, str | None]:
    """The two parameters to draw (numeric ones first), or one and None for a 1-D space."""
    names = list(space)
    if requested:
        return requested[0], (requested[1] if len(requested) > 1 else None)
    numeric = [n for n in names if space[n].get("type") in ("float", "int")]
    ordered = numeric + [n for n in names if n not in numeric]
    return ordered[0], (ordered[1] if len(ordered) > 1 else None)


def configurations(results: ComparisonResults, x_param: str, y_param: str | None) -> dict[str, ConfigPoints]:
    """Per algorithm, every finished trial's (x, y) (y = the metric when ``y_param`` is None).

    A replayed trial is placed at the tabulated configuration it replayed (its ``table_params``):
    a sampled batch size of 5 evaluated the table's 4, and the picture shows what was evaluated.
    """
    out = {}
    for sampler in results.samplers:
        xs: list[Any] = []
        ys: list[Any] = []
        sampled_xs: list[Any] = []
        sampled_ys: list[Any] = []
        values: list[float | None] = []
        states: list[str] = []
        seeds: list[int] = []
        bests: list[bool] = []
        replayed = False
        for run in results.runs_of(sampler):
            best = final_best(run, results.direction)
            best_number = next((t.number for t in run.finished if best is not None and t.value == best), None)
            for trial in run.finished:
                shown = trial.table_params if trial.table_params is not None else trial.params
                replayed = replayed or trial.table_params is not None
                if x_param not in shown or (y_param is not None and y_param not in shown):
                    continue
                xs.append(shown[x_param])
                sampled_xs.append(trial.params.get(x_param))
                ys.append(trial.value if y_param is None else shown[y_param])
                sampled_ys.append(trial.value if y_param is None else trial.params.get(y_param))
                values.append(trial.value)
                states.append(trial.state)
                seeds.append(run.seed)
                bests.append(trial.number == best_number)
        out[sampler] = ConfigPoints(
            tuple(xs),
            tuple(ys),
            tuple(values),
            tuple(states),
            tuple(seeds),
            tuple(bests),
            tuple(sampled_xs),
            tuple(sampled_ys),
            replayed,
        )
    return out


def colour_range(values: Sequence[float], direction: str) -> tuple[float, float]:
    """The value range the configurations picture spreads its colour scale over: from the best
    value to the median of all ``values`` (completed trials of every algorithm); values beyond the
    median get the scale's worst colour.

    A range up to the worst value would let a few diverged or untrained trials (a loss of 2.3 or
    30) stretch the scale until a seed's best of 1.55 against others' 0.42 looked green: every
    worse-than-typical value is drawn as bad, every marker on this one shared scale.
    """
    if not values:
        return 0.0, 1.0
    s = sign(direction)
    best = min(values, key=lambda v: s * v)
    limit = float(np.median(values))
    if limit == best:  # at least half the trials share the best value: spread to the worst one
        limit = max(values, key=lambda v: s * v)
    return float(best), float(limit)
