"""hpbandster's BOHB config generator (the KDE model), fed with observations from the storage.

The model is hpbandster 0.7.4's own ``hpbandster.optimizers.config_generators.bohb.BOHB``: one pair
of kernel density estimators (good / bad configurations) per budget, proposals taken from the largest
budget that has enough observations. We feed it observations (which ones: :mod:`hpo.bohb._trials`)
in the order the evaluations finished, as hpbandster's master calls ``new_result`` (which drops an
observation whose budget is below the largest budget that already has a model). The one addition
is the constant liar: evaluations still running can join the bad density for one proposal
(:meth:`KdeModel._with_pending`).

hpbandster draws from NumPy's global random state. To make proposals reproducible without leaving
that state changed, every call runs inside :func:`_global_numpy_seed`, which seeds the global state
and restores it afterwards (NumPy offers no other hook; hpbandster takes no generator).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hpo.bohb._configspace import ConfigSpaceCodec

_LOG = logging.getLogger("hpo.bohb")


class _DemotedWarnings(logging.LoggerAdapter[logging.Logger]):
    """hpbandster's logger, with its warnings logged at DEBUG level.

    hpbandster warns, with a dump of the KDE's data, whenever a candidate scores NaN — routine
    when all good configurations share a categorical value (statsmodels then divides by zero) —
    and then handles it itself. In a worker's output that is noise; ``logging.getLogger("hpo.bohb")``
    at DEBUG shows it.
    """

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


@dataclass(frozen=True)
class Observation:
    """One observation: ConfigSpace values, a budget and the loss there (+inf: crashed); a finished
    evaluation at its own budget, or (``evidence="every_epoch"``) one of its epochs at a lower one."""

    key: int  # the trial number, to recognise observations already fed
    values: tuple[tuple[str, Any], ...]
    budget: float
    loss: float


@dataclass(frozen=True)
class KdeOptions:
    """hpbandster's config-generator settings (same names and defaults as ``hpbandster.BOHB``)."""

    min_points_in_model: int | None = None
    top_n_percent: int = 15
    num_samples: int = 64
    random_fraction: float = 1 / 3
    bandwidth_factor: float = 3
    min_bandwidth: float = 1e-3

    def __post_init__(self) -> None:
        if self.min_points_in_model is not None and not _positive_int(self.min_points_in_model):
            raise ValueError(
                f"min_points_in_model must be a positive integer, got {self.min_points_in_model!r}"
            )
        if not (_positive_int(self.top_n_percent) and self.top_n_percent <= 99):
            raise ValueError(f"top_n_percent must be an integer from 1 to 99, got {self.top_n_percent!r}")
        if not _positive_int(self.num_samples):
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if not (isinstance(self.random_fraction, int | float) and 0.0 <= self.random_fraction <= 1.0):
            raise ValueError(f"random_fraction must be between 0 and 1, got {self.random_fraction!r}")
        for name in ("bandwidth_factor", "min_bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Run hpbandster/scipy code against a seeded global NumPy state, then restore the old state.

    Also silences what hpbandster's calls emit on every use with ConfigSpace 1.x and statsmodels
    0.15: deprecation notices for the ConfigSpace 0.x API it calls, statsmodels' notice about its
    future default generator (unused with the bandwidth rule hpbandster picks), and the division
    by zero statsmodels reports when all good configurations share a categorical value (hpbandster
    catches the resulting non-finite score itself).
    """
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        np.random.set_state(state)


class KdeModel:
    """hpbandster's config generator over one :class:`ConfigSpaceCodec`'s space.

    :meth:`feed` appends observations (it refuses anything but an extension of what it was fed, so
    a cached model can never drift from the storage); :meth:`propose` asks for a configuration.
    """

    def __init__(self, codec: ConfigSpaceCodec, options: KdeOptions) -> None:
        # Imported here: hpbandster pulls in statsmodels and pandas, seconds of import time that
        # only BOHB studies should pay, and only when they sample.
        from hpbandster.optimizers.config_generators.bohb import BOHB

        self.codec = codec
        with _global_numpy_seed(0):
            self._generator = BOHB(
                configspace=codec.configspace,
                min_points_in_model=options.min_points_in_model,
                top_n_percent=options.top_n_percent,
                num_samples=options.num_samples,
                random_fraction=options.random_fraction,
                bandwidth_factor=options.bandwidth_factor,
                min_bandwidth=options.min_bandwidth,
                logger=_DemotedWarnings(_LOG, {}),
            )
        self.fed: tuple[Observation, ...] = ()

    def extends(self, observations: Sequence[Observation]) -> bool:
        """Whether ``observations`` starts with everything this model has been fed."""
        return tuple(observations[: len(self.fed)]) == self.fed

    def feed(self, observations: Sequence[Observation]) -> None:
        """Feed the observations not fed yet; ``observations`` must extend what was fed before."""
        if not self.extends(observations):
            raise ValueError("observations must extend the ones already fed")
        from hpbandster.core.dispatcher import Job

        for position in range(len(self.fed), len(observations)):
            obs = observations[position]
            job = Job((position, 0, 0), config=dict(obs.values), budget=obs.budget)
            job.result = {"loss": obs.loss} if math.isfinite(obs.loss) else None
            # Seeded by position: the model hpbandster builds (it imputes inactive parameters at
            # random) depends only on the sequence of observations, not on who rebuilt it when.
            with _global_numpy_seed(position):
                self._generator.new_result(job)
        self.fed = tuple(observations)

    @property
    def model_budgets(self) -> tuple[float, ...]:
        """The budgets that have a fitted model (proposals come from the largest)."""
        return tuple(sorted(self._generator.kde_models))

    def propose(
        self, budget: float, seed: int, pending: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[dict[str, Any], bool]:
        """hpbandster's ``get_config(budget)``: ConfigSpace values and whether the model chose them.

        ``pending`` are the ConfigSpace values of evaluations still running elsewhere: the constant
        liar adds them to the "bad" density of the model the proposal comes from, for this proposal
        only (see :meth:`_with_pending`).
        """
        # Two independent streams: ConfigSpace's sampler and NumPy's global state must not share a
        # seed, or the draw deciding "random or model" would also be the first random coordinate
        # (every random configuration would then have its first parameter in the bottom third).
        space_seed, numpy_seed = np.random.SeedSequence(seed).generate_state(2)
        self.codec.configspace.seed(int(space_seed))
        with _global_numpy_seed(int(numpy_seed)), self._with_pending(pending):
            values, info = self._generator.get_config(budget)
        return dict(values), bool(info.get("model_based_pick", False))

    @property
    def observations_by_budget(self) -> dict[float, int]:
        """How many observations hpbandster holds at each budget (the ones it did not drop)."""
        return {budget: len(losses) for budget, losses in sorted(self._generator.losses.items())}

    @contextlib.contextmanager
    def _with_pending(self, pending: Sequence[Mapping[str, Any]]) -> Iterator[None]:
        """Add ``pending`` to the "bad" density proposals come from, for this proposal only.

        hpbandster proposes from the largest budget with a model alone, so only that model is
        changed: its good density stays as hpbandster fitted it, and its bad density is refitted
        the way hpbandster fits it, on hpbandster's bad share of the real observations plus the
        pending configurations. (Appending them as +inf results through ``new_result`` would not
        do: its split leaves out the worst observation whenever the count is not a multiple of 20,
        so a single lie would vanish.) Without a model (proposals drawn from the prior) nothing is
        added, so lies never create a model out of evaluations that have not finished.
        """
        generator = self._generator
        if not pending or not generator.kde_models:
            yield
            return
        import ConfigSpace
        import statsmodels.api as sm

        top = max(generator.kde_models)
        configs, losses = np.array(generator.configs[top]), np.array(generator.losses[top])
        # hpbandster's split of the real observations (its new_result), unchanged.
        n_good = max(generator.min_points_in_model, generator.top_n_percent * len(losses) // 100)
        n_bad = max(generator.min_points_in_model, (100 - generator.top_n_percent) * len(losses) // 100)
        order = np.argsort(losses)
        lies = [
            ConfigSpace.Configuration(self.codec.configspace, values=dict(v)).get_array() for v in pending
        ]
        bad = generator.impute_conditional_data(np.vstack([configs[order[n_good : n_good + n_bad]], *lies]))
        kde = sm.nonparametric.KDEMultivariate(
            data=bad, var_type=generator.kde_vartypes, bw="normal_reference"
        )
        kde.bw = np.clip(kde.bw, generator.min_bandwidth, None)
        saved = generator.kde_models[top]
        generator.kde_models[top] = {"good": saved["good"], "bad": kde}
        try:
            yield
        finally:
            generator.kde_models[top] = saved
