"""Creating, adopting and loading studies together with their stored definition.

A study's definition (the resolved study file) lives in the study's system attribute
``hpo:definition`` (read through :mod:`hpo._records`; the dashboard's study note shows it as
YAML). Its trial budget is materialised when the study is created: ``n_trials``
WAITING trials are queued (the grid's points, with their parameters fixed, for grid search; for every
other sampler, the study file's ``enqueue:`` points first, with their parameters fixed, then empty
slots, whose parameters the sampler picks when a worker claims the slot).
Workers only ever claim queued trials, with one conditional update (:mod:`hpo._rdb`), so the
study gets exactly ``n_trials`` trials however many workers run, on any machine. Queueing is
idempotent: a creation interrupted half-way is completed by the next ``create-study`` or worker.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna, _records
from hpo._dashboard_data import store_records
from hpo.errors import HpoError, StudyDefinitionMismatch
from hpo.samplers import make_pruner, make_sampler
from hpo.space import grid_points
from hpo.spec import STUDY_NAME_FIX, StudySpec, definition_diff, spec_from_definition, valid_study_name
from hpo.storage import study_lock

DEFINITION_ATTR = _records.DEFINITION_KEY
# A random id given to each study when hpo defines it: names repeat across storages and after a
# study is deleted and re-created, and files kept per study (checkpoints) must never be mixed up.
UID_ATTR = "hpo:uid"
# What was done to the study after its creation (hpo.lifecycle): a list of records such as
# {"action": "extend", "n_trials": 10, "at": "..."}; extensions raise the stored n_trials.
HISTORY_ATTR = _records.HISTORY_KEY
# User attribute of the trials queued from the study file's ``enqueue:`` (the dashboard shows it).
ENQUEUED_ATTR = "enqueued_from"


def _load(storage: BaseStorage, study_name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def stored_definition(study: optuna.Study) -> dict[str, Any] | None:
    """The study's stored definition (a study system attribute, or the legacy user attribute:
    see :mod:`hpo._records`), or None for a study hpo did not define."""
    return _records.study_definition(study)


def _is_retry(trial: FrozenTrial) -> bool:
    return "failed_trial" in trial.system_attrs


def _point_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True, default=str)


def _queue_budget(study: optuna.Study, spec: StudySpec) -> int:
    """Queue the trials the study is missing (see the module docstring); how many were queued.

    Idempotent: a creation interrupted half-way (any line, SIGKILL included) is completed by the
    next ``create-study`` or worker, and a complete queue is left alone. Retries replace the
    slot of the attempt they retry, so they do not count as slots.
    """
    slots = [t for t in study.get_trials(deepcopy=False) if not _is_retry(t)]
    queued = 0
    if spec.sampler.name == "grid":
        present = {_point_key(t.system_attrs.get("fixed_params") or t.params) for t in slots}
        for point in grid_points(spec.space):
            if _point_key(point) not in present:
                study.enqueue_trial(point, skip_if_exists=False)
                queued += 1
    else:
        # The study file's ``enqueue:`` points first (so they are the first trials), each once:
        # a point already fixed on a slot (by an earlier, maybe interrupted, creation, or by
        # ``hpo enqueue``) is not queued again. Then empty slots up to n_trials.
        fixed = Counter(
            _point_key(t.system_attrs["fixed_params"]) for t in slots if t.system_attrs.get("fixed_params")
        )
        for point in spec.enqueue:
            key = _point_key(point)
            if fixed[key] > 0:
                fixed[key] -= 1
                continue
            study.enqueue_trial(point, user_attrs={ENQUEUED_ATTR: "study file"}, skip_if_exists=False)
            queued += 1
        for _ in range(max(0, spec.n_trials - len(slots) - queued)):
            study.enqueue_trial({})
            queued += 1
    return queued


def complete_queue(storage: BaseStorage, study: optuna.Study, spec: StudySpec) -> int:
    """Queue whatever trials ``study`` lacks, under the study lock; how many were queued."""
    with study_lock(storage, study.study_name):
        return _queue_budget(study, spec)


def history(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's lifecycle records (``hpo:history``), oldest first."""
    return _records.study_history(study)


def extended_trials(study: optuna.Study) -> int:
    """How many trials ``hpo extend`` added to the study's budget, over all its extensions."""
    return sum(int(r.get("n_trials", 0)) for r in history(study) if r.get("action") == "extend")


def _check_same(study_name: str, study: optuna.Study, spec: StudySpec) -> StudySpec:
    """Refuse a ``spec`` whose definition differs from the stored one; the spec to queue with.

    A stored ``n_trials`` larger than the file's by exactly the trials ``hpo extend`` recorded
    is the same study (the original file stays usable); the returned spec then has that budget.
    """
    stored = stored_definition(study)
    if stored is None:
        return spec
    given = spec.definition()
    extra = extended_trials(study)
    if extra and stored.get("n_trials") == spec.n_trials + extra:
        given["n_trials"] = stored["n_trials"]
        spec = spec.model_copy(update={"n_trials": spec.n_trials + extra})
    diff = definition_diff(stored, given)
    if diff:
        raise StudyDefinitionMismatch(
            f"study {study_name!r} exists with a different definition; refusing to resume it silently.\n"
            f"{diff}\n"
            "(fix: restore the study file; replace the stored study with hpo create-study STUDY_FILE "
            "--replace; or create a new study with --study-name NEW_NAME)"
        )
    return spec


def _check_direction(study_name: str, study: optuna.Study, spec: StudySpec) -> None:
    directions = [d.name.lower() for d in study.directions]
    if directions != list(spec.directions):
        raise HpoError(
            f"study {study_name!r} was created to {', '.join(directions)} but the study file says "
            f"direction: {', '.join(spec.directions)} (fix: make them agree)"
        )


