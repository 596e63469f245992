"""``hpo compare`` / ``hpo report`` / ``hpo tabulate`` through the CLI, as a user runs them: bad input
refused before anything is created, a replayed comparison and its report, and a real comparison on
PostgreSQL that ordinary workers share and that a rerun continues."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import require_real, run_cli, write_study

from hpo.compare._replay import load_table
from hpo.compare._results import load_results

QUAD = """
name: quad
objective: hpo_test_objectives:quadratic
search_space:
  x: {type: float, low: 0.0, high: 3.0, grid: [0.0, 1.0, 2.0, 3.0]}
  y: {type: float, low: -2.0, high: 0.0, grid: [-2.0, -1.0, 0.0]}
metric: loss
direction: minimize
n_trials: 12
budget: {max_epochs: 4}
sampler: {name: tpe, options: {n_startup_trials: 3}}
pruner: {name: median, options: {n_startup_trials: 2, n_warmup_steps: 1}}
"""


def one_line_error(result: object) -> str:
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert result.returncode == 2, (result.stdout, stderr)  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and stderr.startswith("error: "), stderr
    return stderr


def study_names(url: str) -> list[str]:
    return optuna.get_all_study_names(storage=url)


def test_bad_input_is_refused_before_any_study_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = write_study(tmp_path, QUAD)
    wrong_grid = write_study(tmp_path, QUAD.replace("n_trials: 12", "n_trials: 10"), "wrong_grid.yaml")
    narrow = write_study(
        tmp_path,
        QUAD.replace("low: 0.0, high: 3.0", "low: 1.0, high: 3.0").replace(
            "grid: [0.0, 1.0, 2.0, 3.0]", "grid: [1.0, 2.0, 3.0]"
        ),
        "narrow.yaml",
    )
    cases = [
        (
            ["compare", str(study), "--samplers", "random,sobolev", "--seeds", "2"],
            "unknown sampler 'sobolev'",
        ),
        (["compare", str(study), "--samplers", "random", "--seeds", "0"], "--seeds must be at least 1"),
        (
            ["compare", str(wrong_grid), "--samplers", "grid,random", "--seeds", "2"],
            "n_trials: is 10 but the grid",
        ),
    ]
    for args, message in cases:
        error = one_line_error(run_cli([*args, "--storage", url]))
        assert message in error
    # a table of a narrower range does not cover the study
    tabulated = run_cli(["tabulate", str(narrow), "--storage", url, "-o", str(tmp_path / "t.json")])
    assert tabulated.returncode == 0, tabulated.stderr
    error = one_line_error(
        run_cli(
            ["compare", str(study), "--replay", str(tmp_path / "t.json"), "--storage", url, "--seeds", "2"]
        )
    )
    assert "does not cover the study's search space: x spans [0, 3] in the study but [1, 3]" in error
    assert "(fix: " in error
    assert study_names(url) == ["quad/table"], "only the tabulating study may exist"
    error = one_line_error(run_cli(["report", "quad", "--storage", url]))
    assert "no comparison named 'quad' in this storage" in error


def test_replayed_comparison_reports_curves_configurations_and_a_table(tmp_path: Path) -> None:
    study = write_study(tmp_path, QUAD)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    table_path = tmp_path / "quad.json"
    tabulated = run_cli(["tabulate", str(study), "--storage", url, "-o", str(table_path)])
    assert tabulated.returncode == 0, tabulated.stderr
    table = load_table(table_path)
    assert len(table.entries) == 12 and all(e.epochs == 4 for e in table.entries)  # no pruning, no stopping
    assert all(len(e.epoch_seconds) == 4 for e in table.entries)

    png = shutil.which("chromium") is not None
    if not png:
        require_real("Chromium is needed for PNG export (scripts/ci-browser.sh installs it)")
    out = tmp_path / "report"
    result = run_cli(
        [
            "compare",
            str(study),
            "--replay",
            str(table_path),
            "--samplers",
            "grid,random,tpe",
            "--seeds",
            "3",
            "-o",
            str(out),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "in an in-memory storage" in result.stdout
    # overall progress over every study (quiet replay: one line per study), ending at all 9 x 12
    overall = re.findall(
        r"compare: (\d+)/108 trials done \(\d+%\), \S+ elapsed, about \S+ left", result.stdout
    )
    assert [int(n) for n in overall] == [12 * k for k in range(1, 10)], result.stdout
    assert study_names(url) == ["quad/table"], "an in-memory replay writes nothing to the database"

    results = load_results(out / "results.json")
    assert results.replay_table == str(table_path.resolve())
    assert {(r.sampler, r.seed) for r in results.runs} == {
        (s, k) for s in ("grid", "random", "tpe") for k in range(3)
    }
    for run in results.runs:
        assert run.is_complete and len(run.trials) == 12
        # the simulated clock: the tabulated seconds of the epochs each trial replayed
        assert all(t.seconds > 0 for t in run.trials)
        # what each trial looked up is kept: a tabulated configuration (the picture draws it there)
        tabulated = [dict(e.params) for e in table.entries]
        assert all(t.table_params is not None and dict(t.table_params) in tabulated for t in run.trials)
    # every grid seed visits the whole grid; values are the tabulated curves' (x-2)^2+(y+1)^2+1/epoch
    for run in results.runs_of("grid"):
        points = {(t.params["x"], t.params["y"]) for t in run.trials}
        assert len(points) == 12
        for t in run.trials:
            if t.state == "COMPLETE":
                assert t.value == pytest.approx((t.params["x"] - 2) ** 2 + (t.params["y"] + 1) ** 2 + 0.25)
    assert any(t.state == "PRUNED" for run in results.runs for t in run.trials), (
        "median pruning acts in replay"
    )

    markdown = (out / "report.md").read_text()
    assert "carry no training noise" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "algorithm" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["grid", "random", "tpe"]
    html = (out / "report.html").read_text()
    assert "plotly" in html and "<table>" in html and "carry no training noise" in html
    assert "best_vs_epochs.png" in markdown
    for name in ("best_vs_trials", "best_vs_epochs", "best_vs_time", "configurations", "final_best"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the report can be redrawn from results.json alone, here with IQM and bootstrap bands
    again = run_cli(
        [
            "report",
            str(out / "results.json"),
            "-o",
            str(tmp_path / "again"),
            "--statistic",
            "iqm",
            "--band",
            "bootstrap",
            "--no-png",
        ]
    )
    assert again.returncode == 0, again.stderr
    assert "95 % bootstrap confidence interval" in (tmp_path / "again" / "report.md").read_text()
    assert not list((tmp_path / "again").glob("*.png"))


@pytest.mark.postgres
def test_real_comparison_is_shared_by_workers_continued_by_a_rerun_and_guarded_against_clashes(
    tmp_path: Path, postgres_url: str
) -> None:
    study = write_study(tmp_path, QUAD)
    args = [
        "compare",
        str(study),
        "--samplers",
        "random,tpe",
        "--seeds",
        "2",
        "--storage",
        postgres_url,
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    created = run_cli([*args, "--no-run"])
    assert created.returncode == 0, created.stderr
    assert sorted(study_names(postgres_url)) == [
        f"quad/{s}/seed-{k}" for s in ("random", "tpe") for k in (0, 1)
    ]
    assert "hpo worker --study-name quad/SAMPLER/seed-K" in created.stdout

    # an ordinary worker does part of one study ...
    worker = run_cli(
        [
            "worker",
            "--study-name",
            "quad/tpe/seed-1",
            "--storage",
            postgres_url,
            "--n-trials",
            "5",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert worker.returncode == 0, worker.stderr
    # ... and the comparison finishes the rest: each study ends with exactly its 12 trials
    out = tmp_path / "report"
    finished = run_cli([*args, "-o", str(out), "--no-png"])
    assert finished.returncode == 0, finished.stderr
    # overall progress after each trial: it starts from the 5 trials already done, ends at 48/48
    overall = [int(n) for n in re.findall(r"compare: (\d+)/48 trials done", finished.stdout)]
    assert overall == list(range(6, 49)), finished.stdout
    assert "estimating time left" not in finished.stdout and "about 0s left" in finished.stdout
    for name in study_names(postgres_url):
        trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
        assert len(trials) == 12 and all(t.state.is_finished() for t in trials), name
    results = load_results(out / "results.json")
    assert results.replay_table is None and len(results.runs) == 4
    # real runs take real time: the clock is the runs' active time
    assert all(t.finished_at is not None and t.finished_at >= 0 for r in results.runs for t in r.trials)

    report = run_cli(["report", "quad", "--storage", postgres_url, "-o", str(tmp_path / "r2"), "--no-png"])
    assert report.returncode == 0, report.stderr
    redrawn = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert redrawn == json.loads((out / "results.json").read_text())

    # the same comparison name with another problem definition is refused, and nothing new is made
    changed = write_study(tmp_path, QUAD.replace("max_epochs: 4", "max_epochs: 5"), "changed.yaml")
    error = one_line_error(
        run_cli(
            [
                "compare",
                str(changed),
                "--samplers",
                "random,tpe,gp",
                "--seeds",
                "3",
                "--storage",
                postgres_url,
                "--no-run",
            ]
        )
    )
    assert "clashes with study 'quad/random/seed-0'" in error.splitlines()[0]
    assert "--name NEW_NAME" in error
    assert len(study_names(postgres_url)) == 4


def test_bad_output_paths_and_report_flags_are_refused_before_any_run(tmp_path: Path) -> None:
    """A typo in -o (or a report flag that cannot work) must not cost a whole comparison or grid:
    one line naming the flag and the fix, before any study is created or trained."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = write_study(tmp_path, QUAD)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    long_name = "x" * 5000
    compare = ["compare", str(study), "--samplers", "random,tpe", "--seeds", "2", "--storage", url]
    tabulate = ["tabulate", str(study), "--storage", url]
    cases = [
        ([*tabulate, "-o", str(a_file / "t.json")], f"{a_file} is a file, not a folder"),
        ([*tabulate, "-o", str(a_folder)], "is a folder, not a file"),
        ([*tabulate, "-o", ""], "-o: the file name is empty"),
        ([*tabulate, "-o", str(tmp_path / long_name)], "File name too long"),
        ([*compare, "-o", str(a_file)], "is a file, not a folder"),
        ([*compare, "-o", str(a_file / "sub")], f"{a_file} is a file, not a folder"),
        ([*compare, "--replay", ""], "--replay: the table's file name is empty"),
        ([*compare, "--replay", long_name], "cannot read the replay table: File name too long"),
        ([*compare, "--seeds", "100000000"], "--seeds 100000000 is too many"),
        ([*compare, "--reference", "bogus"], "--reference: 'bogus' is not an algorithm of this comparison"),
        ([*compare, "--target", "nan"], "--target: must be a finite metric value"),
        ([*compare, "--axes", "x"], "--axes: names one parameter, the plot needs two (fix: e.g. --axes x,y)"),
        ([*compare, "--axes", "x,x"], "--axes: 'x' named twice"),
        ([*compare, "--axes", "x,z"], "--axes: 'z' is not a parameter"),
        (["report", "quad", "--storage", url, "-o", str(a_file)], "is a file, not a folder"),
        (["report", "quad", "--storage", url, "--target", "inf"], "--target: must be a finite metric value"),
    ]
    for args, message in cases:
        error = one_line_error(run_cli(args))
        assert message in error, (args[:6], error)
        assert "(fix: " in error and len(error) < 400 and "\n" not in error, error
    assert "--seeds" in one_line_error(run_cli([*compare, "--seeds", "100000000"])).split(":")[1]
    assert study_names(url) == [], "nothing may be created or run"
    # a name too long to be a file is a comparison name that is not there, said in one line
    error = one_line_error(run_cli(["report", long_name, "--storage", url]))
    assert "Traceback" not in error and len(error) < 600
