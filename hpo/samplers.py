"""Factories from a study file's ``sampler:`` and ``pruner:`` sections to Optuna objects.

Each sampler is built by a function in :data:`SAMPLER_BUILDERS`; adding an algorithm (BOHB, say)
means adding one entry. Builders receive the options from the study file verbatim, so every
keyword of the Optuna class is available, and an unknown keyword is reported at load time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler

if TYPE_CHECKING:
    from hpo.spec import PrunerSpec, StudySpec

SamplerBuilder = Callable[[dict[str, Any], int | None, "StudySpec"], BaseSampler]


def _random(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed, **options)


def _grid(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    # Grid points are queued as WAITING trials with fixed parameters when the study is created,
    # so workers pop each point exactly once; the sampler itself is never asked for a value.
    # (Optuna's GridSampler would pick points per process and repeat them under parallel workers.)
    if options:
        raise TypeError(f"the grid sampler takes no options, got {sorted(options)}")
    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    defaults: dict[str, Any] = {
        # Running trials of other workers count as bad results, so parallel workers spread out.
        "constant_liar": True,
    }
    if spec.space.is_conditional:
        # Multivariate TPE with groups handles conditional (tree-structured) spaces.
        defaults.update(multivariate=True, group=True)
    return optuna.samplers.TPESampler(seed=seed, **{**defaults, **options})


def _gp(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, **options)


def _cmaes(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, **options)


def _nsga2(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    # NSGA-II keeps its generations in trial system attributes, so a sampler built per trial (as
    # workers do) continues the same evolution; it is meant for multi-objective studies.
    return optuna.samplers.NSGAIISampler(seed=seed, **options)


def _bohb(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BaseSampler:
    # Imported lazily: only BOHB studies should pay for ConfigSpace/hpbandster (see hpo/bohb/).
    from hpo.bohb import build_sampler

    return build_sampler(options, seed, spec)


SAMPLER_BUILDERS: Mapping[str, SamplerBuilder] = MappingProxyType(
    {
        "grid": _grid,
        "random": _random,
        "tpe": _tpe,
        "gp": _gp,
        "cmaes": _cmaes,
        "nsga2": _nsga2,
        "bohb": _bohb,
    }
)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` of a study seeded ``seed``: one 32-bit draw of
    ``numpy.random.SeedSequence([seed, number])``.

    Workers build a sampler per trial with this seed, so a run is reproducible (same study seed,
    same trials) and parallel workers never draw from equal RNG states. It is a hash of the pair,
    not ``seed + number``: studies seeded ``s`` and ``s + 1`` share no random stream (with the sum,
    seed 1's trial 0 was seed 0's trial 1). A retried trial keeps its parameters (it is queued with
    them), so a retry's seed never matters. ``seed`` may be negative (taken modulo 2**64);
    ``number`` is a trial number (>= 0).
    """
    if number < 0:
        raise ValueError(f"a trial number is >= 0, got {number}")
    state = np.random.SeedSequence([seed % 2**64, number]).generate_state(1, dtype=np.uint32)
    return int(state[0])


def make_sampler(spec: StudySpec, seed: int | None = None) -> BaseSampler:
    """Build the study's sampler; ``seed`` overrides the file's seed (workers pass each trial's
    :func:`trial_seed`)."""
    builder = SAMPLER_BUILDERS[spec.sampler.name]
    return builder(dict(spec.sampler.options), spec.sampler_seed if seed is None else seed, spec)


def make_pruner(pruner: PrunerSpec, max_epochs: int) -> BasePruner:
    options = dict(pruner.options)
    name = pruner.name
    if name == "none":
        if options:
            raise TypeError(f"pruner none takes no options, got {sorted(options)}")
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "percentile":
        if "percentile" not in options:
            raise TypeError("pruner percentile needs options.percentile, e.g. 25.0")
        return optuna.pruners.PercentilePruner(**options)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if name == "hyperband":
        options.setdefault("min_resource", 1)
        options.setdefault("max_resource", max_epochs)
        return optuna.pruners.HyperbandPruner(**options)
    if name == "patient":
        if "patience" not in options:
            raise TypeError("pruner patient needs options.patience, e.g. 3")
        wrapped = make_pruner(pruner.wrapped, max_epochs) if pruner.wrapped is not None else None
        return optuna.pruners.PatientPruner(wrapped, **options)
    raise TypeError(f"unknown pruner {name!r}")  # unreachable: PrunerSpec.name is a Literal


def accepted_keywords(factory: Callable[..., Any]) -> list[str]:
    """Keyword names a sampler or pruner class accepts (for error hints)."""
    return [
        name
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in {"self", "seed"}
    ]
