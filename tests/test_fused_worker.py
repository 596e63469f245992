"""``hpo worker --fuse K`` end to end: real CLI processes, real SQLite / PostgreSQL, the digits MLP.

A fused run gives every trial the value and curves of an unfused ``hpo worker`` run of the same
study (relative tolerance 1e-5: batched matmuls and torch's fused optimizer kernels round
differently, measured ~7e-7 here with SGD); a pruned member leaves its group while the others go
on; a trial that cannot fuse starts the next group or runs alone, and a group takes the queued
grid points that fuse with it (report 002's interleaved batch sizes); a worker SIGKILLed mid-group
leaves its members to the heartbeat/lease mechanism, which fails and retries each exactly once.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from background import Output
from conftest import cli_env, run_cli, start_cli, write_study
from optuna.trial import FrozenTrial, TrialState

from hpo._rdb import RETRY_OF_ATTR
from hpo._records import trial_metrics

pytestmark = pytest.mark.slow
FAST_BEAT = ["--heartbeat-interval", "1", "--grace-period", "8", "--no-progress"]
REL_TOL = 1e-5
ENV = cli_env({"OMP_NUM_THREADS": "1"})


def digits_study(
    directory: Path,
    name: str,
    lrs: list[float],
    *,
    epochs: int = 4,
    hidden: int = 32,
    batch: int = 64,
    pruner: str = "none",
    lone_adam: bool = True,
) -> Path:
    """A grid of SGD learning rates (fusable), then, with ``lone_adam``, one Adam trial (not)."""
    optimizers = "[sgd, adam]" if lone_adam else "[sgd]"
    pruner_block = (
        "pruner: {name: median, options: {n_startup_trials: 4, n_warmup_steps: 1}}"
        if pruner == "median"
        else "pruner: none"
    )
    body = f"""
name: {name}
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: {hidden}, hidden_layers: 2, batch_size: {batch}, scheduler: step, step_size: 2,
  gamma: 0.5}}
search_space:
  optimizer: {{type: categorical, choices: {optimizers}}}
  lr: {{type: categorical, choices: {lrs}, when: {{optimizer: [sgd]}}}}
metric: val_loss
direction: minimize
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: grid
{pruner_block}
"""
    return write_study(directory, body, f"{name}.yaml")


def worker(url: str, name: str, checkpoints: Path, *extra: str) -> list[str]:
    return [
        "worker",
        "--study-name",
        name,
        "--storage",
        url,
        "--checkpoint-dir",
        str(checkpoints),
        *FAST_BEAT,
        *extra,
    ]


def by_params(url: str, name: str) -> dict[tuple[Any, ...], FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    return {tuple(sorted(t.params.items())): t for t in trials if t.state != TrialState.FAIL}


def assert_close(fused: FrozenTrial, unfused: FrozenTrial) -> None:
    assert fused.state == unfused.state, (fused.params, fused.state, unfused.state)
    assert fused.intermediate_values.keys() == unfused.intermediate_values.keys(), fused.params
    for step, value in unfused.intermediate_values.items():
        assert fused.intermediate_values[step] == pytest.approx(value, rel=REL_TOL), (fused.params, step)
    fused_curves, unfused_curves = trial_metrics(fused), trial_metrics(unfused)
    assert fused_curves.keys() == unfused_curves.keys() == {"val_loss", "val_acc", "train_loss"}
    for metric, values in unfused_curves.items():
        assert fused_curves[metric] == pytest.approx(values, rel=REL_TOL), (fused.params, metric)
    if unfused.state == TrialState.COMPLETE:
        assert fused.value == pytest.approx(unfused.value, rel=REL_TOL), fused.params


def run_both(url: str, tmp_path: Path, fused: str, unfused: str, k: int, files: bool = False) -> str:
    """The fused and the unfused worker side by side; the fused worker's output. ``files``: the
    workers create the studies from their files (else ``hpo create-study`` has)."""

    def args(name: str, *extra: str) -> list[str]:
        if files:
            return [
                "worker",
                str(tmp_path / f"{name}.yaml"),
                *worker(url, name, tmp_path / f"ck_{name}", *extra)[3:],
            ]
        return worker(url, name, tmp_path / f"ck_{name}", *extra)

    procs = [start_cli(args(fused, "--fuse", str(k)), env=ENV), start_cli(args(unfused), env=ENV)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs[0]


def test_fused_trials_equal_unfused_ones_and_unfusable_trials_run_alone(
    tmp_path: Path, sqlite_url: str
) -> None:
    lrs = [0.2, 0.1, 0.05, 0.02, 0.01]
    paths = [digits_study(tmp_path, name, lrs) for name in ("fused", "unfused")]
    creating = [start_cli(["create-study", str(path), "--storage", sqlite_url], env=ENV) for path in paths]
    assert [c.wait(timeout=300) for c in creating] == [0, 0]
    out = run_both(sqlite_url, tmp_path, "fused", "unfused", 4)
    # grid order: sgd x 5 learning rates, then adam: one group of 4, then the 5th SGD trial alone
    # (the queued Adam trial cannot join it: its grid point says so, so it is not even claimed),
    # then the Adam trial alone
    assert "trials 0, 1, 2, 3 train as one fused group" in out, out
    assert "starts the next group" not in out, out
    assert out.count("train as one fused group") == 1, out
    fused, unfused = by_params(sqlite_url, "fused"), by_params(sqlite_url, "unfused")
    assert len(fused) == len(unfused) == 6 and fused.keys() == unfused.keys()
    for key, trial in unfused.items():
        assert trial.state == TrialState.COMPLETE
        assert_close(fused[key], trial)
    # nothing doubled: 6 trials, each told once, no failures, no retries
    assert len(optuna.load_study(study_name="fused", storage=sqlite_url).get_trials()) == 6


def test_a_grid_over_batch_sizes_fuses_the_queued_trials_of_each_batch_size(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Report 002's grid is learning rate x batch size, the batch size varying fastest in the
    # queue: consecutive trials never fuse. The group takes the queued grid points that fuse with
    # its first member instead; the others stay queued for the next group.
    body = """
