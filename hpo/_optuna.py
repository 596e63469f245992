"""The one place where hpo reaches into Optuna's (and Ray Tune's Optuna searcher's) internals.

hpo builds on Optuna's storage, its RDB cache, its heartbeats and its gRPC proxy in ways Optuna's
public API does not cover: a worker claims a queued trial by id and builds the ``optuna.Trial``
for it, reads Optuna's tables with its own SQL, beats for trials from its own thread, serves
heartbeats through the gRPC proxy, and points Ray's ``OptunaSearch`` at an existing study. Each of
those needs a private name (``study._storage``, ``trial._trial_id``, the cache's ``_backend``...) or
an undocumented one (``RDBStorage.engine``, the ``optuna.Trial`` constructor).

Every such name is reached here, through a small typed function whose docstring says what it
reaches and why, and nowhere else in hpo: ``tests/test_optuna_seam.py`` exercises each function
against the installed Optuna and Ray with real storages (in memory, SQLite, PostgreSQL), and scans
``hpo/`` for private Optuna/Ray accesses outside this module. When a release changes one of these
names, that test fails naming it, and so does the function here at run time
(:class:`OptunaInternalsChanged`), instead of a worker misbehaving in the middle of a study.

The releases these internals are tested with are :data:`OPTUNA_TESTED` and :data:`RAY_TESTED`;
``pyproject.toml`` pins Optuna and Ray to them. To widen a pin: install the new release, run
``pytest tests/test_optuna_seam.py`` (then the tests of the modules using a function that failed),
adapt this module, and change the constant and the pin together.

What is wrapped (the internal, then what hpo uses instead)::

    Study._storage                                        study_storage()
    Study._study_id                                       study_id()
    Trial._trial_id, FrozenTrial._trial_id                trial_id()
    optuna.Trial(study, trial_id) (not for direct use)    trial_for()
    Trial._suggest                                        suggest()
    Trial._suggest writing through Trial.storage          deferred_param_writes()
    BaseDistribution._contains                            distribution_contains()
    BaseSampler._raise_error_if_multi_objective           raise_if_multi_objective()
    optuna.storages.get_storage ("internal usage")        cached_storage()
    optuna.storages._CachedStorage                        is_cached()
    _CachedStorage._backend                               rdb_backend()
    RDBStorage.engine (undocumented)                      rdb_engine()
    RDBStorage.scoped_session (undocumented)              rdb_scoped_session()
    optuna.storages._rdb.storage._create_scoped_session   rdb_session()
    optuna.storages._rdb.models (the ORM schema)          rdb_models, RDB_COLUMNS
    _CachedStorage._trial_id_to_study_id_and_number       cache_knows_trial()
    _CachedStorage._read_trials_from_remote_storage       refresh_cache()
    optuna.study._frozen.FrozenStudy                      FrozenStudy
    optuna.storages._heartbeat.BaseHeartbeat              HeartbeatStorage, has_heartbeat(),
                                                          heartbeat_interval(), record_heartbeat()
    BaseHeartbeat._get_stale_trial_ids                    stale_trial_ids()
    optuna.storages._grpc.auto_generated.api_pb2          api_pb2
    optuna.storages._grpc.auto_generated.api_pb2_grpc     api_pb2_grpc
    optuna.storages._grpc.servicer.OptunaStorageProxyService   StorageProxyServicer
    OptunaStorageProxyService._backend                    servicer_storage()
    GrpcStorageProxy._host, GrpcStorageProxy._port        grpc_address()
    GrpcStorageProxy._channel, ._stub, ._cache.grpc_client  grpc_use_channel()
    Ray OptunaSearch._ot_study                            ray_search_study()
    Ray OptunaSearch._ot_trials                           ray_search_trials()
    Ray OptunaSearch._completed_trials                    ray_search_completed()
    Ray _OptunaTrialSuggestCaptor.ot_trial                define_by_run_trial()

Storage wrappers: the storage functions look through Optuna's RDB cache (``_CachedStorage``) and
through hpo's own wrappers, which name the storage they wrap ``inner`` (``hpo.resilient``'s
``RetryingStorage``), so ``rdb_backend(study_storage(study))`` finds the database whatever layers
the study's storage has.

Private overrides: the one other place hpo may spell an Optuna/Ray private name is a method of its
own subclass of an Optuna/Ray class where overriding that private method is the point. They are
the table :data:`PRIVATE_OVERRIDES`; the test checks that each still exists in an Optuna/Ray base
class (an override of a name Optuna removed would silently never be called), and that hpo's
subclasses define no other private name their Optuna/Ray bases have (a name Optuna added that
collides with one of hpo's)::

    hpo class                       private override       why
    hpo.serve_storage.ProxyStorage  _get_stale_trial_ids   abstract in BaseHeartbeat: the gRPC client
                                                           must define it to be a heartbeat storage;
                                                           it finds none, as hpo serve-storage fails
                                                           stale trials itself
    hpo.resilient.RetryingStorage   _get_stale_trial_ids   abstract in BaseHeartbeat: the retrying
                                                           wrapper forwards it to the inner storage
    hpo._rdb.HpoRDBStorage          _get_stale_trial_ids   RDBStorage's: also finds RUNNING trials
                                                           that never got a heartbeat row
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage, get_storage
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import grpc
    import sqlalchemy
    import sqlalchemy.orm
    from ray.tune.search.optuna import OptunaSearch

# The Optuna releases whose internals this module is tested with (tests/test_optuna_seam.py);
# pyproject.toml pins Optuna to this range.
OPTUNA_TESTED = ">=5.0,<5.1"
# The Ray releases whose OptunaSearch internals are tested here; pyproject.toml pins ray[tune] to it.
RAY_TESTED = ">=2.60,<2.61"


def changed(name: str, library: str = "Optuna") -> str:
    """The message for an internal ``name`` that the installed ``library`` changed."""
    if library == "Ray":
        try:
            import ray

            version = str(ray.__version__)
        except ImportError:  # pragma: no cover - Ray is only asked about by Ray code
            version = "(not installed)"
        tested = RAY_TESTED
    else:
        version, tested = optuna.__version__, OPTUNA_TESTED
    return (
        f"{library} {version} changed {name}; hpo is tested with {library} {tested} "
        "(fix: install a tested release, or adapt hpo/_optuna.py and run tests/test_optuna_seam.py)"
    )


class OptunaInternalsChanged(RuntimeError):
    """An Optuna (or Ray) internal that hpo relies on is missing or changed in the installed release."""


def _reach(obj: object, name: str, owner: str, library: str = "Optuna") -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise OptunaInternalsChanged(changed(f"{owner}.{name}", library)) from None


try:
    from optuna.storages import _CachedStorage
    from optuna.storages._grpc.auto_generated import api_pb2, api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages._rdb import models as rdb_models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.study._frozen import FrozenStudy
except ImportError as _exc:  # pragma: no cover - only with an Optuna release that moved them
    raise OptunaInternalsChanged(changed(f"module {_exc.name or _exc}")) from _exc

# Base class of the storages with heartbeats (RDBStorage, Optuna's cache, hpo's gRPC client).
HeartbeatStorage = BaseHeartbeat
# Optuna's gRPC servicer: hpo serve-storage subclasses it to turn heartbeat writes into heartbeats.
StorageProxyServicer = OptunaStorageProxyService

__all__ = [
    "OPTUNA_TESTED",
    "PRIVATE_OVERRIDES",
    "RAY_TESTED",
    "RDB_COLUMNS",
    "FrozenStudy",
    "HeartbeatStorage",
    "OptunaInternalsChanged",
    "StorageProxyServicer",
    "api_pb2",
    "api_pb2_grpc",
    "cache_knows_trial",
    "cached_storage",
    "changed",
    "deferred_param_writes",
    "define_by_run_trial",
    "distribution_contains",
    "grpc_address",
    "grpc_use_channel",
    "has_heartbeat",
    "heartbeat_interval",
    "is_cached",
    "raise_if_multi_objective",
    "ray_search_completed",
    "ray_search_study",
    "ray_search_trials",
    "rdb_backend",
    "rdb_engine",
    "rdb_models",
    "rdb_scoped_session",
    "rdb_session",
    "rdb_stale_trial_ids",
    "record_heartbeat",
    "refresh_cache",
    "servicer_storage",
    "stale_trial_ids",
    "study_id",
    "study_storage",
    "suggest",
    "trial_for",
    "trial_id",
]

# hpo's subclasses of Optuna/Ray classes and the private names of their bases they override on
# purpose (the module docstring says why); tests/test_optuna_seam.py keeps this table exact.
PRIVATE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "hpo.serve_storage.ProxyStorage": ("_get_stale_trial_ids",),
    "hpo.resilient.RetryingStorage": ("_get_stale_trial_ids",),
    "hpo._rdb.HpoRDBStorage": ("_get_stale_trial_ids",),
}

# The tables and columns of Optuna's RDB schema that hpo reads or writes with its own SQL (and that
# optuna-dashboard and the optuna CLI read back): tests/test_optuna_seam.py checks them against
# Optuna's ORM models and against the schema RDBStorage creates on SQLite and PostgreSQL.
RDB_COLUMNS: dict[str, tuple[str, ...]] = {
    "studies": ("study_id", "study_name"),
    "trials": ("trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"),
    "trial_heartbeats": ("trial_id", "heartbeat"),
    "trial_system_attributes": ("trial_id", "key", "value_json"),
    "trial_user_attributes": ("trial_id", "key", "value_json"),
    "trial_params": ("trial_id", "param_name", "param_value", "distribution_json"),
    "trial_values": ("trial_id", "objective", "value", "value_type"),
    "trial_intermediate_values": ("trial_id", "step", "intermediate_value", "intermediate_value_type"),
}


# --------------------------------------------------------------------------- studies and trials


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (``Study._storage``).

    For a study loaded from an RDB URL or an ``RDBStorage`` this is Optuna's caching wrapper, not
    the RDBStorage itself (:func:`rdb_backend` finds that). hpo needs it for the storage calls the
    Study API lacks: claiming a trial by id, setting trial system attributes.
    """
    return cast(BaseStorage, _reach(study, "_storage", "Study"))


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage (``Study._study_id``), which every storage call takes."""
    return int(_reach(study, "_study_id", "Study"))


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (``Trial._trial_id`` / ``FrozenTrial._trial_id``).

    Not its number: storage calls (``set_trial_system_attr``, ``get_trial``...) take the id, which
    is unique across all studies of a storage.
    """
    return int(_reach(trial, "_trial_id", type(trial).__name__))


