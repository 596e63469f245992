"""A new trainer imports the study's objective before the worker claims a trial (issue 14: time
from trial start to first batch), so a trial's recorded time holds its training, not the imports,
and a queued trial is never held RUNNING by a trainer that cannot start it yet. An objective
whose import fails still fails its trial with the import's error, as before."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli_env

from hpo._records import trial_metrics

HPO = Path(sys.executable).parent / "hpo"

# Importing this module takes IMPORT_S seconds (as torchvision or a big model zoo can); it
# records when the import ended and when training began.
SLOW_IMPORT = """
import time
from pathlib import Path

from hpo.objective import Objective

time.sleep({import_s})
IMPORTED_AT = time.time()


def train(run):
    started = time.time()
    run.report(1, {{"loss": float(run.config["x"]) ** 2, "imported_at": IMPORTED_AT, "train_started": started}})
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss", "imported_at", "train_started"))
"""

# Imports in the worker (which checks the objective before it opens the storage) but not in the
# trainer process, as a module touching a GPU or a library missing its native part can.
BROKEN_IMPORT = """
import multiprocessing

from hpo.objective import Objective

if multiprocessing.current_process().name == "hpo-trainer":
    raise ImportError("no module named 'missing_dependency' in the trainer")


def train(run):
    return 0.0


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""

STUDY = """name: warm
objective: {module}:OBJECTIVE
search_space:
  x: {{type: float, low: -1, high: 1}}
metric: loss
direction: minimize
n_trials: {n_trials}
budget: {{max_epochs: 1}}
sampler: {{name: random, seed: 1}}
"""


