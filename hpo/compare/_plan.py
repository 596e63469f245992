"""Planning a comparison: one study per (sampler, seed), named ``NAME/SAMPLER/seed-K``.

Each run's study is derived from the comparison's study file by replacing ``sampler`` (name, seed,
options) and nothing else that matters, so every algorithm gets the same budget: the same
``n_trials`` and the same ``budget.max_epochs`` per trial (the report then also counts the epochs
each one actually consumed, since pruning and multi-fidelity samplers spend fewer). Grid search's
trial count is its grid's size, so a comparison that includes ``grid`` needs ``n_trials`` equal to
the grid's size (report 002: 5 learning rates x 4 batch sizes = 20 trials for every algorithm);
each seed runs the whole grid in its own seeded order (each parameter's grid values permuted), so
grid's best-so-far curve does not depend on the order the values were written in.

Sampler seeds: run ``K`` uses sampler seed ``base + K * SEED_STRIDE``. Workers seed each trial's
sampler with :func:`hpo.samplers.trial_seed` (a hash of study seed and trial number), so consecutive
seeds would now be independent too; the stride stays because each run's seed is part of its stored
definition, and comparisons created before keep matching (and resuming) their studies.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from hpo.compare._replay import REPLAY_OBJECTIVE_PATH, ReplayTable, check_covers, file_digest
from hpo.compare._results import COMPARISON_ATTR, comparison_study_names
from hpo.errors import HpoError, SpecError
from hpo.samplers import SAMPLER_BUILDERS
from hpo.space import grid_points, grid_values
from hpo.spec import MAX_SEED, StudySpec, definition_diff, parse_study
from hpo.studies import create_study, stored_definition

SEED_STRIDE = 1_000_000


@dataclass(frozen=True)
class PlannedRun:
    sampler: str
    seed: int  # the repetition index K of NAME/SAMPLER/seed-K
    study_name: str
    spec: StudySpec


@dataclass(frozen=True)
class ComparisonPlan:
    """The studies of one comparison. ``base`` is the study file's spec with overrides applied."""

    name: str
    base: StudySpec
    samplers: tuple[str, ...]
    seeds: tuple[int, ...]
    runs: tuple[PlannedRun, ...]
    replay_table: str | None
    vary_training_seed: bool