def create_study(
    storage: BaseStorage, spec: StudySpec, study_name: str | None = None, skip_if_exists: bool = False
) -> tuple[optuna.Study, bool]:
    """Create the study (definition stored, budget queued). Returns the study and whether it is new.

    An existing study is an error unless ``skip_if_exists``; it is always an error when its stored
    definition differs from ``spec``.
    """
    name = study_name or spec.name
    with study_lock(storage, name):
        study = _load(storage, name)
        if study is None and not valid_study_name(name):  # the file's own name: checked on load
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise HpoError(f"--study-name {shown!r} is not a valid study name (fix: {STUDY_NAME_FIX})")
        if study is not None:
            effective = _check_same(name, study, spec)
            if stored_definition(study) is None:
                # No definition: made by `optuna create-study`, or an hpo creation killed before
                # it stored one (then the study has no trials yet, and is simply completed).
                if not skip_if_exists and study.get_trials(deepcopy=False):
                    raise HpoError(f"study {name!r} already exists (fix: pass --skip-if-exists to reuse it)")
                _adopt_locked(name, study, spec)
            elif _queue_budget(study, effective) == 0 and not skip_if_exists:
                # (A creation interrupted before its queue was complete is completed above.)
                raise HpoError(f"study {name!r} already exists (fix: pass --skip-if-exists to reuse it)")
            return study, False
        return create_locked(storage, name, spec), True


def create_locked(storage: BaseStorage, name: str, spec: StudySpec) -> optuna.Study:
    """Create the study with its definition and queue; the caller holds :func:`study_lock`."""
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=list(spec.directions),
        sampler=make_sampler(spec),
        pruner=make_pruner(spec.pruner, spec.budget.max_epochs),
    )
    _install(study, spec)
    return study


def _install(study: optuna.Study, spec: StudySpec) -> None:
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    # The dashboard (and trials_dataframe) then say "val_loss", not "Objective 0".
    study.set_metric_names(list(spec.metrics))
    # The definition is a system attribute (Optuna's tools show user attributes, see
    # hpo._records), and the dashboard's study note shows it as YAML.
    store_records(
        _optuna.study_storage(study), _optuna.study_id(study), study.study_name, definition=spec.definition()
    )
    _queue_budget(study, spec)


def _adopt_locked(name: str, study: optuna.Study, spec: StudySpec) -> None:
    _check_direction(name, study, spec)
    _install(study, spec)


def adopt_study(storage: BaseStorage, study_name: str, spec: StudySpec) -> optuna.Study:
    """Give a study made elsewhere (``optuna create-study``) hpo's definition and queued budget."""
    with study_lock(storage, study_name):
        study = _load(storage, study_name)
        if study is None:
            raise HpoError(
                f"no study named {study_name!r} in this storage "
                "(fix: create it with hpo create-study or optuna create-study, or check --storage)"
            )
        if stored_definition(study) is not None:
            _queue_budget(study, _check_same(study_name, study, spec))
        else:
            _adopt_locked(study_name, study, spec)
        return study


def load_study_spec(storage: BaseStorage, study_name: str) -> tuple[optuna.Study, StudySpec]:
    """The study and the definition stored with it."""
    study = _load(storage, study_name)
    if study is None:
        raise HpoError(
            f"no study named {study_name!r} in this storage "
            "(fix: check the name with `hpo status`, or pass the study file / --storage)"
        )
    definition = stored_definition(study)
    if definition is None:
        raise HpoError(
            f"study {study_name!r} has no hpo definition "
            f"(fix: run `hpo worker --study-name {study_name} --spec STUDY_FILE` once to adopt it)"
        )
    spec = spec_from_definition(definition, f"stored definition of study {study_name!r}")
    return study, spec


def study_uid(study: optuna.Study) -> str:
    uid = study.user_attrs.get(UID_ATTR)
    return uid if isinstance(uid, str) else f"id{_optuna.study_id(study)}"


# A file name is at most 255 bytes: a longer study name is cut (the unique id keeps it apart).
_FOLDER_NAME_BYTES = 200


def checkpoint_folder(root: Path, study: optuna.Study) -> Path:
    """The study's folder of trial checkpoints under ``root`` (its name plus its unique id)."""
    name = study.study_name.replace("/", "_").encode()[:_FOLDER_NAME_BYTES].decode(errors="ignore")
    return root / f"{name}-{study_uid(study)[:12]}"


def probe_writable(folder: Path) -> None:
    """OSError unless this user can create a file in ``folder`` (what os.access cannot tell: a
    read-only file system, a full disk's quota, a root-owned folder when running as root)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpo-write-check-"):
        pass


def check_checkpoint_root(root: Path, flag: str = "--checkpoint-dir") -> None:
    """One line now, before a trial is claimed, if this user cannot create and write checkpoints
    under ``root``: found by the first trial instead, every trial failed for good, each with its
    own path in the reason (so not even the broken-objective rule stopped the worker)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_writable(root)
    except OSError as exc:
        raise HpoError(
            f"{flag} {str(root)!r}: checkpoints cannot be written there: {exc.strerror or exc} "
            f"(fix: {flag} a folder this user can write, e.g. storage/checkpoints)"
        ) from None


def trial_checkpoint_dir(study_folder: Path, number: int, system_attrs: Mapping[str, Any]) -> Path:
    """Where trial ``number`` checkpoints. A retried trial shares the folder of the attempt it
    replaces, so it resumes ("failed_trial", Optuna's name for the first attempt of a retry chain)."""
    origin = system_attrs.get("failed_trial")
    return study_folder / f"trial-{number if origin is None else int(origin)}"


def trial_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts
