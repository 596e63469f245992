"""One hpo trial as a Ray Tune function trainable (runs in a Ray worker process).

The driver's search algorithm has already claimed the Optuna trial and chosen its parameters
(they are in the storage); the Ray trial config carries only the trial's id. The trainable runs
the study's objective through :class:`hpo.objective.TrialRun`, exactly as a plain worker does,
so intermediate values and each epoch's metrics are written to the Optuna storage as epochs
finish. Each epoch is also reported to Ray (for its scheduler), with the objective's checkpoint
directory attached so that Ray can restore the trial after its process or node died.

Who records what in the storage:

* this trainable: each epoch's intermediate value and metrics; FAIL (with ``fail_reason``) when
  the objective raises, like a plain worker (Ray does not retry a failing objective, only a dead
  process); PRUNED when the objective itself raises ``optuna.TrialPruned``;
* the driver (:mod:`hpo.ray_backend._search`): COMPLETE, from the final result this trainable
  reports (:data:`FINAL_KEY`); PRUNED when Ray's scheduler stopped the trial; FAIL when Ray gave
  up restoring a dead trial.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from ray import tune

from hpo import _optuna
from hpo._lease import worker_identity
from hpo._rdb import WORKER_ATTR
from hpo.errors import HpoError
from hpo.objective import BUDGET_ATTR, TrialRun, resolve_objective
from hpo.ray_backend._schedulers import EPOCH_KEY
from hpo.storage import open_storage
from hpo.studies import checkpoint_folder, load_study_spec, trial_checkpoint_dir
from hpo.trainer import tune_malloc

# Ray trial config key holding the Optuna trial id claimed by the driver.
TRIAL_ID_KEY = "hpo_trial_id"
# Keys of the last result of a trial whose objective returned: FINAL_KEY marks it (1.0) and
# VALUE_KEY holds the objective's return value, which the driver records as the trial's value.
# The rest of that result repeats the last epoch's, so schedulers see no new data point.
FINAL_KEY = "hpo_final"
VALUE_KEY = "hpo_value"


@dataclass(frozen=True)
class RayJob:
    """What every Ray trial of one ``hpo worker --backend ray`` run needs (sent once via Ray)."""

    storage_url: str  # absolute: Ray workers do not share the driver's working directory
    study_name: str
    checkpoint_root: str  # absolute local path; objective checkpoints live below it per trial
    gpus_per_trial: float
    # The objective the driver checked against its side's allow-list (hpo.policy); a trial whose
    # stored definition names another one (changed in the database since) is refused.
    objective: str = ""
    # Folders where the objective's module is looked for (hpo._objective_path), chosen on the
    # driver's command line: never read from the storage.
    objective_path: tuple[str, ...] = ()


def checkpoint_dir_of(root: Path, study: optuna.Study, trial: FrozenTrial) -> Path:
    """The objective's checkpoint directory for ``trial``: the layout plain workers use, so a
    trial re-queued after an interrupted run resumes from the attempt it replaces."""
    return trial_checkpoint_dir(checkpoint_folder(root, study), trial.number, trial.system_attrs)


def record_failure(storage: BaseStorage, trial_id: int, reason: str) -> None:
    """Mark the trial FAIL with its reason (as plain workers do); no-op if it already finished."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_system_attr(trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _device(gpus_per_trial: float) -> str:
    if gpus_per_trial > 0 and ray.get_gpu_ids():
        import torch  # only when a GPU was granted: importing torch is slow

        if torch.cuda.is_available():
            return "cuda"  # Ray restricts CUDA_VISIBLE_DEVICES to the GPU it granted
    return "cpu"


