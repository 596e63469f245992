"""Which objectives a worker imports is decided on the worker's side (hpo.policy), never by what
the storage says: registry names, ``hpo.objectives`` entry points, ``--allow-objective`` /
``HPO_ALLOW_OBJECTIVES`` module patterns, and the study file given on the worker's command line.
Refused objectives are never imported; stored definitions are never read as file paths."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli
from studyfiles import quadratic_study

from hpo import _optuna
from hpo.errors import SpecError
from hpo.objective import Objective, check_objective, resolve_objective
from hpo.policy import ObjectivePolicy, entry_point_objectives, known_objectives
from hpo.spec import parse_study, spec_from_definition
from hpo.studies import DEFINITION_ATTR, stored_definition
from objectives import REGISTRY

SOURCE = "stored definition of study 'x'"

# A module that proves whether it was imported: it writes IMPORTED next to itself at import time.
PLANTED = """\
from pathlib import Path

Path(__file__).with_name("IMPORTED").write_text("imported")


def obj(run):
    value = 0.0
    for epoch in range(1, run.max_epochs + 1):
        value = 1.0 / epoch
        if run.report(epoch, {"loss": value}):
            break
    return run.final_value()
"""


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def plant(directory: Path, module: str) -> Path:
    """Write ``module`` (see PLANTED) into ``directory``; returns the marker file it would write."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(PLANTED)
    return directory / "IMPORTED"


