"""Optuna's own storage conformance suite (``optuna.testing.pytest_storages``) run over the storages
hpo hands to Optuna, the way Optuna's tests run it over its own: a study a worker writes through
hpo must read back, through plain Optuna, exactly as if Optuna had written it.

Storages: what ``hpo.storage.open_storage`` opens (``HpoRDBStorage``, Optuna's ``RDBStorage`` with
hpo's claims and batched writes) on SQLite and on the real PostgreSQL, and the same wrapped in
``hpo.resilient.RetryingStorage``, the layer every worker and command calls through; and
``hpo serve-storage``'s proxy (its server with hpo's heartbeat servicer and outage interceptor,
over Optuna's cache layer) through the client workers use, ``grpc://``. One test differs there:
Optuna's gRPC protocol sends a trial's parameters as a protobuf map, so they arrive in hash order
(as through Optuna's own ``GrpcStorageProxy``); all of them must still arrive, with their values.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState

from hpo import serve_storage
from hpo.resilient import RetryingStorage
from hpo.storage import open_storage


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _disposed(storage: BaseStorage) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


class TestSqliteStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BaseStorage]:
        storage = open_storage(f"sqlite:///{tmp_path / 'conformance.db'}")
        yield storage
        _disposed(storage)


class TestRetryingSqliteStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BaseStorage]:
        inner = open_storage(f"sqlite:///{tmp_path / 'conformance.db'}")
        yield RetryingStorage(inner, patience=5.0)
        _disposed(inner)


class TestRetryingPostgresStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, postgres_url: str) -> Iterator[BaseStorage]:
        inner = open_storage(postgres_url)
        yield RetryingStorage(inner, patience=5.0)
        _disposed(inner)


class TestRetryingProxyStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BaseStorage]:
        url = f"sqlite:///{tmp_path / 'conformance.db'}"
        proxy = serve_storage.start(url, "127.0.0.1", _free_port(), threads=4)
        client = serve_storage.connect(proxy.url)  # what open_storage("grpc://...") opens
        try:
            yield RetryingStorage(client, patience=5.0)
        finally:
            client.close()
            proxy.stop()

    @pytest.mark.parametrize("param_names", [["a", "b"], ["b", "a"], list("zbqamc")])
    def test_get_all_trials_params_order(self, storage: BaseStorage, param_names: list[str]) -> None:
        study_id = storage.create_new_study(directions=[StudyDirection.MINIMIZE])
        trial_id = storage.create_new_trial(study_id, optuna.trial.create_trial(state=TrialState.RUNNING))
        for value, name in enumerate(param_names):
            storage.set_trial_param(trial_id, name, float(value), FloatDistribution(0.0, 10.0))
        (trial,) = storage.get_all_trials(study_id)
        assert trial.params == {name: float(value) for value, name in enumerate(param_names)}
        assert set(trial.distributions) == set(param_names)
