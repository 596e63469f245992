"""Study lifecycle: ``hpo extend``, ``hpo enqueue``, ``hpo delete-study`` and :func:`replace_study`.

What an Optuna user does by calling ``study.optimize`` again, ``study.enqueue_trial(...)`` or
``optuna.delete_study``, for studies whose budget is queued up front (:mod:`hpo.studies`):

* **extend** raises the stored definition's ``n_trials`` by N, records
  ``{"action": "extend", "n_trials": N, "at": ...}`` in the study (system) attribute ``hpo:history``
  (both in one transaction) and queues the N new slots. The original study file stays usable:
  a stored ``n_trials`` above the file's by exactly the recorded extensions is the same study.
  Grid studies are refused (the grid's size is their ``n_trials``).
* **enqueue** validates known configurations against the study's search space and fixes each on
  the oldest empty WAITING slot (Optuna's ``fixed_params`` system attribute, one conditional
  transaction, :meth:`hpo._rdb.HpoRDBStorage.fill_empty_slot`), so the study keeps exactly
  ``n_trials`` trials and workers, which claim the oldest WAITING trial first, run them next.
* **delete-study** deletes the study, its checkpoint folder and its artifacts' files.
* :func:`replace_study` (``create-study --replace``) deletes and re-creates a study under the
  study lock, returning the definition diff.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from hpo import _optuna
from hpo._commands.lifecycle import DEFAULT_CHECKPOINT_ROOT
from hpo._dashboard_data import store_records
from hpo._rdb import rdb_of
from hpo.artifacts import resolve_artifact_dir
from hpo.errors import HpoError
from hpo.space import SearchSpace
from hpo.spec import MAX_TRIALS, StudySpec, definition_diff, read_yaml_file
from hpo.storage import open_storage, redact, resolve_storage_url, study_lock
from hpo.studies import (
    _load,
    _queue_budget,
    checkpoint_folder,
    create_locked,
    history,
    load_study_spec,
    stored_definition,
)

ARTIFACTS_ATTR_PREFIX = "artifacts:"  # optuna.artifacts._upload.ARTIFACTS_ATTR_PREFIX


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- extend


def extend_study(storage: BaseStorage, study_name: str, n_trials: int) -> tuple[int, int]:
    """Raise the study's budget by ``n_trials`` and queue the new slots; (new n_trials, queued)."""
    if n_trials < 1:
        raise HpoError(f"--n-trials must be at least 1, got {n_trials}")
    with study_lock(storage, study_name):
        study, spec = load_study_spec(storage, study_name)
        if spec.sampler.name == "grid":
            raise HpoError(
                f"study {study_name!r} is a grid search: its n_trials is the grid's size "
                "(fix: add values to the grid in the study file and create a new study "
                "with --study-name NEW_NAME)"
            )
        definition = stored_definition(study)
        assert definition is not None  # load_study_spec refuses a study without one
        total = spec.n_trials + n_trials
        if total > MAX_TRIALS:  # checked before anything is written: the stored study stays valid
            room = MAX_TRIALS - spec.n_trials
            raise HpoError(
                f"study {study_name!r} has n_trials={spec.n_trials}: {n_trials} more would make "
                f"{total}, above hpo's limit of {MAX_TRIALS:,} trials a study (fix: "
                + (
                    f"--n-trials {room} at most)"
                    if room > 0
                    else "create a new study with --study-name NEW_NAME)"
                )
            )
        record = {"action": "extend", "n_trials": n_trials, "at": _now()}
        store_records(
            storage,
            _optuna.study_id(study),
            study_name,
            definition={**definition, "n_trials": total},
            history=[*history(study), record],
        )
        study, spec = load_study_spec(storage, study_name)
        queued = _queue_budget(study, spec)
    return total, queued


# --------------------------------------------------------------------------- enqueue


def _describe(param: Any) -> str:
    if param.kind == "categorical":
        return f"one of {list(param.choices)}"
    text = f"in [{param.low}, {param.high}]"
    if (param.kind == "int" and param.step != 1) or (param.kind == "float" and param.step):
        text += f" on steps of {param.step} from {param.low}"
    return text


