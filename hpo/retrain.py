"""``hpo retrain STUDY_NAME --epochs N [--top K | --trial N ...]``: train the winners (or chosen
trials) for longer, keep the curves.

Report 002 searched with a 25-epoch budget and early stopping, then trained the best
configuration for 40 epochs and read the final epoch count off its learning curves. This command
does that for any study: it loads the stored definition and the ``K`` best COMPLETE trials, and
trains each configuration for ``N`` epochs through the study's own objective (``Objective.train``,
so any objective works) with no pruning and no early stopping, seeded like the search.

``--trial N`` (repeatable) retrains trial N's configuration instead of the best ones, whatever its
state (e.g. a report's own setting, queued first with ``enqueue:``, that did not win). Its label is
``trialN`` where the best ones' is ``topR``.

What it records, for each retrained configuration (``topR`` is its rank, 1 = best; ``trialN``):

* a trial in the study ``STUDY_NAME/retrain`` in the same storage, with the same parameters and
  every epoch's metrics, so ``hpo dashboard`` shows the full learning curves next to the search;
* ``OUTPUT/topR/curves.csv`` and ``curves.json``: the per-epoch metrics;
* ``OUTPUT/topR/model.pt``: the final model's ``state_dict`` with its resolved configuration
  (``torch.load(path, weights_only=True)``), taken from the objective's last checkpoint; objectives
  that do not checkpoint through :func:`hpo.training.save_checkpoint` get curves but no model.
  The same file goes to the artifact store (``--artifact-dir``, ``$HPO_ARTIFACT_DIR``), as an
  artifact of its retrain trial, and is published there as ``artifact:STUDY_NAME`` (``#topR``
  for R > 1; ``#trialN`` with ``--trial N``): another study's setting (e.g.
  ``encoder_checkpoint``) names it so, and any worker that sees the artifact folder finds it
  (:func:`hpo.artifacts.resolve_model_reference`).

Every retrain starts from scratch (a leftover checkpoint in ``OUTPUT/topR`` is removed first).
``STUDY_NAME`` is the stored study's name (``--study-name`` at creation), not the study file's
``name:``: it names the retrain study and the published model.

Every place the results go (``OUTPUT``, its ``topR`` folders, the artifact folder) is created and
checked writable before anything trains, so a bad ``--output`` or ``--artifact-dir`` costs no
training; a retrain trial that was started ends FAIL with a ``fail_reason`` whatever goes wrong
later (a checkpoint that cannot be read, a full disk, Ctrl-C), never stays RUNNING.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from hpo import _optuna
from hpo._dashboard_data import store_records
from hpo._objective_path import objective_path
from hpo.artifacts import (
    ENV_ARTIFACT_DIR,
    models_folder,
    open_artifact_store,
    publish_model,
    resolve_artifact_dir,
    upload_trial_artifact,
)
from hpo.errors import HpoError
from hpo.objective import Objective, TrialRun, resolve_objective
from hpo.policy import ObjectivePolicy
from hpo.spec import (
    BudgetSpec,
    EarlyStoppingSpec,
    PrunerSpec,
    SamplerSpec,
    StudySpec,
    valid_study_name,
)
from hpo.storage import open_storage, resolve_storage_url
from hpo.studies import UID_ATTR, load_study_spec, probe_writable

RETRAIN_SUFFIX = "/retrain"
RETRAIN_OF_ATTR = "hpo:retrain_of"
DEFAULT_OUTPUT_ROOT = Path("storage/retrain")


@dataclass(frozen=True)
class RetrainResult:
    rank: int  # 1, 2, ... in the order retrained
    source: FrozenTrial
    trial_number: int  # in STUDY_NAME/retrain
    state: TrialState
    history: dict[str, list[float]]
    folder: Path
    model_file: Path | None
    error: str | None = None


def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` best COMPLETE trials, best first (ties: lower trial number first)."""
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None
    ]
    if not complete:
        raise HpoError(
            f"study {study.study_name!r} has no completed trial to retrain "
            f"(fix: run `hpo worker --study-name {study.study_name}` first; "
            f"see `hpo status {study.study_name}`)"
        )
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    complete.sort(key=lambda t: (sign * float(t.value), t.number))  # type: ignore[arg-type]
    return complete[:top]