def _worker(
    tmp_path: Path, module: str, source: str, n_trials: int, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``hpo worker STUDY_FILE`` on a new SQLite study of ``module``'s objective (``source``), in
    ``env`` (default: the tests' CLI environment)."""
    (tmp_path / f"{module}.py").write_text(source)
    study_file = tmp_path / "warm.yaml"
    study_file.write_text(STUDY.format(module=module, n_trials=n_trials))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = subprocess.run(
        [str(HPO), "worker", str(study_file), "--storage", url, "--no-progress"],
        cwd=tmp_path,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, url


def test_the_objective_is_imported_before_the_first_trial_is_claimed(tmp_path: Path) -> None:
    import_s = 2.0
    result, url = _worker(tmp_path, "slowimport", SLOW_IMPORT.format(import_s=import_s), 2)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="warm", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:
        metrics = {k: v[-1] for k, v in trial_metrics(trial).items()}
        assert trial.datetime_start is not None
        # Optuna stores naive local times; the import ended before this trial was claimed.
        imported = datetime.datetime.fromtimestamp(metrics["imported_at"])
        assert imported <= trial.datetime_start, (imported, trial.datetime_start)
        # From claim to first line of training: well under the import's own time.
        started = datetime.datetime.fromtimestamp(metrics["train_started"])
        assert (started - trial.datetime_start).total_seconds() < import_s / 2


def test_an_objective_that_cannot_be_imported_still_fails_its_trial_with_the_reason(tmp_path: Path) -> None:
    result, url = _worker(tmp_path, "brokenimport", BROKEN_IMPORT, 1)
    (trial,) = optuna.load_study(study_name="warm", storage=url).trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "missing_dependency" in result.stdout + result.stderr
    assert "missing_dependency" in str(trial.system_attrs) + str(trial.user_attrs)


# Importing this module in the trainer kills it, as a crash in an extension's import would.
KILLING_IMPORT = """
import multiprocessing
import os
import signal

from hpo.objective import Objective

if multiprocessing.current_process().name == "hpo-trainer":
    os.kill(os.getpid(), signal.SIGKILL)


def train(run):
    return 0.0


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""


def test_an_import_that_kills_the_trainer_fails_the_trial_not_the_worker(tmp_path: Path) -> None:
    result, url = _worker(tmp_path, "killingimport", KILLING_IMPORT, 1)
    assert "Traceback" not in result.stdout + result.stderr
    trials = optuna.load_study(study_name="warm", storage=url).trials
    # Each attempt met the crash in its own trainer; a SIGKILL counts as an OOM kill, retried
    # (a bounded number of times) as it was before the warm-up.
    assert trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert all("SIGKILL" in t.system_attrs["fail_reason"] for t in trials)


def test_a_warm_up_slower_than_its_wait_overlaps_the_first_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker claims after TRAINER_WARM_WAIT_S at most; the late ("warm",) answer is dropped, so
    the trial's own messages come through as usual."""
    import hpo._interrupts
    import hpo._trainer_handle
    from hpo.spec import load_study_file
    from hpo.trainer import TrialJob

    import_s = 6.0
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT.format(import_s=import_s))
    monkeypatch.setattr(hpo._trainer_handle, "TRAINER_WARM_WAIT_S", 0.3)
    study_file = tmp_path / "warm.yaml"
    study_file.write_text(STUDY.format(module="slowimport", n_trials=1))
    definition = load_study_file(study_file).definition()
    job = TrialJob(
        number=0,
        definition=definition,
        objective="slowimport:OBJECTIVE",
        params={"x": 0.5},
        max_epochs=1,
        device="cpu",
        checkpoint_dir=str(tmp_path / "ckpt"),
        prunes=False,
        objective_path=(str(tmp_path),),
    )
    trainer = hpo._trainer_handle.Trainer(threads=1, warm=job)
    try:
        began = time.monotonic()
        trainer.ensure_started(hpo._interrupts.Interrupts())
        waited = time.monotonic() - began
        assert waited < import_s  # claimed without waiting for the whole import
        trainer.send(job.to_message())
        messages = []
        while not messages or messages[-1][0] not in ("done", "failed"):
            message = trainer.poll(0.2)
            if message is not None:
                messages.append(message)
        assert ("warm",) not in messages
        assert messages[-1] == ("done", 0.25), messages
    finally:
        trainer.shutdown()


# Imported by the worker itself (to check the study) and again by its trainer: in the worker, it
# writes how many trainer processes (multiprocessing spawn children) the worker already has.
CHILDREN_AT_IMPORT = """
import multiprocessing
import os
from pathlib import Path

from hpo.objective import Objective


def _spawned_children() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == os.getpid() and b"spawn_main" in cmdline:
            count += 1
    return count


if multiprocessing.current_process().name != "hpo-trainer":
    Path("children_at_import.txt").write_text(str(_spawned_children()))


def train(run):
    run.report(1, {{"loss": float(run.config["x"]) ** 2}})
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""


def test_the_trainer_process_starts_before_the_worker_imports_the_objective(tmp_path: Path) -> None:
    """``hpo worker`` spawns its trainer first, so that the trainer's imports (PyTorch) overlap
    the worker's own (the storage, the study, the objective) instead of following them."""
    result, url = _worker(tmp_path, "childrenprobe", CHILDREN_AT_IMPORT.format(), 1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "children_at_import.txt").read_text() == "1"
    (trial,) = optuna.load_study(study_name="warm", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE


# Records, for each process importing it (the worker, which checks the objective, and its
# trainer, which warms up), when its import began and ended; the import takes IMPORT_S seconds.
IMPORT_TIMES = """
import multiprocessing
import time
from pathlib import Path

from hpo.objective import Objective

_began = time.time()
time.sleep({import_s})
with open(Path(__file__).with_name("import_times.txt"), "a") as out:
    out.write(f"{{multiprocessing.current_process().name}} {{_began}} {{time.time()}}\\n")


def train(run):
    run.report(1, {{"loss": 0.0}})
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""


def test_the_trainer_imports_the_objective_while_the_worker_still_imports_it(tmp_path: Path) -> None:
    """Once the policy allows the objective, the worker sends its trainer the warm-up before it
    imports the objective itself (to check it), so the two imports overlap instead of the
    trainer's following the worker's."""
    import_s = 6.0
    result, url = _worker(tmp_path, "importtimes", IMPORT_TIMES.format(import_s=import_s), 1)
    assert result.returncode == 0, result.stdout + result.stderr
    times = {}
    for line in (tmp_path / "import_times.txt").read_text().splitlines():
        name, began, ended = line.split()
        times[name] = (float(began), float(ended))
    assert set(times) == {"MainProcess", "hpo-trainer"}, times
    # The trainer began its import before the worker had finished its own.
    assert times["hpo-trainer"][0] < times["MainProcess"][1], times
    (trial,) = optuna.load_study(study_name="warm", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("refused", ["unknown-study", "objective-not-allowed"])
def test_a_worker_refusing_its_input_leaves_no_trainer_behind(tmp_path: Path, refused: str) -> None:
    """Refused after the trainer was spawned: a study the storage does not hold, or a stored
    study whose objective this worker's side does not allow (hpo.policy: never imported)."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = "no_such_study"
    if refused == "objective-not-allowed":
        (tmp_path / "childrenprobe.py").write_text(CHILDREN_AT_IMPORT.format())
        study_file = tmp_path / "warm.yaml"
        study_file.write_text(STUDY.format(module="childrenprobe", n_trials=1))
        created = subprocess.run(
            [str(HPO), "create-study", str(study_file), "--storage", url],
            cwd=tmp_path,
            env=cli_env({"HPO_ALLOW_OBJECTIVES": "childrenprobe"}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stderr
        (tmp_path / "children_at_import.txt").unlink()  # written by create-study's own check
        name = "warm"
    marker = f"HPO_TEST_MARKER_{tmp_path.name}"
    began = time.monotonic()
    result = subprocess.run(
        [str(HPO), "worker", "--study-name", name, "--storage", url, "--no-progress"],
        cwd=tmp_path,
        env=cli_env({marker: "1"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("not allowed" in result.stderr) == (refused == "objective-not-allowed"), result.stderr
    assert not (tmp_path / "children_at_import.txt").exists()  # nobody imported the objective
    assert time.monotonic() - began < 60  # not held by a trainer it failed to stop
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


# Prints at the end of its training without a newline or a flush: on a pipe, the trainer's
# stdout holds it in its buffer until the trainer exits.
LAST_WORDS = """
import sys

from hpo.objective import Objective


def train(run):
    run.report(1, {{"loss": float(run.config["x"]) ** 2}})
    sys.stdout.write("last words of trial %d" % run.trial.number)
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""


def test_the_trainer_exits_at_once_when_the_worker_ends_and_keeps_its_output(tmp_path: Path) -> None:
    """The trainer skips the interpreter's teardown when asked to exit (about a second with
    PyTorch loaded), but what its trials wrote to stdout still reaches the worker's output."""
    env = cli_env()
    env.pop("PYTHONUNBUFFERED")  # buffered, as a worker's output to a file or pipe is
    result, _ = _worker(tmp_path, "lastwords", LAST_WORDS.format(), 2, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "last words of trial 1" in result.stdout, result.stdout

    import hpo._interrupts
    import hpo._trainer_handle

    trainer = hpo._trainer_handle.Trainer(threads=1)  # imports PyTorch, as every worker's trainer does
    trainer.ensure_started(hpo._interrupts.Interrupts())
    process = trainer._process
    trainer.shutdown()
    assert process.exitcode == 0  # it ended on its own, not killed after the grace period


# Imported by the worker itself while it checks the study file, after its trainer was spawned:
# says so in a file, then stays in the import (a slow objective module or storage).
STUCK_IMPORT = """
import multiprocessing
import time
from pathlib import Path

from hpo.objective import Objective

if multiprocessing.current_process().name != "hpo-trainer":
    Path("importing.txt").write_text("1")
    time.sleep(120)


def train(run):
    return 0.0


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""


def test_a_worker_sigkilled_while_it_starts_leaves_no_trainer_behind(tmp_path: Path) -> None:
    """SIGKILL reaches the worker between spawning its trainer and handing it to the worker loop
    (no ``finally`` runs): the trainer ends too, by its parent-death signal or, idle, by its pipe
    closing (either alone suffices: removing the signal leaves this test passing)."""
    (tmp_path / "stuckimport.py").write_text(STUCK_IMPORT)
    study_file = tmp_path / "warm.yaml"
    study_file.write_text(STUDY.format(module="stuckimport", n_trials=1))
    marker = f"HPO_TEST_MARKER_{tmp_path.name}"
    worker = subprocess.Popen(
        [
            str(HPO),
            "worker",
            str(study_file),
            "--storage",
            f"sqlite:///{tmp_path / 'hpo.db'}",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=cli_env({marker: "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "importing.txt").exists():
            assert worker.poll() is None and time.monotonic() < deadline, (
                "the worker never reached its import"
            )
            time.sleep(0.05)
        assert len(_processes_with(marker)) >= 2  # the worker and its trainer (spawned first)
        worker.kill()
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []
