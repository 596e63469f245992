"""The command line as a newcomer types it: mistyped flags and commands, mistyped database paths."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, cli_env, run_cli

from hpo.cli import build_parser

HEAVY = ("optuna", "sqlalchemy", "scipy", "torch", "pydantic", "grpc", "plotly")
COMMANDS = sorted(build_parser(lazy=True).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_commands_help_imports_no_heavy_module(command: str) -> None:
    """`hpo COMMAND --help` builds that command's parser in full (hpo.cli.main) and prints its help
    without importing Optuna, SQLAlchemy, SciPy, torch, pydantic, gRPC or plotly: that is what keeps
    it as quick as `optuna --help` (timed in benchmarks/cli_startup.py)."""
    code = (
        "import contextlib, io, json, sys\nfrom hpo.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    try:\n        main([{command!r}, '--help'])\n    except SystemExit:\n        pass\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[1])))\n"
        "print(json.dumps({'help': out.getvalue(), 'heavy': loaded}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(HEAVY)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["help"].startswith(f"usage: hpo {command} "), shown["help"][:200]
    assert shown["heavy"] == []


def test_help_defaults_agree_with_the_modules_that_use_them() -> None:
    """The light parsers (hpo._commands) restate a few defaults of modules that import Optuna."""
    from hpo import _commands, artifacts, retrain
    from hpo._commands import retrain as retrain_flags

    assert _commands.ENV_ARTIFACT_DIR == artifacts.ENV_ARTIFACT_DIR
    assert retrain_flags.DEFAULT_OUTPUT_ROOT == retrain.DEFAULT_OUTPUT_ROOT


def test_every_lazy_command_resolves_to_its_modules_function() -> None:
    """A lazily imported command's run function names a function that exists in the module that does
    the work (a renamed function would otherwise fail only when a user runs the command)."""
    import importlib

    parser = build_parser()
    runs = {
        ("dashboard",): "hpo.dashboard:cmd_dashboard",
        ("serve-storage",): "hpo.serve_storage:cmd_serve_storage",
        ("retrain", "s", "--epochs", "1"): "hpo.retrain:cmd_retrain",
        ("extend", "s", "--n-trials", "1"): "hpo.lifecycle:cmd_extend",
        ("enqueue", "s", "--params", "{}"): "hpo.lifecycle:cmd_enqueue",
        ("delete-study", "s"): "hpo.lifecycle:cmd_delete_study",
    }
    for argv, target in runs.items():
        module, name = target.split(":")
        assert parser.parse_args(list(argv)).func.__name__ == name
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["worker", "--n-trial", "3"], "did you mean --n-trials?"),  # a prefix is not accepted silently
        (["worker", "--ntrials", "3"], "did you mean --n-trials?"),
        (["wroker"], "did you mean worker?"),
        (["status", "--storge", "sqlite:///x.db"], "did you mean --storage?"),
    ],
)
def test_mistyped_flags_and_commands_get_a_suggestion(args: list[str], suggestion: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2
    assert suggestion in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize("command", [["status"], ["best", "quad"], ["export", "quad"], ["report", "quad"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "typo" / "hpo.db"
    result = run_cli([*command, "--storage", f"sqlite:///{missing}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no database file" in line and str(missing) in line
    assert not missing.exists() and not missing.parent.exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--storage-patience", "0"], "--storage-patience must be a positive number"),
        (["--storage-patience", "nan"], "--storage-patience must be a positive number"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--threads", "1000000000"], "--threads 1000000000 is more than 4096 threads per trainer"),
        (["--n-trials", "-2"], "--n-trials must be at least 1, got -2"),
        (["--timeout", "-5"], "--timeout must be a positive number of seconds, got -5"),
        (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
        (["--max-retry", "-1"], "--max-retry must be 0 or more, got -1"),
        (["--max-consecutive-failures", "0"], "--max-consecutive-failures must be at least 1, got 0"),
        (["--grace-period", "5", "--heartbeat-interval", "10"], "--grace-period must exceed"),
        (["--allow-objective", "evil.mod:obj"], "contains ':'"),
    ],
)
def test_bad_worker_flags_are_one_clear_line(tmp_path: Path, flags: list[str], fragment: str) -> None:
    from studyfiles import quadratic_study

    path = quadratic_study(tmp_path)
    result = run_cli(["worker", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}", *flags])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert fragment in line, line


def test_an_exported_omp_num_threads_of_99999_is_one_clear_line(tmp_path: Path) -> None:
    # It was passed on: libgomp's pool then failed every trial at start-up (MemoryError), each
    # blamed on the training code, until the study's retries were spent.
    from studyfiles import quadratic_study

    path = quadratic_study(tmp_path)
    env = cli_env({"OMP_NUM_THREADS": "99999"})
    result = run_cli(["worker", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"], env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "OMP_NUM_THREADS=99999 is more than 4096 threads per trainer" in line, line


def test_more_threads_than_cores_and_trials_per_gpu_without_gpus_are_noted(tmp_path: Path) -> None:
    """Allowed, as PyTorch allows them, but said: more threads than cores slow trials down, and
    --trials-per-gpu does nothing on a worker without GPUs."""
    from studyfiles import quadratic_study

    from hpo.launcher import available_cores

    path = quadratic_study(tmp_path)
    threads = available_cores() + 1
    flags = ["--n-trials", "1", "--threads", str(threads), "--gpus", "none", "--trials-per-gpu", "3"]
    result = run_cli(["worker", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}", *flags])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: --threads {threads} is more threads than the" in result.stdout, result.stdout
    assert "--trials-per-gpu 3 applies to GPUs, and this worker has none" in result.stdout, result.stdout
    # an OMP_NUM_THREADS that str.isdigit() takes and int() refuses is not a thread count: ignored
    odd = run_cli(
        ["worker", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}", "--n-trials", "1"],
        env=cli_env({"OMP_NUM_THREADS": "\u00b2"}),
    )
    assert odd.returncode == 0 and "Traceback" not in odd.stderr, odd.stdout + odd.stderr


def test_a_non_positive_trial_timeout_is_refused_at_load(tmp_path: Path) -> None:
    from studyfiles import quadratic_study

    path = quadratic_study(tmp_path)
    path.write_text(
        path.read_text().replace("budget: {max_epochs: 3}", "budget: {max_epochs: 3, trial_timeout: -5}")
    )
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "budget.trial_timeout" in line, line


def test_a_failed_trials_traceback_is_shown_by_status_and_export(tmp_path: Path) -> None:
    """From a failure to its traceback without reading code: `hpo status NAME` names the failed trial
    and how to see it, `hpo status NAME --trial K` prints its traceback, `hpo export` (CSV and JSON)
    carries it."""
    import csv
    import io

    from studyfiles import quadratic_study

    path = quadratic_study(
        tmp_path,
        name="crashy",
        sampler="grid",
        n_trials=None,
        grid_x=[-1.0, 1.0],
        grid_y=[0.0],
        objective="hpo_test_objectives:crash_when_negative",
    )
    storage = ["--storage", f"sqlite:///{tmp_path / 'hpo.db'}"]
    worker = run_cli(["worker", str(path), *storage, "--no-progress"])
    assert worker.returncode == 0, worker.stdout + worker.stderr

    status = run_cli(["status", "crashy", *storage])
    assert status.returncode == 0, status.stderr
    (failed,) = [line for line in status.stdout.splitlines() if " FAIL: " in line]
    number = int(failed.split()[1])
    # The reason is printed as stored (rich markup would eat "[...]"), with the way to the traceback.
    assert "simulated CUDA out of memory for x=-1.0" in failed
    assert "hpo status crashy --trial K" in status.stdout

    shown = run_cli(["status", "crashy", "--trial", str(number), *storage])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"trial {number} of study crashy: FAIL\n")
    assert "Traceback (most recent call last):" in shown.stdout
    assert "in crash_when_negative" in shown.stdout
    assert "RuntimeError: simulated CUDA out of memory for x=-1.0" in shown.stdout

    missing = run_cli(["status", "crashy", "--trial", "7", *storage])
    assert missing.returncode == 2 and "has no trial 7 (fix: --trial 0 to 1)" in missing.stderr

    rows = list(csv.DictReader(io.StringIO(run_cli(["export", "crashy", *storage]).stdout)))
    by_state = {row["state"]: row for row in rows}
    assert "in crash_when_negative" in by_state["FAIL"]["traceback"]
    assert by_state["COMPLETE"]["traceback"] == ""
    records = json.loads(run_cli(["export", "crashy", "--format", "json", *storage]).stdout)["trials"]
    assert ["RuntimeError: simulated" in (r["traceback"] or "") for r in records] == [
        r["state"] == "FAIL" for r in records
    ]

    # ... and the dashboard shows it as the failed trial's note (its own API, as its trial page reads it).
    notes = _dashboard_trial_notes(f"sqlite:///{tmp_path / 'hpo.db'}", "crashy")
    assert notes[number]["body"].startswith(
        "**Failed**: RuntimeError: simulated CUDA out of memory for x=-1.0\n"
    )
    assert "in crash_when_negative" in notes[number]["body"]
    assert [n["body"] for k, n in notes.items() if k != number] == [""]


def _dashboard_trial_notes(url: str, study_name: str) -> dict[int, dict[str, object]]:
    """Each trial's note as optuna-dashboard's HTTP API serves it, by trial number."""
    from typing import Any
    from wsgiref.util import setup_testing_defaults

    import optuna
    import optuna_dashboard

    storage = optuna.storages.RDBStorage(url)
    study_id = storage.get_study_id_from_name(study_name)
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=f"/api/studies/{study_id}", REQUEST_METHOD="GET")
    body = b"".join(optuna_dashboard.wsgi(storage)(environ, lambda status, headers, *_: None))
    return {t["number"]: t["note"] for t in json.loads(body)["trials"]}


def test_status_prints_failure_reasons_and_parameters_as_stored() -> None:
    """A reason like "KeyError: [x=1] ..." is text, not rich markup (which would drop "[x=1]")."""
    import io

    import optuna
    from optuna.trial import TrialState
    from rich.console import Console

    from hpo import inspect as inspect_

    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            params={"x": 1.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
            system_attrs={"fail_reason": "KeyError: [x=1] [bold]not bold[/bold]"},
        )
    )
    out = io.StringIO()
    inspect_.print_status(study, 1, console=Console(file=out, width=200, highlight=False))
    assert "  trial 0 FAIL: KeyError: [x=1] [bold]not bold[/bold]\n" in out.getvalue()


def test_a_failure_note_is_the_trials_note_in_the_dashboard(tmp_path: Path) -> None:
    """hpo._trial_note writes optuna-dashboard's trial-note format; the dashboard's own API serves it
    as the failed trial's note (what its trial page shows), long tracebacks included."""
    import optuna
    from optuna.trial import TrialState

    from hpo._trial_note import save_failure_note

    url = f"sqlite:///{tmp_path / 'notes.db'}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name="notes")
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    failed = study.trials[1]
    traceback = (
        "Traceback (most recent call last):\n" + "  frame\n" * 600 + "ZeroDivisionError: division by zero"
    )
    save_failure_note(
        storage, study._study_id, failed._trial_id, "ZeroDivisionError: division by zero", traceback
    )

    notes = _dashboard_trial_notes(url, "notes")
    assert notes[0] == {"version": 0, "body": ""}
    assert notes[1]["version"] == 1
    assert notes[1]["body"].startswith("**Failed**: ZeroDivisionError: division by zero\n\n```text\n")
    assert traceback in notes[1]["body"]  # all of it, across several attribute chunks


