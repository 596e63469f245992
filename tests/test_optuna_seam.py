"""``hpo._optuna``, hpo's one seam to Optuna's (and Ray's) internals, against the installed releases.

Every function of the seam is exercised with real storages (in memory, an SQLite file, the real
PostgreSQL) and its behaviour asserted, so that an Optuna or Ray release that changes one of the
internals hpo relies on fails here, naming it, rather than in a worker in the middle of a study.
``tests/test_optuna_scan.py`` keeps the seam the only place in ``hpo/`` that reaches into Optuna or Ray.
"""

from __future__ import annotations

import datetime
import json
import tomllib
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import optuna
import pytest
import sqlalchemy
from conftest import ROOT
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage, GrpcStorageProxy, InMemoryStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from hpo import _optuna

# True until pyproject.toml pins optuna to _optuna.OPTUNA_TESTED (it allows ">=4.2,<6" today).
PIN_PENDING = False

THIS = Path(__file__)


def changed(name: str, library: str = "Optuna") -> str:
    return _optuna.changed(name, library)


# --------------------------------------------------------------------------- storages


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rdb_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def opened() -> Iterator[list[RDBStorage]]:
    """RDBStorages a test opens, their connections closed at its end (PostgreSQL drops the database)."""
    storages: list[RDBStorage] = []
    yield storages
    for storage in storages:
        storage.engine.dispose()


def open_rdb(url: str, opened: list[RDBStorage], **kwargs: Any) -> RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(url, **kwargs)
    opened.append(storage)
    return storage


@pytest.fixture
def storage(backend: str, request: pytest.FixtureRequest, opened: list[RDBStorage]) -> BaseStorage:
    """A fresh storage of each kind: in memory, an SQLite file, a PostgreSQL database."""
    if backend == "memory":
        return InMemoryStorage()
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    return open_rdb(url, opened)


class _Wrapper(InMemoryStorage):
    """A stand-in for hpo's storage wrappers (hpo.resilient.RetryingStorage): the wrapped one is ``inner``."""

    def __init__(self, inner: BaseStorage) -> None:
        super().__init__()
        self.inner = inner


class _SpySampler(optuna.samplers.RandomSampler):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.before: list[int] = []

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.before.append(trial.number)


# --------------------------------------------------------------------------- versions and pins


def test_installed_releases_are_the_tested_ones() -> None:
    assert Version(optuna.__version__) in SpecifierSet(_optuna.OPTUNA_TESTED), (
        f"Optuna {optuna.__version__} is outside the releases hpo is tested with ({_optuna.OPTUNA_TESTED}): "
        "run this test file against it, then widen OPTUNA_TESTED in hpo/_optuna.py and the pin in pyproject.toml"
    )
    ray = pytest.importorskip("ray")
    assert Version(ray.__version__) in SpecifierSet(_optuna.RAY_TESTED), (
        f"Ray {ray.__version__} is outside the releases hpo is tested with ({_optuna.RAY_TESTED})"
    )


def _pin(name: str) -> SpecifierSet:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement.specifier
    raise AssertionError(f"pyproject.toml has no dependency {name}")


def test_pyproject_pins_the_tested_releases() -> None:
    assert _pin("ray") == SpecifierSet(_optuna.RAY_TESTED), "pin ray[tune] to hpo._optuna.RAY_TESTED"
    if PIN_PENDING:
        pytest.skip(f"pyproject.toml pins optuna{_pin('optuna')}, not yet {_optuna.OPTUNA_TESTED}")
    assert _pin("optuna") == SpecifierSet(_optuna.OPTUNA_TESTED), "pin optuna to hpo._optuna.OPTUNA_TESTED"