def parse_samplers(text: str, flag: str = "--samplers") -> tuple[str, ...]:
    """Comma-separated sampler names, each registered in :data:`hpo.samplers.SAMPLER_BUILDERS`."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = ", ".join(SAMPLER_BUILDERS)
    if not names:
        raise HpoError(f"{flag}: no sampler named (fix: e.g. {flag} random,tpe; known: {known})")
    for name in names:
        if name not in SAMPLER_BUILDERS:
            raise HpoError(f"{flag}: unknown sampler {name!r} (fix: use names from {known})")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise HpoError(f"{flag}: {', '.join(duplicates)} listed twice (fix: name each sampler once)")
    return names


def _with(base: dict[str, Any], source: str, **changes: Any) -> StudySpec:
    definition = copy.deepcopy(base)
    definition.update(changes)
    return parse_study(definition, source)


def _shuffled_grid(space: dict[str, Any], spec: StudySpec, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    shuffled = copy.deepcopy(space)
    for param in spec.space:
        values = list(grid_values(param))
        rng.shuffle(values)
        shuffled[param.name]["grid"] = values
    return shuffled


def base_spec(spec: StudySpec, source: str, subset: float | None = None) -> StudySpec:
    """``spec`` with ``--subset`` applied to ``data.subset`` (validated like the file itself)."""
    if spec.is_multi_objective:
        # Comparisons rank samplers by one best-so-far curve, which several objectives lack.
        raise HpoError(
            f"{source}: metric: {len(spec.metrics)} metrics; comparisons need a single metric "
            "(fix: compare on one metric, e.g. metric: " + spec.metric + ")"
        )
    if subset is None:
        return spec
    if not 0.0 < subset <= 1.0:
        raise HpoError(f"--subset must lie in (0, 1], got {subset} (fix: e.g. --subset 0.1 for 10%)")
    return _with(spec.definition(), source, data={**spec.data, "subset": subset})


def derive_run_spec(
    base: StudySpec,
    sampler: str,
    seed: int,
    study_name: str,
    source: str,
    replay: tuple[str, str] | None = None,
    vary_training_seed: bool = False,
) -> StudySpec:
    """The study of run ``seed`` of ``sampler`` (see the module docstring); ``replay`` is
    ``(table path, sha256)`` for a replayed run."""
    definition = base.definition()
    options = dict(base.sampler.options) if base.sampler.name == sampler else {}
    changes: dict[str, Any] = {
        "name": study_name,
        "sampler": {"name": sampler, "seed": base.sampler_seed + seed * SEED_STRIDE, "options": options},
    }
    if vary_training_seed:
        changes["seed"] = base.seed + seed
    if sampler == "grid":
        changes["search_space"] = _shuffled_grid(definition["search_space"], base, seed)
        changes["n_trials"] = base.n_trials
    if replay is not None:
        changes["objective"] = REPLAY_OBJECTIVE_PATH
        changes["data"] = {"table": replay[0], "sha256": replay[1]}
        changes["description"] = f"replay of {replay[0]}: {base.description}".strip(": ")
    return _with(definition, source, **changes)


def plan_comparison(
    base: StudySpec,
    samplers: Sequence[str],
    seeds: int,
    *,
    source: str,
    name: str | None = None,
    replay: ReplayTable | None = None,
    replay_path: str | None = None,
    vary_training_seed: bool = False,
) -> ComparisonPlan:
    """Validate the comparison and derive every run's study; raises before anything is created."""
    if seeds < 1:
        raise HpoError(
            f"--seeds must be at least 1, got {seeds} "
            "(fix: e.g. --seeds 10; one run cannot tell luck from method)"
        )
    if not samplers:
        raise HpoError("--samplers: no sampler named (fix: e.g. --samplers random,tpe)")
    # run K's sampler seed is sampler_seed + K * SEED_STRIDE (its training seed seed + K with
    # --vary-training-seed): each must stay a valid seed, and the flag is what went too far
    most = (MAX_SEED - base.sampler_seed) // SEED_STRIDE + 1
    if vary_training_seed:
        most = min(most, MAX_SEED - base.seed + 1)
    if seeds > most:
        raise HpoError(
            f"--seeds {seeds} is too many: run K uses sampler seed {base.sampler_seed} + K x {SEED_STRIDE}, "
            f"which must stay at most {MAX_SEED} (fix: --seeds {most} or fewer)"
        )
    if "grid" in samplers:
        size = len(grid_points(base.space, source))
        if size != base.n_trials:
            raise SpecError(
                source,
                "n_trials",
                f"is {base.n_trials} but the grid of the search space has {size} points, so grid search "
                "would get a different budget than the other algorithms",
                f"set n_trials: {size}, or change the grid: values so the grid has {base.n_trials} points",
            )
    if replay is not None:
        if replay_path is None:
            raise ValueError("replay_path is required with replay")
        if vary_training_seed:
            raise HpoError(
                "--vary-training-seed has no effect with --replay: a table holds one training run per "
                "configuration (fix: drop one of the two flags)"
            )
        check_covers(replay, base, replay_path)
    comparison = name or (f"{base.name}-replay" if replay is not None else base.name)
    replay_ref = None
    if replay_path is not None:
        path = Path(replay_path).resolve()
        replay_ref = (str(path), file_digest(path))
    runs = tuple(
        PlannedRun(
            sampler,
            seed,
            f"{comparison}/{sampler}/seed-{seed}",
            derive_run_spec(
                base,
                sampler,
                seed,
                f"{comparison}/{sampler}/seed-{seed}",
                source,
                replay_ref,
                vary_training_seed,
            ),
        )
        # seeds outermost: a comparison stopped half way has the same seeds of every algorithm
        for seed in range(seeds)
        for sampler in samplers
    )
    return ComparisonPlan(
        comparison,
        base,
        tuple(samplers),
        tuple(range(seeds)),
        runs,
        replay_ref[0] if replay_ref else None,
        vary_training_seed,
    )


def check_clashes(storage: BaseStorage, plan: ComparisonPlan) -> None:
    """Refuse a comparison whose name is already used by studies of another definition.

    Checks the planned studies and every other ``NAME/SAMPLER/seed-K`` study (a sampler or seed
    this run does not ask for), so one comparison never mixes two problems. Nothing is created.
    """
    planned = {run.study_name: run.spec for run in plan.runs}
    replay_ref = None
    if plan.replay_table is not None:
        replay_ref = (plan.replay_table, next(iter(planned.values())).data["sha256"])
    existing = comparison_study_names(storage, plan.name)
    for sampler, seed, study_name in existing:
        spec = planned.get(study_name)
        if spec is None:
            if sampler not in SAMPLER_BUILDERS:
                continue  # an algorithm no longer installed here; its runs are still reported
            spec = derive_run_spec(
                plan.base, sampler, seed, study_name, "comparison", replay_ref, plan.vary_training_seed
            )
        study = optuna.load_study(study_name=study_name, storage=storage)
        stored = stored_definition(study)
        if stored is None:
            continue
        diff = definition_diff(stored, spec.definition())
        if diff:
            raise HpoError(
                f"comparison {plan.name!r} clashes with study {study_name!r}, stored with another "
                f"definition:\n{diff}\n(fix: pass --name NEW_NAME to start a new comparison, or restore "
                "the study file and flags that made it)"
            )


def create_runs(storage: BaseStorage, plan: ComparisonPlan) -> int:
    """Create every run's study that does not exist yet (after :func:`check_clashes`); how many."""
    check_clashes(storage, plan)
    created = 0
    for run in plan.runs:
        study, new = create_study(storage, run.spec, run.study_name, skip_if_exists=True)
        if new:
            study.set_user_attr(
                COMPARISON_ATTR, {"comparison": plan.name, "sampler": run.sampler, "seed": run.seed}
            )
            created += 1
    return created
