"""A comparison report that cannot mislead (issue 13), tested on the data behind its table and its
figures, not on pictures: the reference reaches its own target, coinciding curves are said and drawn
distinguishably, replayed configurations are drawn where the table was looked up, every marker is
coloured by its own value on one robust scale, and plotly gets no number where it needs a colour."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import require_real

from hpo.compare._draw import DASHES, configurations_figure, curve_figure, value_colour
from hpo.compare._markdown import table_rows
from hpo.compare._report import ReportOptions, write_report
from hpo.compare._results import REPLAYED_PARAMS_ATTR, ComparisonResults, RunResult, TrialResult, _run_result
from hpo.compare._stats import (
    Coincidence,
    coinciding_curves,
    colour_range,
    configurations,
    curve_bands,
    default_target,
    shared_first_trials,
    summarize,
)

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"type": "int", "low": 4, "high": 16},
}
CHROMIUM = "/usr/bin/chromium"


def trial(number: int, value: float | None, epochs: int = 4, **params: object) -> TrialResult:
    state = "COMPLETE" if value is not None else "PRUNED"
    return TrialResult(number, state, value, params, epochs, seconds=1.0, finished_at=float(number + 1))


def run(sampler: str, seed: int, *trials: TrialResult) -> RunResult:
    return RunResult(sampler, seed, f"cmp/{sampler}/seed-{seed}", len(trials), tuple(trials))


def results(*runs: RunResult, direction: str = "minimize", n_trials: int = 3) -> ComparisonResults:
    samplers = tuple(dict.fromkeys(r.sampler for r in runs))
    return ComparisonResults("cmp", "loss", direction, n_trials, 4, SPACE, samplers, tuple(runs))


# --------------------------------------------------------------------------- target


@pytest.mark.parametrize(
    ("bests", "direction", "target"),
    [
        ([0.42, 0.46], "minimize", 0.46),  # two seeds: the worse one, not their mean 0.44
        ([0.5, 0.3, 0.4, 0.6], "minimize", 0.5),
        ([0.9, 0.7, 0.8], "minimize", 0.8),  # odd: the median itself
        ([0.3, 0.9], "maximize", 0.3),
    ],
)
def test_the_reference_reaches_its_own_target_in_the_median(
    bests: list[float], direction: str, target: float
) -> None:
    runs = [
        run("random", s, trial(0, 5.0 if direction == "minimize" else -5.0), trial(1, b))
        for s, b in enumerate(bests)
    ]
    res = results(*runs, direction=direction, n_trials=2)
    assert default_target(res) == target
    (row,) = summarize(res)
    assert row.reached_target > len(bests) / 2
    assert row.epochs_to_target_median == 8.0  # every run reaches it, if at all, after its 2nd trial
    assert "not reached" not in table_rows([row])[0][4]


def test_an_algorithm_reaching_a_given_target_in_half_its_runs_is_still_not_reached_in_the_median() -> None:
    runs = [run("tpe", s, trial(0, b)) for s, b in enumerate([0.42, 0.46])]
    (row,) = summarize(results(*runs, n_trials=1), target=0.44, reference="random")
    assert row.epochs_to_target_median == math.inf and row.reached_target == 1
    assert table_rows([row])[0][4] == "not reached (1/2)"


# --------------------------------------------------------------------------- coinciding curves


def _same_start() -> ComparisonResults:
    """random and TPE share their first 3 trials in both seeds (TPE's start-up), then TPE improves."""
    runs = []
    for seed in (0, 1):
        start = [
            trial(i, 2.0 - i * 0.1 - seed * 0.01, lr=0.01 * (i + 1), batch_size=4 + seed) for i in range(3)
        ]
        runs.append(
            run("random", seed, *start, trial(3, 1.95, lr=0.05, batch_size=8), trial(4, None, lr=0.1))
        )
        runs.append(run("tpe", seed, *start, trial(3, 1.0, lr=0.02, batch_size=12), trial(4, 0.9, lr=0.02)))
    return results(*runs, n_trials=5)


def test_curves_that_coincide_are_found_from_the_data_and_their_shared_trials_counted() -> None:
    res = _same_start()
    bands = curve_bands(res, "trials")
    assert coinciding_curves(bands) == [Coincidence(("random", "tpe"), 1.0, 3.0)]
    assert shared_first_trials(res, "random", "tpe") == 3
    assert shared_first_trials(res, "tpe", "random") == 3
    # on the epochs axis too (4 epochs per trial): the same stretch, in epochs
    (on_epochs,) = coinciding_curves(curve_bands(res, "epochs"))
    assert (on_epochs.start, on_epochs.end) == (4.0, 15.0)  # until TPE's 4th trial ends, at 16


def test_coinciding_curves_are_drawn_with_different_dashes_and_said_in_the_report(tmp_path: Path) -> None:
    res = _same_start()
    fig = curve_figure(curve_bands(res, "trials"), "trials", "loss", "median", "25-75 %", "t", notes=["n"])
    lines = {t.legendgroup: t.line.dash for t in fig.data if t.showlegend is not False}
    assert lines == {"random": DASHES[0], "tpe": DASHES[1]} and DASHES[0] != DASHES[1]
    assert [a.text for a in fig.layout.annotations] == ["n"]

    report = write_report(res, tmp_path, ReportOptions(png=False))
    markdown = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    said = "curves on top of each other: random and tpe (trials 1-3)"
    why = "random and tpe run the same first 3 trials in every seed"
    for text in (markdown, html):
        assert said in text and why in text
    assert report.rows[0].sampler == "random"


def test_no_note_when_no_curves_coincide(tmp_path: Path) -> None:
    res = results(run("random", 0, trial(0, 2.0)), run("tpe", 0, trial(0, 1.0)), n_trials=1)
    assert coinciding_curves(curve_bands(res, "trials")) == []
    write_report(res, tmp_path, ReportOptions(png=False))
    assert "on top of each other" not in (tmp_path / "report.md").read_text()


# --------------------------------------------------------------------------- replayed configurations


def test_replayed_trials_are_placed_at_the_tabulated_configuration_they_replayed() -> None:
    # a real (in-memory) Optuna study as a replay leaves it: the sampled batch size 5, the table's 4
    study = optuna.create_study()
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "batch_size": optuna.distributions.IntDistribution(4, 16),
    }
    for number, (sampled, table) in enumerate([(5, 4), (7, 8), (14, 16)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 0.003, "batch_size": sampled},
                distributions=dists,
                value=1.0 - 0.1 * number,
                intermediate_values={1: 1.0},
                user_attrs={
                    REPLAYED_PARAMS_ATTR: {"lr": 0.001, "batch_size": table},
                    "hpo:replay_seconds": 0.5,
                },
            )
        )
    replayed = _run_result("bohb", 0, study, 3)
    assert [t.table_params["batch_size"] for t in replayed.trials if t.table_params] == [4, 8, 16]
    assert [t.params["batch_size"] for t in replayed.trials] == [5, 7, 14]

    res = results(replayed)
    points = configurations(res, "lr", "batch_size")["bohb"]
    assert points.replayed and points.y == (4, 8, 16) and points.x == (0.001,) * 3
    assert points.sampled_y == (5, 7, 14)
    fig = configurations_figure({"bohb": points}, SPACE, "lr", "batch_size", "loss", "minimize")
    drawn = {y for t in fig.data for y in (t.y or ()) if y is not None}
    assert drawn == {4, 8, 16}, "only looked-up values are drawn"
    assert "tabulated value replayed" in fig.layout.yaxis.title.text
    hover = [text for t in fig.data for text in (t.text or ())]
    assert "seed 0: loss=1 (sampled lr=0.003, batch_size=5)" in hover

    # a trained trial has no table parameters and is drawn where it was sampled
    trained = results(run("tpe", 0, trial(0, 1.0, lr=0.003, batch_size=5)), n_trials=1)
    points = configurations(trained, "lr", "batch_size")["tpe"]
    assert not points.replayed and points.y == (5,)


