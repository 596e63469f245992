"""Objectives used by the tests: trivial, deterministic and fast, importable by worker subprocesses
(``tests/support`` is put on PYTHONPATH by ``tests/conftest.py::cli_env``)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.objective import Objective, TrialRun


def quadratic(run: TrialRun) -> float:
    """(x - 2)^2 + (y + 1)^2 approached over the epochs; ``settings.sleep`` seconds per epoch."""
    config = run.config
    x = float(config.get("x", 0.0))
    y = float(config.get("y", 0.0))
    target = (x - 2.0) ** 2 + (y + 1.0) ** 2
    sleep = float(config.get("sleep", 0.0))
    for epoch in range(1, run.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        value = target + 1.0 / epoch
        if run.report(epoch, {"loss": value}):
            break
    return run.final_value()


def crash_when_negative(run: TrialRun) -> float:
    """Raises for x < 0 (a bad trial), else behaves like :func:`quadratic`."""
    if float(run.config["x"]) < 0:
        raise RuntimeError(f"simulated CUDA out of memory for x={run.config['x']}")
    return quadratic(run)


def always_nan(run: TrialRun) -> float:
    return math.nan


def marker_then_sleep(run: TrialRun) -> float:
    """Writes ``<marker_dir>/trial-<number>.started`` then trains slowly (for kill tests).

    The marker holds the pid of the worker: the parent of the trainer process running this.
    """
    marker_dir = Path(os.environ["HPO_TEST_MARKERS"])
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"trial-{run.number}.started").write_text(str(os.getppid()))
    return quadratic(run)


QUADRATIC = Objective(train=quadratic, description="test objective")


def counted(run: TrialRun) -> float:
    """:func:`quadratic` that first leaves one file per training in ``$HPO_TEST_COUNTS``, so a test
    counts the trainings the objective itself ran (not what the database says)."""
    _leave_count_file(run)
    return quadratic(run)


def _leave_count_file(run: TrialRun) -> None:
    """One file per training in ``$HPO_TEST_COUNTS`` (when set), named by the trial's x and y."""
    if "HPO_TEST_COUNTS" not in os.environ:
        return
    counts = Path(os.environ["HPO_TEST_COUNTS"])
    counts.mkdir(parents=True, exist_ok=True)
    config = run.config
    (counts / f"{config['x']}_{config['y']}_{os.getpid()}_{time.monotonic_ns()}").write_text(str(run.number))


def poison(run: TrialRun) -> float:
    """Training code that takes its process down, by the trial's x: -5 os._exit, -4 SystemExit,
    -3 KeyboardInterrupt, -2 hangs for an hour, -1 SIGKILLs itself (as the OOM killer would);
    anything else trains like :func:`quadratic`."""
    import signal as signal_module

    x = float(run.config["x"])
    run.report(1, {"loss": 100.0})  # the curve of a failing trial is kept
    if x == -5:
        os._exit(3)
    if x == -4:
        raise SystemExit(2)
    if x == -3:
        raise KeyboardInterrupt
    if x == -2:
        time.sleep(3600)
    if x == -1:
        os.kill(os.getpid(), signal_module.SIGKILL)
    return quadratic(run)


def dies_once(run: TrialRun) -> float:
    """The first training (per ``$HPO_TEST_MARKERS`` folder) SIGKILLs its own process after epoch 1,
    as the OOM killer would; every later one trains like :func:`quadratic` (a retry succeeds)."""
    import signal as signal_module

    marker = Path(os.environ["HPO_TEST_MARKERS"]) / "died"
    run.report(1, {"loss": 100.0})
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(run.number))
        os.kill(os.getpid(), signal_module.SIGKILL)
    return quadratic(run)


def checkpointed(run: TrialRun) -> float:
    """:func:`quadratic` that checkpoints every epoch into ``run.checkpoint_dir`` (JSON) and resumes
    from it, as a real training loop does (for tests of retries and paused workers)."""
    import json

    config = run.config
    target = (float(config.get("x", 0.0)) - 2.0) ** 2 + (float(config.get("y", 0.0)) + 1.0) ** 2
    sleep = float(config.get("sleep", 0.0))
    state_file = run.checkpoint_dir / "state.json"
    done = 0
    if state_file.is_file():
        done = run.resume(json.loads(state_file.read_text())["history"])
    for epoch in range(done + 1, run.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        value = target + 1.0 / epoch
        history = run.history
        history.setdefault("loss", []).append(value)
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": history}))
        os.replace(tmp, state_file)
        if run.report(epoch, {"loss": value}):
            break
    return run.final_value()


@dataclass
class _Leaving:
    """What ``fused_train``'s ``on_leave`` is given: the member's run and its own error, if any."""

    run: TrialRun
    error: Exception | None = None


def _fused_quadratic(runs: Sequence[TrialRun], on_leave: Callable[[Any], None]) -> list[_Leaving]:
    """K :func:`quadratic` trials trained as one group: one ``settings.sleep`` per epoch for all.

    ``settings.fail_below``: members numbered below it raise at their last epoch (the first
    group fails, its retries do not), all with the same error unless ``settings.fail_alike`` is
    false; ``settings.poison_x``: the trainer of a group (or lone
    trial) holding that x SIGKILLs itself after epoch 1, every time (see :func:`_poisoned`);
    ``settings.group_raises``: a group of two or more raises MemoryError in its second epoch;
    ``settings.always_raises``: every group, and every lone trial, raises the same ValueError;
    ``settings.die_with``: the first group holding that trial
    number SIGKILLs its trainer after epoch 1 (once per ``$HPO_TEST_MARKERS`` folder);
    ``settings.die_at_start_with``: the same as the group starts, before its first epoch. With
    ``$HPO_TEST_COUNTS`` set, each member leaves a file there as :func:`counted` does."""
    import signal as signal_module

    for run in runs:
        _leave_count_file(run)
    config = runs[0].config
    # settings.group_slowdown: a group's epoch takes this many times one trial's (compute-bound)
    sleep = float(config.get("sleep", 0.0)) * (
        float(config.get("group_slowdown", 1.0)) if len(runs) > 1 else 1.0
    )
    fail_below = int(config.get("fail_below", -1))
    die_with = config.get("die_with")
    die_at_start_with = config.get("die_at_start_with")
    if die_at_start_with is not None and any(run.number == int(die_at_start_with) for run in runs):
        _die_once(runs)
    members = [_Leaving(run) for run in runs]
    training = list(members)
    for epoch in range(1, max(run.max_epochs for run in runs) + 1):
        if sleep:
            time.sleep(sleep)
        for member in list(training):
            run = member.run
            target = (float(run.config.get("x", 0.0)) - 2.0) ** 2 + (
                float(run.config.get("y", 0.0)) + 1.0
            ) ** 2
            try:
                stop = run.report(epoch, {"loss": target + 1.0 / epoch})
            except Exception as exc:  # pruned: this member's own end
                member.error, stop = exc, True
            if epoch == run.max_epochs and run.number < fail_below:
                alike = config.get("fail_alike", True)
                member.error = RuntimeError(f"member {'' if alike else run.number} fails at its last epoch")
            if stop or epoch >= run.max_epochs:
                training.remove(member)
                on_leave(member)
        if config.get("always_raises"):
            raise ValueError("the objective is broken")
        if epoch == 2 and len(runs) > 1 and config.get("group_raises"):
            raise MemoryError("not enough memory for the group")  # for the group, not one member
        if epoch == 1 and any(_poisoned(run) for run in runs):
            os.kill(os.getpid(), signal_module.SIGKILL)
        if die_with is not None and epoch == 1 and any(run.number == int(die_with) for run in runs):
            _die_once(runs)
    return members


def _die_once(runs: Sequence[TrialRun]) -> None:
    """SIGKILL this process (as the OOM killer would), the first time only: a marker
    ``trainer-died`` in ``$HPO_TEST_MARKERS`` names the group's trials."""
    import signal as signal_module

    marker = Path(os.environ["HPO_TEST_MARKERS"]) / "trainer-died"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(",".join(str(run.number) for run in runs))
        os.kill(os.getpid(), signal_module.SIGKILL)


def _poisoned(run: TrialRun) -> bool:
    poison = run.config.get("poison_x")
    return poison is not None and float(run.config["x"]) == float(poison)


def _quadratic_unless_poisoned(run: TrialRun) -> float:
    """:func:`quadratic`; the trial whose x is ``settings.poison_x`` SIGKILLs its process after epoch 1.
    It counts its training as the fused trainer does: a group of one runs here, not there."""
    import signal as signal_module

    _leave_count_file(run)

    if run.config.get("always_raises"):
        raise ValueError("the objective is broken")
    if _poisoned(run):
        run.report(1, {"loss": 100.0})
        os.kill(os.getpid(), signal_module.SIGKILL)
    return quadratic(run)


FUSED_QUADRATIC = Objective(
    train=_quadratic_unless_poisoned,
    description="quadratic, with a fused trainer (hpo worker --fuse K)",
    fused_train=_fused_quadratic,
    may_differ=frozenset({"x", "y"}),
)
