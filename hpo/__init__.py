"""hpo: hyperparameter optimisation for PyTorch models on Optuna's storage.

Public surface; everything else is an implementation detail behind these names.
"""

from hpo.errors import HpoError, SpecError, StorageError, StudyDefinitionMismatch
from hpo.objective import BUDGET_ATTR, EarlyStopping, Objective, TrialRun
from hpo.space import CategoricalParam, Condition, FloatParam, IntParam, SearchSpace, parse_space
from hpo.spec import StudySpec, load_study_file
from hpo.storage import DEFAULT_STORAGE, open_storage, resolve_storage_url
from hpo.studies import adopt_study, create_study, load_study_spec
from hpo.worker import Worker, WorkerOptions

__all__ = [
    "BUDGET_ATTR",
    "DEFAULT_STORAGE",
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
