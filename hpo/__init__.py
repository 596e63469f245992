"""hpo: hyperparameter optimisation for PyTorch models on Optuna's storage.

Public surface; everything else is an implementation detail behind these names.

The names are imported on first use (module ``__getattr__``): ``import hpo``, which every ``hpo``
command does first, must not pay for Optuna, SQLAlchemy and pydantic when it only prints help.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpo.bohb import BOHBSampler
    from hpo.errors import HpoError, SpecError, StorageError, StudyDefinitionMismatch
    from hpo.objective import BUDGET_ATTR, EarlyStopping, Objective, TrialRun
    from hpo.space import CategoricalParam, Condition, FloatParam, IntParam, SearchSpace, parse_space
    from hpo.spec import StudySpec, load_study_file
    from hpo.storage import DEFAULT_STORAGE, open_storage, resolve_storage_url
    from hpo.studies import adopt_study, create_study, load_study_spec
    from hpo.worker import Worker, WorkerOptions

# Public name -> the module that defines it.
_EXPORTS = {
    "BOHBSampler": "hpo.bohb",
    "HpoError": "hpo.errors",
    "SpecError": "hpo.errors",
    "StorageError": "hpo.errors",
    "StudyDefinitionMismatch": "hpo.errors",
    "BUDGET_ATTR": "hpo.objective",
    "EarlyStopping": "hpo.objective",
    "Objective": "hpo.objective",
    "TrialRun": "hpo.objective",
    "CategoricalParam": "hpo.space",
    "Condition": "hpo.space",
    "FloatParam": "hpo.space",
    "IntParam": "hpo.space",
    "SearchSpace": "hpo.space",
    "parse_space": "hpo.space",
    "StudySpec": "hpo.spec",
    "load_study_file": "hpo.spec",
    "DEFAULT_STORAGE": "hpo.storage",
    "open_storage": "hpo.storage",
    "resolve_storage_url": "hpo.storage",
    "adopt_study": "hpo.studies",
    "create_study": "hpo.studies",
    "load_study_spec": "hpo.studies",
    "Worker": "hpo.worker",
    "WorkerOptions": "hpo.worker",
}

__all__ = [
    "BUDGET_ATTR",
    "DEFAULT_STORAGE",
    "BOHBSampler",
    "CategoricalParam",
    "Condition",
    "EarlyStopping",
    "FloatParam",
    "HpoError",
    "IntParam",
    "Objective",
    "SearchSpace",
    "SpecError",
    "StorageError",
    "StudyDefinitionMismatch",
    "StudySpec",
    "TrialRun",
    "Worker",
    "WorkerOptions",
    "adopt_study",
    "create_study",
    "load_study_file",
    "load_study_spec",
    "open_storage",
    "parse_space",
    "resolve_storage_url",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
