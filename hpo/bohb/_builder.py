"""``sampler: {name: bohb, options: {...}}`` in a study file → :class:`BOHBSampler`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpo.bohb._sampler import BOHBSampler

if TYPE_CHECKING:
    from hpo.spec import StudySpec

OPTION_NAMES = (
    "min_budget",
    "max_budget",
    "eta",
    "min_points_in_model",
    "top_n_percent",
    "num_samples",
    "random_fraction",
    "bandwidth_factor",
    "min_bandwidth",
    "wait_timeout",
    "continuation",
    "evidence",
    "constant_liar",
)


def build_sampler(options: dict[str, Any], seed: int | None, spec: StudySpec) -> BOHBSampler:
    """BOHB over the study's search space, with budgets in epochs.

    ``min_budget`` defaults to ``budget.min_epochs`` and ``max_budget`` to ``budget.max_epochs``;
    ``max_budget`` may not exceed ``budget.max_epochs``, ``min_budget`` may not be below one epoch, and
    ``n_trials`` must cover at least the first (largest) bracket. The plan is fitted to ``n_trials``
    (no bracket is opened that the trials left cannot finish); ``wait_timeout`` is how long, in
    seconds, a trial may wait for a slot. ``evidence`` (``every_epoch`` or ``paper``) and
    ``constant_liar`` (true or false) are :class:`BOHBSampler`'s.
    Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad value (the study-file
    loader reports either as one line naming ``sampler.options``).
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown BOHB option(s) {', '.join(unknown)}; BOHB's options: {', '.join(OPTION_NAMES)}"
        )
    settings = dict(options)
    min_budget = settings.pop("min_budget", spec.budget.min_epochs)
    max_budget = settings.pop("max_budget", spec.budget.max_epochs)
    for name, value in (("min_budget", min_budget), ("max_budget", max_budget)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number of epochs, got {value!r}")
    if min_budget < 1:
        raise ValueError(f"min_budget is in epochs and must be at least 1, got {min_budget}")
    if max_budget > spec.budget.max_epochs:
        raise ValueError(
            f"max_budget={max_budget} exceeds budget.max_epochs={spec.budget.max_epochs} "
            "(budgets are epochs: lower max_budget or raise budget.max_epochs)"
        )
    sampler = BOHBSampler(
        spec.space,
        min_budget=min_budget,
        max_budget=max_budget,
        seed=seed,
        n_trials=spec.n_trials,
        **settings,
    )
    first = sampler.bracket_plan(0)
    if spec.n_trials < first.evaluations:
        # Fewer trials than the first bracket: nothing would ever train for max_budget.
        stages = " + ".join(f"{n} at {b:g}" for n, b in zip(first.num_configs, first.budgets, strict=True))
        raise ValueError(
            f"n_trials={spec.n_trials} is less than the {first.evaluations} evaluations of BOHB's first "
            f"bracket ({stages} epochs), so no configuration would reach max_budget; raise n_trials, "
            "or narrow the budgets (a higher min_budget or eta, a lower max_budget)"
        )
    return sampler
