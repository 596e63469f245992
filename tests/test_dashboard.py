"""``hpo dashboard``: optuna-dashboard on the study storage, watched in a real headless Chromium while
real workers run a study on real PostgreSQL; its HTTP API for finished studies (stored definition,
learning curves, artifacts); and one-line errors for bad storage URLs and occupied ports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from background import Output, free_port, stop
from conftest import cli_env, require_real, run_cli, start_cli
from studyfiles import quadratic_study

from hpo._dashboard_data import figure_id
from hpo._records import LEGACY_METRICS_ATTR
from hpo.studies import DEFINITION_ATTR, stored_definition

CHROMIUM = "/usr/bin/chromium"
VIEWPORT_WIDTH = 1400
SEVERAL = "hpo_dashboard_objectives:several_metrics"  # loss, train_loss and val_acc each epoch
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Background processes of one test, stopped at its end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        stop(proc)


def start_dashboard(procs: list[subprocess.Popen[str]], *args: str) -> tuple[Output, str]:
    proc = start_cli(["dashboard", *args])
    procs.append(proc)
    out = Output(proc)
    url = out.wait_for(r"on (http://\S+/dashboard)").group(1)
    return out, url


def page_width(page: Any) -> int:
    """How wide the page's content is, in CSS pixels (more than the window: it scrolls sideways)."""
    return int(page.evaluate("document.documentElement.scrollWidth"))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