def chosen_trials(study: optuna.Study, numbers: Sequence[int]) -> list[FrozenTrial]:
    """Trials ``numbers`` of ``study``, in that order: any that was sampled (COMPLETE, PRUNED, FAIL
    or RUNNING) has the parameters to retrain; a missing or still empty one is an error."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = []
    for number in dict.fromkeys(numbers):  # each once, in the order given
        trial = trials.get(number)
        if trial is None or not trial.params:
            valid = ", ".join(str(n) for n, t in sorted(trials.items()) if t.params) or "none yet"
            raise HpoError(
                f"study {study.study_name!r} has no trial {number} with parameters to retrain "
                f"(fix: --trial with one of: {valid}; see `hpo status {study.study_name}`)"
            )
        chosen.append(trial)
    return chosen


def retrain_spec(spec: StudySpec, epochs: int, n_trials: int, study_name: str | None = None) -> StudySpec:
    """The search's definition with a fixed budget, no pruning and no early stopping, named after
    the searched study ``study_name`` (the stored study's name; default the definition's). A study
    made elsewhere may have a name hpo would not give (``valid_study_name``), which a stored
    definition must not carry: the definition keeps its own name then."""
    study_name = study_name or spec.name
    name = study_name + RETRAIN_SUFFIX
    if not valid_study_name(name):
        name = spec.name + RETRAIN_SUFFIX
    return spec.model_copy(
        update={
            "name": name,
            "description": f"{study_name} best configurations trained for {epochs} epochs",
            "n_trials": n_trials,
            "budget": BudgetSpec(max_epochs=epochs),
            "early_stopping": EarlyStoppingSpec(),
            "pruner": PrunerSpec(),
            # Parameters are fixed per trial; a random sampler keeps the stored definition valid.
            "sampler": SamplerSpec(name="random", seed=spec.sampler.seed),
            "enqueue": (),  # the retrained configurations are queued one by one
        }
    )


def _retrain_study(storage: BaseStorage, study_name: str, spec: StudySpec) -> optuna.Study:
    study = optuna.create_study(
        storage=storage,
        study_name=study_name + RETRAIN_SUFFIX,
        direction=spec.direction,
        load_if_exists=True,
        pruner=optuna.pruners.NopPruner(),
    )
    study.set_user_attr(RETRAIN_OF_ATTR, study_name)
    if UID_ATTR not in study.user_attrs:
        study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    return study


def resolved_config(objective: Objective, config: Mapping[str, Any]) -> dict[str, Any]:
    """The objective's full configuration, defaults included (the raw one without a config model)."""
    if objective.config is None:
        return dict(config)
    try:
        return objective.config.model_validate(dict(config)).model_dump(mode="json")
    except ValueError:  # an invalid configuration failed its trial; keep what was given
        return dict(config)


def write_curves(folder: Path, history: Mapping[str, list[float]], meta: Mapping[str, Any]) -> None:
    """``curves.csv`` (one row per epoch) and ``curves.json`` (``meta`` plus the metrics)."""
    names = list(history)
    epochs = max((len(v) for v in history.values()), default=0)
    with (folder / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *names])
        for i in range(epochs):
            writer.writerow([i + 1, *[history[n][i] if i < len(history[n]) else "" for n in names]])
    (folder / "curves.json").write_text(json.dumps({**meta, "metrics": history}, indent=2) + "\n")


