"""A fast, careful command line: help without heavy imports, read-only databases read, unwritable
SQLite paths explained, relative search-space paths explained.

Permissions are real: as root (whose capabilities override file modes) the commands run with every
capability dropped through ``setpriv``, so the modes apply to them as to any user, on a copy of the
database in a folder made for that. (Not as ``nobody``: that user may not be able to read the
checkout, e.g. a clone made in ``mktemp -d``, mode 0700.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, require_real, run_cli
from studyfiles import quadratic_study

HEAVY = ("optuna", "sqlalchemy", "pydantic", "torch", "scipy", "grpc", "plotly")


def _modules_after(argv: list[str]) -> list[str]:
    """The heavy modules imported by ``hpo ARGV`` (which prints help and exits)."""
    code = (
        "import sys\nfrom hpo.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('MODULES', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("MODULES ")]
    loaded: list[str] = json.loads(line.removeprefix("MODULES ").replace("'", '"'))
    return loaded


# Each command's --help: tests/test_cli_usability.py.
@pytest.mark.parametrize("argv", [["--help"], ["wroker"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    assert _modules_after(argv) == []


def test_import_hpo_is_light_and_its_names_resolve() -> None:
    code = (
        "import sys, hpo\nlight = 'optuna' not in sys.modules\n"
        "values = [getattr(hpo, name) for name in hpo.__all__]\n"
        "print(light, len(values) == len(hpo.__all__) > 0, sorted(hpo.__all__) == sorted(hpo._EXPORTS))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True
    )
    assert result.stdout.split() == ["True", "True", "True"], result.stderr


def test_the_lazy_command_list_matches_the_commands_modules() -> None:
    """`hpo --help` lists the other modules' commands from cli.COMMAND_MODULES without importing them;
    the listing must be what the modules themselves register."""
    from hpo.cli import build_parser

    assert build_parser(lazy=True).format_help() == build_parser().format_help()


# --------------------------------------------------------------------------- read-only databases


@pytest.fixture(scope="module")
def finished_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database (write-ahead-log mode, as hpo leaves it) with a study of 2 finished trials."""
    folder = tmp_path_factory.mktemp("finished")
    study = quadratic_study(folder, n_trials=2)
    db = folder / "hpo.db"
    result = run_cli(["worker", str(study), "--storage", f"sqlite:///{db}", "--no-progress"])
    assert result.returncode == 0, result.stdout + result.stderr
    return db


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder of its own whose modes the tests set (restored so it can be removed)."""
    folder = Path(tempfile.mkdtemp(prefix="hpo-access-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)


def _as_user(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``hpo ARGS`` as a user the file modes apply to: root without its capabilities when running as root."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            require_real("setpriv (util-linux) is needed to test file permissions as root")
        # An empty bounding and inheritable set: the exec'd root process keeps no capability
        # (CAP_DAC_OVERRIDE is what lets root write a 0444 file), and still owns the checkout.
        prefix = [str(setpriv), "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
    env = cli_env({"HOME": "/tmp"})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "hpo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _read_only_copy(finished_db: Path, shared_dir: Path, layout: str) -> Path:
    folder = shared_dir / layout
    folder.mkdir()
    db = folder / "hpo.db"
    shutil.copy(finished_db, db)
    db.chmod(0o444)
    # read-only-folder: SQLite cannot create the -shm file a WAL database needs;
    # read-only-file: it can (the folder is writable by everyone), but never write the database.
    folder.chmod(0o555 if layout == "read-only-folder" else 0o1777)
    return db


@pytest.mark.parametrize("layout", ["read-only-folder", "read-only-file"])
def test_read_only_commands_read_a_database_this_user_cannot_write(
    finished_db: Path, shared_dir: Path, layout: str
) -> None:
    db = _read_only_copy(finished_db, shared_dir, layout)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    storage = ["--storage", f"sqlite:///{db}"]

    listing = _as_user(["status", *storage])
    assert listing.returncode == 0, listing.stderr
    assert "quad" in listing.stdout

    best = _as_user(["best", "quad", "--json", *storage])
    assert best.returncode == 0, best.stderr
    assert set(json.loads(best.stdout)["params"]) == {"x", "y"}

    export = _as_user(["export", "quad", "--format", "json", *storage])
    assert export.returncode == 0, export.stderr
    assert [trial["state"] for trial in json.loads(export.stdout)["trials"]] == ["COMPLETE", "COMPLETE"]

    status = _as_user(["status", "quad", *storage])
    assert status.returncode == 0, status.stderr

    trial = _as_user(["status", "quad", "--trial", "1", *storage])
    assert trial.returncode == 0, trial.stderr
    assert trial.stdout.startswith("trial 1 of study quad: COMPLETE")

    long_form = _as_user(["export", "quad", "--format", "csv-long", *storage])
    assert long_form.returncode == 0, long_form.stderr
    assert long_form.stdout.startswith("number,state,params_x,params_y,epoch,loss\n")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_file_that_is_not_a_study_database_is_one_line(shared_dir: Path) -> None:
    junk = shared_dir / "notes.db"
    junk.write_text("not a database\n")
    result = run_cli(["status", "--storage", f"sqlite:///{junk}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(junk) in line and "fix:" in line, line


# --------------------------------------------------------------------------- unwritable SQLite paths


def _assert_path_hint(result: subprocess.CompletedProcess[str], path: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert path in line and "fix:" in line, line
    assert "host" not in line and "credentials" not in line, line


def test_an_impossible_sqlite_folder_gets_a_path_hint(tmp_path: Path) -> None:
    study = quadratic_study(tmp_path)
    result = run_cli(["create-study", str(study), "--storage", "sqlite:////proc/nope/hpo.db"])
    _assert_path_hint(result, "/proc/nope")


@pytest.mark.parametrize("layout", ["read-only-folder", "read-only-file", "missing-subfolder"])
def test_an_unwritable_sqlite_path_gets_a_path_hint(finished_db: Path, shared_dir: Path, layout: str) -> None:
    study = quadratic_study(shared_dir)
    if layout == "missing-subfolder":
        locked = shared_dir / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        db, expected = locked / "sub" / "hpo.db", str(locked / "sub")
    elif layout == "read-only-folder":
        locked = shared_dir / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        db, expected = locked / "hpo.db", str(locked)
    else:
        db = _read_only_copy(finished_db, shared_dir, layout)
        expected = str(db)
    for command in (["create-study", str(study)], ["worker", str(study), "--n-trials", "1"]):
        _assert_path_hint(_as_user([*command, "--storage", f"sqlite:///{db}"]), expected)
    assert not (db.parent / "hpo.db-wal").exists()


# --------------------------------------------------------------------------- search-space paths


def test_a_missing_search_space_file_names_the_study_files_folder(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text("x: {type: float, low: -5, high: 5}\n")
    (tmp_path / "studies").mkdir()
    study = quadratic_study(tmp_path / "studies")
    text = study.read_text()
    start = text.index("search_space:")
    end = text.index("metric:")
    study.write_text(text[:start] + "search_space: spaces/s.yaml\n" + text[end:])
    # The path exists relative to the current directory, but is resolved against the study file.
    result = run_cli(
        ["create-study", str(study), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"], cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "study file's folder" in line and str(study.parent / "spaces" / "s.yaml") in line, line
    assert "current directory" not in line, line


def test_a_worker_with_a_bad_study_file_leaves_no_database_behind(tmp_path: Path) -> None:
    """The study file is checked before the storage is opened: a typo never creates an empty database."""
    study = quadratic_study(tmp_path)
    study.write_text(study.read_text().replace("direction: minimize", "direction: minimise"))
    db = tmp_path / "fresh" / "hpo.db"
    db.parent.mkdir()
    for command in (["worker", str(study)], ["worker", "--study-name", "q", "--spec", str(study)]):
        result = run_cli([*command, "--storage", f"sqlite:///{db}", "--no-progress"])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "direction" in line and "minimise" in line, line
        assert list(db.parent.iterdir()) == []