name: bs_grid
objective: digits_mlp
data: {val_fraction: 0.2}
settings: {hidden_units: 32, hidden_layers: 2, optimizer: sgd, scheduler: none}
search_space:
  lr: {type: float, low: 0.01, high: 0.2, log: true, grid: [0.1, 0.05, 0.02]}
  batch_size: {type: int, low: 16, high: 128, grid: [32, 64]}
metric: val_loss
direction: minimize
budget: {max_epochs: 2}
seed: 0
sampler: grid
"""
    path = write_study(tmp_path, body, "bs_grid.yaml")
    args = ["worker", str(path), *worker(sqlite_url, "bs_grid", tmp_path / "ck", "--fuse", "3")[3:]]
    result = run_cli(args, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trials 0, 2, 4 train as one fused group" in result.stdout, result.stdout
    assert "trials 1, 3, 5 train as one fused group" in result.stdout, result.stdout
    trials = optuna.load_study(study_name="bs_grid", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6  # each point once, nothing failed
    assert [t.params["batch_size"] for t in trials] == [32, 64] * 3
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)


def test_two_fused_workers_racing_over_a_batch_size_grid_train_each_point_once(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Both workers skip and pick queued grid points by their batch size at the same moments: the
    # conditional claim lets one of them win each point; none is trained twice or lost.
    lrs = [0.1, 0.07, 0.05, 0.03, 0.02, 0.01]
    body = f"""
name: race
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: 16, hidden_layers: 1, optimizer: sgd, scheduler: none}}
search_space:
  lr: {{type: float, low: 0.005, high: 0.2, log: true, grid: {lrs}}}
  batch_size: {{type: int, low: 16, high: 128, grid: [32, 64]}}
