"""Fault injection against real worker processes: exactly once under every fault.

Each test is a scenario a user can rerun by hand: real ``hpo`` processes on a real SQLite file or
PostgreSQL database, killed, starved or fed training code that takes its own process down. The
objective counts its own trainings (``hpo_test_objectives:counted``), so "exactly once" is checked
against what ran, not only against what the database says.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pytest
import sqlalchemy
from background import Output
from conftest import cli_env, require_real, run_cli, start_cli, study_if_created
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo._rdb import RETRY_OF_ATTR

if TYPE_CHECKING:
    from pg_server import PgServer

pytestmark = pytest.mark.slow
# Dead workers are found after 8 s: quick, yet a live worker on a loaded 2-core machine (SQLite
# lock waits, CPU starvation) never goes that long without a heartbeat.
FAST_BEAT = ["--heartbeat-interval", "1", "--grace-period", "8", "--no-progress"]
GRID_6x10 = dict(grid_x=[-3, -1, 0, 1, 2, 4], grid_y=[-4, -3, -2, -1, 0, 1, 2, 3, 4, 4.5])


def trainings(counts: Path) -> Counter[tuple[float, float]]:
    """How often the objective trained each (x, y), from the files it left."""
    return Counter(
        (float(x), float(y)) for x, y, *_ in (f.name.split("_") for f in counts.iterdir() if f.is_file())
    )


def wait_all(workers: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    return [w.communicate(timeout=timeout)[0] for w in workers]


def test_four_sqlite_workers_train_each_of_60_grid_points_exactly_once(
    tmp_path: Path, sqlite_url: str
) -> None:
    counts = tmp_path / "counts"
    path = quadratic_study(
        tmp_path,
        sampler="grid",
        n_trials=None,
        epochs=2,
        objective="hpo_test_objectives:counted",
        **GRID_6x10,
    )
    env = cli_env({"HPO_TEST_COUNTS": str(counts)})
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    workers = [
        start_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *FAST_BEAT], env=env)
        for _ in range(4)
    ]
    outputs = wait_all(workers, timeout=600)
    assert all(w.returncode == 0 for w in workers), outputs
    ran = trainings(counts)
    assert sum(ran.values()) == 60 and set(ran.values()) == {1}, ran.most_common(3)
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 60}
    assert {(t.params["x"], t.params["y"]) for t in trials} == set(ran)


def test_five_workers_started_together_on_sqlite_one_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    # long enough (80 s of training) that no worker is done before the last one has started
    path = quadratic_study(tmp_path, n_trials=8, epochs=20, sleep=0.5)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    workers = [
        start_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *FAST_BEAT]) for _ in range(5)
    ]
    outputs = wait_all(workers, timeout=600)
    codes = sorted(w.returncode for w in workers)
    assert codes == [0, 0, 0, 0, 2], outputs
    (refused,) = [out for w, out in zip(workers, outputs, strict=True) if w.returncode == 2]
    assert "exceed its safe limit of 4" in refused and "PostgreSQL" in refused
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 8}


def test_a_trial_left_running_without_heartbeat_is_retried(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=4, epochs=2)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    # A process that claimed a trial and died before its first heartbeat: plain Optuna pops a
    # queued trial (WAITING -> RUNNING) without heartbeats, and nobody ever finishes it.
    orphan = optuna.load_study(study_name="quad", storage=sqlite_url).ask()
    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.begin() as conn:  # it was claimed a minute ago
        conn.execute(
            sqlalchemy.text("UPDATE trials SET datetime_start = :t WHERE trial_id = :id"),
            {"t": datetime.datetime.utcnow() - datetime.timedelta(minutes=1), "id": orphan._trial_id},
        )
    engine.dispose()
    worker = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *FAST_BEAT], timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    stale = trials[orphan.number]
    assert stale.state == TrialState.FAIL and "heartbeat" in stale.system_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) == orphan.number]
    assert retry.state == TrialState.COMPLETE
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 4, TrialState.FAIL: 1}


def poison_study(directory: Path, timeout: float) -> Path:
    path = quadratic_study(
        directory,
        sampler="grid",
        n_trials=None,
        epochs=2,
        objective="hpo_test_objectives:poison",
        grid_x=[-5, -4, -3, -2, -1, 1, 2],
        grid_y=[0],
    )
    path.write_text(
        path.read_text().replace(
            "budget: {max_epochs: 2}", f"budget: {{max_epochs: 2, trial_timeout: {timeout}}}"
        )
    )
    return path


def test_poison_trials_fail_with_their_cause_and_the_worker_finishes_the_rest(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = poison_study(tmp_path, timeout=20)
    result = run_cli(
        [
            "worker",
            str(path),
            "--storage",
            sqlite_url,
            *FAST_BEAT,
            "--max-retry",
            "1",
            "--max-consecutive-failures",
            "50",
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    by_x: dict[float, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        by_x.setdefault(trial.params["x"], []).append(trial)
    reasons = {x: [t.system_attrs.get("fail_reason", "") for t in ts] for x, ts in by_x.items()}
    # os._exit and SIGKILL take the trainer down: retried once (--max-retry 1), then failed for good
    for x, cause in ((-5, "exited with code 3"), (-1, "SIGKILL, probably out of memory")):
        assert [t.state for t in by_x[x]] == [TrialState.FAIL, TrialState.FAIL], reasons[x]
        assert all(cause in r for r in reasons[x]), reasons[x]
        assert "not retried" in reasons[x][-1], reasons[x]
        assert by_x[x][1].system_attrs[RETRY_OF_ATTR] == by_x[x][0].number
        assert (
            "fail_reason" not in by_x[x][1].user_attrs
            or by_x[x][1].user_attrs["fail_reason"] == reasons[x][1]
        )
    # SystemExit and KeyboardInterrupt from training code are errors of the trial, not retried
    assert [t.state for t in by_x[-4]] == [TrialState.FAIL] and "sys.exit(2)" in reasons[-4][0]
    assert [t.state for t in by_x[-3]] == [TrialState.FAIL] and "KeyboardInterrupt" in reasons[-3][0]
    assert [t.state for t in by_x[-2]] == [TrialState.FAIL] and "trial_timeout of 20s" in reasons[-2][0]
    for x in (1, 2):
        assert [t.state for t in by_x[x]] == [TrialState.COMPLETE]
    # the curve reported before the crash is kept
    assert by_x[-4][0].intermediate_values == {1: 100.0}
    assert "Traceback" in by_x[-4][0].system_attrs["hpo:traceback"]


def test_ten_random_sigkills_of_workers_on_a_30_point_grid(tmp_path: Path, postgres_url: str) -> None:
    counts = tmp_path / "counts"
    path = quadratic_study(
        tmp_path,
        sampler="grid",
        n_trials=None,
        epochs=4,
        sleep=0.3,
        objective="hpo_test_objectives:counted",
        grid_x=[-3, -1, 0, 1, 2, 4],
        grid_y=[-2, -1, 0, 1, 3],
    )
    env = cli_env({"HPO_TEST_COUNTS": str(counts)})
    assert run_cli(["create-study", str(path), "--storage", postgres_url]).returncode == 0
    args = ["worker", "--study-name", "quad", "--storage", postgres_url, *FAST_BEAT, "--max-retry", "20"]
    rng = random.Random(0)
    workers = [start_cli(args, env=env) for _ in range(3)]
    kills = 0
    try:
        while kills < 10:
            time.sleep(rng.uniform(1.0, 3.0))
            alive = [w for w in workers if w.poll() is None]
            if not alive:
                break
            victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            kills += 1
            workers.append(start_cli(args, env=env))
        for worker in workers:
            worker.communicate(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert kills == 10, "the study finished before ten kills; make the trials longer"
    trials = optuna.load_study(study_name="quad", storage=postgres_url).get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = Counter((t.params["x"], t.params["y"]) for t in complete)
    assert len(points) == 30 and set(points.values()) == {1}, points.most_common(3)
    # every failure is a killed attempt that was retried; trainings = completions + killed attempts
    assert all(t.system_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL)
    assert set(trainings(counts)) == set(points)


def test_sigterm_requeues_the_running_trial_and_exits_143(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=3, epochs=40, sleep=0.25)
    worker = start_cli(["worker", str(path), "--storage", sqlite_url, *FAST_BEAT])
    out = Output(worker)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, out.text
            time.sleep(0.2)
            study = study_if_created(sqlite_url, "quad")
            if study and [
                t for t in study.get_trials() if t.state == TrialState.RUNNING and t.intermediate_values
            ]:
                break
        worker.send_signal(signal.SIGTERM)
        assert out.finish(timeout=120) == 143, out.text
    finally:
        if worker.poll() is None:
            worker.kill()
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert "interrupted by SIGTERM" in failed.system_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) == failed.number]
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert not retry.user_attrs and not retry.intermediate_values  # a retry starts clean


def test_an_interrupted_create_study_is_completed_by_a_rerun(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=400, epochs=1)
    creating = start_cli(["create-study", str(path), "--storage", sqlite_url])
    engine = sqlalchemy.create_engine(sqlite_url)
    deadline = time.monotonic() + 120
    queued = 0
    try:
        while queued == 0:
            assert time.monotonic() < deadline and creating.poll() is None, "create-study ended too soon"
            time.sleep(0.05)
            try:
                with engine.connect() as conn:
                    queued = conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM trials")).scalar_one()
            except sqlalchemy.exc.OperationalError:
                continue  # the tables are not there yet
        creating.send_signal(signal.SIGKILL)
        creating.wait(timeout=30)
    finally:
        engine.dispose()
    partial = len(optuna.load_study(study_name="quad", storage=sqlite_url).get_trials())
    assert 0 < partial < 400, partial
    again = run_cli(["create-study", str(path), "--storage", sqlite_url])
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()) == 400
    # and a further rerun changes nothing
    assert run_cli(["create-study", str(path), "--storage", sqlite_url, "--skip-if-exists"]).returncode == 0
    assert len(optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()) == 400


def own_postgres() -> PgServer:
    """A PostgreSQL server of the test's own, to restart (tests/support/pg_server.py); where none
    can be started the test skips with the reason, and fails in CI."""
    from pg_server import PgServer, missing_reason

    reason = missing_reason()
    if reason is not None:
        require_real(reason)
    return PgServer()


def through_a_restart_and_an_outage(
    pg: PgServer, args: list[str], env: dict[str, str], *, workers: int, mid_work: str
) -> list[Output]:
    """Start ``workers`` workers (``hpo ARGS``); once the first has finished a trial, restart the
    database (1.5 s down); once it prints ``mid_work`` again, take the database away for 20 s; let
    every worker finish (each one's exit status in ``proc.returncode``)."""
    procs = [start_cli(args, env=env) for _ in range(workers)]
    outputs = [Output(p) for p in procs]
    try:
        outputs[0].wait_for(r"trial \d+ COMPLETE", timeout=180)
        pg.restart(down_for=1.5)  # a quick restart ...
        outputs[0].wait_for(mid_work, timeout=180)
        time.sleep(1.0)
        pg.stop()  # ... and a 20 s outage, mid-training
        time.sleep(20)
        pg.start()
        for out in outputs:
            out.finish(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def test_workers_outlive_a_postgresql_restart_and_a_20s_outage(tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    path = quadratic_study(
        tmp_path, n_trials=24, epochs=5, sleep=0.3, objective="hpo_test_objectives:counted", sampler="random"
    )
    env = cli_env({"HPO_TEST_COUNTS": str(counts)})
    with own_postgres() as pg:
        assert run_cli(["create-study", str(path), "--storage", pg.url]).returncode == 0
        # grace 60 s: the 20 s outage must not make the trials in hand look dead
        args = ["worker", "--study-name", "quad", "--storage", pg.url, "--no-progress"]
        args += ["--heartbeat-interval", "2", "--grace-period", "60", "--storage-patience", "120"]
        outputs = through_a_restart_and_an_outage(pg, args, env, workers=3, mid_work=r"trial \d+ COMPLETE")
        codes = [out.proc.returncode for out in outputs]
        assert codes == [0, 0, 0], "\n----\n".join(out.text for out in outputs)
        text = "\n".join(out.text for out in outputs)
        assert "unreachable" in text and "reachable again" in text, text
        trials = optuna.load_study(study_name="quad", storage=pg.url).get_trials()
    states = Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: 24}, states
    assert all(len(t.intermediate_values) == 5 for t in trials)  # no epoch's record lost
    assert sum(trainings(counts).values()) == 24  # nothing trained twice


def test_fused_workers_claiming_ahead_outlive_a_postgresql_restart_and_a_20s_outage(tmp_path: Path) -> None:
    # Two `--fuse 4` workers on a random search: each claims its next group during the current
    # group's last epoch and holds the current group's results until that group is sent. The
    # database restarts right after a group's results are told (the next claims come a second
    # later) and then goes away for 20 s mid-group: every trial still trains once and completes.
    counts = tmp_path / "counts"
    path = quadratic_study(
        tmp_path,
        n_trials=24,
        epochs=5,
        sleep=0.3,
        objective="hpo_test_objectives:FUSED_QUADRATIC",
        sampler="random",
    )
    env = cli_env({"HPO_TEST_COUNTS": str(counts), "OMP_NUM_THREADS": "1"})
    with own_postgres() as pg:
        assert run_cli(["create-study", str(path), "--storage", pg.url]).returncode == 0
        args = ["worker", "--study-name", "quad", "--storage", pg.url, "--no-progress", "--fuse", "4"]
        args += ["--heartbeat-interval", "2", "--grace-period", "60", "--storage-patience", "120"]
        outputs = through_a_restart_and_an_outage(
            pg, args, env, workers=2, mid_work="train as one fused group"
        )
        codes = [out.proc.returncode for out in outputs]
        text = "\n----\n".join(out.text for out in outputs)
        assert codes == [0, 0], text
        assert "unreachable" in text and "reachable again" in text, text
        assert "train as one fused group" in outputs[1].text, text  # both workers fused
        trials = optuna.load_study(study_name="quad", storage=pg.url).get_trials()
    states = Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: 24}, text
    assert all(len(t.intermediate_values) == 5 for t in trials)  # no epoch's record lost
    assert sum(trainings(counts).values()) == 24  # nothing trained twice


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the worker and its trainer)."""
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += _process_tree(int(child))
    return pids


def test_a_worker_paused_past_its_lease_neither_writes_twice_nor_deletes_the_retrys_checkpoint(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = quadratic_study(
        tmp_path,
        n_trials=1,
        epochs=30,
        sleep=0.3,
        objective="hpo_test_objectives:checkpointed",
        sampler="random",
    )
    checkpoints = ["--checkpoint-dir", str(tmp_path / "ck")]
    paused = start_cli(["worker", str(path), "--storage", sqlite_url, *FAST_BEAT, *checkpoints])
    paused_out = Output(paused)
    other = None
    try:
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, paused_out.text
            time.sleep(0.1)
            study = study_if_created(sqlite_url, "quad")
            trials = study.get_trials() if study else []
            if trials and len(trials[0].intermediate_values) >= 4:
                break
        tree = _process_tree(paused.pid)
        assert len(tree) >= 2, "the worker should have a trainer process"
        for pid in tree:  # the whole worker freezes (a laptop lid, a VM paused, SIGSTOP)
            os.kill(pid, signal.SIGSTOP)
        before = len(
            optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()[0].intermediate_values
        )
        other = start_cli(
            ["worker", "--study-name", "quad", "--storage", sqlite_url, *FAST_BEAT, *checkpoints]
        )
        other_out = Output(other)
        other_out.wait_for(r"failed a stale trial", timeout=120)
        time.sleep(2.0)  # the retry is resuming from the checkpoint ...
        for pid in tree:  # ... when the paused worker wakes up
            os.kill(pid, signal.SIGCONT)
        assert other_out.finish(timeout=300) == 0, other_out.text
        assert paused_out.finish(timeout=300) == 0, paused_out.text
    finally:
        for proc in (paused, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "given up" in paused_out.text, paused_out.text
    first, retry = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert first.state == TrialState.FAIL and "heartbeat" in first.system_attrs["fail_reason"]
    assert len(first.intermediate_values) <= before + 1  # nothing recorded after its lease expired
    assert retry.state == TrialState.COMPLETE and retry.system_attrs[RETRY_OF_ATTR] == first.number
    assert retry.user_attrs["resumed_from_epoch"] >= before - 1  # resumed: the checkpoint survived
    assert sorted(retry.intermediate_values) == list(range(1, 31))


def _trainers(worker_pid: int) -> list[int]:
    """The worker's trainer processes (multiprocessing's spawned children)."""
    found = []
    for pid in _process_tree(worker_pid)[1:]:
        try:
            if b"--multiprocessing-fork" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # it ended meanwhile
            continue
    return found


def test_trainers_killed_while_they_start_are_replaced_and_every_trial_runs_once(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The out-of-memory killer takes a trainer during its imports, twice: the worker starts
    another each time (no trial was sent to it) instead of dying with a traceback."""
    counts = tmp_path / "counts"
    path = quadratic_study(tmp_path, n_trials=3, sampler="random", objective="hpo_test_objectives:counted")
    worker = start_cli(
        ["worker", str(path), "--storage", sqlite_url, *FAST_BEAT],
        env=cli_env({"HPO_TEST_COUNTS": str(counts)}),
    )
    output = Output(worker)
    try:
        killed: list[int] = []
        deadline = time.monotonic() + 120
        while len(killed) < 2:  # the first trainer, then its replacement, each before it is ready
            assert time.monotonic() < deadline and worker.poll() is None, output.text
            for pid in _trainers(worker.pid):
                if pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)
        assert output.finish(timeout=300) == 0, output.text
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "Traceback" not in output.text, output.text
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 3}, output.text
    assert sum(trainings(counts).values()) == 3


TRAINER_KILLER = """
import os, signal, sys
if "--multiprocessing-fork" in sys.argv:  # a spawned trainer: dies as the OOM killer would kill it
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_trainer_that_always_dies_while_starting_stops_the_worker_with_one_line(
    tmp_path: Path, sqlite_url: str
) -> None:
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(TRAINER_KILLER)
    path = quadratic_study(tmp_path, n_trials=3, sampler="random")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(killer), env["PYTHONPATH"]])
    result = run_cli(["worker", str(path), "--storage", sqlite_url, *FAST_BEAT], env=env)
    assert result.returncode == 2, result.stdout + result.stderr  # hpo's exit code for an error
    assert "Traceback" not in result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "3 trainer processes in a row died while starting" in error[0], result.stderr
    assert "SIGKILL" in error[0] and "fix:" in error[0]
    # Nothing was claimed: every trial still waits for a worker that can train it.
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.WAITING: 3}