def install_entry_point(site: Path, dist: str, name: str, value: str) -> None:
    """A real installed distribution (dist-info with METADATA and entry_points.txt) under ``site``."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hpo.objectives]\n{name} = {value}\n")


# --------------------------------------------------------------------------- the policy


def test_registry_names_and_their_targets_are_allowed() -> None:
    policy = ObjectivePolicy.from_sources(environ={})
    for name, target in REGISTRY.items():
        assert policy.check(name, SOURCE) == target
        assert policy.check(target, SOURCE) == target  # the registry's own target, spelt out


def test_an_unknown_name_is_an_error_listing_the_known_names() -> None:
    with pytest.raises(SpecError) as info:
        ObjectivePolicy().check("no_such_objective", SOURCE)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{SOURCE}: objective: unknown objective 'no_such_objective'")
    assert "digits_mlp" in text


def test_the_refusal_is_one_line_naming_the_objective_and_the_fix() -> None:
    with pytest.raises(SpecError) as info:
        ObjectivePolicy.from_sources(environ={}).check("evil.mod:obj", SOURCE)
    assert str(info.value) == (
        "stored definition of study 'x': objective: 'evil.mod:obj' is not allowed on this worker "
        "(fix: pass --allow-objective evil.mod or set HPO_ALLOW_OBJECTIVES=evil.mod on the worker, "
        "install it as an hpo.objectives entry point, or run the worker with the study file)"
    )
    assert info.value.field == "objective"


@pytest.mark.parametrize(
    ("patterns", "target", "allowed"),
    [
        (["myproj.*"], "myproj.models:train", True),
        (["myproj.*"], "myproj.models.deep:train", True),
        (["myproj.*"], "myproj:train", False),  # myproj.* names submodules only
        (["myproj.*"], "myprojx.models:train", False),
        (["myproj.models"], "myproj.models:train", True),
        (["myproj.models"], "myproj.models.sub:train", False),
        (["myproj.models"], "myproj.model:train", False),
        (["myproj.models"], "Myproj.models:train", False),  # module paths are case-sensitive
        (["a.b", "myproj.mod?ls"], "myproj.models:train", True),
        (["a.b,myproj.models"], "myproj.models:train", True),  # one flag value, comma-separated
        ([], "myproj.models:train", False),
    ],
)
def test_module_patterns(patterns: list[str], target: str, allowed: bool) -> None:
    policy = ObjectivePolicy.from_sources(patterns, environ={})
    if allowed:
        assert policy.check(target, SOURCE) == target
    else:
        with pytest.raises(SpecError, match="is not allowed on this worker"):
            policy.check(target, SOURCE)


def test_patterns_come_from_the_environment_variable_too() -> None:
    policy = ObjectivePolicy.from_sources(["cli.mod"], environ={"HPO_ALLOW_OBJECTIVES": " env.a , env.b.* "})
    assert policy.patterns == ("cli.mod", "env.a", "env.b.*")
    for target in ("cli.mod:f", "env.a:f", "env.b.c:f"):
        assert policy.check(target, SOURCE) == target
    with pytest.raises(SpecError):
        policy.check("env.c:f", SOURCE)
    assert ObjectivePolicy.from_sources(environ={"HPO_ALLOW_OBJECTIVES": "  "}).patterns == ()
    assert ObjectivePolicy.from_sources(environ={}).patterns == ()


def test_the_default_environment_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_ALLOW_OBJECTIVES", "from_env.*")
    assert ObjectivePolicy.from_sources().check("from_env.x:f", SOURCE) == "from_env.x:f"
    monkeypatch.delenv("HPO_ALLOW_OBJECTIVES")
    with pytest.raises(SpecError):
        ObjectivePolicy.from_sources().check("from_env.x:f", SOURCE)


def test_a_trusted_study_file_objective_allows_its_module_and_no_other() -> None:
    policy = ObjectivePolicy.from_sources(trusted=["userproj.train:fit", "digits_mlp"], environ={})
    assert policy.check("userproj.train:fit", SOURCE) == "userproj.train:fit"
    assert policy.check("userproj.train:other", SOURCE) == "userproj.train:other"  # same module
    for refused in ("userproj.evil:fit", "userproj:fit", "userproj.train.sub:fit"):
        with pytest.raises(SpecError, match="is not allowed"):
            policy.check(refused, SOURCE)
    # What a parent worker passes to the child processes it starts without the study file:
    with_patterns = ObjectivePolicy.from_sources(["p.*"], trusted=["userproj.train:fit"], environ={})
    assert with_patterns.cli_args() == ["--allow-objective", "p.*", "--allow-objective", "userproj.train"]
    assert ObjectivePolicy.from_sources(with_patterns.module_patterns(), environ={}).allows_module(
        "userproj.train"
    )


@pytest.mark.parametrize(
    ("cli", "env", "origin", "message"),
    [
        ([""], {}, "--allow-objective", "empty objective pattern"),
        (["   "], {}, "--allow-objective", "empty objective pattern"),
        (["a.b,"], {}, "--allow-objective", "empty objective pattern"),
        (["evil.mod:obj"], {}, "--allow-objective", "contains ':'"),
        (["my proj"], {}, "--allow-objective", "is not a module path"),
        ([], {"HPO_ALLOW_OBJECTIVES": "a.b,,c"}, "HPO_ALLOW_OBJECTIVES", "empty objective pattern"),
        ([], {"HPO_ALLOW_OBJECTIVES": "a.b:obj"}, "HPO_ALLOW_OBJECTIVES", "contains ':'"),
    ],
)
def test_malformed_patterns_are_one_line_errors(
    cli: list[str], env: dict[str, str], origin: str, message: str
) -> None:
    with pytest.raises(SpecError) as info:
        ObjectivePolicy.from_sources(cli, environ=env)
    text = str(info.value)
    assert text.startswith(f"{origin}: ") and message in text and "(fix: " in text and "\n" not in text


def test_a_colon_pattern_error_suggests_the_module() -> None:
    with pytest.raises(SpecError) as info:
        ObjectivePolicy.from_sources(["evil.mod:obj"], environ={})
    assert str(info.value).endswith("(fix: use the module path, e.g. evil.mod)")


@pytest.mark.parametrize("target", [":obj", "mod:", "mod:a.b", "a b:c", ".rel:obj", "a..b:c", "mod:obj:x"])
def test_malformed_targets_are_refused_before_any_import(target: str) -> None:
    with pytest.raises(SpecError, match=r"is not a registry name or a module\.path:attribute"):
        ObjectivePolicy.from_sources(["*"], environ={}).check(target, SOURCE)
    with pytest.raises(SpecError, match=r"is not a registry name or a module\.path:attribute"):
        resolve_objective(target, "study file")


# --------------------------------------------------------------------------- entry points


def test_entry_point_objectives_are_names_and_allowed_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name = unique("ep_objective_mod"), unique("ep_objective")
    marker = plant(tmp_path, module)
    install_entry_point(tmp_path, unique("hpo_ep_dist"), name, f"{module}:obj")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert entry_point_objectives()[name] == f"{module}:obj"
    assert known_objectives()[name] == f"{module}:obj"
    policy = ObjectivePolicy.from_sources(environ={})
    assert policy.check(name, SOURCE) == f"{module}:obj"
    assert policy.check(f"{module}:obj", SOURCE) == f"{module}:obj"  # the value, spelt out
    with pytest.raises(SpecError, match="is not allowed"):
        policy.check(f"{module}:other", SOURCE)  # only the entry point's own value
    assert not marker.exists()  # checking imports nothing

    objective = resolve_objective(name, SOURCE, policy)  # the name resolves like a registry name
    assert isinstance(objective, Objective) and marker.exists()
    assert resolve_objective(name).train is objective.train  # and without a policy


def test_the_registry_wins_a_name_an_entry_point_also_defines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_entry_point(tmp_path, unique("hpo_ep_dist"), "digits_mlp", "somewhere.else:obj")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ObjectivePolicy().check("digits_mlp", SOURCE) == REGISTRY["digits_mlp"]


# --------------------------------------------------------------------------- resolve_objective


def test_a_refused_module_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("planted_refused")
    marker = plant(tmp_path / "planted", module)
    monkeypatch.syspath_prepend(str(tmp_path / "planted"))
    policy = ObjectivePolicy.from_sources(["other.*"], environ={})

    with pytest.raises(SpecError) as info:
        resolve_objective(f"{module}:obj", SOURCE, policy)
    assert f"'{module}:obj' is not allowed on this worker" in str(info.value)
    assert f"--allow-objective {module}" in str(info.value)
    assert not marker.exists() and module not in sys.modules

    # The same module allowed by a pattern is imported: the marker does prove an import.
    allowed = ObjectivePolicy.from_sources([module], environ={})
    assert callable(resolve_objective(f"{module}:obj", SOURCE, allowed).train)
    assert marker.exists()


def test_without_a_policy_a_study_file_objective_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = unique("planted_trusted")
    marker = plant(tmp_path, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert callable(resolve_objective(f"{module}:obj").train)
    assert marker.exists()


def test_check_objective_applies_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("planted_checked")
    marker = plant(tmp_path, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_study(study_dict(f"{module}:obj"), "study.yaml")
    with pytest.raises(SpecError, match="is not allowed"):
        check_objective(spec, SOURCE, ObjectivePolicy.from_sources(environ={}))
    assert not marker.exists()
    check_objective(spec, SOURCE, ObjectivePolicy.from_sources(trusted=[f"{module}:obj"], environ={}))
    assert marker.exists()


# --------------------------------------------------------------------------- stored definitions


def study_dict(objective: str, search_space: object = None) -> dict[str, object]:
    return {
        "name": "s",
        "objective": objective,
        "search_space": search_space or {"x": {"type": "float", "low": -1.0, "high": 1.0}},
        "metric": "loss",
        "direction": "minimize",
        "n_trials": 2,
        "budget": {"max_epochs": 2},
        "sampler": {"name": "random"},
    }


def test_a_stored_definition_always_carries_its_space_inline(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("x: {type: float, low: -1, high: 1}\n")
    spec = parse_study(study_dict("hpo_test_objectives:quadratic", "space.yaml"), "f.yaml", base_dir=tmp_path)
    definition = spec.definition()
    assert definition["search_space"] == {"x": {"type": "float", "low": -1.0, "high": 1.0}}
    assert spec_from_definition(definition, SOURCE).definition() == definition


@pytest.mark.parametrize("reference", ["space.yaml", "ABSOLUTE", ["x"]])
def test_a_stored_definition_naming_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: object
) -> None:
    # A valid space file that a path-reading loader would accept, relative and absolute.
    (tmp_path / "space.yaml").write_text("x: {type: float, low: -1, high: 1}\n")
    monkeypatch.chdir(tmp_path)
    if reference == "ABSOLUTE":
        reference = str(tmp_path / "space.yaml")
    definition = study_dict("hpo_test_objectives:quadratic", reference)
    with pytest.raises(SpecError) as info:
        spec_from_definition(definition, SOURCE)
    text = str(info.value)
    assert text.startswith(f"{SOURCE}: search_space: ") and "not an inline mapping" in text
    assert info.value.field == "search_space" and "\n" not in text


def test_a_stored_definition_without_a_space_is_refused() -> None:
    definition = study_dict("digits_mlp")
    del definition["search_space"]
    with pytest.raises(SpecError, match="search_space: is missing; a stored definition carries"):
        spec_from_definition(definition, SOURCE)


# --------------------------------------------------------------------------- the worker, end to end


def _tampered_study(tmp_path: Path, url: str) -> tuple[str, Path, dict[str, str]]:
    """A study created from a study file, whose stored definition is then changed to name a
    planted module. Returns the study name, the planted module's marker file and the CLI env."""
    study_file = quadratic_study(tmp_path, name="policy_e2e", n_trials=2, epochs=2)
    created = run_cli(["create-study", str(study_file), "--storage", url])
    assert created.returncode == 0, created.stderr

    study = optuna.load_study(study_name="policy_e2e", storage=url)
    tampered = dict(stored_definition(study) or {})
    assert tampered["objective"] == "hpo_test_objectives:quadratic"
    tampered["objective"] = "planted_evil:obj"
    _optuna.study_storage(study).set_study_system_attr(_optuna.study_id(study), DEFINITION_ATTR, tampered)

    marker = plant(tmp_path / "planted", "planted_evil")
    base = cli_env()
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(tmp_path / "planted"), base["PYTHONPATH"]])})
    env.pop("HPO_ALLOW_OBJECTIVES", None)
    return "policy_e2e", marker, env


