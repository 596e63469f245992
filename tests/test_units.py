"""Fast unit tests of the spine's pure parts: early stopping, factories, GPU slots, storage URLs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from hpo.errors import HpoError, StorageError
from hpo.launcher import (
    SQLITE_MAX_WORKER_PROCESSES,
    Slot,
    check_sqlite_limit,
    free_sqlite_slots,
    parse_gpus,
    plan_slots,
    sqlite_worker_slot,
)
from hpo.objective import EarlyStopping
from hpo.samplers import make_pruner, make_sampler
from hpo.spec import EarlyStoppingSpec, PrunerSpec, parse_study
from hpo.storage import parse_url, redact, resolve_storage_url, sqlite_path


def feed(stopper: EarlyStopping, values: list[float]) -> int | None:
    """Feed values until the rule stops; the 1-based epoch it stopped at (None if it never did)."""
    for epoch, value in enumerate(values, start=1):
        if stopper.update(value):
            return epoch
    return None


def test_report_002_rule_stops_after_two_worse_epochs_and_scores_the_worse() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(rule="consecutive_worse"), "minimize")
    # 0.9 is the reference; 1.0 and 0.95 are both worse than it -> stop at epoch 5
    assert feed(stopper, [1.5, 1.2, 0.9, 1.0, 0.95, 0.5]) == 5
    assert stopper.result() == 1.0


def test_report_002_rule_does_not_stop_when_one_of_two_improves() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(rule="consecutive_worse"), "minimize")
    assert feed(stopper, [1.0, 1.1, 0.9, 1.2, 0.8, 0.85, 0.7]) is None
    assert stopper.result() == 0.7  # last value when it never stopped


def test_report_002_rule_for_a_maximized_metric_scores_the_lower() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(rule="consecutive_worse"), "maximize")
    assert feed(stopper, [0.5, 0.8, 0.7, 0.75]) == 4
    assert stopper.result() == 0.7


def test_patience_stops_and_scores_the_best() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(rule="patience", patience=2, min_delta=0.01), "minimize")
    # 0.995 is not better than 1.0 by more than min_delta
    assert feed(stopper, [1.2, 1.0, 0.995, 1.05, 0.9]) == 4
    assert stopper.result() == 1.0


def test_no_rule_never_stops() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(), "minimize")
    assert feed(stopper, [3.0, 4.0, 5.0, 6.0]) is None and stopper.result() == 6.0
    with pytest.raises(RuntimeError):
        EarlyStopping(EarlyStoppingSpec(), "minimize").result()


SPEC = {
    "name": "s",
    "objective": "hpo_test_objectives:quadratic",
    "search_space": {"x": {"type": "float", "low": 0, "high": 1}},
    "metric": "loss",
    "direction": "minimize",
    "n_trials": 3,
    "budget": {"max_epochs": 27},
}


@pytest.mark.parametrize(
    ("pruner", "cls"),
    [
        ({"name": "none"}, optuna.pruners.NopPruner),
        ({"name": "median", "options": {"n_warmup_steps": 2}}, optuna.pruners.MedianPruner),
        ({"name": "percentile", "options": {"percentile": 25.0}}, optuna.pruners.PercentilePruner),
        ({"name": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
        ({"name": "hyperband"}, optuna.pruners.HyperbandPruner),
        (
            {"name": "patient", "options": {"patience": 2}, "wrapped": {"name": "median"}},
            optuna.pruners.PatientPruner,
        ),
    ],
)
def test_pruner_factory(pruner: dict, cls: type) -> None:
    built = make_pruner(PrunerSpec(**pruner), max_epochs=27)
    assert isinstance(built, cls)
    if isinstance(built, optuna.pruners.HyperbandPruner):
        assert built._max_resource == 27  # defaults to the study's epoch budget


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("random", optuna.samplers.RandomSampler),
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("grid", optuna.samplers.RandomSampler),  # grid points are queued; the sampler never picks
    ],
)
def test_sampler_factory(name: str, cls: type) -> None:
    raw = {**SPEC, "sampler": {"name": name}}
    if name == "grid":
        raw = {**raw, "search_space": {"x": {"type": "float", "low": 0, "high": 1, "grid": [0, 1]}}}
        raw.pop("n_trials")
    spec = parse_study(raw, "s.yaml")
    assert isinstance(make_sampler(spec, seed=3), cls)


def test_tpe_defaults_to_constant_liar_and_groups_conditional_spaces() -> None:
    raw = {
        **SPEC,
        "sampler": {"name": "tpe"},
        "search_space": {
            "opt": {"type": "categorical", "choices": ["a", "b"]},
            "m": {"type": "float", "low": 0, "high": 1, "when": {"opt": ["b"]}},
        },
    }
    sampler = make_sampler(parse_study(raw, "s.yaml"))
    assert sampler._constant_liar is True and sampler._multivariate is True and sampler._group is True


def test_parse_gpus_and_slots() -> None:
    assert parse_gpus("none", 4) == [] and parse_gpus("all", 2) == [0, 1] and parse_gpus("1,3", 4) == [1, 3]
    assert plan_slots([], 3) == [Slot(None, 0)]  # no GPU: one CPU worker in this process
    assert [s.label for s in plan_slots([0, 1], 2)] == ["gpu0.0", "gpu0.1", "gpu1.0", "gpu1.1"]
    for bad, fragment in [("2", "GPU 2 does not exist"), ("0,0", "listed twice"), ("x", "expected all")]:
        with pytest.raises(HpoError, match=fragment):
            parse_gpus(bad, 2)
    with pytest.raises(HpoError, match="at least 1"):
        plan_slots([0], 0)


def test_sqlite_worker_slots_are_held_by_live_processes_only(tmp_path: Path) -> None:
    database = tmp_path / "hpo.db"
    check_sqlite_limit(database, SQLITE_MAX_WORKER_PROCESSES)
    with pytest.raises(HpoError, match="PostgreSQL"):
        check_sqlite_limit(database, SQLITE_MAX_WORKER_PROCESSES + 1)
    with contextlib.ExitStack() as held:
        slots = [held.enter_context(sqlite_worker_slot(database)) for _ in range(SQLITE_MAX_WORKER_PROCESSES)]
        assert sorted(slots) == list(range(SQLITE_MAX_WORKER_PROCESSES))
        assert free_sqlite_slots(database) == 0
        with pytest.raises(HpoError, match="already running"), sqlite_worker_slot(database):
            pass
        with pytest.raises(HpoError, match="already running"):
            check_sqlite_limit(database, 1)
    assert free_sqlite_slots(database) == SQLITE_MAX_WORKER_PROCESSES  # released with their holders
    # a process killed while holding a slot gives it back (the kernel drops its flock)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hpo.launcher import sqlite_worker_slot\n"
            f"with sqlite_worker_slot(__import__('pathlib').Path({str(database)!r})):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert free_sqlite_slots(database) == SQLITE_MAX_WORKER_PROCESSES - 1
    holder.kill()
    holder.wait(timeout=30)
    assert free_sqlite_slots(database) == SQLITE_MAX_WORKER_PROCESSES


def test_storage_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert resolve_storage_url(None) == "sqlite:///storage/hpo.db"
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None) == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///cli.db") == "sqlite:///cli.db"
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert "secret" not in redact("postgresql://u:secret@h/db")
    assert str(sqlite_path("sqlite:///storage/hpo.db")) == "storage/hpo.db"
    assert sqlite_path("sqlite:///:memory:") is None
    with pytest.raises(StorageError, match="not a database URL"):
        parse_url("::")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:secret@h/db",
        "postgresql://u:se@cret@h:5432/db",  # an unescaped "@": cut at the first one by the parser
        "postgresql://u:secret@h:notaport/db",  # refused by the parser: shown as given, but masked
        "mysql://u:secret@h/d?x=a@b",
    ],
)
def test_no_part_of_a_password_is_ever_shown(url: str) -> None:
    assert "secret" not in redact(url) and "cret" not in redact(url) and "***" in redact(url)
    try:
        parse_url(url)
    except StorageError as refused:  # its message quotes the URL
        assert "cret" not in str(refused)


def test_a_malformed_url_is_one_error_naming_the_fix() -> None:
    with pytest.raises(StorageError, match="not a database URL"):  # was a ValueError traceback
        parse_url("postgresql://u@h:notaport/db")
    with pytest.raises(StorageError, match=r"must be written %40"):
        parse_url("postgresql://u:p@ss@h:5432/db")


def test_gpu_children_get_every_flag_but_never_the_storage_url() -> None:
    from hpo.cli import _child_args, build_parser
    from hpo.policy import ObjectivePolicy

    url = "postgresql+psycopg://hpo:secret@db:5432/hpo"
    flags = [
        "--storage-patience",
        "42",
        "--threads",
        "3",
        "--max-retry",
        "5",
        "--allow-objective",
        "myproj.*",
    ]
    args = build_parser().parse_args(
        ["worker", "study.yaml", "--storage", url, "--checkpoint-dir", "/ck", "--no-progress", *flags]
    )
    policy = ObjectivePolicy.from_sources(cli_patterns=args.allow_objective, trusted=["mine.models:OBJ"])
    child = _child_args(args, "quad", policy)
    assert "secret" not in " ".join(child) and "--storage" not in child
    pairs = {child[i]: child[i + 1] for i in range(len(child) - 1) if child[i].startswith("--")}
    assert pairs["--checkpoint-dir"] == "/ck" and pairs["--storage-patience"] == "42.0"
    assert pairs["--threads"] == "3" and pairs["--max-retry"] == "5" and pairs["--study-name"] == "quad"
    assert "--no-progress" in child
    allowed = [child[i + 1] for i, flag in enumerate(child) if flag == "--allow-objective"]
    assert "myproj.*" in allowed and any("mine.models" in a for a in allowed)  # the study file's module