metric: val_loss
direction: minimize
budget: {{max_epochs: 2}}
seed: 0
sampler: grid
"""
    path = write_study(tmp_path, body, "race.yaml")
    assert run_cli(["create-study", str(path), "--storage", sqlite_url], env=ENV).returncode == 0
    procs = [
        start_cli(worker(sqlite_url, "race", tmp_path / f"ck{i}", "--fuse", "3"), env=ENV) for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = optuna.load_study(study_name="race", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12, outputs
    points = Counter((t.params["lr"], t.params["batch_size"]) for t in trials)
    assert set(points.values()) == {1} and len(points) == 12
    assert sum(out.count("train as one fused group") for out in outputs) >= 2, outputs


def test_a_pruned_member_leaves_its_group_and_the_others_go_on(tmp_path: Path, postgres_url: str) -> None:
    # group 1: four middling learning rates (they complete: the median pruner's startup trials);
    # group 2: two learning rates too small to learn are pruned early, two better ones finish.
    lrs = [0.02, 0.01, 0.005, 0.003, 1e-4, 0.1, 2e-4, 0.05]
    for name in ("fusedp", "unfusedp"):
        digits_study(tmp_path, name, lrs, pruner="median", lone_adam=False)
    out = run_both(postgres_url, tmp_path, "fusedp", "unfusedp", 4, files=True)
    assert "trials 4, 5, 6, 7 train as one fused group" in out, out
    fused, unfused = by_params(postgres_url, "fusedp"), by_params(postgres_url, "unfusedp")
    states = Counter(t.state for t in fused.values())
    assert states == {TrialState.COMPLETE: 6, TrialState.PRUNED: 2}, states
    for key, trial in fused.items():
        lr = dict(key)["lr"]
        if lr < 1e-3:  # left the group early, with its own curve up to there
            assert trial.state == TrialState.PRUNED and len(trial.intermediate_values) < 4
            assert len(trial_metrics(trial)["train_loss"]) == len(trial.intermediate_values)
        else:  # the others trained all 4 epochs, exactly as the unfused run did
            assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
        assert_close(trial, unfused[key])
    # each member's result was told when it left: the pruned ones before the group ended
    finished = {t.params["lr"]: t.datetime_complete for t in fused.values()}
    assert finished[1e-4] < finished[0.1] and finished[2e-4] < finished[0.05]


def test_sigkill_of_a_fused_worker_leaves_its_members_to_the_lease_mechanism(
    tmp_path: Path, sqlite_url: str
) -> None:
    lrs = [0.1, 0.05, 0.02, 0.01]
    # long enough (about 20 s of training for the group) that the kill lands mid-group
    path = digits_study(tmp_path, "killed", lrs, epochs=25, hidden=256, batch=16, lone_adam=False)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url], env=ENV).returncode == 0
    checkpoints = tmp_path / "ck"
    victim = start_cli(worker(sqlite_url, "killed", checkpoints, "--fuse", "4"), env=ENV)
    out = Output(victim)
    try:
        out.wait_for("train as one fused group", timeout=120)
        deadline = time.monotonic() + 120
        while len(list(checkpoints.rglob("*.pt"))) < 4:  # every member has checkpointed an epoch
            assert time.monotonic() < deadline and victim.poll() is None, out.text
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = optuna.load_study(study_name="killed", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in killed) == {TrialState.RUNNING: 4}, out.text  # caught mid-group
    # A new worker finds them stale (no heartbeat for 8 s), fails and re-queues each once, and
    # resumes every retry from its own checkpoint, fused again.
    rescue = run_cli(worker(sqlite_url, "killed", checkpoints, "--fuse", "4"), env=ENV, timeout=300)
    assert rescue.returncode == 0, rescue.stdout + rescue.stderr
    assert "train as one fused group" in rescue.stdout
    trials = optuna.load_study(study_name="killed", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 4, TrialState.COMPLETE: 4}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("heartbeat" in t.system_attrs["fail_reason"] for t in failed)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == sorted(lrs)  # nothing doubled or lost
    assert {t.system_attrs[RETRY_OF_ATTR] for t in complete} == {t.number for t in failed}
    for trial in complete:
        assert trial.user_attrs["resumed_from_epoch"] >= 1  # from its own checkpoint
        assert sorted(trial.intermediate_values) == list(range(1, 26))


def groups_in(output: str) -> list[list[int]]:
    """The fused groups a worker printed, in order, as trial numbers."""
    found = re.findall(r"trials ([\d, ]+) train as one fused group", output)
    return [[int(n) for n in group.split(", ")] for group in found]


def test_a_grid_worker_claims_the_next_group_while_the_current_one_trains(
    tmp_path: Path, sqlite_url: str
) -> None:
    # A grid's asks do not depend on results: the second group is claimed (and its parameters
    # set) during the first group's last epochs, sent to the trainer the moment the first ends,
    # and only then are the first group's results told. Each trial's values stay the unfused ones.
    lrs = [0.05, 0.03, 0.02, 0.01, 0.007, 0.005, 0.003, 0.002]  # small: rounding is not amplified
    for name in ("ahead", "plain"):
        digits_study(tmp_path, name, lrs, epochs=4, hidden=128, batch=16, lone_adam=False)
    out = run_both(sqlite_url, tmp_path, "ahead", "plain", 4, files=True)
    assert groups_in(out) == [[0, 1, 2, 3], [4, 5, 6, 7]], out
    trials = optuna.load_study(study_name="ahead", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8, out  # nothing doubled or failed
    first, second = trials[:4], trials[4:]
    claimed_next = max(t.datetime_start for t in second if t.datetime_start is not None)
    assert claimed_next < min(t.datetime_complete for t in first if t.datetime_complete is not None)
    fused, unfused = by_params(sqlite_url, "ahead"), by_params(sqlite_url, "plain")
    assert fused.keys() == unfused.keys() and len(fused) == 8
    for key, trial in unfused.items():
        assert_close(fused[key], trial)


def lr_study(directory: Path, name: str, sampler: str, *, n_trials: int) -> Path:
    """A search over the SGD learning rate alone (every trial fuses), 4 epochs of a 256-unit MLP
    at batch 16 (a group of 4 trains for about a second)."""
    body = f"""
