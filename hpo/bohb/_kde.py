"""hpbandster's BOHB config generator (the KDE model), fed with observations from the storage.

The model is hpbandster 0.7.4's own ``hpbandster.optimizers.config_generators.bohb.BOHB``: one pair
of kernel density estimators (good / bad configurations) per budget, proposals taken from the largest
budget that has enough observations. We only feed it: every finished evaluation, in the order the
evaluations finished, exactly as hpbandster's master calls ``new_result`` (which drops an evaluation
whose budget is below the largest budget that already has a model).

hpbandster draws from NumPy's global random state. To make proposals reproducible without leaving
that state changed, every call runs inside :func:`_global_numpy_seed`, which seeds the global state
and restores it afterwards (NumPy offers no other hook; hpbandster takes no generator).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
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
    """One finished evaluation: ConfigSpace values, the budget it ran at, its loss (+inf: crashed)."""

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

    def propose(self, budget: float, seed: int) -> tuple[dict[str, Any], bool]:
        """hpbandster's ``get_config(budget)``: ConfigSpace values and whether the model chose them."""
        # Two independent streams: ConfigSpace's sampler and NumPy's global state must not share a
        # seed, or the draw deciding "random or model" would also be the first random coordinate
        # (every random configuration would then have its first parameter in the bottom third).
        space_seed, numpy_seed = np.random.SeedSequence(seed).generate_state(2)
        self.codec.configspace.seed(int(space_seed))
        with _global_numpy_seed(int(numpy_seed)):
            values, info = self._generator.get_config(budget)
        return dict(values), bool(info.get("model_based_pick", False))