def _restore(checkpoint_dir: Path) -> None:
    """Replace the local checkpoint directory by Ray's latest checkpoint of this trial, if any."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return  # first attempt, or the objective never wrote a checkpoint
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    checkpoint.to_directory(str(checkpoint_dir))


class _RayReporter:
    """``TrialRun.on_epoch``: each epoch's metrics (and the checkpoint) go to Ray as one result."""

    def __init__(self, checkpoint_dir: Path, metric: str) -> None:
        self.run: TrialRun | None = None
        self.checkpoint_dir = checkpoint_dir
        # Before any epoch: epoch 0, which every scheduler ignores (below any grace period).
        self.last: dict[str, float] = {EPOCH_KEY: 0}
        self.metric = metric

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        result = {name: float(value) for name, value in metrics.items()}
        result[EPOCH_KEY] = epoch
        self.last = result
        if self.run is not None:
            # Ray's scheduler may stop the trial at this report, after which the driver has
            # recorded it PRUNED and it takes no more writes: store the metrics first.
            self.run.flush()
        # The objective saves its checkpoint after run.report, so this is the previous epoch's:
        # a restored trial repeats at most one epoch.
        folder = self.checkpoint_dir
        has_files = folder.is_dir() and any(folder.iterdir())
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if has_files else None
        # Blocks until the driver has handled the result; if its scheduler stopped the trial,
        # Ray ends this thread here (SystemExit).
        tune.report(result, checkpoint=checkpoint)

    def final(self, value: float) -> None:
        tune.report({self.metric: value, **self.last, FINAL_KEY: 1.0, VALUE_KEY: value})


@contextlib.contextmanager
def _opened(url: str) -> Iterator[BaseStorage]:
    storage = open_storage(url)
    try:
        yield storage
    finally:
        engine = _optuna.rdb_engine(storage)
        if engine is not None:
            engine.dispose()  # actors are reused across trials: don't pile up connections


def run_trial(config: dict[str, Any], job: RayJob) -> None:
    """Ray Tune function trainable: train the Optuna trial named in ``config``."""
    tune_malloc()  # as hpo's own trainer process does (Ray reuses its worker processes)
    with warnings.catch_warnings():
        # As the hpo CLI does: Optuna flags features hpo relies on (TPE's group=True) as
        # experimental. And after a restore the objective repeats the epochs since its
        # checkpoint; Optuna keeps the first value of each epoch and would warn every time.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "The reported value is ignored", UserWarning)
        _run_trial(int(config[TRIAL_ID_KEY]), job)


def _run_trial(trial_id: int, job: RayJob) -> None:
    with _opened(job.storage_url) as storage:
        study, spec = load_study_spec(storage, job.study_name)
        # The driver's sampler chose the parameters (and ran its before_trial hook) already;
        # Ray's scheduler, not an Optuna pruner, decides pruning.
        study.sampler = optuna.samplers.RandomSampler()
        study.pruner = optuna.pruners.NopPruner()
        if job.objective and spec.objective != job.objective:
            raise HpoError(
                f"study {job.study_name!r}: the stored definition now names objective {spec.objective!r}, "
                f"not the {job.objective!r} this Ray run was started with; refusing to import it "
                "(fix: restart hpo worker --backend ray so the objective is checked again)"
            )
        objective = resolve_objective(spec.objective, "stored definition", search_path=job.objective_path)
        trial = _optuna.trial_for(study, trial_id)
        frozen = storage.get_trial(trial_id)
        storage.set_trial_system_attr(trial_id, WORKER_ATTR, worker_identity("ray"))
        checkpoint_dir = checkpoint_dir_of(Path(job.checkpoint_root), study, frozen)
        _restore(checkpoint_dir)
        reporter = _RayReporter(checkpoint_dir, spec.metric)
        run = TrialRun(
            trial=trial,
            spec=spec,
            params=dict(frozen.params),
            max_epochs=int(frozen.system_attrs.get(BUDGET_ATTR, spec.budget.max_epochs)),
            device=_device(job.gpus_per_trial),
            checkpoint_dir=checkpoint_dir,
            cache={},  # per trial: hpo keeps no state in Ray's (reused) worker processes
            on_epoch=reporter,
        )
        reporter.run = run
        finished = False
        try:
            try:
                value = float(objective.train(run))
                if not math.isfinite(value):
                    raise FloatingPointError(f"objective returned {value}")
            except optuna.TrialPruned:
                finished = True
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    run.flush()
                    study.tell(trial, state=TrialState.PRUNED)
                return
            except Exception as exc:  # a failing objective is a FAIL trial, not a Ray retry
                finished = True
                with contextlib.suppress(Exception):  # keep its learning curve if possible
                    run.flush()
                record_failure(storage, trial_id, f"{type(exc).__name__}: {exc}")
                if os.environ.get("HPO_DEBUG"):
                    print(traceback.format_exc(), flush=True)
                return
            finished = True
            run.flush()
            reporter.final(value)
        finally:
            # Keep the checkpoint only while the trial may still be resumed: Ray stopped this
            # attempt without the trial being finished (the run was interrupted).
            if finished or storage.get_trial(trial_id).state.is_finished():
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
