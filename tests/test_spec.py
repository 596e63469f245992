"""Study files: loading, validation errors (one line naming file and field), stored definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_study

from hpo.errors import SpecError
from hpo.spec import definition_diff, load_study_file, parse_study

BASE = """
name: t
objective: hpo_test_objectives:quadratic
search_space:
  x: {type: float, low: -5, high: 5}
  y: {type: float, low: -5, high: 5}
metric: loss
direction: minimize
n_trials: 4
budget: {max_epochs: 3}
sampler: {name: tpe, seed: 1}
"""


def test_quickstart_file_loads() -> None:
    spec = load_study_file(ROOT / "studies" / "digits_quickstart.yaml")
    assert spec.name == "digits_quickstart"
    assert spec.sampler.name == "tpe" and spec.pruner.name == "median"
    assert spec.n_trials == 20
    assert "momentum" in spec.space.names and spec.space.is_conditional


def test_definition_round_trips_and_equal_definitions_have_no_diff(tmp_path: Path) -> None:
    spec = load_study_file(write_study(tmp_path, BASE))
    definition = spec.definition()
    again = parse_study(definition, "stored")
    assert again == spec
    assert definition_diff(definition, again.definition()) == ""


def test_definition_diff_shows_the_change(tmp_path: Path) -> None:
    a = load_study_file(write_study(tmp_path, BASE, "a.yaml")).definition()
    b = load_study_file(write_study(tmp_path, BASE.replace("max_epochs: 3", "max_epochs: 5"), "b.yaml"))
    diff = definition_diff(a, b.definition())
    assert "-  max_epochs: 3" in diff and "+  max_epochs: 5" in diff


def test_search_space_file_reference_is_relative_to_the_study(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.yaml").write_text("x: {type: float, low: 0, high: 1}\n")
    body = BASE.replace(
        "search_space:\n  x: {type: float, low: -5, high: 5}\n  y: {type: float, low: -5, high: 5}\n",
        "search_space: spaces/s.yaml\n",
    )
    spec = load_study_file(write_study(tmp_path, body))
    assert spec.space.names == ("x",)


def test_grid_study_n_trials_defaults_to_grid_size(tmp_path: Path) -> None:
    body = BASE.replace("sampler: {name: tpe, seed: 1}", "sampler: grid").replace("n_trials: 4\n", "")
    body = body.replace(
        "{type: float, low: -5, high: 5}", "{type: float, low: -5, high: 5, grid: [-1, 0, 1]}"
    )
    assert load_study_file(write_study(tmp_path, body)).n_trials == 9


MALFORMED = [
    # (replacement applied to BASE, expected field, expected fragment)
    (("name: t", "name: 't t'"), "name", "not a valid study name"),
    (
        ("objective: hpo_test_objectives:quadratic", "objective: no_such_objective"),
        "objective",
        "unknown objective",
    ),
    (("objective: hpo_test_objectives:quadratic", "objective: nomodule_xyz:f"), "objective", "cannot import"),
    (("direction: minimize", "direction: down"), "direction", "minimize"),
    (("n_trials: 4", "n_trials: 0"), "n_trials", "greater than 0"),
    (("n_trials: 4", "n_trials: many"), "n_trials", "integer"),
    (("budget: {max_epochs: 3}", "budget: {max_epochs: 3, min_epochs: 5}"), "budget", "min_epochs"),
    (("budget: {max_epochs: 3}", "budget: {epochs: 3}"), "budget.epochs", "unknown field"),
    (("sampler: {name: tpe, seed: 1}", "sampler: {name: annealing}"), "sampler.name", "unknown sampler"),
    # named as the field at fault, not as the sampler's options that the seed reaches
    (("n_trials: 4", "n_trials: 4\nseed: -1"), " seed:", "greater than or equal to 0"),
    (("seed: 1}", "seed: 5000000000}"), "sampler.seed", "less than or equal to 4294967295"),
    (
        ("sampler: {name: tpe, seed: 1}", "sampler: {name: tpe, options: {n_startup: 3}}"),
        "sampler.options",
        "n_startup",
    ),
    (
        ("sampler: {name: tpe, seed: 1}", "sampler: {name: tpe}\npruner: {name: bandit}"),
        "pruner.name",
        "median",
    ),
    (
        ("sampler: {name: tpe, seed: 1}", "sampler: {name: tpe}\npruner: {name: percentile}"),
        "pruner.options",
        "percentile",
    ),
    (("metric: loss", "metric: loss\nmetrics: [a]"), "metrics", "unknown field"),
    (("metric: loss\n", ""), "metric", "is required"),
    (
        ("x: {type: float, low: -5, high: 5}", "x: {type: float, low: 5, high: -5}"),
        "search_space.x.low",
        "greater than high",
    ),
    (("sampler: {name: tpe, seed: 1}", "sampler: {name: grid}"), "search_space.x.grid", "grid"),
    (("n_trials: 4", "n_trials: 4\nearly_stopping: {rule: sometimes}"), "early_stopping.rule", "patience"),
    (("direction: minimize", "direction: minimize\n  bad_indent: ["), " line", "invalid YAML"),
    # create-study queued 2**70 trials, one row each: it hung
    (("n_trials: 4", "n_trials: 1180591620717411303424"), "n_trials", "less than or equal to 100000"),
    (("sampler: {name: tpe, seed: 1}", "sampler: {name: [tpe]}"), "sampler.name", "unknown sampler"),
]


@pytest.mark.parametrize(("change", "field", "fragment"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_study_files_name_file_and_field(
    tmp_path: Path, change: tuple[str, str], field: str, fragment: str
) -> None:
    old, new = change
    assert old in BASE
    path = write_study(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(SpecError) as info:
        load_study_file(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert field in message and fragment in message, message
    assert "\n" not in message


def test_missing_files_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="study file not found"):
        load_study_file(tmp_path / "nope.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(
        BASE.replace("direction: minimize", "description: caf\xe9\ndirection: minimize").encode("latin-1")
    )
    with pytest.raises(
        SpecError, match=r"latin1.yaml: is not UTF-8 text \(byte 0xe9 at offset \d+\) \(fix: save"
    ):
        load_study_file(latin1)  # was: UnicodeDecodeError, a traceback
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_study_file(write_study(tmp_path, "- a\n- b\n"))
    body = BASE.replace(
        "search_space:\n  x: {type: float, low: -5, high: 5}\n  y: {type: float, low: -5, high: 5}\n",
        "search_space: missing.yaml\n",
    )
    with pytest.raises(SpecError, match="search-space file not found"):
        load_study_file(write_study(tmp_path, body))


def test_objective_options_are_checked_against_the_objective(tmp_path: Path) -> None:
    body = (ROOT / "studies" / "digits_quickstart.yaml").read_text()
    body = body.replace(
        "search_space: ../search_spaces/digits.yaml", f"search_space: {ROOT}/search_spaces/digits.yaml"
    )
    path = write_study(tmp_path, body.replace("hidden_units: 128", "hiden_units: 128"))
    with pytest.raises(SpecError, match=r"settings\.hiden_units: is not an option.*hidden_units"):
        load_study_file(path)
    path = write_study(tmp_path, body.replace("hidden_units: 128", "hidden_units: -3"), "b.yaml")
    with pytest.raises(SpecError, match=r"settings\.hidden_units"):
        load_study_file(path)
    path = write_study(tmp_path, body.replace("val_fraction: 0.2", "val_fraction: 2"), "c.yaml")
    with pytest.raises(SpecError, match=r"data\.val_fraction"):
        load_study_file(path)


@pytest.mark.parametrize("command", ["create-study", "worker"])
def test_cli_prints_one_line_without_traceback(tmp_path: Path, command: str) -> None:
    path = write_study(tmp_path, BASE.replace("direction: minimize", "direction: sideways"))
    result = run_cli([command, str(path), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: direction:")
    assert "Traceback" not in result.stderr