@pytest.mark.slow
@pytest.mark.postgres
def test_browser_sees_the_running_study_its_trial_count_grow_and_learning_curves(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    if shutil.which(CHROMIUM) is None:
        require_real(f"Debian's chromium is not installed at {CHROMIUM} (run scripts/ci-browser.sh)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        require_real("playwright is not installed (pip install -e '.[dev]')")

    n_trials = 10
    study_file = quadratic_study(
        tmp_path, name="live-quad", n_trials=n_trials, epochs=4, sleep=0.5, objective=SEVERAL
    )
    # Create the study before the dashboard and the worker open the database: a fresh PostgreSQL
    # database gets Optuna's tables exactly once.
    created = run_cli(["create-study", str(study_file), "--storage", postgres_url])
    assert created.returncode == 0, created.stderr
    out, url = start_dashboard(procs, "--storage", postgres_url, "--port", str(free_port()))
    assert url.startswith("http://127.0.0.1:")
    assert "warning" not in out.text
    worker = start_cli(["worker", "--study-name", "live-quad", "--storage", postgres_url, "--no-progress"])
    procs.append(worker)
    worker_out = Output(worker)

    with sync_playwright() as pw:
        # Debian's Chromium with a fresh, empty profile in the test's folder.
        browser = pw.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": VIEWPORT_WIDTH, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            # The dashboard refreshes a study every 10 s (its "Live Update"); give assertions time.
            expect.set_options(timeout=60_000)

            # The study list shows the study; its page lists its user attributes, short ones only
            # (the definition is in the note, below).
            page.goto(url)
            page.get_by_text(re.compile(r"^\d+\. live-quad$")).click()
            study_url = page.url.rstrip("/")
            expect(page.get_by_text("Study User Attributes")).to_be_visible()
            expect(page.get_by_text("hpo:uid", exact=True)).to_be_visible()
            expect(page.get_by_text(DEFINITION_ATTR, exact=True)).to_have_count(0)

            # The learning curves: Optuna's intermediate values plot, one line per trial.
            curves = page.locator(".MuiCard-root", has_text="Intermediate values")
            expect(curves.get_by_text("trial #0")).to_be_visible()
            assert curves.locator(".scatterlayer .trace").count() >= 1

            # The trial list fills as trials complete, by the dashboard's live update (no reload).
            page.goto(f"{study_url}/trials")
            expect(page.get_by_text(f"{n_trials} Trials")).to_be_visible()
            complete = page.locator(
                ".MuiListItemButton-root .MuiChip-label", has_text=re.compile(r"^Complete$")
            )
            before = complete.count()
            assert before < n_trials, "the study finished before the browser could watch it"
            expect(complete.nth(before)).to_be_visible()  # one more than before
            grown = complete.count()
            assert before < grown <= n_trials
            page.screenshot(path=str(tmp_path / "trials.png"))

            # A finished trial's page lists its learning curve epoch by epoch.
            page.get_by_text("Trial 0", exact=True).first.click()
            expect(page.get_by_text("Intermediate Values")).to_be_visible()
            study = optuna.load_study(study_name="live-quad", storage=postgres_url)
            trial0 = study.trials[0]
            assert sorted(trial0.intermediate_values) == [1, 2, 3, 4]
            for step, value in trial0.intermediate_values.items():
                expect(page.get_by_text(f"{step} {value}", exact=True)).to_be_visible()
            # Its attributes are short: the last epoch's metrics, not the whole history; nothing
            # makes the page wider than the window (the history once made it ~10,000 px wide).
            # (The dashboard shows an attribute as one paragraph, "key value".)
            expect(page.get_by_text(re.compile(r'^last_epoch \{"epoch": 4, "loss": '))).to_be_visible()
            expect(page.get_by_text(re.compile(rf"^{LEGACY_METRICS_ATTR} "))).to_have_count(0)
            page.screenshot(path=str(tmp_path / "trial.png"), full_page=True)
            assert page_width(page) <= VIEWPORT_WIDTH, "the trial page overflows sideways"

            # The study's page: one figure per metric, by name, with every finished trial's curve.
            page.goto(study_url)
            for metric in ("loss", "train_loss", "val_acc"):
                plot = page.locator(f'[id="user-defined-plot:{figure_id(metric)}"]')
                expect(plot.get_by_text(f"{metric} by epoch (hpo, one line per trial)")).to_be_attached()
                expect(plot.locator(".scatterlayer .trace").first).to_be_attached()
            plot = page.locator(f'[id="user-defined-plot:{figure_id("val_acc")}"]')
            plot.scroll_into_view_if_needed()
            expect(plot.get_by_text("trial #0", exact=True)).to_be_visible()  # the legend names trials
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
            assert page_width(page) <= VIEWPORT_WIDTH, "the study page overflows sideways"

            # The study's note: the stored definition as YAML.
            page.get_by_role("link", name="Note").click()
            expect(page.get_by_text("Study definition of live-quad")).to_be_visible()
            definition = page.locator("pre").filter(has_text=f"objective: {SEVERAL}")
            expect(definition).to_be_visible()
            expect(definition).to_contain_text("metric: loss")
            expect(definition).to_contain_text(f"n_trials: {n_trials}")
            page.screenshot(path=str(tmp_path / "note.png"), full_page=True)
            assert page_width(page) <= VIEWPORT_WIDTH, "the note overflows sideways"
        finally:
            browser.close()
    assert worker.poll() is None or worker.returncode == 0, worker_out.text


PARETO_STUDY = """\
name: pareto
objective: hpo_pareto_objectives:two_metrics
search_space:
  x: {type: float, low: -3, high: 5}
metric: [left, right]
direction: [minimize, minimize]
budget: {max_epochs: 2}
sampler: {name: random, seed: 3}
n_trials: 12
"""


@pytest.mark.slow
def test_browser_shows_a_multi_objective_studys_pareto_front_by_metric_name(
    sqlite_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A finished two-metric study (left = x^2, right = (x-2)^2, both minimised) on the dashboard:
    the Pareto Front card names the metrics on its axes' selectors and plots every trial, the front
    (what `optuna best-trials` reads) highlighted; the Best Trials card lists the front."""
    if shutil.which(CHROMIUM) is None:
        require_real(f"Debian's chromium is not installed at {CHROMIUM} (run scripts/ci-browser.sh)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        require_real("playwright is not installed (pip install -e '.[dev]')")

    study_file = tmp_path / "pareto.yaml"
    study_file.write_text(PARETO_STUDY)
    worker = run_cli(["worker", str(study_file), "--storage", sqlite_url, "--no-progress"])
    assert worker.returncode == 0, worker.stdout + worker.stderr
    study = optuna.load_study(study_name="pareto", storage=sqlite_url)
    front = sorted(study.best_trials, key=lambda t: t.number)
    assert 1 < len(front) < len(study.trials) == 12  # a front worth drawing, and trials off it
    _, url = start_dashboard(procs, "--storage", sqlite_url, "--port", str(free_port()))

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": VIEWPORT_WIDTH, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.goto(url)
            page.get_by_text(re.compile(r"^\d+\. pareto$")).click()

            # The metric names, not "Objective 0" and "Objective 1", on the axes' selectors.
            card = page.locator(".MuiCard-root", has_text="Pareto Front")
            expect(card.locator("fieldset", has_text="Objective X:")).to_contain_text("left")
            expect(card.locator("fieldset", has_text="Objective Y:")).to_contain_text("right")
            expect(card).not_to_contain_text("Objective 0")

            # Every trial is a point; the front's points are the "Best Trial" trace, with the
            # values Optuna's best_trials has (plotly keeps the drawn data on the graph's div).
            plot = card.locator("#graph-pareto-front")
            expect(plot.locator(".scatterlayer .point")).to_have_count(len(study.trials))
            drawn = plot.evaluate("gd => gd.data.map(t => ({kind: t.hovertemplate, x: t.x, y: t.y}))")
            (best,) = [t for t in drawn if "Best Trial" in t["kind"]]
            assert sorted(zip(best["x"], best["y"], strict=True)) == sorted(
                (t.values[0], t.values[1]) for t in front
            )
            best_card = page.locator(".MuiCard-root", has_text="Best Trials")
            for trial in front:
                expect(best_card.get_by_text(f"Trial {trial.number}", exact=True)).to_be_visible()
            page.screenshot(path=str(tmp_path / "pareto.png"), full_page=True)
            assert page_width(page) <= VIEWPORT_WIDTH, "the study page overflows sideways"
        finally:
            browser.close()


@pytest.mark.slow
def test_api_serves_the_definition_learning_curves_and_artifacts_of_a_study(
    sqlite_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    artifact_dir = tmp_path / "artifacts"
    study_file = quadratic_study(
        tmp_path, name="arts", n_trials=2, epochs=3, objective="hpo_artifact_objectives:quadratic_with_report"
    )
    env = cli_env({"HPO_ARTIFACT_DIR": str(artifact_dir)})
    worker = run_cli(["worker", str(study_file), "--storage", sqlite_url, "--no-progress"], env=env)
    assert worker.returncode == 0, worker.stdout + worker.stderr

    out, url = start_dashboard(
        procs, "--storage", sqlite_url, "--port", str(free_port()), "--artifact-dir", str(artifact_dir)
    )
    assert "warning" not in out.text
    base = url.removesuffix("/dashboard")
    study = optuna.load_study(study_name="arts", storage=sqlite_url)

    (summary,) = get_json(f"{base}/api/studies")["study_summaries"]
    assert summary["study_name"] == "arts"
    attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
    assert set(attrs) == {"hpo:uid"}  # the definition is no user attribute ...

    detail = get_json(f"{base}/api/studies/{summary['study_id']}")
    # ... but the study's note, as YAML
    definition = re.search(r"```yaml\n(.*?)```", detail["note"]["body"], re.DOTALL)
    assert definition and yaml.safe_load(definition.group(1)) == stored_definition(study)
    # the study metric's figure, a line per trial
    (shown_figure,) = detail["plotly_graph_objects"]
    assert shown_figure["id"] == figure_id("loss")
    assert [t["name"] for t in json.loads(shown_figure["graph_object"])["data"]] == ["trial #0", "trial #1"]
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
    for shown, trial in zip(detail["trials"], study.trials, strict=True):
        curve = {point["step"]: point["value"] for point in shown["intermediate_values"]}
        assert curve == trial.intermediate_values
        assert list(curve) == [1, 2, 3]
        (artifact,) = shown["artifacts"]
        assert artifact["filename"] == "report.txt"
        body = get_text(
            f"{base}/artifacts/{summary['study_id']}/{shown['trial_id']}/{artifact['artifact_id']}"
        )
        assert body == (
            f"trial {trial.number} x={trial.params['x']} y={trial.params['y']} value={trial.value}\n"
        )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_an_occupied_port_is_one_clear_line(sqlite_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["dashboard", "--storage", sqlite_url, "--port", str(port)], timeout=60)
    line = one_error_line(result)
    assert line.startswith(f"error: port {port} on 127.0.0.1 is in use (fix: --port N")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://localhost/db", "unsupported database 'mongodb'"),
        ("not a url", "is not a database URL"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", "cannot open storage"),
        ("grpc://127.0.0.1", "expected grpc://HOST:PORT"),
    ],
)
def test_a_bad_storage_url_is_one_clear_line(url: str, expected: str) -> None:
    result = run_cli(["dashboard", "--storage", url, "--port", str(free_port())], timeout=60)
    line = one_error_line(result)
    assert expected in line
    assert "fix:" in line


def test_an_unknown_host_is_one_clear_line(sqlite_url: str) -> None:
    result = run_cli(["dashboard", "--storage", sqlite_url, "--host", "no-such-host.invalid"], timeout=60)
    assert "cannot listen on host 'no-such-host.invalid'" in one_error_line(result)


def test_listening_beyond_loopback_is_an_explicit_choice_with_a_warning(
    sqlite_url: str, procs: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    out, _ = start_dashboard(procs, "--storage", sqlite_url, "--host", "0.0.0.0", "--port", str(port))
    warning = out.wait_for(r"^warning: the dashboard listens on 0\.0\.0\.0:\d+").string
    assert "reachable from other machines" in warning and "no authentication" in warning
    assert get_json(f"http://127.0.0.1:{port}/api/studies") == {"study_summaries": []}
