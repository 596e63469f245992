"""``checkpoint_every: N``: when the image classifier writes checkpoints, and fused optimizers (CPU).

A checkpoint is written every N epochs and always at the trial's last epoch, however the trial
ends (the budget's end, early stopping, pruning). Exact resumption of a trial killed between two
checkpoints is tested in ``test_resume_exact.py``. ``checkpoint_async: true`` writes them in a
background thread; a SIGKILL during such a write leaves the previous whole checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from synthetic_data import make_imagefolder

from hpo.errors import HpoError
from hpo.objective import TrialRun
from hpo.spec import parse_study
from hpo.training import CHECKPOINT_FILE, build_optimizer, checkpoint_due, load_checkpoint, save_checkpoint
from objectives.vision.train import train

MLP = {"model": "mlp", "mlp_width": 16, "mlp_layers": 1, "batch_size": 16, "optimizer": "adam"}


class PruneAt(optuna.pruners.BasePruner):
    """Prunes every trial once it has reported epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return (trial.last_step or 0) >= self.epoch


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("colours"), classes=3, per_class=8, size=8)


def study_raw(colours: Path, settings: Mapping[str, Any], epochs: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "every",
        "objective": "image_classifier",
        "data": {"format": "imagefolder", "root": str(colours), "image_size": 8, "val_fraction": 0.3},
        "settings": {**MLP, **settings},
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": epochs},
        "seed": 3,
        "sampler": "random",
        **extra,
    }


def on_disk(directory: Path) -> int | None:
    path = directory / CHECKPOINT_FILE
    return int(torch.load(path, weights_only=True)["epoch"]) if path.is_file() else None


def run_trial(
    colours: Path,
    directory: Path,
    settings: Mapping[str, Any],
    epochs: int,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
    **extra: Any,
) -> tuple[TrialRun, list[int | None]]:
    """Train one trial; also returns the checkpoint epoch on disk as each epoch is reported."""
    spec = parse_study(study_raw(colours, settings, epochs, **extra), "test study")
    seen: list[int | None] = []
    run = TrialRun(
        trial=optuna.create_study(pruner=pruner).ask(),
        spec=spec,
        params={"lr": 1e-2},
        max_epochs=epochs,
        device="cpu",
        checkpoint_dir=directory,
        cache={},
        on_epoch=lambda epoch, metrics: seen.append(on_disk(directory)),
    )
    train(run)
    return run, seen


def test_checkpoint_due_every_n_epochs_and_at_the_budgets_end() -> None:
    assert [e for e in range(1, 8) if checkpoint_due(e, 7, 3)] == [3, 6, 7]
    assert [e for e in range(1, 5) if checkpoint_due(e, 4)] == [1, 2, 3, 4]  # the default: every epoch
    with pytest.raises(ValueError, match="at least 1"):
        checkpoint_due(1, 4, 0)


def test_checkpoints_every_third_epoch_and_at_the_last(colours: Path, tmp_path: Path) -> None:
    run, seen = run_trial(colours, tmp_path, {"checkpoint_every": 3}, epochs=7)
    # what was on disk while epoch e was reported (that epoch's own checkpoint comes after it)
    assert seen == [None, None, None, 3, 3, 3, 6]
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 7 and state["history"] == run.history
    assert "checkpoint_every" not in state["config"]["config"]  # when to save is not the run's identity


def test_an_early_stopped_trial_checkpoints_its_last_epoch(colours: Path, tmp_path: Path) -> None:
    # min_delta far above any change of val_loss: no improvement after epoch 1, stop after epoch 2
    early = {"rule": "patience", "patience": 1, "min_delta": 100.0}
    run, _ = run_trial(colours, tmp_path, {"checkpoint_every": 5}, epochs=10, early_stopping=early)
    assert len(run.history["val_loss"]) == 2
    assert on_disk(tmp_path) == 2


def test_a_pruned_trial_checkpoints_the_epoch_it_was_pruned_at(colours: Path, tmp_path: Path) -> None:
    with pytest.raises(optuna.TrialPruned):
        run_trial(colours, tmp_path, {"checkpoint_every": 4}, epochs=10, pruner=PruneAt(2))
    assert on_disk(tmp_path) == 2


def test_checkpoint_every_must_be_positive(colours: Path, tmp_path: Path) -> None:
    with pytest.raises(HpoError, match=r"image_classifier: checkpoint_every: .*greater than or equal to 1"):
        run_trial(colours, tmp_path, {"checkpoint_every": 0}, epochs=2)


def test_cpu_optimizers_stay_unfused_and_a_fused_checkpoint_does_not_make_them_fused(tmp_path: Path) -> None:
    """Fused kernels are picked only for CUDA parameters; a checkpoint written by a fused optimizer
    (a CUDA run) restores its state into the classic one without switching it to fused."""
    for name in ("sgd", "adam", "adamw"):
        model = torch.nn.Linear(4, 2)
        optimizer = build_optimizer(name, model.parameters(), 0.1, momentum=0.9)  # an iterator, read once
        assert not optimizer.param_groups[0].get("fused") and len(optimizer.param_groups[0]["params"]) == 2

    model = torch.nn.Linear(4, 2)
    fused = build_optimizer("adamw", [{"params": list(model.parameters())}], 0.1, fused=True)
    assert fused.param_groups[0]["fused"] is True
    model(torch.ones(3, 4)).sum().backward()
    fused.step()
    save_checkpoint(tmp_path, model=model, optimizer=fused, scheduler=None, epoch=1, config={}, history={})

    again = torch.nn.Linear(4, 2)
    classic = build_optimizer("adamw", again.parameters(), 0.1)
    assert load_checkpoint(tmp_path, model=again, optimizer=classic, scheduler=None, config={}) == (1, {})
    assert not classic.param_groups[0]["fused"]
    assert classic.state_dict()["state"][0]["exp_avg"].equal(fused.state_dict()["state"][0]["exp_avg"])