def check_config(space: SearchSpace, config: Any, where: str) -> dict[str, Any]:
    """``config`` validated against ``space`` (ints accepted for floats); one-line HpoError if not."""
    if not isinstance(config, Mapping) or not config:
        raise HpoError(
            f"{where}: a configuration must be a mapping of parameter names to values, got {config!r} "
            '(fix: e.g. {"lr": 0.01})'
        )
    names = ", ".join(space.names)
    for name in config:
        if name not in space.names:
            raise HpoError(
                f"{where}: parameter {name!r} is not in the study's search space (fix: remove it; "
                f"the parameters are {names})"
            )
    values: dict[str, Any] = {}
    for param in space:
        if param.when is not None and not param.when.is_active(values):
            if param.name in config:
                parents = ", ".join(f"{p}={values.get(p)!r}" for p in param.when.parents())
                raise HpoError(
                    f"{where}: parameter {param.name!r} is inactive when {parents} "
                    f"(fix: remove it, or set {param.when.to_dict()})"
                )
            continue
        if param.name not in config:
            raise HpoError(f"{where}: parameter {param.name!r} is missing (fix: add it, {_describe(param)})")
        value = config[param.name]
        if param.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = param.contains(value)
        if ok and param.kind == "float" and param.step:
            ok = _optuna.distribution_contains(
                optuna.distributions.FloatDistribution(param.low, param.high, step=param.step), value
            )
        if not ok:
            raise HpoError(
                f"{where}: {param.name}={value!r} is outside the search space "
                f"(fix: use a value {_describe(param)})"
            )
        values[param.name] = value
    try:
        space.validate_config(values)  # the canonical check; the ones above name the fix
    except ValueError as exc:
        raise HpoError(f"{where}: {exc}") from None
    return values


def read_configs(params: str | None, from_file: str | None) -> list[Any]:
    """The configurations of ``--params JSON`` or ``--from FILE`` (a mapping or a list of them)."""
    if params is not None:
        try:
            raw = json.loads(params)
        except json.JSONDecodeError as exc:
            raise HpoError(
                f"--params: invalid JSON: {exc.msg} (fix: e.g. --params '{{\"lr\": 0.01}}')"
            ) from None
        source = "--params"
    else:
        assert from_file is not None
        raw = read_yaml_file(Path(from_file), "file of configurations")  # YAML is a superset of JSON
        source = from_file
    configs = raw if isinstance(raw, list) else [raw]
    if not configs:
        raise HpoError(f"{source}: no configuration given (fix: a mapping, or a list of mappings)")
    return configs


def enqueue_configs(storage: BaseStorage, study_name: str, configs: list[Any], source: str) -> list[int]:
    """Fix each configuration on the oldest empty WAITING slot; the trial numbers, in order.

    Every configuration is validated before any is written; a study with fewer empty slots than
    configurations is refused before any is written too.
    """
    study, spec = load_study_spec(storage, study_name)
    if spec.sampler.name == "grid":
        raise HpoError(
            f"study {study_name!r} is a grid search: every grid point is already queued "
            "(fix: add the values to the grid in the study file and create a new study)"
        )
    rdb = rdb_of(storage)
    if rdb is None:
        raise HpoError(
            "hpo enqueue needs the study's database (fix: pass its SQLAlchemy URL as --storage, "
            "not a grpc:// proxy)"
        )
    several = len(configs) > 1
    checked = [
        check_config(spec.space, c, f"{source}[{i}]" if several else source) for i, c in enumerate(configs)
    ]
    study_id = _optuna.study_id(study)
    fix = f"hpo extend {study_name} --n-trials {len(checked)} first"
    with study_lock(storage, study_name):
        empty = _empty_slots(study)
        if empty < len(checked):
            raise HpoError(
                f"study {study_name!r} has {empty} empty queued slot(s) for {len(checked)} "
                f"configuration(s); every other trial has started or has its parameters (fix: {fix})"
            )
        numbers: list[int] = []
        for config in checked:
            number = rdb.fill_empty_slot(study_id, config)
            if number is None:  # a worker claimed the slots meanwhile
                raise HpoError(
                    f"study {study_name!r}: no empty queued slot left for {config} "
                    f"({len(numbers)} of {len(checked)} enqueued) (fix: {fix})"
                )
            numbers.append(number)
            study = optuna.load_study(study_name=study_name, storage=storage)
            record = {"action": "enqueue", "params": config, "trial": number, "at": _now()}
            store_records(storage, study_id, study_name, history=[*history(study), record])
    return numbers


def _empty_slots(study: optuna.Study) -> int:
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not t.params and not t.system_attrs.get("fixed_params") and "failed_trial" not in t.system_attrs
    )


# --------------------------------------------------------------------------- delete


def _artifact_ids(storage: BaseStorage, study: optuna.Study) -> list[str]:
    """Artifact ids stored with the study and its trials (Optuna's ``artifacts:<id>`` system attrs)."""
    attrs = [storage.get_study_system_attrs(_optuna.study_id(study))]
    attrs += [t.system_attrs for t in study.get_trials(deepcopy=False)]
    return [
        key.removeprefix(ARTIFACTS_ATTR_PREFIX)
        for a in attrs
        for key in a
        if key.startswith(ARTIFACTS_ATTR_PREFIX)
    ]


