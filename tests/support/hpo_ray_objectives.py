"""Objectives for the Ray backend tests (importable by Ray's worker processes through PYTHONPATH,
which ``tests/conftest.py::cli_env`` sets and a local Ray instance passes on to its workers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hpo.objective import TrialRun


def crash_once(run: TrialRun) -> float:
    """``quadratic`` (plus a ``train_loss`` metric, half the loss) with a JSON checkpoint per
    epoch; the process dies once, after epoch 2.

    The first attempt of each trial kills its own process (``os._exit``, as an out-of-memory
    kill or a lost node would) once epoch 2 is saved; ``<HPO_TEST_MARKERS>/crash-<number>``
    records that it did. Ray must restore the trial from its last checkpoint and finish it.
    Also records the working directory the trial ran in (``user_attrs["cwd"]``).
    """
    run.trial.set_user_attr("cwd", os.getcwd())
    config = run.config
    target = (float(config["x"]) - 2.0) ** 2 + (float(config.get("y", 0.0)) + 1.0) ** 2
    state_file = run.checkpoint_dir / "state.json"
    start = 1
    if state_file.is_file():
        start = run.resume(json.loads(state_file.read_text())["history"]) + 1
    marker = Path(os.environ["HPO_TEST_MARKERS"]) / f"crash-{run.number}"
    for epoch in range(start, run.max_epochs + 1):
        loss = target + 1.0 / epoch
        stop = run.report(epoch, {"loss": loss, "train_loss": loss / 2})
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "history": run.history}))
        tmp.replace(state_file)
        if epoch == 2 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            os._exit(1)
        if stop:
            break
    return run.final_value()
