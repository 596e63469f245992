"""Progress people expect: where a trial stands in its study ("trial k/N"), the best value so far,
a comparison's time left, and ``hpo status`` counts that add up.

Unit tests on the numbers (:mod:`hpo._progress` computes them apart from drawing), then the CLI as
a user runs it: ``hpo status`` of a fresh study and after a retry, piped without a split number,
a worker's lines, and the live epoch bar on a real terminal (``script`` gives the worker a pty).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import ROOT, cli_env, require_real, run_cli, start_cli
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from studyfiles import quadratic_study

from hpo._progress import (
    UNWRAPPED_WIDTH,
    ComparisonProgress,
    EpochBar,
    StudyCounts,
    better,
    count_trials,
    eta_seconds,
    finish_note,
    format_duration,
    overall_line,
    report_console,
    trial_label,
)
from hpo._rdb import FAILED_TRIAL_ATTR, RETRY_HISTORY_ATTR, RETRY_OF_ATTR

X = FloatDistribution(-5, 5)


def trial(number: int, state: TrialState, value: float | None = None, **system: Any) -> FrozenTrial:
    made = optuna.trial.create_trial(
        state=state,
        value=value,
        params={"x": 1.0} if state != TrialState.WAITING else {},
        distributions={"x": X} if state != TrialState.WAITING else {},
        system_attrs=system,
    )
    made.number = number
    return made


def retry_of(
    number: int, state: TrialState, of: int, history: list[int], value: float | None = None
) -> FrozenTrial:
    attrs = {RETRY_OF_ATTR: of, FAILED_TRIAL_ATTR: history[0], RETRY_HISTORY_ATTR: history}
    return trial(number, state, value, **attrs)


# ---------------------------------------------------------------------------------- the numbers


def test_a_fresh_study_is_zero_of_n_done_with_every_slot_waiting() -> None:
    counts = count_trials([trial(i, TrialState.WAITING) for i in range(20)], 20, "minimize")
    assert counts.done_text() == "0/20 done"
    assert (counts.waiting, counts.running, counts.retried, counts.best) == (20, 0, 0, None)
    assert counts.states_text() == "complete=0  pruned=0  fail=0  running=0  waiting=20  retried=0"


def test_retried_attempts_are_not_trials_and_the_counts_add_up() -> None:
    trials = [
        trial(0, TrialState.FAIL),  # died, retried as 3, which died too, retried as 4
        trial(1, TrialState.COMPLETE, 2.0),
        trial(2, TrialState.FAIL),  # failed for good (an exception: not retried)
        retry_of(3, TrialState.FAIL, of=0, history=[0]),
        retry_of(4, TrialState.COMPLETE, of=3, history=[0, 3], value=1.5),
        trial(5, TrialState.PRUNED),
        trial(6, TrialState.RUNNING),
        trial(7, TrialState.WAITING),
    ]
    counts = count_trials(trials, 6, "minimize")
    assert (counts.complete, counts.pruned, counts.failed, counts.retried) == (2, 1, 1, 2)
    assert (counts.done, counts.running, counts.waiting) == (4, 1, 1)
    assert counts.done + counts.running + counts.waiting == counts.planned == 6
    assert counts.best == 1.5


def test_a_retry_chain_known_only_by_its_history_is_still_counted_once() -> None:
    # an attempt named only in a later retry's retry_history (its direct retry was retried again)
    trials = [trial(0, TrialState.FAIL), trial(1, TrialState.FAIL, **{RETRY_HISTORY_ATTR: [0]})]
    trials.append(retry_of(2, TrialState.WAITING, of=1, history=[0, 1]))
    counts = count_trials(trials, 1, "minimize")
    assert (counts.retried, counts.waiting, counts.done, counts.planned) == (2, 1, 0, 1)


def test_position_counts_claims_and_never_exceeds_n() -> None:
    # one worker: each new claim is the next k; a retry takes the place of its attempt
    first = count_trials([trial(0, TrialState.RUNNING), trial(1, TrialState.WAITING)], 2, "minimize")
    assert first.position == 1 and trial_label(0, first) == "trial 1/2 (#0)"
    second = count_trials([trial(0, TrialState.COMPLETE, 1.0), trial(1, TrialState.RUNNING)], 2, "minimize")
    assert second.position == 2
    retried = count_trials(
        [trial(0, TrialState.FAIL), trial(1, TrialState.WAITING), retry_of(2, TrialState.RUNNING, 0, [0])],
        2,
        "minimize",
    )
    assert retried.position == 1
    # stale RUNNING trials of dead workers (not failed yet) cannot push k past N
    stale = StudyCounts(planned=3, complete=2, running=3)
    assert stale.position == 3
    assert StudyCounts(planned=3).position == 1


def test_planned_follows_an_extension_made_after_the_definition_was_read() -> None:
    counts = count_trials([trial(i, TrialState.WAITING) for i in range(8)], 5, "minimize")
    assert counts.planned == 8 and counts.done_text() == "0/8 done"


def test_best_so_far_follows_the_direction_and_is_none_for_several_objectives() -> None:
    trials = [
        trial(0, TrialState.COMPLETE, 3.0),
        trial(1, TrialState.COMPLETE, 1.0),
        trial(2, TrialState.PRUNED),
    ]
    assert count_trials(trials, 3, "minimize").best == 1.0
    assert count_trials(trials, 3, "maximize").best == 3.0
    assert count_trials(trials, 3, ["minimize", "minimize"]).best is None
    assert better("minimize", 2.0, 1.0) == 1.0 and better("maximize", 2.0, 1.0) == 2.0
    assert better("minimize", None, float("nan")) is None and better("minimize", 2.0, None) == 2.0


def test_finish_note_says_trial_k_of_n_and_the_best() -> None:
    counts = StudyCounts(planned=20, complete=2, running=1, best=0.5)
    assert finish_note(counts, 0.41) == "trial 3/20 of the study, best 0.41"
    assert finish_note(counts, None) == "trial 3/20 of the study"
    assert finish_note(None, 0.41) == ""


def test_counts_after_a_running_trial_ends_equal_counting_the_study_again() -> None:
    """A fused group's members leaving together share one read of the study: the counts brought
    forward by each result equal a fresh count; a failure (which may queue a retry) asks for one."""
    ran = [trial(0, TrialState.COMPLETE, 0.5), trial(1, TrialState.RUNNING), trial(2, TrialState.RUNNING)]
    ran += [trial(3, TrialState.WAITING)]
    for direction in ("minimize", "maximize"):
        counts = count_trials(ran, 5, direction)
        ends = [trial(1, TrialState.COMPLETE, 0.2), trial(2, TrialState.PRUNED)]
        now = list(ran)
        for ended in ends:
            after = counts.after(ended, direction)
            now = [ended if t.number == ended.number else t for t in now]
            assert after == count_trials(now, 5, direction)
            assert after is not None and after.position == counts.position
            counts = after
        assert counts.best == (0.2 if direction == "minimize" else 0.5)
    assert count_trials(ran, 5, "minimize").after(trial(1, TrialState.FAIL), "minimize") is None


def test_eta_is_the_time_left_at_the_rate_trials_finished_here() -> None:
    assert eta_seconds(total=100, done=30, done_at_start=10, elapsed=40.0) == pytest.approx(140.0)
    assert eta_seconds(total=100, done=10, done_at_start=10, elapsed=40.0) is None  # nothing finished yet
    assert eta_seconds(total=100, done=100, done_at_start=10, elapsed=40.0) == 0.0
    assert (
        format_duration(45.2) == "45s"
        and format_duration(725) == "12m05s"
        and format_duration(10920) == "3h02m"
    )
    assert (
        overall_line(120, 37, 1, 72.0)
        == "compare: 37/120 trials done (30%), 1m12s elapsed, about 2m46s left"  # 83 left at 36 per 72 s
    )
    assert overall_line(120, 0, 0, 5.0).endswith("estimating time left")


def test_comparison_progress_counts_finished_slots_not_requeued_attempts() -> None:
    overall = ComparisonProgress(total=4, done_at_start=1, started=100.0)
    overall.trial_ended(TrialState.FAIL, requeued=True)  # its retry is still to run
    overall.trial_ended(None, requeued=False)  # given up: another worker runs it
    assert overall.done == 1
    overall.trial_ended(TrialState.COMPLETE, requeued=False)
    overall.trial_ended(TrialState.FAIL, requeued=False)
    assert overall.line(110.0) == "compare: 3/4 trials done (75%), 10s elapsed, about 5s left"


def test_epoch_bar_shows_trial_k_of_n_the_metric_and_the_best_so_far() -> None:
    console = Console(record=True, force_terminal=True, width=120)
    bar = EpochBar(console, "val_loss")
    counts = StudyCounts(planned=20, complete=2, running=1, best=0.25)
    with bar.shown(7, 5, counts):
        bar.epoch(2, 0.5)
        console.print(bar.renderable())
    text = console.export_text()
    assert "trial 3/20 (#7)" in text and "2/5" in text
    assert "val_loss=0.5  best=0.25" in text


def test_report_console_does_not_wrap_when_not_a_terminal() -> None:
    console = report_console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal and console.width == UNWRAPPED_WIDTH


# ---------------------------------------------------------------------------------- the CLI


def _numbers_in_k_of_n(text: str) -> list[tuple[int, int]]:
    return [(int(k), int(n)) for k, n in re.findall(r"trial (\d+)/(\d+) of the study", text)]


@pytest.mark.slow
def test_status_of_a_fresh_study_is_zero_of_n_done(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=5)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    status = run_cli(["status", "quad", "--storage", sqlite_url])
    assert status.returncode == 0, status.stderr
    assert "study quad: 0/5 done" in status.stdout
    assert "complete=0  pruned=0  fail=0  running=0  waiting=5  retried=0" in status.stdout
    listing = run_cli(["status", "--storage", sqlite_url])
    assert listing.returncode == 0, listing.stderr
    assert "done/planned" in listing.stdout and re.search(r"│ quad\s+│ minimize\s+│ 0/5\s+│", listing.stdout)


@pytest.mark.slow
def test_status_after_a_retry_adds_up_and_the_worker_says_trial_k_of_n(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = quadratic_study(tmp_path, n_trials=3, epochs=2, objective="hpo_test_objectives:dies_once")
    env = cli_env({"HPO_TEST_MARKERS": str(tmp_path / "markers")})
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    worker = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, "--no-progress"], env=env)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert re.search(r"trial 0 FAIL .*re-queued\); trial 1/3 of the study", worker.stdout), worker.stdout
    # the retry takes its attempt's place (1/3 again), then 2/3 and 3/3: k never passes N
    assert _numbers_in_k_of_n(worker.stdout) == [(1, 3), (1, 3), (2, 3), (3, 3)], worker.stdout
    assert re.search(r"trial 3/3 of the study, best \d", worker.stdout)

    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert len(trials) == 4  # three planned trials plus the attempt that died
    status = run_cli(["status", "quad", "--storage", sqlite_url])
    assert status.returncode == 0, status.stderr
    assert "study quad: 3/3 done" in status.stdout
    assert "complete=3  pruned=0  fail=0  running=0  waiting=0  retried=1" in status.stdout, status.stdout


LONG_PARAMS_STUDY = """\
name: longparams
objective: hpo_test_objectives:marker_then_sleep
settings: {sleep: 1.0}
search_space:
  x: {type: float, low: -5, high: 5}
  y: {type: float, low: -5, high: 5}
  learning_rate_of_the_encoder: {type: float, low: 1.0e-7, high: 1.0e-1, log: true}
  weight_decay_of_the_encoder: {type: float, low: 1.0e-9, high: 1.0e-2, log: true}
  dropout_probability: {type: float, low: 0.0, high: 0.9}
