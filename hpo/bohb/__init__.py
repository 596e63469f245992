"""BOHB (Falkner, Klein and Hutter, ICML 2018) as a first-class hpo sampler: ``sampler: {name: bohb}``.

Hyperband brackets over the epoch budget decide how long each trial trains; hpbandster's KDE config
generator decides what it trains. The sampler runs inside hpo's ordinary worker loop, keeps all its
state in the study's storage, and so works with any number of workers and resumes after a stop.
See ``docs/bohb.md``.

Public surface:

* :class:`BOHBSampler` — the Optuna sampler (also usable in plain ``study.optimize``);
* :class:`HyperbandSchedule`, :class:`Bracket` — the bracket plan, identical to hpbandster's;
* :class:`ConfigSpaceCodec` — an hpo search space as a ConfigSpace ``ConfigurationSpace``;
* :func:`trial_budget` — the budget BOHB gave a trial;
* :func:`plan_for` — the brackets a study of ``n_trials`` trials runs;
* :func:`build_sampler` — the ``SAMPLER_BUILDERS`` entry for study files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpo.bohb._builder import OPTION_NAMES, build_sampler
from hpo.bohb._sampler import (
    ADOPTED_BY_ATTR,
    MODEL_PICK_ATTR,
    SLOT_ATTR,
    BOHBSampler,
    SlotWaitError,
    trial_budget,
)
from hpo.bohb._schedule import Bracket, HyperbandSchedule, budget_epochs, plan_for

if TYPE_CHECKING:
    from hpo.bohb._configspace import ConfigSpaceCodec


def __getattr__(name: str) -> object:
    # ConfigSpace takes seconds to import; load it only when the codec is asked for.
    if name == "ConfigSpaceCodec":
        from hpo.bohb._configspace import ConfigSpaceCodec

        return ConfigSpaceCodec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADOPTED_BY_ATTR",
    "MODEL_PICK_ATTR",
    "OPTION_NAMES",
    "SLOT_ATTR",
    "BOHBSampler",
    "Bracket",
    "ConfigSpaceCodec",
    "HyperbandSchedule",
    "SlotWaitError",
    "budget_epochs",
    "build_sampler",
    "plan_for",
    "trial_budget",
]