def _foreign_database(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT)")
        db.execute("INSERT INTO studies (title) VALUES ('not optuna')")
        db.commit()
    return path


def _schema(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master"))


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("random bytes", "is not an SQLite database"),
        ("another application's", "is another application's SQLite database (tables studies)"),
    ],
)
@pytest.mark.parametrize("command", ["create-study", "status", "dashboard"])
def test_sqlite_urls_that_cannot_hold_a_study_are_one_line_and_change_nothing(
    tmp_path: Path, kind: str, fragment: str, command: str
) -> None:
    from studyfiles import quadratic_study

    path = None
    url = kind
    if kind == "random bytes":
        path = tmp_path / "junk.db"
        path.write_bytes(bytes(range(256)) * 64)
        url = f"sqlite:///{path}"
    elif kind == "another application's":
        path = _foreign_database(tmp_path / "app.db")
        url = f"sqlite:///{path}"
    before = path.read_bytes() if path is not None else b""
    args = {
        "create-study": ["create-study", str(quadratic_study(tmp_path))],
        "status": ["status"],
        "dashboard": ["dashboard", "--port", "39187"],  # refused before it listens
    }[command]
    result = run_cli([*args, "--storage", url], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert fragment in line and "fix:" in line, line
    if path is not None:  # not a table or an index added to someone else's file
        assert path.read_bytes() == before
        if kind == "another application's":
            assert _schema(path) == ["studies"]


@pytest.mark.parametrize(
    "name",
    ["../../../tmp/evil_hpo", "a/../b", "a\nb", " ", "*", "x" * 201, "trailing-newline\n"],
)
def test_a_study_name_hpo_cannot_use_is_refused_before_the_study_is_created(
    tmp_path: Path, name: str
) -> None:
    # Names become folders (checkpoints, artifacts): a 300-character name failed every trial with
    # "File name too long", on PostgreSQL over 512 characters a traceback.
    from studyfiles import quadratic_study

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = run_cli(["create-study", str(quadratic_study(tmp_path)), "--storage", url, "--study-name", name])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "--study-name" in line and "not a valid study name" in line and "at most 200" in line, line
    assert optuna.get_all_study_names(storage=url) == []


def test_a_long_valid_study_name_trains_and_checkpoints(tmp_path: Path) -> None:
    from studyfiles import quadratic_study

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = "n" * 200
    path = quadratic_study(
        tmp_path, n_trials=1, sampler="random", objective="hpo_test_objectives:checkpointed"
    )
    flags = [
        "--storage",
        url,
        "--study-name",
        name,
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--no-progress",
    ]
    result = run_cli(["worker", str(path), *flags])
    assert result.returncode == 0, result.stdout + result.stderr
    [trial] = optuna.load_study(study_name=name, storage=url).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.system_attrs.get("fail_reason")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_checkpoint_dir_that_cannot_hold_checkpoints_is_one_line_before_any_trial(
    tmp_path: Path, where: str
) -> None:
    # Found by the first trial instead, every trial failed for good (NotADirectoryError), each with
    # its own path in the reason, so not even the broken-objective rule stopped the worker.
    from studyfiles import quadratic_study

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is wanted\n")
    root = blocker if where == "a file" else blocker / "checkpoints"
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    flags = ["--storage", url, "--checkpoint-dir", str(root), "--no-progress"]
    result = run_cli(["worker", str(quadratic_study(tmp_path, n_trials=2, sampler="random")), *flags])
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --checkpoint-dir '{root}': checkpoints cannot be written there"), line
    assert "fix: --checkpoint-dir a folder this user can write" in line
    trials = optuna.load_study(study_name="quad", storage=url).get_trials()
    assert {t.state for t in trials} == {optuna.trial.TrialState.WAITING}  # nothing claimed or failed