name: {name}
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: 256, hidden_layers: 2, batch_size: 16, optimizer: sgd, scheduler: none}}
search_space:
  lr: {{type: float, low: 0.005, high: 0.2, log: true}}
metric: val_loss
direction: minimize
n_trials: {n_trials}
budget: {{max_epochs: 4}}
seed: 0
sampler: {sampler}
"""
    return write_study(directory, body, f"{name}.yaml")


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_only_samplers_that_ignore_results_claim_the_next_group_early(
    sampler: str, tmp_path: Path, sqlite_url: str
) -> None:
    # TPE's asks learn from every result: its next group is claimed after the current group's
    # results are told, so each of its asks sees them. Random asks do not: claimed early.
    path = lr_study(tmp_path, f"{sampler}_ahead", sampler, n_trials=8)
    args = ["worker", str(path), *worker(sqlite_url, f"{sampler}_ahead", tmp_path / "ck", "--fuse", "4")[3:]]
    result = run_cli(args, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert groups_in(result.stdout) == [[0, 1, 2, 3], [4, 5, 6, 7]], result.stdout
    trials = optuna.load_study(study_name=f"{sampler}_ahead", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    starts = [t.datetime_start for t in trials[4:] if t.datetime_start is not None]
    completes = [t.datetime_complete for t in trials[:4] if t.datetime_complete is not None]
    if sampler == "tpe":
        assert min(starts) >= max(completes)
    else:
        assert max(starts) < min(completes)


def test_a_worker_past_its_timeout_claims_no_group_ahead(tmp_path: Path, sqlite_url: str) -> None:
    # Claimed trials must run, so a worker whose --timeout has passed claims nothing ahead: it
    # ends with the group it is training (and one claimed before the deadline), not the study.
    path = lr_study(tmp_path, "timed", "random", n_trials=300)
    args = [
        "worker",
        str(path),
        *worker(sqlite_url, "timed", tmp_path / "ck", "--fuse", "4", "--timeout", "6")[3:],
    ]
    result = run_cli(args, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "timeout of 6s reached" in result.stdout, result.stdout
    trials = optuna.load_study(study_name="timed", storage=sqlite_url).get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] >= 4, result.stdout
    assert set(states) == {TrialState.COMPLETE, TrialState.WAITING}, result.stdout  # none left held
    # every trial it ran was claimed before its deadline (6 s after it started, so at most 6 s
    # after its first claim), however many groups this machine trains in 6 s
    starts = sorted(t.datetime_start for t in trials if t.datetime_start is not None)
    assert (starts[-1] - starts[0]).total_seconds() <= 6.0, result.stdout


WINDOW_LRS = [0.2, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01, 0.005]
WINDOW_EPOCHS = 6


def signal_in_the_window(tmp_path: Path, url: str, name: str, signum: int) -> tuple[list[FrozenTrial], str]:
    """Start a fused worker (K=4) on 8 grid points; send it ``signum`` once the study holds 8 RUNNING
    trials (the next group claimed while the first is in its last epochs, its results not told
    yet); the trials as it left them, and its output."""
    path = digits_study(
        tmp_path, name, WINDOW_LRS, epochs=WINDOW_EPOCHS, hidden=256, batch=16, lone_adam=False
    )
    assert run_cli(["create-study", str(path), "--storage", url], env=ENV).returncode == 0
    victim = start_cli(worker(url, name, tmp_path / "ck", "--fuse", "4"), env=ENV)
    out = Output(victim)
    database = url.removeprefix("sqlite:///")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and victim.poll() is None, out.text
            with contextlib.closing(sqlite3.connect(database, timeout=5)) as conn:
                states = dict(conn.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())
            if states.get("RUNNING", 0) == 8:
                break
            time.sleep(0.02)
        victim.send_signal(signum)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    out.finish(timeout=10)
    return optuna.load_study(study_name=name, storage=url).get_trials(), out.text


def rescued(tmp_path: Path, url: str, name: str) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """Run a second worker to the study's end: (every trial, the COMPLETE ones), each grid point
    COMPLETE exactly once with all its epochs."""
    rescue = run_cli(worker(url, name, tmp_path / "ck", "--fuse", "4"), env=ENV, timeout=300)
    assert rescue.returncode == 0, rescue.stdout + rescue.stderr
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == sorted(WINDOW_LRS)  # nothing doubled or lost
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}
    for trial in complete:
        assert sorted(trial.intermediate_values) == list(range(1, WINDOW_EPOCHS + 1))
    return trials, complete


def test_sigkill_while_the_next_group_is_claimed_and_results_are_held_loses_and_doubles_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The worker dies holding 8 RUNNING trials, the first four trained to (or nearly to) their
    # end. Each is failed as stale and retried once: those that had finished end at once from
    # their last checkpoint.
    killed, out = signal_in_the_window(tmp_path, sqlite_url, "window", signal.SIGKILL)
    running = [t for t in killed if t.state == TrialState.RUNNING]
    assert {t.state for t in killed} <= {TrialState.RUNNING, TrialState.COMPLETE}, out
    assert [t.number for t in running][-4:] == [4, 5, 6, 7], out  # the next group: claimed, held
    trials, complete = rescued(tmp_path, sqlite_url, "window")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)  # each failed once
    assert all("heartbeat" in t.system_attrs["fail_reason"] for t in failed)
    first_group = {t.params["lr"] for t in killed if t.number < 4}
    for trial in complete:
        if trial.params["lr"] in first_group and RETRY_OF_ATTR in trial.system_attrs:
            # trained to its last epoch or the one before when the worker died: resumed from there
            assert trial.user_attrs["resumed_from_epoch"] >= WINDOW_EPOCHS - 1


def test_sigterm_while_the_next_group_is_claimed_tells_what_finished_and_requeues_the_rest(
    tmp_path: Path, sqlite_url: str
) -> None:
    stopped, out = signal_in_the_window(tmp_path, sqlite_url, "window_term", signal.SIGTERM)
    assert "interrupted by SIGTERM" in out, out
    states = Counter(t.state for t in stopped)
    # nothing left RUNNING: the next group's trials (and any member still training) are failed
    # and re-queued at once, a result already received is told
    assert TrialState.RUNNING not in states, out
    next_group = [t for t in stopped if t.number in (4, 5, 6, 7)]
    assert all(t.state == TrialState.FAIL for t in next_group), out
    assert all("interrupted" in t.system_attrs["fail_reason"] for t in next_group)
    assert states[TrialState.WAITING] == states[TrialState.FAIL], out  # each failure re-queued once
    trials, _complete = rescued(tmp_path, sqlite_url, "window_term")
    assert sum(t.state == TrialState.FAIL for t in trials) == states[TrialState.FAIL]


GROUP_XS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]


def quadratic_group_study(
    directory: Path, name: str, timeout: float | None = None, **settings: object
) -> Path:
    """8 grid points of the fused quadratic test objective (``hpo_test_objectives.FUSED_QUADRATIC``),
    5 epochs of 0.3 s: a group of 4 trains for about 1.5 s. ``settings``: its fault switches;
    ``timeout``: budget.trial_timeout."""
    extra = "".join(f", {key}: {value}" for key, value in settings.items())
    limit = "" if timeout is None else f", trial_timeout: {timeout}"
    body = f"""
