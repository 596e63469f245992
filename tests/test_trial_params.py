"""A worker writes a trial's sampled configuration in one transaction (``hpo._rdb.set_trial_params``).

Optuna writes each suggested parameter in its own transaction; a worker collects them while the
sampler draws (``hpo._optuna.deferred_param_writes``) and writes them together: one commit
instead of one per parameter, and a trial never holds part of its configuration.
"""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from hpo import _optuna
from hpo._rdb import set_trial_params
from hpo.space import parse_space, suggest
from hpo.storage import open_storage

SPACE = parse_space(
    {
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
        "step_size": {"type": "int", "low": 2, "high": 10},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optimizer": ["sgd"]}},
    },
    "test space",
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def study(request: pytest.FixtureRequest) -> Iterator[optuna.Study]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    storage = open_storage(url)
    yield optuna.create_study(
        study_name="params", storage=storage, sampler=optuna.samplers.RandomSampler(seed=3)
    )
    engine = _optuna.rdb_engine(storage)
    assert engine is not None
    engine.dispose()


def _commits(study: optuna.Study) -> list[int]:
    """A list that counts the commits on the study's database from now on."""
    engine = _optuna.rdb_engine(_optuna.study_storage(study))
    assert engine is not None
    seen: list[int] = []
    sqlalchemy.event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


def test_a_configuration_is_one_commit_and_reads_back_as_optuna_wrote_it(study: optuna.Study) -> None:
    storage = _optuna.study_storage(study)
    direct = study.ask()
    commits = _commits(study)
    expected = suggest(direct, SPACE)  # Optuna's own path: one commit per parameter
    assert len(commits) == len(expected) >= 3

    batched = study.ask()
    commits.clear()
    with _optuna.deferred_param_writes(batched) as pending:
        values = suggest(batched, SPACE)
    assert commits == []  # nothing written while the sampler draws
    set_trial_params(storage, _optuna.trial_id(batched), pending)
    assert len(commits) == 1

    for trial, drawn in ((direct, expected), (batched, values)):
        study.tell(trial, 1.0)
        again = optuna.load_study(study_name="params", storage=storage).trials[trial.number]
        assert again.params == drawn
        assert again.distributions == trial.distributions


def test_an_incompatible_parameter_leaves_the_trial_without_any(study: optuna.Study) -> None:
    storage = _optuna.study_storage(study)
    first = study.ask()
    first.suggest_float("lr", 1e-4, 1e-1, log=True)
    study.tell(first, 1.0)
    trial = study.ask()
    params = [
        ("step_size", 3.0, IntDistribution(2, 10)),
        ("lr", 0.0, CategoricalDistribution(["low", "high"])),  # lr was a float in this study
    ]
    with pytest.raises(ValueError, match="lr"):
        set_trial_params(storage, _optuna.trial_id(trial), params)
    assert storage.get_trial(_optuna.trial_id(trial)).params == {}


def test_repeating_a_write_is_harmless_and_a_different_value_is_refused(study: optuna.Study) -> None:
    storage = _optuna.study_storage(study)
    trial = study.ask()
    tid = _optuna.trial_id(trial)
    params = [
        ("lr", 0.0123456789, FloatDistribution(1e-4, 1e-1, log=True)),
        ("n", 4.0, IntDistribution(1, 8)),
    ]
    set_trial_params(storage, tid, params)
    set_trial_params(storage, tid, params)  # the first commit's answer was lost: retried
    assert storage.get_trial(tid).params == {"lr": pytest.approx(0.0123456789), "n": 4}
    with pytest.raises(ValueError, match="already has parameter 'n'"):
        set_trial_params(storage, tid, [("n", 5.0, IntDistribution(1, 8))])
    assert storage.get_trial(tid).params["n"] == 4


def test_a_finished_trial_takes_no_parameters(study: optuna.Study) -> None:
    storage = _optuna.study_storage(study)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_params(storage, _optuna.trial_id(trial), [("n", 4.0, IntDistribution(1, 8))])
    assert storage.get_trial(_optuna.trial_id(trial)).params == {}


def test_storages_without_a_database_get_one_write_per_parameter() -> None:
    study = optuna.create_study(storage=InMemoryStorage(), sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    with _optuna.deferred_param_writes(trial) as pending:
        values = suggest(trial, SPACE)
    set_trial_params(_optuna.study_storage(study), _optuna.trial_id(trial), pending)
    study.tell(trial, 0.5)
    assert study.trials[0].params == values
