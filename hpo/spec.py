"""Study files: typed, frozen, validated once at load time.

A study file names the objective, its fixed settings, the search space (a file reference or
inline), the metric and direction, the sampler, the pruner, the budget and the early-stopping
rule. :func:`load_study_file` turns it into a :class:`StudySpec` or raises one :class:`SpecError`
naming the file, the field and the fix. The *definition* (:meth:`StudySpec.definition`) is the
resolved file with its search space inlined; it is stored with the study so that any worker can
run the study from the storage URL and the study name alone. :func:`spec_from_definition` reads a
stored definition back and refuses one whose space is not inline (it never reads a file).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_serializer,
    model_serializer,
    model_validator,
)

from hpo.errors import HpoError, SpecError
from hpo.samplers import SAMPLER_BUILDERS, make_pruner, make_sampler
from hpo.space import MAX_GRID_POINTS, SearchSpace, grid_points, parse_space, space_to_dict

_T = TypeVar("_T")
PRUNER_NAMES = ("none", "median", "percentile", "successive_halving", "hyperband", "patient")
Direction = Literal["minimize", "maximize"]
DIRECTIONS: tuple[Direction, ...] = ("minimize", "maximize")
# Samplers Optuna cannot run on a study with several objectives (they raise at the first trial).
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "bohb")
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")
# Study names become folder names (checkpoints, artifacts): short enough for a file name, and no
# ".." step out of the folder they are meant for.
MAX_STUDY_NAME = 200
STUDY_NAME_FIX = (
    f"use letters, digits, _ . - /, at most {MAX_STUDY_NAME} characters, starting with a letter or digit"
)


def valid_study_name(name: str) -> bool:
    """Whether hpo creates a study of this name (a study made elsewhere keeps whatever name it has)."""
    return (
        len(name) <= MAX_STUDY_NAME
        and _STUDY_NAME.fullmatch(name) is not None
        and ".." not in name.split("/")
    )


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# What NumPy's RandomState, which Optuna's samplers seed, accepts.
MAX_SEED = 2**32 - 1
# create-study queues every trial of the budget as a database row (hpo.studies): a budget past
# this would take hours to create (2**70 hung it), and no training study needs it.
MAX_TRIALS = MAX_GRID_POINTS


class SamplerSpec(_Frozen):
    name: str
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerSpec(_Frozen):
    name: Literal["none", "median", "percentile", "successive_halving", "hyperband", "patient"] = "none"
    options: dict[str, Any] = Field(default_factory=dict)
    wrapped: PrunerSpec | None = None


class BudgetSpec(_Frozen):
    max_epochs: PositiveInt
    min_epochs: PositiveInt = 1
    # Seconds one trial may train; a trial still running then is stopped and recorded FAIL.
    trial_timeout: PositiveFloat | None = None

    @model_validator(mode="after")
    def _ordered(self) -> BudgetSpec:
        if self.min_epochs > self.max_epochs:
            raise ValueError("min_epochs must not exceed max_epochs")
        return self


class EarlyStoppingSpec(_Frozen):
    """``consecutive_worse`` is report 002's rule: stop once two consecutive epochs are both worse
    than the epoch before them, and score the trial by the worse of those two. ``patience`` stops
    after ``patience`` epochs without an improvement larger than ``min_delta`` (report 004's
    "threshold": an absolute change of the metric) and scores the epoch of the last such
    improvement. ``score`` overrides how the trial's value is taken, whatever the rule:
    ``best_epoch`` is the best value of any epoch (report 004 kept its best epoch), ``last_epoch``
    the last epoch's; left out, the rule decides (no rule: the last epoch).
    """

    rule: Literal["none", "consecutive_worse", "patience"] = "none"
    patience: PositiveInt = 3
    min_delta: float = Field(default=0.0, ge=0.0)
    score: Literal["best_epoch", "last_epoch"] | None = None

    @model_serializer(mode="wrap")
    def _without_default_score(self, handler: Callable[[Any], Any]) -> Any:
        # Definitions stored before ``score`` existed have no such key; leaving the default out
        # keeps them equal to the study file's (see definition_diff).
        data = handler(self)
        if self.score is None and isinstance(data, dict):
            data.pop("score", None)
        return data


class StudySpec(_Frozen):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str
    description: str = ""
    objective: str
    data: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    space: SearchSpace
    # ``metric:`` and ``direction:`` in the file: one name, or a list of them for a multi-objective
    # study (Optuna's ``directions``). Held as tuples; written back as the file wrote them (a
    # single name stays a string, so definitions stored before multi-objective studies still match).
    metrics: tuple[str, ...] = Field(alias="metric", min_length=1)
    directions: tuple[Direction, ...] = Field(alias="direction", min_length=1)
    n_trials: int = Field(gt=0, le=MAX_TRIALS)
    budget: BudgetSpec
    seed: int = Field(0, ge=0, le=MAX_SEED)
    sampler: SamplerSpec
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    # Known configurations (e.g. a report's own setting) queued as the study's first trials when it
    # is created (hpo.studies); validated against the space at load time (_check_enqueue).
    enqueue: tuple[dict[str, Any], ...] = ()

    @model_serializer(mode="wrap")
    def _without_empty_enqueue(self, handler: Callable[[Any], Any]) -> Any:
        # Definitions stored before ``enqueue`` existed have no such key (see definition_diff).
        data = handler(self)
        if not self.enqueue and isinstance(data, dict):
            data.pop("enqueue", None)
        return data

    @field_serializer("metrics", "directions")
    def _one_or_list(self, value: tuple[str, ...]) -> str | list[str]:
        return value[0] if len(value) == 1 else list(value)

    @property
    def metric(self) -> str:
        """The first (for a single-objective study: the) metric: the one reported to the pruner as
        the trial's intermediate values, and the one early stopping watches."""
        return self.metrics[0]

    @property
    def direction(self) -> Direction:
        """The first metric's direction."""
        return self.directions[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def sampler_seed(self) -> int:
        return self.sampler.seed if self.sampler.seed is not None else self.seed

    def definition(self) -> dict[str, Any]:
        """The resolved, JSON-ready definition stored with the study; its ``search_space`` is always
        the inline mapping (never a file path), as :func:`spec_from_definition` requires."""
        data = self.model_dump(mode="json", exclude={"space"}, by_alias=True)
        data["search_space"] = space_to_dict(self.space)
        return data

    def config_for(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fixed settings overlaid with a trial's sampled parameters."""
        return {**self.settings, **params}


# --------------------------------------------------------------------------- loading

_TOP_LEVEL = (
    "name, description, objective, data, settings, search_space, metric, direction, n_trials, "
    "budget, seed, sampler, pruner, early_stopping, enqueue"
)
# Settings holding a file path (by name): a relative one is resolved against the study file's
# folder when the file is loaded, never against the current directory of whoever runs the study.
# ``artifact:STUDY`` (a model that ``hpo retrain STUDY`` put in the artifact store) is left as is.
PATH_SETTING_SUFFIX = "_checkpoint"
ARTIFACT_PREFIX = "artifact:"


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML (or JSON) document in ``path``; a one-line :class:`SpecError` naming the file if it
    is missing, unreadable, not UTF-8 or not valid YAML. ``what``: the file's role, for messages."""
    if not path.is_file():
        raise SpecError(
            str(path), "", f"{what} not found", "check the path (relative to the current directory)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            str(path),
            "",
            f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
            "save the file as UTF-8",
        ) from None
    except OSError as exc:
        raise SpecError(str(path), "", f"cannot read the {what}: {exc.strerror}", "check the file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(str(path), where, f"invalid YAML: {problem}", "fix the YAML syntax") from None


def load_space_file(path: str | Path) -> SearchSpace:
    path = Path(path)
    return parse_space(read_yaml_file(path, "search-space file"), str(path))


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that holds the value at ``loc``."""
    model: Any = StudySpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")]
        if not candidates:
            return []
        model = candidates[0]
    fields = getattr(model, "model_fields", {})
    names = [field.alias or name for name, field in fields.items() if name != "space"]
    return [*names, "search_space"] if model is StudySpec else names


def _pydantic_error(source: str, error: ValidationError) -> SpecError:
    errors = error.errors()
    # A misspelt field also makes the real one "missing"; the misspelling is the useful report.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(tuple(first["loc"])))
        return SpecError(source, loc, "unknown field", f"remove it or check its spelling; fields: {allowed}")
    if first["type"] == "missing":
        return SpecError(source, loc, "is required", "add it to the study file")
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return SpecError(source, loc, message)


def _in_space(build: Callable[[], _T], prefix: str) -> _T:
    try:
        return build()
    except SpecError as exc:
        if not prefix:
            raise
        raise SpecError(exc.source, f"{prefix}{exc.field}".rstrip("."), exc.message, exc.hint) from None


def parse_study(raw: Any, source: str, base_dir: Path | None = None) -> StudySpec:
    """Validate a study mapping (from a file, or a stored definition) into a :class:`StudySpec`."""
    if not isinstance(raw, Mapping):
        raise SpecError(source, "", "a study file must be a YAML mapping", f"top-level fields: {_TOP_LEVEL}")
    raw = dict(raw)
    if "search_space" not in raw:
        raise SpecError(source, "search_space", "is required", "search_space: ../search_spaces/NAME.yaml")
    space_ref = raw.pop("search_space")
    if isinstance(space_ref, str):
        space_path = Path(space_ref)
        if not space_path.is_absolute() and base_dir is not None:
            space_path = base_dir / space_path
        space_source, prefix = str(space_path), ""
        if base_dir is not None and not space_path.is_file():
            # Resolved against the study file's folder, not the current directory: say so.
            raise SpecError(
                source,
                "search_space",
                f"search-space file not found: {space_ref} (looked for {space_path})",
                "the path is relative to the study file's folder, "
                "e.g. search_space: ../search_spaces/NAME.yaml",
            )
        space = load_space_file(space_path)
    else:
        # Errors in an inline space name the study file and the field under search_space.
        space_source, prefix = source, "search_space."
        space = _in_space(lambda: parse_space(space_ref, source), prefix)
    for key in ("sampler", "pruner"):
        if isinstance(raw.get(key), str):
            raw[key] = {"name": raw[key]}
    sampler_name = (raw.get("sampler") or {}).get("name") if isinstance(raw.get("sampler"), Mapping) else None
    if sampler_name is not None and (
        not isinstance(sampler_name, str) or sampler_name not in SAMPLER_BUILDERS
    ):
        raise SpecError(
            source,
            "sampler.name",
            f"unknown sampler {sampler_name!r}",
            f"use one of {', '.join(SAMPLER_BUILDERS)}",
        )
    if sampler_name == "grid":
        points = _in_space(lambda: grid_points(space, space_source), prefix)
        if raw.get("n_trials") is None:
            raw["n_trials"] = len(points)
        elif raw["n_trials"] != len(points):
            raise SpecError(
                source,
                "n_trials",
                f"is {raw['n_trials']} but the grid has {len(points)} points",
                "remove n_trials for a grid study (it is the grid's size)",
            )
    _objectives(raw, source)
    if "enqueue" in raw:
        raw["enqueue"] = _check_enqueue(raw["enqueue"], space, sampler_name, source)
    if base_dir is not None and isinstance(raw.get("settings"), Mapping):
        raw["settings"] = _resolve_path_settings(raw["settings"], base_dir)
    if isinstance(raw.get("name"), str) and not valid_study_name(raw["name"]):
        shown = raw["name"] if len(raw["name"]) <= 60 else raw["name"][:60] + "..."
        raise SpecError(source, "name", f"{shown!r} is not a valid study name", STUDY_NAME_FIX)
    try:
        spec = StudySpec(space=space, **raw)
    except ValidationError as exc:
        raise _pydantic_error(source, exc) from None
    except TypeError as exc:
        raise SpecError(source, "", str(exc)) from None
    if len(spec.enqueue) > spec.n_trials:
        raise SpecError(
            source,
            "enqueue",
            f"lists {len(spec.enqueue)} configurations but n_trials is {spec.n_trials}",
            f"raise n_trials to at least {len(spec.enqueue)} (the enqueued trials are part of the budget)",
        )
    if spec.is_multi_objective:
        _check_multi_objective(spec, source)
    _check_factories(spec, source)
    return spec


def _check_enqueue(
    value: Any, space: SearchSpace, sampler_name: str | None, source: str
) -> list[dict[str, Any]]:
    """``enqueue:`` validated point by point against the space, as ``hpo enqueue`` validates
    ``--params`` (:func:`hpo.lifecycle.check_config`); the normalised points (ints made floats
    for float parameters), so that the queued trials' fixed parameters compare equal."""
    example = "e.g. enqueue: [{lr: 1.0e-3, weight_decay: 1.0e-2}]"
    if sampler_name == "grid":
        raise SpecError(
            source,
            "enqueue",
            "a grid study already queues every grid point",
            "remove enqueue, or add the values to the grid (grid: [...]) of its parameters",
        )
    if not isinstance(value, list) or not value:
        raise SpecError(
            source, "enqueue", f"must be a non-empty list of configurations, got {value!r}", example
        )
    from hpo.lifecycle import check_config  # local import: hpo.lifecycle imports this module

    points: list[dict[str, Any]] = []
    for i, config in enumerate(value):
        where = f"{source}: enqueue[{i}]"
        try:
            point = check_config(space, config, where)
        except SpecError:
            raise
        except HpoError as exc:
            raise SpecError(source, f"enqueue[{i}]", str(exc).removeprefix(f"{where}: ")) from None
        if point in points:
            raise SpecError(
                source,
                f"enqueue[{i}]",
                f"repeats enqueue[{points.index(point)}]",
                "list each configuration once (each is queued as one trial)",
            )
        points.append(point)
    return points


def _resolve_path_settings(settings: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """``settings`` with each relative ``*_checkpoint`` path made absolute against ``base_dir``."""
    resolved = dict(settings)
    for key, value in settings.items():
        if (
            isinstance(key, str)  # any other key is refused where the settings are validated
            and key.endswith(PATH_SETTING_SUFFIX)
            and isinstance(value, str)
            and value
            and not value.startswith(ARTIFACT_PREFIX)
            and not Path(value).is_absolute()
        ):
            resolved[key] = str((base_dir / value).resolve())
    return resolved


def _names(value: Any, source: str, field: str, what: str, example: str) -> tuple[str, ...]:
    """A ``metric:``/``direction:`` value as a tuple: one string, or a non-empty list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise SpecError(source, field, f"must be a {what} or a list of them, got {value!r}", example)
    seen: set[str] = set()
    for i, item in enumerate(items):
        if field == "metric" and item in seen:
            raise SpecError(source, f"{field}[{i}]", f"{item!r} is listed twice", "list each metric once")
        seen.add(item)
    return tuple(items)


def _objectives(raw: dict[str, Any], source: str) -> None:
    """Check ``metric:`` and ``direction:`` together (one direction per metric) and turn each into
    a tuple; a missing one is left for the model to report as required."""
    if raw.get("metric") is None or raw.get("direction") is None:
        return
    metrics = _names(
        raw["metric"],
        source,
        "metric",
        "metric name",
        "e.g. metric: val_loss, or metric: [val_loss, train_seconds]",
    )
    directions = _names(
        raw["direction"],
        source,
        "direction",
        "direction",
        "e.g. direction: minimize, or direction: [minimize, minimize] with one entry per metric",
    )
    for i, direction in enumerate(directions):
        if direction not in DIRECTIONS:
            where = "direction" if isinstance(raw["direction"], str) else f"direction[{i}]"
            close = difflib.get_close_matches(direction, DIRECTIONS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SpecError(
                source, where, f"{direction!r} is not a direction", f"{hint}use minimize or maximize"
            )
    if len(directions) != len(metrics):
        raise SpecError(
            source,
            "direction",
            f"has {len(directions)} {'entry' if len(directions) == 1 else 'entries'} "
            f"but metric has {len(metrics)}",
            "give one direction per metric, in the same order, e.g. "
            f"direction: [{', '.join(['minimize'] * len(metrics))}]",
        )
    raw["metric"], raw["direction"] = metrics, directions


def _check_multi_objective(spec: StudySpec, source: str) -> None:
    """What Optuna cannot do with several objectives, refused at load time rather than at the
    first trial."""
    count = f"{len(spec.metrics)} metrics"
    if spec.sampler.name in SINGLE_OBJECTIVE_SAMPLERS:
        raise SpecError(
            source,
            "sampler.name",
            f"{spec.sampler.name} cannot optimise several objectives ({count})",
            "use nsga2, tpe, random, gp or grid, or a single metric",
        )
    if spec.pruner.name != "none":
        # Optuna's Trial.should_prune raises for multi-objective studies: no pruner applies.
        raise SpecError(
            source,
            "pruner",
            f"Optuna does not prune multi-objective studies ({count})",
            "remove pruner:, or use a single metric",
        )


def _check_factories(spec: StudySpec, source: str) -> None:
    try:
        make_sampler(spec)
    except (TypeError, ValueError) as exc:
        raise SpecError(
            source, "sampler.options", str(exc), "see the Optuna sampler's keyword arguments"
        ) from None
    try:
        make_pruner(spec.pruner, spec.budget.max_epochs)
    except (TypeError, ValueError) as exc:
        raise SpecError(
            source, "pruner.options", str(exc), "see the Optuna pruner's keyword arguments"
        ) from None


def parse_study_file(path: str | Path) -> StudySpec:
    """Read and validate a study file, without importing its objective (:func:`load_study_file`
    checks that too)."""
    path = Path(path)
    return parse_study(read_yaml_file(path, "study file"), str(path), base_dir=path.parent)


def load_study_file(path: str | Path, search_path: Sequence[str] | None = None) -> StudySpec:
    """Load and validate a study file; also checks the objective and its options.

    A ``module:attribute`` objective the installed packages lack is looked for in ``search_path``
    (default: the study file's folder, the folder above it and the current directory; see
    :mod:`hpo._objective_path`).
    """
    path = Path(path)
    spec = parse_study_file(path)
    from hpo._objective_path import objective_path
    from hpo.objective import check_objective  # local import: objectives import torch

    check_objective(spec, str(path), search_path=objective_path(path) if search_path is None else search_path)
    return spec


def spec_from_definition(definition: Mapping[str, Any], source: str) -> StudySpec:
    """A :class:`StudySpec` from a stored definition (``source`` names where it was stored).

    A stored definition carries its search space inline (:meth:`StudySpec.definition`); one whose
    ``search_space`` is anything else is refused without touching the file system: the storage
    never makes a worker read a path. The objective is not resolved here (see
    :func:`hpo.objective.resolve_objective` and :class:`hpo.policy.ObjectivePolicy`).
    """
    if not isinstance(definition, Mapping):
        raise SpecError(
            source, "", "a stored definition must be a mapping", "re-create the study from its study file"
        )
    space = definition.get("search_space")
    if not isinstance(space, Mapping):
        what = "is missing" if space is None else f"is a {type(space).__name__}, not an inline mapping"
        raise SpecError(
            source,
            "search_space",
            f"{what}; a stored definition carries its space inline and is never read as a file path",
            "re-create the study from its study file (hpo create-study stores the space inline)",
        )
    return parse_study(definition, source)


def canonical(definition: Mapping[str, Any]) -> str:
    """A stable text form of a definition; the study name is not part of what must match."""
    return json.dumps({k: v for k, v in definition.items() if k != "name"}, sort_keys=True)


def definition_diff(stored: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """A unified diff between two definitions (empty when they are equivalent)."""
    if canonical(stored) == canonical(given):
        return ""

    def dump(d: Mapping[str, Any]) -> list[str]:
        clean = {k: v for k, v in d.items() if k != "name"}
        return yaml.safe_dump(json.loads(json.dumps(clean)), sort_keys=True).splitlines()

    return "\n".join(
        difflib.unified_diff(dump(stored), dump(given), "stored definition", "study file", lineterm="")
    )
