"""Where trials keep files for people to look at: plots, reports, final checkpoints.

Files go to Optuna's artifact store (``optuna.artifacts``): the bytes in a folder, and with the trial
a system attribute naming them, so ``hpo dashboard`` (optuna-dashboard) lists and serves a trial's
files beside its learning curve. The folder is resolved like the storage URL: ``--artifact-dir``,
then ``$HPO_ARTIFACT_DIR``, then ``storage/artifacts``. Workers and the dashboard must see the same
folder (on one machine, or a shared volume as in ``docker-compose.yml``).
"""

from __future__ import annotations

import os
from pathlib import Path

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
