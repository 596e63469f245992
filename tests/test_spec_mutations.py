"""Every field of shipped study files and their search-space files, mutated one at a time (a value
of another type or out of range, the field removed, its key renamed to a non-name): loading the
study either succeeds or fails with one :class:`hpo.errors.HpoError` line naming the file, never
another exception (the CLI would print a traceback) and never a multi-line message.

The studies cover the features a study file can hold: a search-space file with conditional
parameters (the quickstart), a multi-objective study with early stopping, enqueued points, a grid,
BOHB, and per-member losses.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from hpo.errors import HpoError
from hpo.spec import load_study_file

STUDIES = [
    "digits_quickstart",
    "digits_pareto",
    "r000_celeba_attribute_mlp",
    "r002_scene15_grid",
    "r003_tiny_imagenet_losses",
    "r004_caltech_resnet50_bohb_features",
]
VALUES: list[Any] = [
    None,
    -1,
    0,
    2**70,
    1e308,
    float("nan"),
    float("-inf"),
    "",
    "💥",
    True,
    [],
    [None, "a"],
    {},
    {"a": 1},
    0.5,
    "1e-3",
]
KEYS: list[Any] = [1, None, True, 1.5, "", "💥"]
Path_ = tuple[Any, ...]


def _paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutations(raw: Any) -> Iterator[tuple[str, Any]]:
    """(what was done, the mutated document) for each one-field change of ``raw``."""
    for path in _paths(raw):
        for value in VALUES:
            yield (
                f"{path} = {value!r}",
                _changed(raw, path, lambda parent, key, v=value: parent.__setitem__(key, v)),
            )
        if not path:
            continue
        yield f"{path} removed", _changed(raw, path, lambda parent, key: parent.__delitem__(key))
        if isinstance(path[-1], str):
            for new in KEYS:
                yield (
                    f"{path} renamed {new!r}",
                    _changed(raw, path, lambda parent, key, k=new: parent.__setitem__(k, parent.pop(key))),
                )


def _changed(raw: Any, path: Path_, change: Any) -> Any:
    if not path:
        return None  # the whole document replaced: covered by the top-level values
    document = copy.deepcopy(raw)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    change(parent, path[-1])
    return document


def _check(study: Path, names: tuple[str, ...], what: str) -> None:
    try:
        load_study_file(study)
    except HpoError as exc:
        message = str(exc)
        assert "\n" not in message, f"{what}: {message}"
        assert any(name in message for name in names), f"{what}: names no file: {message}"
    except Exception as exc:  # what the CLI would print as a traceback
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("name", STUDIES)
def test_each_field_of_a_study_and_its_search_space_mutated_loads_or_is_one_line(
    tmp_path: Path, name: str
) -> None:
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    (tmp_path / "studies").mkdir()
    original = (ROOT / "studies" / f"{name}.yaml").read_text()
    study = tmp_path / "studies" / f"{name}.yaml"
    study.write_text(original)
    load_study_file(study)  # the shipped file loads
    raw = yaml.safe_load(original)
    checked = 0
    for what, document in _mutations(raw):
        study.write_text(yaml.safe_dump(document, allow_unicode=True))
        _check(study, (str(study),), f"{study.name}: {what}")
        checked += 1
    study.write_text(original)
    space_ref = raw.get("search_space")
    if isinstance(space_ref, str):
        space = (study.parent / space_ref).resolve()
        space_original = space.read_text()
        for what, document in _mutations(yaml.safe_load(space_original)):
            space.write_text(yaml.safe_dump(document, allow_unicode=True))
            _check(study, (str(study), space.name), f"{space.name}: {what}")
            checked += 1
    assert checked > 100  # the mutations reached the documents' fields
