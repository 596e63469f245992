"""Where trials keep files for people to look at: plots, reports, final checkpoints.

Files go to Optuna's artifact store (``optuna.artifacts``): the bytes in a folder, and with the trial
a system attribute naming them, so ``hpo dashboard`` (optuna-dashboard) lists and serves a trial's
files beside its learning curve. The folder is resolved like the storage URL: ``--artifact-dir``,
then ``$HPO_ARTIFACT_DIR``, then ``storage/artifacts``. Workers and the dashboard must see the same
folder (on one machine, or a shared volume as in ``docker-compose.yml``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo.errors import HpoError

DEFAULT_ARTIFACT_DIR = "storage/artifacts"
ENV_ARTIFACT_DIR = "HPO_ARTIFACT_DIR"


def resolve_artifact_dir(cli_value: str | None = None) -> Path:
    """``--artifact-dir`` wins, then ``$HPO_ARTIFACT_DIR``, then ``storage/artifacts``."""
    return Path(cli_value or os.environ.get(ENV_ARTIFACT_DIR) or DEFAULT_ARTIFACT_DIR)


def open_artifact_store(directory: Path) -> FileSystemArtifactStore:
    """The artifact store in ``directory``, created if missing; :class:`HpoError` if it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HpoError(
            f"artifact folder {str(directory)!r}: cannot create it: {exc.strerror} "
            f"(fix: --artifact-dir DIR or ${ENV_ARTIFACT_DIR} naming a writable folder)"
        ) from None
    return FileSystemArtifactStore(base_path=str(directory))


def upload_trial_artifact(trial: optuna.Trial, path: str | Path, directory: Path | None = None) -> str:
    """Store the file ``path`` with ``trial``; returns its artifact id.

    ``directory`` defaults to :func:`resolve_artifact_dir` (``$HPO_ARTIFACT_DIR`` or
    ``storage/artifacts``), the folder ``hpo dashboard`` serves by default.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"cannot upload {str(file_path)!r} as an artifact: no such file")
    store = open_artifact_store(directory or resolve_artifact_dir())
    return upload_artifact(artifact_store=store, file_path=str(file_path), study_or_trial=trial)


# --------------------------------------------------------------------------- published models

# ``artifact:STUDY`` names the best model that ``hpo retrain STUDY`` stored. The model file is an
# ordinary Optuna artifact of its retrain trial (the dashboard lists it); a small pointer file in
# the same folder, ``hpo-models/<STUDY>/<LABEL>.json`` (``topR``: the R-th best; ``trialN``: trial
# N, retrained with ``--trial N``), names it, so that the training code of any
# worker that sees the artifact folder finds it by the study's name alone (a worker's training
# process never opens the database, see hpo.trainer).
ARTIFACT_PREFIX = "artifact:"
_MODELS_FOLDER = "hpo-models"


_LABEL = re.compile(r"(top[1-9][0-9]*|trial(0|[1-9][0-9]*))")


def models_folder(directory: Path, study_name: str) -> Path:
    """The folder of study ``study_name``'s published models in the artifact folder ``directory``."""
    # One folder per study; quoted, so a study name with "/" or ".." stays inside the folder.
    return directory / _MODELS_FOLDER / quote(study_name, safe="")


def _pointer(directory: Path, study_name: str, label: str) -> Path:
    return models_folder(directory, study_name) / f"{label}.json"


def publish_model(
    directory: Path, study_name: str, label: str, artifact_id: str, meta: dict[str, Any]
) -> Path:
    """Name the artifact ``artifact_id`` as study ``study_name``'s retrained model ``label``
    (``top1``, ``top2``, ... or ``trialN``), replacing an earlier one atomically; returns the
    pointer file."""
    if not _LABEL.fullmatch(label):
        raise ValueError(f"a published model's label is topR or trialN, not {label!r}")
    pointer = _pointer(directory, study_name, label)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"artifact_id": artifact_id, **meta}, default=str) + "\n")
    os.replace(tmp, pointer)
    return pointer


def parse_model_reference(reference: str) -> tuple[str, str]:
    """``artifact:STUDY`` (the best retrained model), ``artifact:STUDY#topR`` (the R-th best) or
    ``artifact:STUDY#trialN`` (trial N's, ``hpo retrain STUDY --trial N``): (STUDY, label)."""
    body = reference.removeprefix(ARTIFACT_PREFIX)
    study, hashed, label = body.rpartition("#") if "#" in body else (body, "", "top1")
    if not study or (hashed and not _LABEL.fullmatch(label)):
        raise HpoError(
            f"{reference!r} is not a model reference (fix: artifact:STUDY for the best model "
            "`hpo retrain STUDY` stored, artifact:STUDY#top2 for the second, artifact:STUDY#trial0 "
            "for trial 0's)"
        )
    return study, label


def resolve_model_reference(reference: str, directory: Path | None = None) -> Path:
    """The local file of the model ``reference`` names (see :func:`parse_model_reference`), read
    from the artifact folder (``directory``, default :func:`resolve_artifact_dir`). A missing one
    is an :class:`HpoError` naming the study and the command that stores it."""
    study, label = parse_model_reference(reference)
    directory = directory or resolve_artifact_dir()
    pointer = _pointer(directory, study, label)
    if label.startswith("trial"):
        how = f" --trial {label.removeprefix('trial')}"
    else:
        how = "" if label == "top1" else f" --top {label.removeprefix('top')}"
    fix = (
        f"run `hpo retrain {study} --epochs N{how}` first, with this "
        f"artifact folder (--artifact-dir or ${ENV_ARTIFACT_DIR}, here {str(directory)!r}), "
        "or point the setting at a model file"
    )
    if not pointer.is_file():
        raise HpoError(
            f"{reference}: study {study!r} has no retrained {label} model in the artifact store (fix: {fix})"
        )
    try:
        artifact_id = str(json.loads(pointer.read_text())["artifact_id"])
        if not artifact_id or Path(artifact_id).name != artifact_id or artifact_id in (".", ".."):
            raise ValueError(artifact_id)  # Optuna's ids are plain file names in the folder
        path = directory / artifact_id
    except (ValueError, KeyError, TypeError):
        raise HpoError(f"{reference}: {pointer} is not a model pointer (fix: {fix})") from None
    if not path.is_file():
        raise HpoError(
            f"{reference}: the artifact {artifact_id} of study {study!r}'s {label} model is missing "
            f"from the artifact store (fix: {fix})"
        )
    return path