def _refuse_running(study: optuna.Study, what: str) -> None:
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if running:
        raise HpoError(
            f"study {study.study_name!r} has {running} RUNNING trial(s): workers are still on it "
            f"(fix: stop its workers first, or pass --force to {what} anyway)"
        )


def _delete_locked(
    storage: BaseStorage, study: optuna.Study, checkpoint_root: Path, artifact_dir: Path
) -> tuple[Path, int]:
    """Delete the study, then its files; (checkpoint folder, artifact files removed)."""
    folder = checkpoint_folder(checkpoint_root, study)
    ids = _artifact_ids(storage, study)
    optuna.delete_study(study_name=study.study_name, storage=storage)
    shutil.rmtree(folder, ignore_errors=True)
    removed = 0
    if ids and artifact_dir.is_dir():
        store = FileSystemArtifactStore(base_path=str(artifact_dir))
        for artifact_id in ids:
            with contextlib.suppress(ArtifactNotFound):
                store.remove(artifact_id)
                removed += 1
    return folder, removed


def delete_study(
    storage: BaseStorage,
    study_name: str,
    *,
    checkpoint_root: Path = DEFAULT_CHECKPOINT_ROOT,
    artifact_dir: Path | None = None,
    force: bool = False,
) -> tuple[Path, int]:
    """Delete ``study_name`` with its checkpoint folder and artifact files (no questions asked)."""
    with study_lock(storage, study_name):
        study = _load(storage, study_name)
        if study is None:
            raise HpoError(
                f"no study named {study_name!r} in this storage (fix: check the name with `hpo status`)"
            )
        if not force:
            _refuse_running(study, "delete it")
        return _delete_locked(storage, study, checkpoint_root, artifact_dir or resolve_artifact_dir())


def replace_study(
    storage: BaseStorage,
    spec: StudySpec,
    study_name: str | None = None,
    *,
    checkpoint_root: Path = DEFAULT_CHECKPOINT_ROOT,
    artifact_dir: Path | None = None,
    force: bool = False,
) -> tuple[optuna.Study, str]:
    """Delete the study (as ``hpo delete-study`` does, checkpoints and artifacts included) and
    create it anew from ``spec``, under the study lock; the new study and the definition diff
    (old vs new, empty when the study did not exist or is unchanged). RUNNING trials are refused
    unless ``force``."""
    name = study_name or spec.name
    with study_lock(storage, name):
        old = _load(storage, name)
        diff = ""
        if old is not None:
            if not force:
                _refuse_running(old, "replace it")
            diff = definition_diff(stored_definition(old) or {}, spec.definition())
            _delete_locked(storage, old, checkpoint_root, artifact_dir or resolve_artifact_dir())
        return create_locked(storage, name, spec), diff


# --------------------------------------------------------------------------- CLI


def _storage(args: argparse.Namespace) -> tuple[BaseStorage, str]:
    url = resolve_storage_url(args.storage)
    return open_storage(url), url


def cmd_extend(args: argparse.Namespace) -> int:
    storage, _ = _storage(args)
    total, queued = extend_study(storage, args.study_name, args.n_trials)
    print(
        f"study {args.study_name!r} extended by {args.n_trials} trials to n_trials={total} ({queued} queued)"
    )
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    storage, _ = _storage(args)
    configs = read_configs(args.params, args.from_file)
    source = "--params" if args.params is not None else args.from_file
    numbers = enqueue_configs(storage, args.study_name, configs, source)
    for number, config in zip(numbers, configs, strict=True):
        print(f"trial {number} of study {args.study_name!r} will run {json.dumps(config)}")
    return 0


def cmd_delete_study(args: argparse.Namespace) -> int:
    storage, url = _storage(args)
    study = _load(storage, args.study_name)
    if study is None:
        raise HpoError(
            f"no study named {args.study_name!r} in {redact(url)} (fix: check the name with `hpo status`)"
        )
    root = Path(args.checkpoint_dir)
    folder = checkpoint_folder(root, study)
    if not args.force:
        _refuse_running(study, "delete it")
    if not args.yes:
        if not sys.stdin.isatty():
            raise HpoError(
                f"refusing to delete study {args.study_name!r} without confirmation: no terminal "
                "(fix: pass --yes)"
            )
        n = len(study.get_trials(deepcopy=False))
        answer = input(f"delete study {args.study_name!r} ({n} trials, checkpoints at {folder})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    artifact_dir = resolve_artifact_dir(args.artifact_dir)
    folder, removed = delete_study(
        storage, args.study_name, checkpoint_root=root, artifact_dir=artifact_dir, force=args.force
    )
    print(
        f"deleted study {args.study_name!r} from {redact(url)}, its checkpoints ({folder}) "
        f"and {removed} artifact file(s)"
    )
    return 0
