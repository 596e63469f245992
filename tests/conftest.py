"""Shared fixtures: real PostgreSQL databases, SQLite files, and running the CLI as a user would.

PostgreSQL: ``HPO_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
names a server and a database to connect to; each test gets a fresh database created there and
dropped afterwards. Outside CI a missing server skips with a visible reason; in CI (``CI`` set)
it fails, because a skipped real part is a failing test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import optuna
import pytest
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True, scope="session")
def _shared_data_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded datasets shared between trainer processes (hpo.shared_data) go to a folder of this
    test session, not the machine's /dev/shm; the CLI subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("shared-data")
    previous = os.environ.get("HPO_SHARED_DATA")
    os.environ["HPO_SHARED_DATA"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("HPO_SHARED_DATA", None)
    else:
        os.environ["HPO_SHARED_DATA"] = previous


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def require_real(reason: str) -> None:
    """Skip outside CI, fail in CI: the real service must be there when CI runs."""
    if _in_ci():
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = os.environ.get("HPO_TEST_POSTGRES_URL", DEFAULT_PG)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:
        require_real(f"PostgreSQL not reachable at {url} ({type(exc).__name__}); set HPO_TEST_POSTGRES_URL")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    admin = sqlalchemy.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(postgres_admin_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hpo.db'}"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for CLI subprocesses: test objectives importable, no GPU, no storage leak."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT), str(ROOT), env.get("PYTHONPATH", "")]))
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("OPTUNA_STORAGE", None)
    env["PYTHONUNBUFFERED"] = "1"
    # Workers run only objectives their own side allows (hpo.policy): the tests' support modules.
    env["HPO_ALLOW_OBJECTIVES"] = "hpo_test_objectives,hpo_*_objectives"
    # Models a test retrains go to this run's temporary folder, never into the checkout's storage/.
    env.setdefault("HPO_ARTIFACT_DIR", str(Path(tempfile.gettempdir()) / f"hpo-test-artifacts-{os.getpid()}"))
    if extra:
        env.update(extra)
    return env


def run_cli(
    args: Sequence[str], *, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``hpo ARGS`` in a subprocess, as a user would, and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args],
        cwd=cwd or ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``hpo ARGS`` in the background (for workers that tests kill or run side by side)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", *args],
        cwd=cwd or ROOT,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def study_if_created(url: str, name: str) -> optuna.Study | None:
    """The study ``name`` once a worker has created it, else None.

    The storage is opened as hpo's own processes open it (``hpo.storage.open_storage`` serialises
    creating a new SQLite database): a plain ``optuna.load_study`` polling a database that a worker
    is creating at that moment races it to create Optuna's tables, and fails with "UNIQUE
    constraint failed: alembic_version" (seen in CI).
    """
    from hpo.storage import open_storage

    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None


def write_study(directory: Path, body: str, name: str = "study.yaml") -> Path:
    path = directory / name
    path.write_text(body)
    return path