def _worker(name: str, url: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "worker",
        "--study-name",
        name,
        "--storage",
        url,
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--no-progress",
        *extra,
    ]


def _states(url: str, name: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=name, storage=url).trials]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_worker_refuses_a_tampered_objective_until_the_worker_allows_it(
    storage: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if storage == "sqlite" else "postgres_url")
    name, marker, env = _tampered_study(tmp_path, url)

    refused = run_cli(_worker(name, url, tmp_path), env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "planted_evil:obj" in lines[0] and "--allow-objective" in lines[0]
    assert not marker.exists(), "the refused module was imported"
    assert _states(url, name) == ["WAITING", "WAITING"]

    other = run_cli(_worker(name, url, tmp_path, "--allow-objective", "other.*"), env=env)
    assert other.returncode == 2 and not marker.exists(), other.stderr

    allowed = run_cli(
        _worker(name, url, tmp_path, "--allow-objective", "planted_evil", "--n-trials", "1"), env=env
    )
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists()
    assert sorted(_states(url, name)) == ["COMPLETE", "WAITING"]


@pytest.mark.slow
def test_a_worker_allows_a_tampered_objective_named_in_the_environment(
    sqlite_url: str, tmp_path: Path
) -> None:
    name, marker, env = _tampered_study(tmp_path, sqlite_url)
    refused = run_cli(_worker(name, sqlite_url, tmp_path), env={**env, "HPO_ALLOW_OBJECTIVES": "other.mod"})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "planted_evil:obj" in refused.stderr and not marker.exists()

    env_allowed = {**env, "HPO_ALLOW_OBJECTIVES": "other.mod,planted_*"}
    result = run_cli(_worker(name, sqlite_url, tmp_path), env=env_allowed)
    assert result.returncode == 0, result.stderr
    assert marker.exists() and _states(sqlite_url, name) == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_a_worker_given_the_study_file_refuses_a_tampered_definition(sqlite_url: str, tmp_path: Path) -> None:
    """With the study file on its command line the worker trusts that file's objective, and only
    that: a stored definition that differs from the file is never run (nor its module imported)."""
    name, marker, env = _tampered_study(tmp_path, sqlite_url)
    study_file = tmp_path / "policy_e2e.yaml"
    result = run_cli(
        ["worker", str(study_file), "--storage", sqlite_url, "--checkpoint-dir", str(tmp_path / "ck")],
        env=env,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "different definition" in result.stderr
    assert not marker.exists()
    assert _states(sqlite_url, name) == ["WAITING", "WAITING"]


@pytest.mark.slow
def test_a_worker_trusts_the_objective_of_the_study_file_it_was_given(
    sqlite_url: str, tmp_path: Path
) -> None:
    marker = plant(tmp_path / "planted", "planted_evil")
    base = cli_env()
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(tmp_path / "planted"), base["PYTHONPATH"]])})
    env.pop("HPO_ALLOW_OBJECTIVES", None)
    study_file = quadratic_study(
        tmp_path, name="own_objective", n_trials=1, epochs=2, objective="planted_evil:obj"
    )
    result = run_cli(
        [
            "worker",
            str(study_file),
            "--storage",
            sqlite_url,
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--no-progress",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert marker.exists() and _states(sqlite_url, "own_objective") == ["COMPLETE"]