# --------------------------------------------------------------------------- colours


def test_every_marker_is_coloured_by_its_own_value_on_one_scale_a_few_diverged_runs_cannot_stretch() -> None:
    good = [run("tpe", s, trial(0, 0.6, lr=0.1), trial(1, 0.42 + 0.01 * s, lr=0.01)) for s in range(3)]
    # a diverged trial, then a poor best
    bad_seed = run("bohb", 0, trial(0, 30.0, lr=0.1), trial(1, 1.554, lr=0.001))
    fine_seed = run("bohb", 1, trial(0, 2.3, lr=0.1), trial(1, 0.45, lr=0.01), trial(2, None, lr=0.1))
    # a scale up to the worst value (30) would put 1.554 in its greenest twentieth
    res = results(*good, bad_seed, fine_seed)
    points = configurations(res, "lr", None)
    values = [v for p in points.values() for v in p.value if v is not None]
    best, limit = colour_range(values, "minimize")
    assert (best, limit) == (0.42, 0.6)  # the median of the 10 completed trials

    fig = configurations_figure(points, SPACE, "lr", None, "loss", "minimize")
    green, red = value_colour(best, best, limit, "minimize"), value_colour(limit, best, limit, "minimize")
    assert green != red
    stars = [t for t in fig.data if t.name == "best of a seed" and t.x and t.x[0] is not None]
    star_colour = {v: c for t in stars for v, c in zip(t.y, t.marker.color, strict=True)}
    assert star_colour[1.554] == red, "a seed whose best is worse than most trials is red"
    assert star_colour[0.42] == green
    for t in fig.data:
        if t.x and t.x[0] is not None and t.name in ("completed", "best of a seed"):
            # every marker: the colour of its own value (here y is the value), on the shared scale
            assert list(t.marker.color) == [value_colour(v, best, limit, "minimize") for v in t.y]
            # worse values last (on top): a bad result is never hidden under a good one
            assert list(t.y) == sorted(t.y)
    # maximize: the scale turns round, green is still the best
    flipped = colour_range([0.1, 0.5, 0.9], "maximize")
    assert flipped == (0.9, 0.5) and value_colour(0.2, *flipped, "maximize") == value_colour(
        0.5, *flipped, "maximize"
    )