def _save_model(checkpoint: Path, target: Path, meta: Mapping[str, Any]) -> Path | None:
    import torch  # the CLI itself does not need torch until a model is saved

    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({"model": state["model"], **meta}, target)
    return target


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fresh_folder(folder: Path) -> None:
    """``folder`` emptied (a retrain starts from scratch) and created; OSError if it cannot be."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def prepare_outputs(output: Path, labels: Sequence[str], artifact_dir: Path, study_name: str) -> None:
    """Create every place the results go and check each is writable, before anything trains:
    ``output``, the artifact folder and the study's folder of published models in it, then
    ``output``'s ``labels`` folders (emptied). A failure is one :class:`HpoError` line naming the
    flag to change."""
    output_fix = "(fix: --output DIR naming a writable folder)"
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HpoError(
            f"output folder {str(output)!r}: cannot create it: {_reason(exc)} {output_fix}"
        ) from None
    try:
        probe_writable(output)
    except OSError as exc:
        raise HpoError(
            f"output folder {str(output)!r}: cannot write in it: {_reason(exc)} {output_fix}"
        ) from None

    artifact_fix = f"(fix: --artifact-dir DIR or ${ENV_ARTIFACT_DIR} naming a writable folder)"
    open_artifact_store(artifact_dir)  # creates it, or an HpoError naming --artifact-dir
    models = models_folder(artifact_dir, study_name)
    try:
        probe_writable(artifact_dir)
        models.mkdir(parents=True, exist_ok=True)
        probe_writable(models)
    except OSError as exc:
        raise HpoError(
            f"artifact folder {str(artifact_dir)!r}: cannot write in it: {_reason(exc)} {artifact_fix}"
        ) from None
    # Last: earlier results are removed only once every check passed.
    for label in labels:
        folder = output / label
        try:
            _fresh_folder(folder)
        except OSError as exc:
            raise HpoError(
                f"output folder {str(folder)!r}: cannot replace it: {_reason(exc)} {output_fix}"
            ) from None


def _best_epoch(values: list[float], direction: str) -> tuple[int, float] | None:
    if not values:
        return None
    pick = min if direction == "minimize" else max
    best = pick(range(len(values)), key=lambda i: values[i])
    return best + 1, values[best]


def retrain(
    storage: BaseStorage,
    study_name: str,
    *,
    epochs: int,
    top: int = 1,
    trials: Sequence[int] = (),
    output: Path | None = None,
    device: str = "cpu",
    console: Console | None = None,
    policy: ObjectivePolicy | None = None,
    search_path: Sequence[str] = (),
    artifact_dir: Path | None = None,
) -> list[RetrainResult]:
    """Retrain the ``top`` best trials of ``study_name`` (or trials number ``trials``, when given)
    for ``epochs`` epochs (see module docstring).

    The objective must pass ``policy``; its module is looked for in ``search_path`` too (folders
    chosen on the command line, see :mod:`hpo._objective_path`)."""
    if epochs < 1:
        raise HpoError(f"--epochs must be at least 1, got {epochs}")
    if top < 1:
        raise HpoError(f"--top must be at least 1, got {top}")
    console = console or Console(highlight=False, soft_wrap=True)
    study, spec = load_study_spec(storage, study_name)
    if spec.is_multi_objective:
        raise HpoError(
            f"study {study_name!r} has {len(spec.metrics)} metrics and no single best trial; hpo retrain "
            "needs a single-objective study (fix: run a trial of `hpo best` in a study of its own)"
        )
    sources = chosen_trials(study, trials) if trials else best_trials(study, top)
    labels = (
        [f"trial{t.number}" for t in sources] if trials else [f"top{r}" for r in range(1, len(sources) + 1)]
    )
    if not trials and len(sources) < top:
        console.print(f"study {study_name!r} has only {len(sources)} completed trial(s); retraining those")
    objective = resolve_objective(
        spec.objective, f"stored definition of study {study_name!r}", policy, search_path
    )
    output = output or DEFAULT_OUTPUT_ROOT / study_name.replace("/", "_")
    artifact_dir = artifact_dir or resolve_artifact_dir()
    prepare_outputs(output, labels, artifact_dir, study_name)  # before anything is recorded or trains

    target = _retrain_study(storage, study_name, spec)
    already = len(target.get_trials(deepcopy=False))
    definition_spec = retrain_spec(spec, epochs, already + len(sources), study_name)
    store_records(
        _optuna.study_storage(target),
        _optuna.study_id(target),
        target.study_name,
        definition=definition_spec.definition(),
    )

    cache: dict[str, Any] = {}  # datasets decoded once for all retrained configurations
    results = []
    for rank, (source, label) in enumerate(zip(sources, labels, strict=True), start=1):
        folder = output / label  # emptied by prepare_outputs
        searched = f"{spec.metric}={source.value:.6g}" if source.value is not None else source.state.name
        console.print(
            f"retrain {label}: trial {source.number} ({searched} in the search) "
            f"for {epochs} epochs on {device}: {source.params}"
        )
        place = _Place(study_name, rank, label, folder)
        results.append(
            _retrain_one(
                target, definition_spec, objective, source, place, device, cache, console, artifact_dir
            )
        )
    return results


@dataclass(frozen=True)
class _Place:
    """Where a retrained configuration goes: the searched study's name (the stored one, which names
    the published model), its rank, its label (``topR``/``trialN``), its folder."""

    study_name: str
    rank: int
    label: str
    folder: Path


def _retrain_one(
    study: optuna.Study,
    spec: StudySpec,
    objective: Objective,
    source: FrozenTrial,
    place: _Place,
    device: str,
    cache: dict[str, Any],
    console: Console,
    artifact_dir: Path,
) -> RetrainResult:
    epochs = spec.budget.max_epochs
    rank, label, folder = place.rank, place.label, place.folder
    source_study = place.study_name
    study.enqueue_trial(
        source.params,
        user_attrs={
            "retrain_of_trial": source.number,
            "retrain_epochs": epochs,
            "rank": rank,
            "label": label,
        },
    )
    trial = study.ask(fixed_distributions=source.distributions)  # pops the queued trial: same params
    checkpoint_dir = folder / "checkpoint"

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        console.print(f"  {label} epoch {epoch}/{epochs}: {shown}")

    error = None
    history: dict[str, list[float]] = {}
    model_file = None
    # From here on the trial is RUNNING: whatever fails, it ends FAIL with its reason.
    try:
        run = TrialRun(
            trial=trial,
            spec=spec,
            params=dict(trial.params),
            max_epochs=epochs,
            device=device,
            checkpoint_dir=checkpoint_dir,
            cache=cache,
            on_epoch=on_epoch,
        )
        value = math.nan
        try:
            value = float(objective.train(run))
            run.flush()  # TrialRun writes the curves at most every few seconds; store the last epochs
        except BaseException as exc:  # one failing configuration must not lose the others' results
            with contextlib.suppress(Exception):
                run.flush()  # keep the curve of a failing configuration
            error = _fail_trial(study, trial, exc)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop here
                raise
            console.print(f"  {label} FAILED: {error}")
        history = run.history
        meta = {
            "study": source_study,
            "source_trial": source.number,
            "source_value": source.value,
            "retrain_study": study.study_name,
            "retrain_trial": trial.number,
            "objective": spec.objective,
            "metric": spec.metric,
            "direction": spec.direction,
            "epochs": len(history.get(spec.metric, [])),
            "params": dict(source.params),
            "config": resolved_config(objective, run.config),
            "data": dict(spec.data),
            "seed": spec.seed,
        }
        write_curves(folder, history, meta)
        if error is None:
            model_file = _save_model(checkpoint_dir / "checkpoint.pt", folder / "model.pt", meta)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # optimizer state is not needed any more
            stored = ""
            if model_file is not None:
                # Before tell: Optuna records an artifact with a trial that is still running.
                artifact_id = upload_trial_artifact(trial, model_file, artifact_dir)
                publish_model(artifact_dir, source_study, label, artifact_id, meta)
                reference = f"artifact:{source_study}{'' if label == 'top1' else f'#{label}'}"
                stored = f" ({reference} in {artifact_dir})"
            study.tell(trial, value)
            best = _best_epoch(history.get(spec.metric, []), spec.direction)
            no_model = "no model (the objective wrote no checkpoint)"
            where = f"model {model_file}{stored}" if model_file else no_model
            best_text = f"; best {spec.metric}={best[1]:.6g} at epoch {best[0]}" if best else ""
            console.print(f"  {label} done: final {spec.metric}={value:.6g}{best_text}; curves and {where}")
    except BaseException as exc:  # after training: storing the results failed
        if _is_running(study, trial):
            error = _fail_trial(study, trial, exc)
            if isinstance(exc, Exception):
                console.print(f"  {label} FAILED after training: {error}")
        elif error is None:  # the trial was already told COMPLETE
            raise
        elif isinstance(exc, Exception):  # a failed configuration whose curves could not be written
            console.print(f"  {label}: curves not written: {type(exc).__name__}: {exc}")
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop here
            raise
    frozen = _optuna.study_storage(study).get_trial(_optuna.trial_id(trial))
    return RetrainResult(rank, source, frozen.number, frozen.state, history, folder, model_file, error)


def _fail_trial(study: optuna.Study, trial: optuna.Trial, exc: BaseException) -> str:
    """Finish ``trial`` as FAIL with ``exc`` as its ``fail_reason``; returns the reason."""
    reason = f"{type(exc).__name__}: {exc}"
    _optuna.study_storage(study).set_trial_system_attr(_optuna.trial_id(trial), "fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    return reason


def _is_running(study: optuna.Study, trial: optuna.Trial) -> bool:
    frozen = _optuna.study_storage(study).get_trial(_optuna.trial_id(trial))
    return frozen.state == TrialState.RUNNING


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def cmd_retrain(args: argparse.Namespace) -> int:
    storage = open_storage(resolve_storage_url(args.storage))
    results = retrain(
        storage,
        args.study_name,
        epochs=args.epochs,
        top=args.top,
        trials=args.trial or (),
        output=Path(args.output) if args.output else None,
        device=args.device or _default_device(),
        # Like a worker: the database does not choose the code that runs here (hpo.policy).
        policy=ObjectivePolicy.from_sources(cli_patterns=args.allow_objective),
        # The current directory and --objective-path folders: never a folder from the storage.
        search_path=objective_path(None, args.objective_path),
        artifact_dir=resolve_artifact_dir(args.artifact_dir),
    )
    failed = [r for r in results if r.error is not None]
    print(
        f"retrained {len(results) - len(failed)} of {len(results)} configuration(s) of {args.study_name!r}; "
        f"curves in study {args.study_name + RETRAIN_SUFFIX!r} and under {results[0].folder.parent}"
    )
    return 1 if failed else 0
