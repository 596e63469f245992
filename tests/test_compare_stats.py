"""The comparison's numbers, computed apart from drawing: best-so-far curves, bands, the summary
table, clocks, nearest-configuration lookup, table coverage and run planning (no storage, no CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hpo.compare._plan import SEED_STRIDE, base_spec, derive_run_spec, parse_samplers, plan_comparison
from hpo.compare._replay import ReplayTable, TableEntry, check_covers, distance, load_table
from hpo.compare._results import (
    ComparisonResults,
    RunResult,
    TrialResult,
    active_elapsed,
    load_results,
    simulated_intervals,
)
from hpo.compare._stats import (
    aggregate,
    best_so_far,
    configurations,
    curve_bands,
    default_target,
    epochs_to_reach,
    run_curve,
    step_values,
    summarize,
)
from hpo.errors import HpoError, SpecError
from hpo.space import grid_points, parse_space
from hpo.spec import parse_study

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-4, 1e-3, 1e-2, 1e-1]},
    "units": {"type": "int", "low": 8, "high": 32, "grid": [8, 16, 32]},
}


def study(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "cmp",
        "objective": "hpo_test_objectives:quadratic",
        "search_space": SPACE,
        "metric": "loss",
        "direction": "minimize",
        "n_trials": 12,
        "budget": {"max_epochs": 4},
        "sampler": {"name": "tpe", "options": {"n_startup_trials": 3}},
    }
    raw.update(changes)
    return raw


def trial(
    number: int, state: str, value: float | None, epochs: int, at: float, **params: object
) -> TrialResult:
    return TrialResult(number, state, value, params, epochs, seconds=1.0, finished_at=at)


def run(sampler: str, seed: int, *trials: TrialResult, n_trials: int | None = None) -> RunResult:
    return RunResult(sampler, seed, f"cmp/{sampler}/seed-{seed}", n_trials or len(trials), tuple(trials))


def results(*runs: RunResult, direction: str = "minimize") -> ComparisonResults:
    samplers = tuple(dict.fromkeys(r.sampler for r in runs))
    return ComparisonResults("cmp", "loss", direction, 3, 4, SPACE, samplers, tuple(runs))


# --------------------------------------------------------------------------- best so far


def test_best_so_far_respects_direction_and_skips_trials_without_value() -> None:
    values = [None, 3.0, None, 5.0, 2.0, 4.0]
    low = best_so_far(values, "minimize")
    high = best_so_far(values, "maximize")
    assert math.isnan(low[0]) and math.isnan(high[0])
    assert low[1:] == [3.0, 3.0, 3.0, 2.0, 2.0]
    assert high[1:] == [3.0, 3.0, 5.0, 5.0, 5.0]


def test_run_curve_orders_by_completion_and_counts_epochs_of_pruned_trials() -> None:
    r = run(
        "tpe",
        0,
        trial(0, "COMPLETE", 5.0, 4, at=40.0),
        trial(1, "PRUNED", None, 2, at=10.0),  # finished first
        trial(2, "COMPLETE", 1.0, 4, at=60.0),
    )
    curve = run_curve(r, "minimize")
    assert curve.trials == (1.0, 2.0, 3.0)
    assert curve.epochs == (2.0, 6.0, 10.0)
    assert curve.time == (10.0, 40.0, 60.0)
    assert math.isnan(curve.best[0]) and curve.best[1:] == (5.0, 1.0)
    assert curve.complete


def test_unfinished_trials_make_an_incomplete_run() -> None:
    r = run("tpe", 0, trial(0, "COMPLETE", 1.0, 4, 1.0), TrialResult(1, "RUNNING", None, {}, 1, 0.0, None))
    assert not r.is_complete and len(r.finished) == 1


def test_step_values_is_right_continuous_and_carries_only_when_asked() -> None:
    grid = np.array([0.0, 1.0, 1.5, 2.0, 3.0])
    carried = step_values([1.0, 2.0], [5.0, 4.0], grid, carry=True)
    cut = step_values([1.0, 2.0], [5.0, 4.0], grid, carry=False)
    assert math.isnan(carried[0])
    assert carried[1:].tolist() == [5.0, 5.0, 4.0, 4.0]
    assert math.isnan(cut[4]) and cut[3] == 4.0


# --------------------------------------------------------------------------- aggregation


def test_median_and_iqr_per_column_and_nan_where_a_run_has_no_value() -> None:
    matrix = np.array([[1.0, 1.0], [2.0, np.nan], [3.0, 3.0], [4.0, 3.0], [5.0, 3.0]])
    center, low, high = aggregate(matrix, "median", "iqr")
    assert center[0] == 3.0 and low[0] == 2.0 and high[0] == 4.0
    assert math.isnan(center[1]) and math.isnan(low[1])


def test_iqm_ignores_the_outer_quartiles() -> None:
    matrix = np.array([[0.0], [10.0], [10.0], [10.0], [10.0], [10.0], [10.0], [1000.0]])
    center, _, _ = aggregate(matrix, "iqm", "iqr")
    assert center[0] == pytest.approx(10.0)


def test_bootstrap_interval_brackets_the_statistic_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(12, 3))
    matrix[:, 2] = 7.0  # all runs equal: a zero-width interval, not an error
    first = aggregate(matrix, "median", "bootstrap", seed=3)
    again = aggregate(matrix, "median", "bootstrap", seed=3)
    center, low, high = first
    assert all(low[i] <= center[i] <= high[i] for i in range(3))
    assert all(low[i] < high[i] for i in range(2))
    assert low[2] == high[2] == 7.0
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[2], again[2])


def test_curves_start_once_every_seed_has_a_value_and_stop_where_a_cut_run_stops() -> None:
    complete = run("tpe", 0, trial(0, "COMPLETE", 4.0, 2, 2.0), trial(1, "COMPLETE", 2.0, 2, 4.0))
    late = run("tpe", 1, trial(0, "PRUNED", None, 1, 1.0), trial(1, "COMPLETE", 6.0, 2, 3.0))
    cut = run("random", 0, trial(0, "COMPLETE", 3.0, 4, 4.0), n_trials=2)  # 1 of 2 trials finished
    bands = curve_bands(results(complete, late, cut), "epochs")
    tpe, random = bands["tpe"], bands["random"]
    assert tpe.x == (1.0, 2.0, 3.0, 4.0)
    # epoch 2: seed 1 has no completed trial yet, so no median is drawn
    assert math.isnan(tpe.center[1])
    assert tpe.center[2:] == (5.0, 4.0)  # median of (4, 6) then (2, 6)
    assert random.center[3] == 3.0 and math.isnan(random.center[2])
    by_trials = curve_bands(results(complete, late, cut), "trials")
    # against trials the axis runs to the planned n_trials (3); no run reached a third trial
    assert by_trials["tpe"].x == (1.0, 2.0, 3.0)
    assert math.isnan(by_trials["tpe"].center[0]) and by_trials["tpe"].center[1] == 4.0
    assert math.isnan(by_trials["tpe"].center[2])


# --------------------------------------------------------------------------- table


def test_summary_table_target_budget_pruned_hours_and_test_against_random() -> None:
    randoms = [
        run("random", s, trial(0, "COMPLETE", v, 4, 4.0), trial(1, "PRUNED", None, 1, 5.0))
        for s, v in enumerate([3.0, 4.0, 5.0])
    ]
    better = [
        run("tpe", s, trial(0, "COMPLETE", 9.0, 4, 4.0), trial(1, "COMPLETE", v, 2, 6.0))
        for s, v in enumerate([1.0, 2.0, 2.5])
    ]
    res = results(*randoms, *better)
    assert default_target(res) == 4.0
    assert epochs_to_reach(randoms[0], 4.0, "minimize") == 4.0
    assert epochs_to_reach(randoms[2], 4.0, "minimize") is None
    rows = {row.sampler: row for row in summarize(res)}
    r, t = rows["random"], rows["tpe"]
    assert (r.best_median, r.best_q25, r.best_q75, r.best_overall) == (4.0, 3.5, 4.5, 3.0)
    # random: two of three runs reach 4.0 after 4 epochs, one never: the median is 4 epochs
    assert r.epochs_to_target_median == 4.0 and r.reached_target == 2
    assert t.epochs_to_target_median == 6.0 and t.reached_target == 3
    assert (r.trials_pruned, r.trials_finished, t.trials_pruned) == (3, 6, 0)
    assert r.device_hours == pytest.approx(6 / 3600)
    assert t.prob_beats_reference == 1.0 and r.prob_beats_reference is None
    assert t.p_value_vs_reference is not None and 0.0 < t.p_value_vs_reference < 0.2


def test_never_reaching_the_target_in_most_runs_gives_an_infinite_median() -> None:
    runs = [run("random", s, trial(0, "COMPLETE", v, 4, 1.0)) for s, v in enumerate([1.0, 5.0, 6.0])]
    (row,) = summarize(results(*runs), target=2.0)
    assert row.epochs_to_target_median == math.inf and row.reached_target == 1


def test_maximize_picks_the_highest_values() -> None:
    runs = [run("random", 0, trial(0, "COMPLETE", 0.5, 1, 1.0), trial(1, "COMPLETE", 0.9, 1, 2.0))]
    (row,) = summarize(results(*runs, direction="maximize"))
    assert row.best_overall == 0.9 and row.epochs_to_target_median == 2.0


def test_configurations_mark_each_seeds_best_and_keep_pruned_trials() -> None:
    a = run(
        "tpe",
        0,
        trial(0, "COMPLETE", 2.0, 4, 1.0, lr=0.1, units=8),
        trial(1, "PRUNED", None, 1, 2.0, lr=0.01, units=16),
    )
    b = run("tpe", 1, trial(0, "COMPLETE", 1.0, 4, 1.0, lr=0.001, units=32))
    points = configurations(results(a, b), "lr", "units")["tpe"]
    assert points.x == (0.1, 0.01, 0.001) and points.y == (8, 16, 32)
    assert points.state == ("COMPLETE", "PRUNED", "COMPLETE")
    assert points.is_run_best == (True, False, True)


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    res = results(run("tpe", 0, trial(0, "COMPLETE", 2.0, 4, 1.0, lr=0.1, units=8)))
    path = tmp_path / "results.json"
    res.save(path)
    assert load_results(path) == res
    path.write_text('{"format": "something else"}')
    with pytest.raises(SpecError, match="format"):
        load_results(path)
    path.write_bytes(b'{"format": "\xff"}')  # was: UnicodeDecodeError, a traceback
    with pytest.raises(HpoError, match="cannot read comparison results"):
        load_results(path)


# --------------------------------------------------------------------------- clocks


def test_active_time_skips_gaps_and_merges_overlaps() -> None:
    intervals = [(0.0, 10.0), (5.0, 12.0), (100.0, 110.0)]  # a stop overnight between 12 and 100
    assert active_elapsed(intervals, 12.0) == 12.0
    assert active_elapsed(intervals, 110.0) == 22.0
    assert active_elapsed(intervals, 105.0) == 17.0


def test_simulated_clock_puts_trials_on_the_first_free_worker() -> None:
    assert simulated_intervals([3.0, 1.0, 2.0]) == [(0.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
    assert simulated_intervals([3.0, 1.0, 2.0], workers=2) == [(0.0, 3.0), (0.0, 1.0), (1.0, 3.0)]


# --------------------------------------------------------------------------- replay tables


def entry(lr: float, units: int, curve: list[float], state: str = "COMPLETE") -> TableEntry:
    return TableEntry({"lr": lr, "units": units}, state, {"loss": tuple(curve)}, tuple(1.0 for _ in curve))


def table(*entries: TableEntry, **definition: object) -> ReplayTable:
    spec = parse_study(study(**definition), "study")
    full = spec.definition()
    return ReplayTable("cmp/table", full, "loss", "minimize", 4, tuple(entries), spec.space)


def test_nearest_configuration_respects_log_scales() -> None:
    space = parse_space(SPACE, "space")
    # 5e-3 is nearer to 1e-3 on a linear scale but nearer to 1e-2 on the log scale the space uses
    assert distance(space, {"lr": 5e-3, "units": 8}, {"lr": 1e-2, "units": 8}) < distance(
        space, {"lr": 5e-3, "units": 8}, {"lr": 1e-3, "units": 8}
    )
    t = table(entry(1e-3, 8, [1.0] * 4), entry(1e-2, 8, [2.0] * 4), entry(1e-2, 32, [3.0] * 4))
    assert t.nearest({"lr": 5e-3, "units": 12}).params == {"lr": 1e-2, "units": 8}
    assert t.nearest({"lr": 5e-3, "units": 30}).params == {"lr": 1e-2, "units": 32}


def test_distance_counts_categorical_mismatch_and_inactive_parameters_as_one() -> None:
    space = parse_space({"opt": {"type": "categorical", "choices": ["sgd", "adam"]}}, "space")
    assert distance(space, {"opt": "sgd"}, {"opt": "adam"}) == 1.0
    assert distance(space, {"opt": "sgd", "momentum": 0.9}, {"opt": "sgd"}) == 1.0


def full_grid_table(**definition: object) -> ReplayTable:
    points = grid_points(parse_space(SPACE, "space"))
    curve = [1.0, 0.9, 0.8, 0.7]
    return table(*(entry(float(str(p["lr"])), int(str(p["units"])), curve) for p in points), **definition)


def test_a_table_covers_a_study_of_the_same_problem() -> None:
    check_covers(full_grid_table(), parse_study(study(), "study"), "table.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"search_space": {**SPACE, "lr": {**SPACE["lr"], "low": 1e-6, "grid": [1e-6, 1e-3]}}}, "lr spans"),
        ({"budget": {"max_epochs": 8}}, "curves have 4 epochs"),
        ({"settings": {"sleep": 0.1}}, "settings"),
        ({"metric": "accuracy"}, "no 'accuracy' curves"),
        ({"search_space": {"lr": SPACE["lr"]}}, "tabulates parameters"),
    ],
)
def test_a_table_that_does_not_cover_the_study_is_refused(change: dict[str, object], message: str) -> None:
    spec = parse_study(study(**change), "study")
    with pytest.raises(SpecError, match=message) as error:
        check_covers(full_grid_table(), spec, "table.json")
    assert str(error.value).startswith("table.json: ") and "(fix: " in str(error.value)


def test_table_files_round_trip_and_malformed_ones_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    full_grid_table().save(path)
    loaded = load_table(path)
    assert loaded.entries == full_grid_table().entries and loaded.space == full_grid_table().space
    text = path.read_text().replace('"epoch_seconds": [\n    1.0,', '"epoch_seconds": [', 1)
    path.write_text(text)
    with pytest.raises(SpecError, match=r"entries\[0\]\.metrics\.loss: has 4 epochs but epoch_seconds has 3"):
        load_table(path)
    with pytest.raises(SpecError, match="replay table not found"):
        load_table(tmp_path / "missing.json")
    path.write_bytes(b"\x80" + path.read_bytes())  # was: UnicodeDecodeError, a traceback
    with pytest.raises(SpecError, match=r"t\.json: is not a JSON replay table"):
        load_table(path)


# --------------------------------------------------------------------------- planning


def test_runs_get_disjoint_sampler_seeds_and_only_the_files_sampler_keeps_its_options() -> None:
    spec = parse_study(study(), "study")
    plan = plan_comparison(spec, ["random", "tpe"], 3, source="study")
    names = [r.study_name for r in plan.runs]
    assert names[:2] == ["cmp/random/seed-0", "cmp/tpe/seed-0"] and len(names) == 6
    seeds = {r.spec.sampler.seed for r in plan.runs if r.sampler == "random"}
    assert seeds == {0, SEED_STRIDE, 2 * SEED_STRIDE}
    tpe = next(r for r in plan.runs if r.sampler == "tpe")
    random = next(r for r in plan.runs if r.sampler == "random")
    assert tpe.spec.sampler.options == {"n_startup_trials": 3} and random.spec.sampler.options == {}
    # everything that sets the budget is the same for every run
    assert all(
        (r.spec.n_trials, r.spec.budget, r.spec.pruner, r.spec.early_stopping)
        == (12, spec.budget, spec.pruner, spec.early_stopping)
        for r in plan.runs
    )


def test_grid_runs_visit_the_whole_grid_in_a_seeded_order() -> None:
    spec = parse_study(study(), "study")
    first = derive_run_spec(spec, "grid", 0, "cmp/grid/seed-0", "study")
    again = derive_run_spec(spec, "grid", 0, "cmp/grid/seed-0", "study")
    orders = [grid_points(derive_run_spec(spec, "grid", s, "x", "study").space) for s in range(4)]
    key = lambda p: sorted(p.items())  # noqa: E731
    assert all(sorted(o, key=key) == sorted(grid_points(spec.space), key=key) for o in orders)
    assert len({tuple(map(str, o)) for o in orders}) > 1, "seeds should change the grid's order"
    assert first.definition() == again.definition()


def test_grid_needs_n_trials_equal_to_the_grid_size() -> None:
    spec = parse_study(study(n_trials=10), "study.yaml")
    with pytest.raises(SpecError, match=r"study.yaml: n_trials: is 10 but the grid .* has 12 points"):
        plan_comparison(spec, ["grid", "random"], 2, source="study.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [("random,nope", "unknown sampler 'nope'"), ("", "no sampler"), ("tpe,tpe", "tpe listed twice")],
)
def test_sampler_lists_are_checked(text: str, message: str) -> None:
    with pytest.raises(HpoError, match=message):
        parse_samplers(text)


def test_zero_seeds_is_refused() -> None:
    with pytest.raises(HpoError, match="--seeds must be at least 1"):
        plan_comparison(parse_study(study(), "study"), ["random"], 0, source="study")


def test_subset_overrides_the_data_section_and_is_range_checked() -> None:
    spec = parse_study(study(data={"subset": 1.0, "val_fraction": 0.2}), "study")
    assert base_spec(spec, "study", 0.1).data == {"subset": 0.1, "val_fraction": 0.2}
    assert base_spec(spec, "study", None) is spec
    with pytest.raises(HpoError, match=r"--subset must lie in \(0, 1\]"):
        base_spec(spec, "study", 1.5)