WRITER = """
import sys
from pathlib import Path

import torch

from hpo.training import CheckpointWriter

torch.set_num_threads(1)
model = torch.nn.Linear(2048, 4096)  # 32 MB of weights, 96 MB with Adam's moments
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
model(torch.ones(1, 2048)).sum().backward()
optimizer.step()
with CheckpointWriter(asynchronous=True) as writer:
    for epoch in range(1, 1000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(epoch)
        writer.save(Path(sys.argv[1]), model=model, optimizer=optimizer, scheduler=None, epoch=epoch,
                    config={}, history={"val_loss": [0.0] * epoch})
        print(epoch, flush=True)
        with torch.no_grad():  # training goes on while the checkpoint is written
            for p in model.parameters():
                p.fill_(-1.0)
"""


def in_flight(directory: Path) -> list[Path]:
    """The temporary files of checkpoint writes under way (or of writers that died mid-write)."""
    return list(directory.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.parametrize("kill_when", ["mid-write", "after-a-while"])
def test_sigkill_during_an_asynchronous_write_leaves_the_previous_whole_checkpoint(
    tmp_path: Path, kill_when: str
) -> None:
    """A trainer killed (SIGKILL) while its background thread writes a checkpoint leaves the last
    completed one, whole and consistent: every weight is its epoch's (the snapshot was taken before
    training changed them), its history has that many epochs, and it is at most one epoch behind
    what the trainer had asked to save."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    try:
        asked = 0
        while asked < 3:  # epochs 1 and 2 are on disk once 3 is asked for
            asked = int(child.stdout.readline())
        if kill_when == "mid-write":
            deadline = time.monotonic() + 60
            while not in_flight(directory) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert in_flight(directory), "no write was seen in flight"
        else:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    for line in child.stdout.read().split():  # what it asked for before it died
        asked = int(line)
    state = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    epoch = state["epoch"]
    assert asked - 1 <= epoch <= asked
    assert len(state["history"]["val_loss"]) == epoch
    for name, tensor in state["model"].items():
        assert bool((tensor == epoch).all()), name
    # The retry's first write removes what the killed writer left mid-write (up to the model's
    # size, once per kill).
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(
        directory, model=model, optimizer=optimizer, scheduler=None, epoch=1, config={}, history={}
    )
    assert in_flight(directory) == []


CONCURRENT_WRITER = """
import sys
from pathlib import Path

import torch

from hpo.training import save_checkpoint

torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(1, 301):
    save_checkpoint(Path(sys.argv[1]), model=model, optimizer=optimizer, scheduler=None, epoch=epoch,
                    config={"writer": sys.argv[2]}, history={"val_loss": [0.0] * epoch})
"""


def test_two_processes_checkpointing_one_trial_at_once_never_fail_or_tear_it(tmp_path: Path) -> None:
    """A paused worker's trainer goes on training while the trial's retry trains in the same
    folder: both write its checkpoint. Neither may fail (one's rename took away the other's
    temporary file: FileNotFoundError failed the retry for good) and the checkpoint is always one
    writer's whole file."""
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER)
    directory = tmp_path / "trial-0"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(directory), name], env=env, stderr=subprocess.PIPE, text=True
        )
        for name in ("paused", "retry")
    ]
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    state = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    assert state["config"]["writer"] in ("paused", "retry") and state["epoch"] == 300
    assert state["model"]["weight"].shape == (256, 256)
    assert in_flight(directory) == []


def test_only_a_dead_writers_temporary_file_is_removed(tmp_path: Path) -> None:
    host = os.uname().nodename.replace(".", "_")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "dead": f".checkpoint.pt.{host}.{dead.pid}.1.tmp",  # a writer SIGKILLed mid-write
            "live": f".checkpoint.pt.{host}.{live.pid}.1.tmp",  # another trainer writing now
            "other host": f".checkpoint.pt.elsewhere.{dead.pid}.1.tmp",  # a shared file system
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        model = torch.nn.Linear(2, 2)
        save_checkpoint(
            tmp_path,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            scheduler=None,
            epoch=1,
            config={},
            history={},
        )
    finally:
        live.kill()
        live.wait()
    left = {path.name for path in in_flight(tmp_path)}
    assert left == {names["live"], names["other host"]}
    assert (tmp_path / CHECKPOINT_FILE).is_file()


def test_asynchronous_checkpoints_hold_what_synchronous_ones_do(colours: Path, tmp_path: Path) -> None:
    sync, _ = run_trial(colours, tmp_path / "sync", {"checkpoint_every": 2}, epochs=3)
    asyn, _ = run_trial(
        colours, tmp_path / "async", {"checkpoint_every": 2, "checkpoint_async": True}, epochs=3
    )
    assert asyn.history == sync.history
    a = torch.load(tmp_path / "async" / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(tmp_path / "sync" / CHECKPOINT_FILE, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["config"] == b["config"] and a["history"] == b["history"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][index][k], v) for k, v in moments.items())