def test_plotly_gets_no_number_where_it_needs_a_colour() -> None:
    """Numbers as marker colours made plotly.js log 'Invalid color specifier' for every legend
    entry; now only the colour bar's never-drawn proxy point carries a number."""
    res = _same_start()
    fig = configurations_figure(
        configurations(res, "lr", "batch_size"), SPACE, "lr", "batch_size", "loss", "minimize"
    )
    numeric = []
    for t in fig.data:
        colours = t.marker.color if isinstance(t.marker.color, tuple | list) else [t.marker.color]
        if any(isinstance(c, int | float) for c in colours):
            numeric.append(t)
        if t.showlegend is not False:
            assert all(isinstance(c, str) for c in colours), t.name
    assert len(numeric) == 1 and numeric[0].marker.showscale and list(numeric[0].x) == [None]
    assert {t.name for t in fig.data if t.showlegend is not False} == {
        "pruned / failed",
        "completed",
        "best of a seed",
    }


def test_the_html_report_logs_no_warning_in_a_browser(tmp_path: Path) -> None:
    if shutil.which(CHROMIUM) is None:
        require_real(f"Debian's chromium is not installed at {CHROMIUM} (run scripts/ci-browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_real("playwright is not installed (pip install -e '.[dev]')")
    write_report(_same_start(), tmp_path, ReportOptions(png=False))
    messages: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.goto((tmp_path / "report.html").as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 5")
            page.wait_for_timeout(500)
        finally:
            browser.close()
    assert messages == []