def test_the_message_names_the_internal_and_the_tested_releases() -> None:
    message = _optuna.changed("Study._storage")
    assert f"Optuna {optuna.__version__} changed Study._storage" in message
    assert f"hpo is tested with Optuna {_optuna.OPTUNA_TESTED}" in message
    assert f"hpo is tested with Ray {_optuna.RAY_TESTED}" in _optuna.changed("OptunaSearch._ot_trials", "Ray")
    with pytest.raises(_optuna.OptunaInternalsChanged, match=r"changed Study\._storage"):
        _optuna.study_storage(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- studies and trials


def test_study_storage_study_id_and_trial_id(storage: BaseStorage) -> None:
    study = optuna.create_study(study_name="seam", storage=storage)
    other = optuna.create_study(study_name="other", storage=storage)
    seen = _optuna.study_storage(study)
    if isinstance(storage, RDBStorage):
        # optuna wraps an RDBStorage in its cache; the seam finds the RDBStorage behind it.
        assert _optuna.is_cached(seen), changed("Study._storage (no longer Optuna's RDB cache)")
        assert _optuna.rdb_backend(seen) is storage, changed("_CachedStorage._backend")
    else:
        assert seen is storage, changed("Study._storage")
    assert _optuna.study_id(study) == storage.get_study_id_from_name("seam"), changed("Study._study_id")
    assert _optuna.study_id(other) != _optuna.study_id(study)
    trials = [study.ask(), other.ask(), study.ask()]
    ids = [_optuna.trial_id(t) for t in trials]
    assert len(set(ids)) == 3, changed("Trial._trial_id (not unique across studies)")
    for trial, tid in zip(trials, ids, strict=True):
        frozen = storage.get_trial(tid)
        assert frozen.number == trial.number, changed("Trial._trial_id (not the storage's trial id)")
        assert _optuna.trial_id(frozen) == tid, changed("FrozenTrial._trial_id")
    assert [_optuna.trial_id(t) for t in study.get_trials()] == [ids[0], ids[2]]


def test_trial_for_runs_before_trial_and_suggests_into_the_claimed_trial(storage: BaseStorage) -> None:
    sampler = _SpySampler()
    study = optuna.create_study(study_name="seam", storage=storage, sampler=sampler)
    study.enqueue_trial({})
    study.enqueue_trial({})
    waiting = study.get_trials(states=(TrialState.WAITING,))
    tid = _optuna.trial_id(waiting[1])
    assert _optuna.study_storage(study).set_trial_state_values(tid, state=TrialState.RUNNING)
    if not _optuna.cache_knows_trial(_optuna.study_storage(study), tid):
        _optuna.refresh_cache(study)
    trial = _optuna.trial_for(study, tid)
    assert isinstance(trial, optuna.Trial)
    assert _optuna.trial_id(trial) == tid and trial.number == 1, changed("optuna.Trial(study, trial_id)")
    assert sampler.before == [1], changed(
        "optuna.Trial(study, trial_id) (no longer runs sampler.before_trial)"
    )
    x = _optuna.suggest(trial, "x", FloatDistribution(0.0, 1.0))
    n = _optuna.suggest(trial, "n", IntDistribution(1, 8, log=True))
    c = _optuna.suggest(trial, "c", CategoricalDistribution(["a", "b"]))
    assert 0.0 <= x <= 1.0 and 1 <= n <= 8 and c in ("a", "b")
    assert storage.get_trial(tid).params == {"x": x, "n": n, "c": c}, changed("Trial._suggest")
    assert _optuna.suggest(trial, "x", FloatDistribution(0.0, 1.0)) == x, changed(
        "Trial._suggest (not idempotent)"
    )
    study.tell(trial, 0.5)
    assert storage.get_trial(tid).state == TrialState.COMPLETE
    assert storage.get_trial(_optuna.trial_id(waiting[0])).state == TrialState.WAITING


def test_deferred_param_writes_collects_what_suggest_would_write(storage: BaseStorage) -> None:
    study = optuna.create_study(
        study_name="seam", storage=storage, sampler=optuna.samplers.RandomSampler(seed=1)
    )
    trial = study.ask()
    tid = _optuna.trial_id(trial)
    original = trial.storage
    with _optuna.deferred_param_writes(trial) as pending:
        x = _optuna.suggest(trial, "x", FloatDistribution(1e-3, 1.0, log=True))
        c = _optuna.suggest(trial, "c", CategoricalDistribution(["a", "b"]))
        # Nothing reached the database, yet the trial knows its values (a repeated suggest). (In
        # memory, the trial's cached copy is the storage's own object, so there is nothing to see.)
        if isinstance(storage, RDBStorage):
            assert storage.get_trial(tid).params == {}, changed("Trial._suggest (writes past Trial.storage)")
        assert _optuna.suggest(trial, "x", FloatDistribution(1e-3, 1.0, log=True)) == x, changed(
            "Trial._suggest (no longer reads its cached trial)"
        )
        assert trial.number == storage.get_trial(tid).number  # other calls pass through
    assert trial.storage is original
    assert [(name, dist) for name, _, dist in pending] == [
        ("x", FloatDistribution(1e-3, 1.0, log=True)),
        ("c", CategoricalDistribution(["a", "b"])),
    ]
    assert pending[0][1] == x and pending[1][1] == ["a", "b"].index(c)  # internal representations
    for name, value, dist in pending:
        storage.set_trial_param(tid, name, value, dist)
    assert storage.get_trial(tid).params == {"x": x, "c": c}


def test_distribution_contains() -> None:
    assert _optuna.distribution_contains(FloatDistribution(0.0, 1.0), 0.5)
    assert not _optuna.distribution_contains(FloatDistribution(0.0, 1.0), 1.5), changed(
        "BaseDistribution._contains"
    )
    assert not _optuna.distribution_contains(FloatDistribution(0.0, 1.0, step=0.25), 0.3)
    assert _optuna.distribution_contains(IntDistribution(2, 10, step=2), 4)
    assert not _optuna.distribution_contains(IntDistribution(2, 10, step=2), 5)
    assert _optuna.distribution_contains(CategoricalDistribution(["a", "b"]), "b")
    # What hpo.bohb relies on: a value a categorical does not have cannot even be converted.
    with pytest.raises((ValueError, TypeError)):
        _optuna.distribution_contains(CategoricalDistribution(["a", "b"]), "c")


def test_raise_if_multi_objective() -> None:
    sampler = optuna.samplers.RandomSampler()
    _optuna.raise_if_multi_objective(sampler, optuna.create_study())
    with pytest.raises(ValueError, match="multi-objective"):
        _optuna.raise_if_multi_objective(sampler, optuna.create_study(directions=["minimize", "maximize"]))


# --------------------------------------------------------------------------- storages and the RDB cache


def test_storage_layers_without_a_database() -> None:
    memory = InMemoryStorage()
    assert _optuna.cached_storage(memory) is memory, changed("optuna.storages.get_storage")
    assert not _optuna.is_cached(memory)
    assert _optuna.rdb_backend(memory) is None
    assert _optuna.rdb_engine(memory) is None
    assert _optuna.rdb_scoped_session(memory) is None
    with pytest.raises(TypeError, match="no database"), _optuna.rdb_session(memory):
        pass
    assert _optuna.cache_knows_trial(memory, 12345)  # no cache: nothing to refresh
    assert _optuna.rdb_backend(_Wrapper(_Wrapper(memory))) is None


def test_rdb_backend_engine_and_sessions(rdb_url: str, opened: list[RDBStorage]) -> None:
    rdb = open_rdb(rdb_url, opened)
    cached = _optuna.cached_storage(rdb)
    assert cached is not rdb and _optuna.is_cached(cached), changed("optuna.storages.get_storage")
    assert not _optuna.is_cached(rdb)
    assert _optuna.rdb_backend(rdb) is rdb
    assert _optuna.rdb_backend(cached) is rdb, changed("_CachedStorage._backend")
    # Through hpo's own wrappers (``inner``), as hpo.resilient.RetryingStorage wraps Optuna's cache.
    assert _optuna.rdb_backend(_Wrapper(cached)) is rdb
    assert _optuna.is_cached(_Wrapper(cached))
    study = optuna.load_study(study_name=optuna.create_study(storage=rdb).study_name, storage=rdb)
    assert _optuna.rdb_backend(_optuna.study_storage(study)) is rdb, changed("_CachedStorage._backend")

    engine = _optuna.rdb_engine(cached)
    assert isinstance(engine, sqlalchemy.Engine), changed("RDBStorage.engine")
    assert engine.dialect.name == rdb_url.split(":")[0].split("+")[0]
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM studies")).scalar() == 1

    factory = _optuna.rdb_scoped_session(cached)
    assert isinstance(factory, sqlalchemy.orm.scoped_session), changed("RDBStorage.scoped_session")
    assert factory().query(_optuna.rdb_models.StudyModel).count() == 1
    factory.remove()

    tid = _optuna.trial_id(study.ask())
    models = _optuna.rdb_models
    with _optuna.rdb_session(cached) as session:  # committed at the end of the block
        session.add(models.TrialUserAttributeModel(trial_id=tid, key="k", value_json=json.dumps("v")))
    assert rdb.get_trial_user_attrs(tid) == {"k": "v"}, changed("_create_scoped_session (no commit)")
    # A duplicate (trial_id, key) breaks Optuna's unique constraint: swallowed only when asked.
    with _optuna.rdb_session(cached, ignore_integrity_error=True) as session:
        session.add(models.TrialUserAttributeModel(trial_id=tid, key="k", value_json=json.dumps("w")))
    with pytest.raises(sqlalchemy.exc.IntegrityError), _optuna.rdb_session(cached) as session:
        session.add(models.TrialUserAttributeModel(trial_id=tid, key="k", value_json=json.dumps("w")))
    assert rdb.get_trial_user_attrs(tid) == {"k": "v"}, changed("_create_scoped_session (no rollback)")


def test_the_cache_learns_a_trial_queued_elsewhere_on_refresh(rdb_url: str, opened: list[RDBStorage]) -> None:
    mine = open_rdb(rdb_url, opened)
    elsewhere = open_rdb(rdb_url, opened)  # another worker's connection to the same database
    optuna.create_study(study_name="seam", storage=mine)
    study = optuna.load_study(study_name="seam", storage=mine)
    cache = _optuna.study_storage(study)
    study.enqueue_trial({})
    known = _optuna.trial_id(study.get_trials()[0])
    assert _optuna.cache_knows_trial(cache, known), changed("_CachedStorage._trial_id_to_study_id_and_number")
    optuna.load_study(study_name="seam", storage=elsewhere).enqueue_trial({})
    queued = next(
        _optuna.trial_id(t) for t in elsewhere.get_all_trials(_optuna.study_id(study)) if t.number == 1
    )
    assert not _optuna.cache_knows_trial(cache, queued), changed(
        "_CachedStorage._trial_id_to_study_id_and_number"
    )
    assert not _optuna.cache_knows_trial(_Wrapper(cache), queued)
    _optuna.refresh_cache(study)
    assert _optuna.cache_knows_trial(cache, queued), changed(
        "_CachedStorage._read_trials_from_remote_storage"
    )
    assert _optuna.cache_knows_trial(_Wrapper(cache), queued)
    # What the cache needs it for: parameters of the claimed trial are written through its index.
    assert cache.set_trial_state_values(queued, state=TrialState.RUNNING)
    trial = _optuna.trial_for(study, queued)
    value = _optuna.suggest(trial, "x", FloatDistribution(0.0, 1.0))
    assert elsewhere.get_trial(queued).params == {"x": value}


def test_the_schema_has_the_tables_and_columns_hpo_uses(rdb_url: str, opened: list[RDBStorage]) -> None:
    rdb = open_rdb(rdb_url, opened)
    tables = _optuna.rdb_models.BaseModel.metadata.tables
    inspector = sqlalchemy.inspect(rdb.engine)
    for table, columns in _optuna.RDB_COLUMNS.items():
        assert table in tables, changed(f"the RDB schema (no table {table} in optuna.storages._rdb.models)")
        missing = sorted(set(columns) - {c.name for c in tables[table].columns})
        assert not missing, changed(f"the RDB schema (table {table} lost columns {missing})")
        created = {c["name"] for c in inspector.get_columns(table)}
        missing = sorted(set(columns) - created)
        assert not missing, changed(f"the RDB schema RDBStorage creates (table {table} lacks {missing})")


# The ORM models' API that hpo's own queries use (hpo._rdb): name -> attribute.
_MODEL_API = [
    ("TrialModel", "count_past_trials"),
    ("TrialModel", "params"),
    ("TrialModel", "system_attributes"),
    ("TrialModel", "heartbeats"),
    ("StudyModel", "find_or_raise_by_id"),
    ("TrialHeartbeatModel", "where_trial_id"),
    ("TrialValueModel", "value_to_stored_repr"),
    ("TrialSystemAttributeModel", "value_json"),
    ("TrialUserAttributeModel", "value_json"),
    ("TrialParamModel", "distribution_json"),
]


def test_hpo_sql_reads_and_writes_optuna_tables_as_optuna_does(
    rdb_url: str, opened: list[RDBStorage]
) -> None:
    models = _optuna.rdb_models
    for model, attribute in _MODEL_API:
        assert hasattr(getattr(models, model, None), attribute), changed(
            f"optuna.storages._rdb.models.{model}.{attribute}"
        )
    assert models.TrialValueModel.value_to_stored_repr(1.5) == (
        1.5,
        models.TrialValueModel.TrialValueType.FINITE,
    )

    rdb = open_rdb(rdb_url, opened, heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(study_name="seam", storage=rdb)
    study.enqueue_trial({"x": 0.5})
    study.enqueue_trial({"x": 0.25})
    first, retry = (_optuna.trial_id(t) for t in study.get_trials())
    rdb.set_trial_system_attr(retry, "failed_trial", 0)
    # The query hpo's workers claim with: states as their names, system attributes as JSON.
    with rdb.engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(
                "SELECT t.trial_id, t.number, a.value_json FROM trials t "
                "LEFT JOIN trial_system_attributes a ON a.trial_id = t.trial_id AND a.key = 'failed_trial' "
                "WHERE t.study_id = :study AND t.state = 'WAITING' "
                "ORDER BY (a.trial_id IS NULL), t.trial_id"
            ),
            {"study": _optuna.study_id(study)},
        ).all()
    assert [(r[0], r[1]) for r in rows] == [(retry, 1), (first, 0)], changed(
        "the trials table (state or ids)"
    )
    assert json.loads(rows[0][2]) == 0, changed("trial_system_attributes.value_json (no longer JSON)")
    # The same through the ORM tables, as hpo._rdb queries them.
    trials = models.TrialModel.__table__
    with rdb.engine.connect() as conn:
        waiting = conn.execute(
            sqlalchemy.select(trials.c.trial_id)
            .where(trials.c.state == TrialState.WAITING)
            .order_by(trials.c.trial_id)
        ).all()
    assert [r[0] for r in waiting] == [first, retry]
    # A claim's heartbeat row, written as hpo._rdb writes it, is the one Optuna reads.
    assert rdb.set_trial_state_values(first, state=TrialState.RUNNING)
    beats = models.TrialHeartbeatModel.__table__
    with rdb.engine.begin() as conn:
        conn.execute(sqlalchemy.delete(beats).where(beats.c.trial_id == first))
        conn.execute(sqlalchemy.insert(beats).values(trial_id=first))
    assert _optuna.stale_trial_ids(rdb, _optuna.study_id(study)) == []
    with rdb.engine.begin() as conn:
        conn.execute(
            sqlalchemy.update(beats)
            .where(beats.c.trial_id == first)
            .values(heartbeat=datetime.datetime(2000, 1, 1))
        )
    assert _optuna.stale_trial_ids(rdb, _optuna.study_id(study)) == [first], changed(
        "trial_heartbeats.heartbeat"
    )


# --------------------------------------------------------------------------- heartbeats


def test_heartbeat_base_class_is_what_hpo_implements() -> None:
    assert issubclass(RDBStorage, _optuna.HeartbeatStorage)
    assert _optuna.HeartbeatStorage.__abstractmethods__ == {
        "record_heartbeat",
        "_get_stale_trial_ids",
        "get_heartbeat_interval",
        "get_heartbeat_stale_trial_callback",
    }, changed(
        "optuna.storages._heartbeat.BaseHeartbeat (its abstract methods, which hpo's storages implement)"
    )


def test_heartbeats_without_a_heartbeat_storage() -> None:
    memory = InMemoryStorage()
    study = optuna.create_study(storage=memory)
    assert not _optuna.has_heartbeat(memory)
    assert _optuna.heartbeat_interval(memory) is None
    assert _optuna.stale_trial_ids(memory, _optuna.study_id(study)) == []
    with pytest.raises(TypeError, match="no heartbeats"):
        _optuna.record_heartbeat(memory, _optuna.trial_id(study.ask()))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # study.ask() with heartbeats on
def test_heartbeats_and_stale_trials(rdb_url: str, opened: list[RDBStorage]) -> None:
    off = open_rdb(rdb_url, opened)
    assert _optuna.has_heartbeat(off) and _optuna.heartbeat_interval(off) is None
    rdb = open_rdb(rdb_url, opened, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name=optuna.create_study(storage=rdb).study_name, storage=rdb)
    cached = _optuna.study_storage(study)
    sid = _optuna.study_id(study)
    assert _optuna.stale_trial_ids(off, sid) == []
    assert _optuna.has_heartbeat(rdb) and _optuna.has_heartbeat(cached)
    assert _optuna.heartbeat_interval(rdb) == 1 and _optuna.heartbeat_interval(cached) == 1
    beating, silent, never = (_optuna.trial_id(study.ask()) for _ in range(3))
    _optuna.record_heartbeat(cached, beating)
    _optuna.record_heartbeat(rdb, silent)
    beats = _optuna.rdb_models.TrialHeartbeatModel.__table__
    with rdb.engine.begin() as conn:
        rows = conn.execute(sqlalchemy.select(beats.c.trial_id, beats.c.heartbeat)).all()
        assert sorted(r[0] for r in rows) == [beating, silent], changed("BaseHeartbeat.record_heartbeat")
        conn.execute(
            sqlalchemy.update(beats)
            .where(beats.c.trial_id == silent)
            .values(heartbeat=datetime.datetime(2000, 1, 1))
        )
    # Only a trial whose heartbeat is older than the grace period is stale; one that never beat is not.
    assert _optuna.stale_trial_ids(rdb, sid) == [silent], changed("BaseHeartbeat._get_stale_trial_ids")
    assert _optuna.rdb_stale_trial_ids(rdb, sid) == [silent], changed("RDBStorage._get_stale_trial_ids")
    assert _optuna.stale_trial_ids(cached, sid) == [silent], changed("_CachedStorage._get_stale_trial_ids")
    _optuna.record_heartbeat(rdb, silent)  # beats again: alive
    assert _optuna.stale_trial_ids(cached, sid) == []
    assert never not in _optuna.stale_trial_ids(rdb, sid)


# --------------------------------------------------------------------------- the gRPC proxy


class _RecordingServicer(_optuna.StorageProxyServicer):
    """What hpo serve-storage does: override the servicer's SetTrialSystemAttribute."""

    def __init__(self, storage: BaseStorage) -> None:
        super().__init__(storage)
        self.seen: list[tuple[int, str]] = []

    def SetTrialSystemAttribute(
        self, request: _optuna.api_pb2.SetTrialSystemAttributeRequest, context: grpc.ServicerContext
    ) -> _optuna.api_pb2.SetTrialSystemAttributeReply:
        self.seen.append((request.trial_id, request.key))
        if request.key == "hpo:seam":
            return _optuna.api_pb2.SetTrialSystemAttributeReply()
        return super().SetTrialSystemAttribute(request, context)


@pytest.fixture
def proxy(storage: BaseStorage) -> Iterator[tuple[_RecordingServicer, GrpcStorageProxy]]:
    servicer = _RecordingServicer(_optuna.cached_storage(storage))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    _optuna.api_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        client = GrpcStorageProxy(host="127.0.0.1", port=port)
    client.wait_server_ready(timeout=10)
    try:
        yield servicer, client
    finally:
        client.close()
        server.stop(grace=None)


def test_grpc_servicer_and_client(proxy: tuple[_RecordingServicer, GrpcStorageProxy]) -> None:
    servicer, client = proxy
    backend = _optuna.servicer_storage(servicer)
    assert isinstance(backend, BaseStorage), changed("OptunaStorageProxyService._backend")
    study = optuna.create_study(study_name="seam", storage=client)
    tid = _optuna.trial_id(study.ask())
    client.set_trial_system_attr(tid, "k", True)
    client.set_trial_system_attr(tid, "hpo:seam", True)
    assert servicer.seen == [(tid, "k"), (tid, "hpo:seam")], changed("the gRPC SetTrialSystemAttribute call")
    assert backend.get_trial_system_attrs(tid) == {"k": True}, changed("OptunaStorageProxyService._backend")

    host, port = _optuna.grpc_address(client) or ("", 0)
    assert host == "127.0.0.1" and port > 0, changed("GrpcStorageProxy._host/_port")
    assert _optuna.grpc_address(_Wrapper(client)) == (host, port)
    assert _optuna.grpc_address(InMemoryStorage()) is None
    # A new channel of hpo's own: every call (the client's stub and its trial cache's) goes over it.
    old = client.__dict__["_channel"]
    channel = grpc.insecure_channel(f"{host}:{port}")
    _optuna.grpc_use_channel(_Wrapper(client), channel)
    old.close()
    assert client.__dict__["_channel"] is channel, changed("GrpcStorageProxy._channel")
    study.enqueue_trial({})
    assert [t.number for t in client.get_all_trials(_optuna.study_id(study))] == [0, 1], changed(
        "GrpcClientCache.grpc_client"
    )
    client.set_trial_system_attr(tid, "k", False)
    assert backend.get_trial_system_attrs(tid) == {"k": False}, changed("GrpcStorageProxy._stub")
    with pytest.raises(TypeError, match="not a gRPC"):
        _optuna.grpc_use_channel(InMemoryStorage(), channel)


def test_frozen_study_is_what_storages_list() -> None:
    storage = InMemoryStorage()
    optuna.create_study(study_name="seam", storage=storage)
    (summary,) = storage.get_all_studies()
    assert isinstance(summary, _optuna.FrozenStudy), changed("optuna.study._frozen.FrozenStudy")
    assert summary.study_name == "seam"


# --------------------------------------------------------------------------- Ray Tune's OptunaSearch


def test_ray_optuna_search_internals() -> None:
    pytest.importorskip("ray.tune.search.optuna")
    from ray.tune.search.optuna import OptunaSearch

    storage = InMemoryStorage()
    seen: list[Any] = []

    def space(trial: Any) -> dict[str, Any]:
        seen.append(trial)
        return {"x": _optuna.suggest(trial, "x", FloatDistribution(0.0, 1.0))}

    search = OptunaSearch(
        space=space,
        metric="loss",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name="seam",
        storage=storage,
    )
    study = _optuna.ray_search_study(search)
    assert study.study_name == "seam", changed("OptunaSearch._ot_study", "Ray")
    trials = _optuna.ray_search_trials(search)
    completed = _optuna.ray_search_completed(search)
    assert trials == {} and completed == set()

    # Ray's own path: it asks the study for a trial, keeps it in the live map.
    params = search.suggest("ray-1")
    assert set(params) == {"x"}
    assert set(_optuna.ray_search_trials(search)) == {"ray-1"}, changed("OptunaSearch._ot_trials", "Ray")
    assert _optuna.define_by_run_trial(seen[-1]) is trials["ray-1"], changed(
        "_OptunaTrialSuggestCaptor.ot_trial", "Ray"
    )
    search.on_trial_complete("ray-1", result={"loss": 0.5})
    assert "ray-1" in completed, changed("OptunaSearch._completed_trials", "Ray")
    assert study.get_trials()[0].state == TrialState.COMPLETE

    # hpo's path: a trial it claimed, put in the map before Ray's suggest, is the one suggested into.
    study.enqueue_trial({})
    tid = _optuna.trial_id(study.get_trials(states=(TrialState.WAITING,))[0])
    assert _optuna.study_storage(study).set_trial_state_values(tid, state=TrialState.RUNNING)
    trials["ray-2"] = _optuna.trial_for(study, tid)
    params = search.suggest("ray-2")
    assert len(study.get_trials()) == 2, changed(
        "OptunaSearch.suggest (asked a new trial despite _ot_trials)", "Ray"
    )
    assert storage.get_trial(tid).params == params
    assert _optuna.trial_id(_optuna.define_by_run_trial(seen[-1])) == tid
    completed.add("ray-2")  # hpo finishes trials itself and tells the searcher so
    search.on_trial_complete("ray-2", result={"loss": 0.1})
    assert storage.get_trial(tid).state == TrialState.RUNNING, changed(
        "OptunaSearch._completed_trials", "Ray"
    )

    plain = trials["ray-2"]
    assert _optuna.define_by_run_trial(plain) is plain
    with pytest.raises(TypeError):
        _optuna.define_by_run_trial(object())


# --------------------------------------------------------------------------- completeness


def test_every_seam_function_is_exercised_here() -> None:
    source = THIS.read_text() + THIS.with_name("test_optuna_scan.py").read_text()
    for name in _optuna.__all__:
        if callable(getattr(_optuna, name)) and not isinstance(getattr(_optuna, name), type):
            assert f"_optuna.{name}(" in source, (
                f"tests/test_optuna_seam.py does not exercise hpo._optuna.{name}"
            )
        else:
            assert f"_optuna.{name}" in source, f"tests/test_optuna_seam.py does not use hpo._optuna.{name}"