name: {name}
objective: hpo_test_objectives:FUSED_QUADRATIC
settings: {{sleep: 0.3{extra}}}
search_space:
  x: {{type: float, low: -5, high: 5, grid: {GROUP_XS}}}
  y: {{type: float, low: -5, high: 5, grid: [0.0]}}
metric: loss
direction: minimize
budget: {{max_epochs: 5{limit}}}
sampler: grid
pruner: none
"""
    return write_study(directory, body, f"{name}.yaml")


def run_group_study(
    tmp_path: Path, url: str, name: str, timeout: float | None = None, **settings: object
) -> subprocess.CompletedProcess[str]:
    path = quadratic_group_study(tmp_path, name, timeout, **settings)
    env = cli_env({"OMP_NUM_THREADS": "1", "HPO_TEST_MARKERS": str(tmp_path / "markers")})
    args = ["worker", str(path), *worker(url, name, tmp_path / "ck", "--fuse", "4")[3:]]
    return run_cli(args, env=env, timeout=300)


def assert_claimed_ahead(trials: list[FrozenTrial]) -> None:
    """Trials 4-7 were claimed (and their group sent) before trials 0-3's results were told."""
    claimed = max(t.datetime_start for t in trials[4:8] if t.datetime_start is not None)
    assert claimed < min(t.datetime_complete for t in trials[:4] if t.datetime_complete is not None)