def trial_for(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """The ``optuna.Trial`` of an existing trial of ``study`` (``optuna.Trial(study, trial_id)``).

    Optuna documents the constructor as not for direct use (``study.ask()`` creates trials); hpo's
    workers claim a queued trial themselves, so that all workers together run exactly the queued
    trials, and then need its Trial. As in ``study.ask()``, this runs the study's sampler's
    ``before_trial`` hook. Behind Optuna's RDB cache, the cache must know the trial before
    parameters are suggested (:func:`cache_knows_trial`, :func:`refresh_cache`).
    """
    return optuna.Trial(study, trial_id)


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """Suggest parameter ``name`` from ``distribution`` (``Trial._suggest``).

    What every public ``suggest_*`` method calls; it takes a distribution object, so hpo's search
    space converts to distributions once instead of dispatching on their type. Ray's define-by-run
    wrapper forwards it to its trial.
    """
    return _reach(trial, "_suggest", type(trial).__name__)(name, distribution)


class _ParamCollector:
    """Stands in for a trial's storage: keeps its parameter writes, forwards everything else."""

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self.pending: list[tuple[str, float, BaseDistribution]] = []

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        if trial_id != self._trial_id:
            raise OptunaInternalsChanged(changed("Trial._suggest writing another trial's parameter"))
        self.pending.append((param_name, param_value_internal, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextlib.contextmanager
def deferred_param_writes(trial: optuna.Trial) -> Iterator[list[tuple[str, float, BaseDistribution]]]:
    """Collect the parameters suggested in the block instead of writing each one at once.

    ``Trial._suggest`` writes every sampled value with its own ``storage.set_trial_param`` call,
    one transaction each (on SQLite with ``synchronous=FULL``, one fsync each: 4 ms, most of the
    time a worker takes to prepare a trial). Within this block ``trial.storage`` (public, read by
    ``_suggest`` on every call) is a stand-in that keeps those writes, as ``(name, internal
    value, distribution)``, in the yielded list, for the caller to write in one transaction
    (``hpo._rdb.set_trial_params``). The trial's own cached copy already holds the values, so the
    sampler sees them while the block runs; every other storage call passes through.
    """
    storage = trial.storage
    collector = _ParamCollector(storage, trial_id(trial))
    trial.storage = cast(BaseStorage, collector)
    try:
        yield collector.pending
    finally:
        trial.storage = storage


def distribution_contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether the (external) ``value`` lies in ``distribution`` (``BaseDistribution._contains``).

    Raises ``ValueError`` or ``TypeError`` when ``value`` cannot even be converted to the
    distribution's internal representation (e.g. a choice a categorical does not have).
    """
    contains = _reach(distribution, "_contains", type(distribution).__name__)
    return bool(contains(distribution.to_internal_repr(value)))


def raise_if_multi_objective(sampler: BaseSampler, study: optuna.Study) -> None:
    """Raise Optuna's ``ValueError`` when ``study`` is multi-objective, for a single-objective
    sampler (``BaseSampler._raise_error_if_multi_objective``, as Optuna's own samplers do)."""
    _reach(sampler, "_raise_error_if_multi_objective", "BaseSampler")(study)


# --------------------------------------------------------------------------- storages and the RDB cache


def _layers(storage: BaseStorage) -> Iterator[BaseStorage]:
    """``storage``, then each storage it wraps: Optuna's cache's ``_backend``, hpo's wrappers' ``inner``."""
    layer: object = storage
    for _ in range(8):
        if not isinstance(layer, BaseStorage):
            return
        yield layer
        if isinstance(layer, _CachedStorage):
            layer = _reach(layer, "_backend", "_CachedStorage")
        else:
            # hpo's wrappers (hpo.resilient.RetryingStorage) keep what they wrap in ``inner``; read
            # from the instance, not through attribute forwarding.
            layer = getattr(layer, "__dict__", {}).get("inner")


def cached_storage(storage: BaseStorage) -> BaseStorage:
    """``storage`` as ``optuna.load_study`` would use it: an RDBStorage wrapped in Optuna's cache,
    any other storage as it is (``optuna.storages.get_storage``, "only for internal usage").

    The cache keeps finished trials in memory (the gRPC proxy answers workers' polling from it).
    """
    return get_storage(storage)


def is_cached(storage: BaseStorage) -> bool:
    """Whether ``storage`` is, or wraps, Optuna's RDB cache (``optuna.storages._CachedStorage``)."""
    return any(isinstance(layer, _CachedStorage) for layer in _layers(storage))


def rdb_backend(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind ``storage`` (itself, the one Optuna's cache wraps in
    ``_CachedStorage._backend``, or the one an hpo wrapper wraps), or None for storages without a
    database (in memory, gRPC). hpo's own SQL (claims, advisory locks) needs the database."""
    for layer in _layers(storage):
        if isinstance(layer, RDBStorage):
            return layer
    return None


def rdb_engine(storage: BaseStorage) -> sqlalchemy.Engine | None:
    """The SQLAlchemy engine of the database behind ``storage`` (``RDBStorage.engine``, not
    documented), or None for storages without a database."""
    rdb = rdb_backend(storage)
    if rdb is None:
        return None
    return cast("sqlalchemy.Engine", _reach(rdb, "engine", "RDBStorage"))


def rdb_scoped_session(
    storage: BaseStorage,
) -> sqlalchemy.orm.scoped_session[sqlalchemy.orm.Session] | None:
    """The session factory RDBStorage runs its queries in (``RDBStorage.scoped_session``, not
    documented), or None for storages without a database."""
    rdb = rdb_backend(storage)
    if rdb is None:
        return None
    factory = _reach(rdb, "scoped_session", "RDBStorage")
    return cast("sqlalchemy.orm.scoped_session[sqlalchemy.orm.Session]", factory)


@contextlib.contextmanager
def rdb_session(
    storage: BaseStorage, ignore_integrity_error: bool = False
) -> Iterator[sqlalchemy.orm.Session]:
    """An ORM session on the database behind ``storage``, handled as Optuna handles its own
    (``optuna.storages._rdb.storage._create_scoped_session``): committed when the block ends,
    rolled back on an error; database errors surface as ``optuna.exceptions.StorageInternalError``,
    and an ``IntegrityError`` is swallowed with ``ignore_integrity_error``.

    Raises ``TypeError`` for storages without a database.
    """
    factory = rdb_scoped_session(storage)
    if factory is None:
        raise TypeError(f"{type(storage).__name__} has no database behind it")
    with _create_scoped_session(factory, ignore_integrity_error) as session:
        yield session


def cache_knows_trial(storage: BaseStorage, trial_id: int) -> bool:
    """Whether Optuna's RDB cache in ``storage`` knows the trial (its index
    ``_CachedStorage._trial_id_to_study_id_and_number``); True for storages without that cache.

    The cache routes parameter writes (``set_trial_param``) through that index: a trial queued
    after the cache last read its study (a retry queued by another worker, say) fails there with
    ``KeyError`` until :func:`refresh_cache` reads the study's new trials.
    """
    for layer in _layers(storage):
        if isinstance(layer, _CachedStorage):
            index = _reach(layer, "_trial_id_to_study_id_and_number", "_CachedStorage")
            if not isinstance(index, dict):
                raise OptunaInternalsChanged(changed("_CachedStorage._trial_id_to_study_id_and_number"))
            return trial_id in index
    return True


def refresh_cache(study: optuna.Study) -> None:
    """Make Optuna's RDB cache read the study's trials that are new or unfinished since it last did.

    Any ``get_all_trials`` through the cache first reads those from the database
    (``_CachedStorage._read_trials_from_remote_storage``); this one asks for the RUNNING trials
    only, so nothing else is copied. Storages without that cache just answer the read.
    """
    study_storage(study).get_all_trials(study_id(study), deepcopy=False, states=(TrialState.RUNNING,))


# --------------------------------------------------------------------------- heartbeats


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether ``storage`` implements heartbeats (``optuna.storages._heartbeat.BaseHeartbeat``:
    RDBStorage, Optuna's cache, hpo's gRPC client); whether they are on is :func:`heartbeat_interval`."""
    return isinstance(storage, BaseHeartbeat)


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, or None when ``storage`` has heartbeats off or none at all."""
    if not isinstance(storage, BaseHeartbeat):
        return None
    return storage.get_heartbeat_interval()


def record_heartbeat(storage: BaseStorage, trial_id: int) -> None:
    """Record that the trial's worker is alive (``BaseHeartbeat.record_heartbeat``).

    Raises ``TypeError`` for storages without heartbeats.
    """
    if not isinstance(storage, BaseHeartbeat):
        raise TypeError(f"{type(storage).__name__} records no heartbeats")
    storage.record_heartbeat(trial_id)


def rdb_stale_trial_ids(storage: RDBStorage, study_id: int) -> list[int]:
    """Optuna's own stale check of an RDB storage (``RDBStorage._get_stale_trial_ids``: RUNNING
    trials whose heartbeat row is older than the grace period), also from a subclass that
    overrides it to add to it (hpo._rdb.HpoRDBStorage)."""
    ids = _reach(RDBStorage, "_get_stale_trial_ids", "RDBStorage")(storage, study_id)
    return [int(i) for i in ids]


def stale_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the grace period
    (``BaseHeartbeat._get_stale_trial_ids``, what ``optuna.storages.fail_stale_trials`` fails);
    empty for storages without heartbeats or with heartbeats off."""
    if heartbeat_interval(storage) is None:
        return []
    ids = _reach(storage, "_get_stale_trial_ids", type(storage).__name__)(study_id)
    return [int(i) for i in ids]


# --------------------------------------------------------------------------- the gRPC proxy


def servicer_storage(servicer: OptunaStorageProxyService) -> BaseStorage:
    """The storage Optuna's gRPC servicer answers from (``OptunaStorageProxyService._backend``)."""
    return cast(BaseStorage, _reach(servicer, "_backend", "OptunaStorageProxyService"))


def _grpc_client(storage: BaseStorage) -> GrpcStorageProxy | None:
    for layer in _layers(storage):
        if isinstance(layer, GrpcStorageProxy):
            return layer
    return None


def grpc_address(storage: BaseStorage) -> tuple[str, int] | None:
    """``(host, port)`` of the gRPC proxy a client storage talks to (``GrpcStorageProxy._host``
    and ``._port``), or None for storages that are not (and wrap no) gRPC client."""
    client = _grpc_client(storage)
    if client is None:
        return None
    host = _reach(client, "_host", "GrpcStorageProxy")
    port = _reach(client, "_port", "GrpcStorageProxy")
    return str(host), int(port)


def grpc_use_channel(storage: BaseStorage, channel: grpc.Channel) -> None:
    """Make a gRPC client storage send its calls over ``channel`` (``GrpcStorageProxy._channel``
    and ``._stub``, and the stub of its trial cache, ``GrpcClientCache.grpc_client``), keeping its
    trial cache. A channel whose server went away waits out gRPC's reconnect backoff (up to minutes)
    before trying again; a new channel connects at once. Calls in flight finish on the old channel.
    Raises ``TypeError`` when ``storage`` is not (and wraps no) gRPC client.
    """
    client = _grpc_client(storage)
    if client is None:
        raise TypeError(f"{type(storage).__name__} is not a gRPC storage client")
    cache = _reach(client, "_cache", "GrpcStorageProxy")
    _reach(cache, "grpc_client", "GrpcClientCache")  # present, so that replacing it is meaningful
    _reach(client, "_stub", "GrpcStorageProxy")
    stub = api_pb2_grpc.StorageServiceStub(channel)
    cache.grpc_client = stub
    client._channel, client._stub = channel, stub


# --------------------------------------------------------------------------- Ray Tune's OptunaSearch


def ray_search_study(search: OptunaSearch) -> optuna.Study:
    """The study Ray's ``OptunaSearch`` created or loaded (``OptunaSearch._ot_study``, set once the
    searcher has its search space; hpo passes the space to the constructor)."""
    study = _reach(search, "_ot_study", "OptunaSearch", "Ray")
    if not isinstance(study, optuna.Study):
        raise OptunaInternalsChanged(changed("OptunaSearch._ot_study (not an optuna.Study)", "Ray"))
    return study


def ray_search_trials(search: OptunaSearch) -> dict[str, optuna.Trial]:
    """``OptunaSearch``'s live map from Ray trial id to the ``optuna.Trial`` it suggests from
    (``OptunaSearch._ot_trials``): hpo puts the trial it claimed there before Ray's ``suggest``."""
    trials = _reach(search, "_ot_trials", "OptunaSearch", "Ray")
    if not isinstance(trials, dict):
        raise OptunaInternalsChanged(changed("OptunaSearch._ot_trials (not a dict)", "Ray"))
    return trials


def ray_search_completed(search: OptunaSearch) -> set[str]:
    """``OptunaSearch``'s live set of the Ray trial ids it has told the study about
    (``OptunaSearch._completed_trials``): hpo adds the trials it finished itself."""
    completed = _reach(search, "_completed_trials", "OptunaSearch", "Ray")
    if not isinstance(completed, set):
        raise OptunaInternalsChanged(changed("OptunaSearch._completed_trials (not a set)", "Ray"))
    return completed


def define_by_run_trial(trial: Any) -> optuna.Trial:
    """The ``optuna.Trial`` behind what ``OptunaSearch`` hands a define-by-run space function (Ray's
    ``_OptunaTrialSuggestCaptor``, whose ``ot_trial`` it is); an ``optuna.Trial`` as it is."""
    if isinstance(trial, optuna.Trial):
        return trial
    from ray.tune.search.optuna import optuna_search

    captor = _reach(optuna_search, "_OptunaTrialSuggestCaptor", "ray.tune.search.optuna.optuna_search", "Ray")
    if isinstance(trial, captor):
        inner = _reach(trial, "ot_trial", "_OptunaTrialSuggestCaptor", "Ray")
        if isinstance(inner, optuna.Trial):
            return inner
    raise TypeError(
        f"expected an optuna.Trial or Ray's define-by-run wrapper of one, got {type(trial).__name__}"
    )