metric: loss
direction: minimize
budget: {max_epochs: 60}
sampler: {name: random, seed: 3}
pruner: {name: none}
n_trials: 1
"""


@pytest.mark.slow
def test_piped_status_never_splits_a_parameter_value(tmp_path: Path, sqlite_url: str) -> None:
    path = tmp_path / "longparams.yaml"
    path.write_text(LONG_PARAMS_STUDY)
    markers = tmp_path / "markers"
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    worker = start_cli(
        ["worker", "--study-name", "longparams", "--storage", sqlite_url, "--no-progress"], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not (markers / "trial-0.started").exists():
            assert time.monotonic() < deadline and worker.poll() is None, "the trial never started"
            time.sleep(0.2)
        status = run_cli(["status", "longparams", "--storage", sqlite_url])  # stdout is a pipe
    finally:
        worker.terminate()
        worker.communicate(timeout=120)
    assert status.returncode == 0, status.stderr
    running = optuna.load_study(study_name="longparams", storage=sqlite_url).trials[0]
    row = next(line for line in status.stdout.splitlines() if "learning_rate_of_the_encoder=" in line)
    assert len(row) > 80, "the row is long enough that an 80-column console would have wrapped it"
    for name, value in running.params.items():
        assert f"{name}={value}" in row, (name, value, status.stdout)


@pytest.mark.slow
def test_live_epoch_bar_on_a_terminal_shows_the_metric_best_and_trial_k_of_n(
    tmp_path: Path, sqlite_url: str
) -> None:
    script = shutil.which("script")
    if script is None:
        require_real("`script` (util-linux) is needed to give the worker a terminal")
    path = quadratic_study(tmp_path, n_trials=2, epochs=3, sleep=0.3)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    command = f"{sys.executable} -m hpo worker --study-name quad --storage {sqlite_url}"
    typescript = tmp_path / "typescript"
    env = cli_env({"COLUMNS": "160", "TERM": "xterm"})
    done = subprocess.run(
        [str(script), "-q", "-e", "-c", command, str(typescript)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", typescript.read_text(errors="replace"))
    assert re.search(r"trial 1/2 \(#0\) .* 3/3 loss=\d+\.\d+\s+best=-", screen), screen
    assert re.search(r"trial 2/2 \(#1\) .* loss=\d+\.\d+\s+best=\d+\.\d+", screen), screen