def assert_every_point_complete_once(trials: list[FrozenTrial], out: str) -> None:
    """Each grid point COMPLETE exactly once, with all its epochs (nothing lost or doubled)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == GROUP_XS, out
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2, 3, 4, 5]


def test_a_trainer_killed_in_the_group_sent_ahead_loses_and_doubles_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The second group is sent to the trainer before the first group's results are told; the
    # trainer is SIGKILLed (as by the OOM killer) one epoch into that group. The first group's
    # results, held until then, are told; the second group's trials are failed and retried once.
    result = run_group_study(tmp_path, sqlite_url, "died_ahead", die_with=4)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (tmp_path / "markers" / "trainer-died").read_text() == "4,5,6,7", out
    assert groups_in(out)[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]], out
    trials = optuna.load_study(study_name="died_ahead", storage=sqlite_url).get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] * 4, out  # held results: told
    assert_claimed_ahead(trials)
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}, out
    assert_every_point_complete_once(trials, out)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.number for t in failed} <= {4, 5, 6, 7}, out
    assert all("killed by SIGKILL" in t.system_attrs["fail_reason"] for t in failed)
    retries = Counter(t.system_attrs.get(RETRY_OF_ATTR) for t in trials if RETRY_OF_ATTR in t.system_attrs)
    assert retries == Counter(t.number for t in failed), "each failed member retried exactly once"


def test_a_trainer_dead_before_the_worker_supervises_the_group_sent_ahead_fails_its_members(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The trainer dies as the group sent ahead starts, while the worker still tells the first
    # group's results: the worker finds it dead when it turns to that group. The group is not
    # sent again, unrecorded, to a new trainer: its members fail with the cause, counted as any
    # death of a group's trainer, and each retry runs alone.
    result = run_group_study(tmp_path, sqlite_url, "died_unseen", die_at_start_with=4)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert (tmp_path / "markers" / "trainer-died").read_text() == "4,5,6,7", out
    trials = optuna.load_study(study_name="died_unseen", storage=sqlite_url).get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] * 4, out
    assert [t.state for t in trials[4:8]] == [TrialState.FAIL] * 4, out
    assert all("killed by SIGKILL" in t.system_attrs["fail_reason"] for t in trials[4:8]), out
    assert "runs alone: a retry after its fused group's trainer died (trainer killed by SIGKILL" in out, out
    retries = Counter(t.system_attrs.get(RETRY_OF_ATTR) for t in trials if RETRY_OF_ATTR in t.system_attrs)
    assert retries == Counter({4: 1, 5: 1, 6: 1, 7: 1}), out
    assert_every_point_complete_once(trials, out)


def test_a_member_that_kills_its_trainer_fails_alone_and_its_groups_retries_complete(
    tmp_path: Path, sqlite_url: str
) -> None:
    # x = 1.0 SIGKILLs whatever process trains it, every time (a poison configuration, or what
    # the OOM killer does to a group too big for memory). Its group dies with it; retried as a
    # group, it would take its innocent members down with it until all had used up --max-retry.
    # Each retry of a group whose trainer died runs alone: the other members complete on their
    # first retry, and only the poison configuration fails for good.
    result = run_group_study(tmp_path, sqlite_url, "poisoned", poison_x=1.0)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out  # the worker is not taken down
    trials = optuna.load_study(study_name="poisoned", storage=sqlite_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == [x for x in GROUP_XS if x != 1.0], out
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}, out
    innocent = [t for t in failed if t.params["x"] != 1.0]
    assert {t.number for t in innocent} <= {0, 1, 2, 3}, out  # failed once, with the first group
    assert len([t for t in failed if t.params["x"] == 1.0]) == 1 + 3, out  # its first try, 3 retries
    assert all("killed by SIGKILL" in t.system_attrs["fail_reason"] for t in failed)
    assert "runs alone: a retry after its fused group's trainer died (trainer killed by SIGKILL" in out, out


def test_an_error_raised_for_the_whole_group_retries_each_member_alone(
    tmp_path: Path, sqlite_url: str
) -> None:
    # A MemoryError out of the fused trainer itself (K members together too big), not out of one
    # member: no member is to blame, so each is failed and retried alone, and completes.
    result = run_group_study(tmp_path, sqlite_url, "group_raises", group_raises=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    trials = optuna.load_study(study_name="group_raises", storage=sqlite_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == GROUP_XS, out
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == list(range(8)), out
    for trial in failed:
        reason = trial.system_attrs["fail_reason"]
        assert reason.startswith(
            "MemoryError: not enough memory for the group (raised for its whole fused group)"
        )
        assert "the objective looks broken" not in reason
    assert out.count("runs alone: a retry after its fused group failed (MemoryError") == 8, out


def test_a_broken_objective_failing_its_group_and_then_alone_stops_the_worker_spending_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The fused trainer raises for the whole group: its members retry alone, and those fail alike
    # too: the objective looks broken. The worker stops, and every grid point is still queued.
    result = run_group_study(tmp_path, sqlite_url, "broken_both", always_raises=True)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "the objective looks broken" in out, out
    trials = optuna.load_study(study_name="broken_both", storage=sqlite_url).get_trials()
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    queued = [t.params.get("x", t.system_attrs.get("fixed_params", {}).get("x")) for t in waiting]
    assert sorted(queued) == GROUP_XS, out  # nothing spent: each point queued once
    assert TrialState.RUNNING not in {t.state for t in trials}, out


def test_a_trainer_dying_under_a_group_of_8_is_one_failure_for_the_worker(
    tmp_path: Path, sqlite_url: str
) -> None:
    # --max-consecutive-failures counts a group whose members all failed together once: the
    # worker does not stop after 8 "consecutive" failures from one dead trainer.
    path = quadratic_group_study(tmp_path, "died_8", die_with=0)
    env = cli_env({"OMP_NUM_THREADS": "1", "HPO_TEST_MARKERS": str(tmp_path / "markers")})
    args = ["worker", str(path), *worker(sqlite_url, "died_8", tmp_path / "ck", "--fuse", "8")[3:]]
    result = run_cli(args, env=env, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    trials = optuna.load_study(study_name="died_8", storage=sqlite_url).get_trials()
    assert sorted(t.number for t in trials if t.state == TrialState.FAIL) == list(range(8)), out
    assert sorted(t.params["x"] for t in trials if t.state == TrialState.COMPLETE) == GROUP_XS, out


def test_max_consecutive_failures_counts_a_failed_fused_group_once(tmp_path: Path, sqlite_url: str) -> None:
    # Every trial fails (each its own error: not a broken objective). With groups of 2 and
    # --max-consecutive-failures 3 the worker stops after 3 failed groups (6 trials), not 3 trials.
    path = quadratic_group_study(tmp_path, "all_fail", fail_below=100, fail_alike=False)
    args = ["worker", str(path), *worker(sqlite_url, "all_fail", tmp_path / "ck", "--fuse", "2")[3:]]
    result = run_cli([*args, "--max-consecutive-failures", "3"], env=ENV, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "3 consecutive trials or fused groups failed; stopping this worker" in out, out
    trials = optuna.load_study(study_name="all_fail", storage=sqlite_url).get_trials()
    trained = [t.number for t in trials if "fails at its last epoch" in t.system_attrs.get("fail_reason", "")]
    assert trained == [0, 1, 2, 3, 4, 5], out
    # the group claimed ahead (if it was) is re-queued, not left RUNNING
    assert {t.state for t in trials[6:]} <= {TrialState.WAITING, TrialState.FAIL}, out


def test_a_fused_group_may_take_k_times_the_trial_timeout(tmp_path: Path, sqlite_url: str) -> None:
    # One trial alone takes 1.5 s, a group of 4 three times that (as on a CPU, where a group is
    # compute-bound): within 4 x the 3 s limit, so every group completes, fused.
    result = run_group_study(tmp_path, sqlite_url, "slow_groups", timeout=3, group_slowdown=3)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert groups_in(out) == [[0, 1, 2, 3], [4, 5, 6, 7]], out
    trials = optuna.load_study(study_name="slow_groups", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8, out


def test_a_fused_group_past_k_times_the_trial_timeout_retries_each_member_alone(
    tmp_path: Path, sqlite_url: str
) -> None:
    # A group of 4 that would take 40 times one trial's time is stopped at 4 x the limit. Which
    # member was slow is unknown: each is failed and retried alone, within the limit, and completes.
    result = run_group_study(tmp_path, sqlite_url, "stuck_group", timeout=3, group_slowdown=40)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    trials = optuna.load_study(study_name="stuck_group", storage=sqlite_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == GROUP_XS, out
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == list(range(8)), out  # both groups, once each
    for trial in failed:
        assert (
            "its fused group of 4 exceeded 4 x budget.trial_timeout of 3s"
            in trial.system_attrs["fail_reason"]
        )
    assert all(RETRY_OF_ATTR in t.system_attrs for t in complete)
    assert out.count("runs alone: a retry after its fused group of 4 exceeded") == 8, out


def test_a_worker_stopping_with_a_group_sent_ahead_stops_it_and_requeues_every_trial_once(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The first group's members fail alike at their last epoch (the objective looks broken) just
    # after the second group was sent to the trainer. The worker stops: it stops that training
    # and fails and re-queues its trials, each of the first group's is re-queued once (not once
    # per failure told after it), and a second worker then runs every point exactly once.
    result = run_group_study(tmp_path, sqlite_url, "broken_ahead", fail_below=4)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "the objective looks broken: the first 4 trials of this worker (0, 1, 2, 3)" in out
    trials = optuna.load_study(study_name="broken_ahead", storage=sqlite_url).get_trials()
    assert [t.state for t in trials[:8]] == [TrialState.FAIL] * 8, out  # nothing left RUNNING
    assert_claimed_ahead(trials)
    assert all("worker stopped" in t.system_attrs["fail_reason"] for t in trials[4:8])
    assert all(t.state == TrialState.WAITING for t in trials[8:])
    assert Counter(t.system_attrs[RETRY_OF_ATTR] for t in trials[8:]) == Counter(range(8))
    rescue = run_group_study(tmp_path, sqlite_url, "broken_ahead", fail_below=4)
    assert rescue.returncode == 0, rescue.stdout + rescue.stderr
    trials = optuna.load_study(study_name="broken_ahead", storage=sqlite_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["x"] for t in complete) == GROUP_XS  # every point once
    assert len(trials) == 16 and {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}


def test_bad_fuse_values_are_one_line_errors_and_create_no_database(tmp_path: Path) -> None:
    study = digits_study(tmp_path, "badfuse", [0.1, 0.2])
    db = tmp_path / "never.db"
    cases = {
        "1": "--fuse must be a number of trials >= 2 or auto, got '1' (fix: e.g. --fuse 8)",
        "many": "--fuse must be a number of trials >= 2 or auto, got 'many'",
        "-3": "--fuse must be a number of trials >= 2 or auto, got '-3'",
        # str.isdigit() takes these; int() refuses the first and reads the second as 3
        "\u00b2": "--fuse must be a number of trials >= 2 or auto, got '\u00b2'",
        "\u0663": "--fuse must be a number of trials >= 2 or auto, got '\u0663'",
    }
    for value, message in cases.items():
        result = run_cli(["worker", str(study), "--storage", f"sqlite:///{db}", f"--fuse={value}"], env=ENV)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ray = run_cli(
        ["worker", str(study), "--storage", f"sqlite:///{db}", "--fuse", "4", "--backend", "ray"], env=ENV
    )
    assert ray.returncode == 2 and "--fuse runs with the workers backend only" in ray.stderr
    assert len(ray.stderr.strip().splitlines()) == 1
    assert not db.exists()
