"""The trainer: a long-lived child process of ``hpo worker`` that runs the objective's training code.

The worker (the *supervisor*, :mod:`hpo.worker`) owns everything that must survive a crash: the
claim of the trial, its heartbeats and its record in the database. The trainer owns nothing but
the training, so whatever the training code does to its process (``os._exit``, a segfault in an
extension, the OOM killer, a CUDA fatal error, ``SystemExit``) ends the trainer, not the worker,
which records the trial FAIL with the cause and starts a new trainer. The trainer lives from one
trial to the next, so its data cache (decoded datasets, see ``TrialRun.cache``) is kept.

The trainer never opens the database. It talks to the supervisor over a pipe, in messages that
are plain tuples of built-in types (no pickled objects come back from training code):

    supervisor -> trainer   ("trial", TrialJob fields as a dict)  |  ("exit",)
                            ("warm", TrialJob fields as a dict)   sent once, right after "ready":
                                import the objective and PyTorch's lazily loaded parts before
                                the first trial is claimed; answered ("warm",), errors ignored
                            ("group", [TrialJob fields as a dict, ...])   fused trials (hpo._fused)
    trainer -> supervisor   ("ready", pid)
                            ("report", value, step)          intermediate value of the study metric
                            ("should_prune",)                answered ("prune", bool) or ("abort",)
                            ("user_attr", key, value)        e.g. the last epoch's metrics
                            ("system_attr", key, value)      e.g. the metric history
                            ("artifact", path)               answered ("artifact_id", id) or ("error", text)
                            ("done", value)  |  ("pruned", message)  |  ("aborted",)
                                (a multi-objective study's "done" carries a list of values)
                            ("failed", exception type, message, traceback)

A fused group's messages are each of these tagged with its member's trial number,
``("member", number, message)``, the member's last one (``done``, ``pruned``, ``failed``,
``aborted``) sent the moment it leaves the group; ``("group_done",)`` follows the last member's.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from hpo.objective import Objective, TrialRun

# Environment variable for the number of intra-op threads of a trainer (set by the worker).
THREADS_ENV = "HPO_TRAINER_THREADS"


class TrialAborted(BaseException):
    """Raised in the trainer when the supervisor has given up the trial (its lease was lost).

    A BaseException, so that training code catching ``Exception`` does not swallow it.
    """


@dataclass(frozen=True)
class TrialJob:
    """What the trainer needs to run one trial; plain data."""

    number: int
    definition: dict[str, Any]  # the study's stored definition (space inline)
    objective: str  # the resolved, allowed 'module:attribute' (or registry name)
    params: dict[str, Any]
    max_epochs: int
    device: str
    checkpoint_dir: str
    # False when the study's pruner never prunes: the trainer then answers should_prune itself,
    # saving a round trip to the worker per epoch.
    prunes: bool = True
    # Folders where the objective's module is looked for when not installed (hpo._objective_path):
    # chosen on the worker's command line, never read from the storage.
    objective_path: tuple[str, ...] = ()

    def to_message(self) -> tuple[str, dict[str, Any]]:
        return ("trial", asdict(self))


def warm_job(
    definition: dict[str, Any], objective: str, objective_path: Sequence[str], device: str = "cpu"
) -> TrialJob:
    """The job a new trainer is sent to warm up (:func:`_warm`), standing for the trials to come:
    only its study definition, objective and objective path are used."""
    return TrialJob(
        number=-1,
        definition=definition,
        objective=objective,
        params={},
        max_epochs=0,
        device=device,
        checkpoint_dir="",
        objective_path=tuple(objective_path),
    )


class RemoteTrial:
    """The part of ``optuna.Trial`` a :class:`hpo.objective.TrialRun` uses, sent to the supervisor."""

    def __init__(self, conn: Connection, number: int, prunes: bool = True) -> None:
        self._conn = conn
        self.number = number
        self._prunes = prunes

    def _send(self, message: tuple[Any, ...]) -> None:
        self._conn.send(message)

    def report(self, value: float, step: int) -> None:
        self._send(("report", float(value), int(step)))

    def should_prune(self) -> bool:
        if not self._prunes:
            return False
        self._send(("should_prune",))
        answer = self._conn.recv()
        if answer[0] == "abort":
            raise TrialAborted("the worker gave this trial up (its lease was lost)")
        return bool(answer[1])

    def set_user_attr(self, key: str, value: Any) -> None:
        # Round-trip through JSON here, so a value the storage could not take fails in the
        # training code that set it, with its own traceback.
        self._send(("user_attr", str(key), json.loads(json.dumps(value))))

    def set_system_attr(self, key: str, value: Any) -> None:
        """For hpo's long records (:mod:`hpo._records`), kept out of the user attributes."""
        self._send(("system_attr", str(key), json.loads(json.dumps(value))))

    def upload_artifact(self, path: str | Path) -> str:
        self._send(("artifact", str(Path(path).resolve())))
        answer = self._conn.recv()
        if answer[0] == "error":
            raise RuntimeError(answer[1])
        return str(answer[1])


class MemberTrial(RemoteTrial):
    """A fused group member's trial: its messages tagged with its number (one pipe for all)."""

    def _send(self, message: tuple[Any, ...]) -> None:
        self._conn.send(("member", self.number, message))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the worker dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


# glibc's malloc (mallopt's parameters): allocations up to this size come from the heap rather
# than each from its own mmap, and up to this much free memory at the heap's top is kept rather
# than returned to the system. Why: by default glibc returns a freed block of more than its
# (adaptive) mmap threshold to the system, so a training step that frees and reallocates tens of
# megabytes of gradients and activations page-faults them back in, zeroed, at every step; with K
# fused members' models and optimizer state around them the adaptive threshold no longer kept up
# (K=4 ResNet-18s at 32 px on a CPU: backward passes 1.4x slower than K unfused runs'). The cost:
# the trainer's resident memory stays at its peak (plus up to MALLOC_TRIM_BYTES free), which the
# next batch reuses. A user's own MALLOC_*_ or GLIBC_TUNABLES settings are left as they are.
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
MALLOC_TRIM_BYTES = 512 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>


def tune_malloc() -> bool:
    """Set this process's glibc malloc thresholds (above); False where nothing was set (not
    glibc, or the user set their own)."""
    own = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        not sys.platform.startswith("linux")
        or any(name in os.environ for name in own)
        or "malloc.mmap_threshold" in tunables
        or "malloc.trim_threshold" in tunables
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt thresholds)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)
    )


def _set_threads() -> None:
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def _quiet_warnings() -> None:
    # As the hpo CLI does: Optuna flags features hpo relies on as experimental.
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def trainer_main(conn: Connection, parent_pid: int) -> None:
    """Entry point of the trainer process (``multiprocessing`` spawn target)."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(1)
    # Ctrl-C reaches the whole process group; the supervisor decides how the trial ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_threads()
    tune_malloc()
    _quiet_warnings()
    cache: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    conn.send(("ready", os.getpid()))
    # While the worker still opens its storage and imports the objective itself (hpo worker
    # spawns its trainer first), PyTorch's part that every first optimizer loads; a warm-up
    # already waiting goes first (it imports the objective, then loads that part).
    if not conn.poll(0):
        _load_first_optimizer()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if message[0] == "exit":
            _exit_now()
        if message[0] == "trial":
            job = TrialJob(**message[1])
            conn.send(_run(conn, job, cache, specs))
        elif message[0] == "group":
            _run_group(conn, [TrialJob(**fields) for fields in message[1]], cache, specs)
            conn.send(("group_done",))
        elif message[0] == "warm":
            _warm(TrialJob(**message[1]), specs)
            conn.send(("warm",))


def _exit_now() -> NoReturn:
    """End the trainer at once, skipping the interpreter's teardown: with PyTorch loaded, freeing
    every module takes about a second, which the worker waits for at its end. Nothing is left to
    write but the standard streams: a trial's checkpoints are closed before its result is sent,
    and the worker asks its trainer to exit only between trials."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _warm(job: TrialJob, specs: dict[str, Any]) -> None:
    """Do the first trial's one-time work before it arrives (time to first batch on a new trainer).

    Importing the objective's module (torchvision, scikit-learn) and PyTorch's parts loaded on
    first use (``torch._dynamo``, imported by the first optimizer) takes seconds, every trainer
    once; done before the supervisor claims a trial, it is not counted in any trial's time, and a
    queued trial is not held by a trainer that cannot start it yet. Any error is left for the
    trial itself to meet and report.
    """
    with contextlib.suppress(Exception):
        _resolve(job, specs, None)
    _load_first_optimizer()


def _load_first_optimizer() -> None:
    """Import ``torch._dynamo``, which a process's first optimizer imports (about 2 s), if PyTorch
    is loaded: an objective that does not use PyTorch never pays for importing it."""
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            import torch

            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def inline_main(conn: Connection, objective: Objective, cache: dict[str, Any]) -> None:
    """The trainer loop in a thread of the worker's own process (``hpo compare``, tests).

    No isolation: what the training code does to the process it does to the worker. Used where
    the objective is an object rather than an importable name, and the caller shares a data cache
    between many short-lived workers.
    """
    specs: dict[str, Any] = {}
    with contextlib.suppress(EOFError, OSError):  # the worker closed the pipe: stop quietly
        conn.send(("ready", os.getpid()))
        while True:
            message = conn.recv()
            if message[0] == "exit":
                return
            if message[0] == "trial":
                job = TrialJob(**message[1])
                conn.send(_run(conn, job, cache, specs, objective))
            elif message[0] == "group":
                _run_group(conn, [TrialJob(**fields) for fields in message[1]], cache, specs, objective)
                conn.send(("group_done",))


def _run(
    conn: Connection,
    job: TrialJob,
    cache: dict[str, Any],
    specs: dict[str, Any],
    objective: Objective | None = None,
) -> tuple[Any, ...]:
    """Run one trial; the final message for the supervisor."""
    import optuna

    run = None
    try:
        spec, objective = _resolve(job, specs, objective)
        run = _trial_run(RemoteTrial(conn, job.number, job.prunes), job, spec, cache)
        result = objective.train(run)
        if spec.is_multi_objective:
            # Each study metric at the scored epoch (TrialRun.final_values); what train()
            # returned, one number, cannot hold them all and is not used.
            run.flush()
            return ("done", run.final_values())
        value = float(result)
        if not math.isfinite(value):
            raise FloatingPointError(f"objective returned {value}")
        run.flush()
        return ("done", value)
    except optuna.TrialPruned as pruned:
        _flush_quietly(run)
        return ("pruned", str(pruned))
    except TrialAborted:
        return ("aborted",)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt from training code included
        _flush_quietly(run)
        return ("failed", type(exc).__name__, _describe(exc), traceback.format_exc())


def _trial_run(trial: Any, job: TrialJob, spec: Any, cache: dict[str, Any]) -> TrialRun:
    """What the objective's ``train`` gets for ``job``; ``trial`` stands in for an ``optuna.Trial``
    (its reports and prune checks travel to the supervisor)."""
    from hpo.objective import TrialRun

    return TrialRun(
        trial=trial,
        spec=spec,
        params=dict(job.params),
        max_epochs=job.max_epochs,
        device=job.device,
        checkpoint_dir=Path(job.checkpoint_dir),
        cache=cache,
    )


def _resolve(job: TrialJob, specs: dict[str, Any], objective: Objective | None) -> tuple[Any, Objective]:
    """The job's study spec and objective, kept in ``specs`` from one trial to the next."""
    from hpo.objective import resolve_objective
    from hpo.spec import canonical, spec_from_definition

    key = canonical(job.definition)
    if key not in specs:
        specs.clear()
        specs[key] = spec_from_definition(job.definition, "stored definition")
    spec = specs[key]
    if objective is None:
        # Resolved once per trainer: looking names up (entry points) costs milliseconds.
        key = f"objective:{job.objective}:{job.objective_path}"
        if key not in specs:
            specs[key] = resolve_objective(job.objective, "stored definition", search_path=job.objective_path)
        objective = specs[key]
    return spec, objective


def _run_group(
    conn: Connection,
    jobs: list[TrialJob],
    cache: dict[str, Any],
    specs: dict[str, Any],
    objective: Objective | None = None,
) -> None:
    """Run fused trials (one group, :mod:`hpo._fused`): each member's last message is sent as it
    leaves; whatever ends the group early ends every member still in it, as it ends a trial."""

    runs: list[Any] = []
    left: set[int] = set()

    def send_final(number: int, message: tuple[Any, ...]) -> None:
        left.add(number)
        conn.send(("member", number, message))

    try:
        spec, objective = _resolve(jobs[0], specs, objective)
        if objective.fused_train is None:
            raise TypeError(f"objective {jobs[0].objective} has no fused trainer")
        runs = [_trial_run(MemberTrial(conn, job.number, job.prunes), job, spec, cache) for job in jobs]

        def on_leave(member: Any) -> None:
            send_final(member.run.number, _member_result(member.run, member.error, spec.is_multi_objective))

        objective.fused_train(runs, on_leave)
        ended: BaseException = RuntimeError("the fused trainer returned before this trial left its group")
    except TrialAborted:
        for job in jobs:
            if job.number not in left:
                send_final(job.number, ("aborted",))
        return
    except BaseException as exc:  # SystemExit, KeyboardInterrupt from training code included
        ended = exc
    # Raised for the whole group, not by one member: marked so (GROUP_FAILURE).
    for run in runs:
        if run.number not in left:
            send_final(run.number, _group_wide(_member_result(run, ended, False)))
    for job in jobs:  # the group failed before its runs were made
        if job.number not in left:
            send_final(job.number, _group_wide(_failed(ended)))


def _group_wide(message: tuple[Any, ...]) -> tuple[Any, ...]:
    return (*message, GROUP_FAILURE) if message[0] == "failed" else message


def _member_result(run: Any, error: BaseException | None, multi_objective: bool) -> tuple[Any, ...]:
    """A member's last message, as :func:`_run` ends an unfused trial."""
    import optuna

    if error is None:
        try:
            value: float | list[float]
            if multi_objective:
                value = run.final_values()
            else:
                value = float(run.final_value())
                if not math.isfinite(value):
                    raise FloatingPointError(f"objective returned {value}")
            run.flush()
            return ("done", value)
        except Exception as exc:
            error = exc
    _flush_quietly(run)
    if isinstance(error, optuna.TrialPruned):
        return ("pruned", str(error))
    return _failed(error)


# Appended to a fused member's ("failed", ...) message when the exception ended its whole group
# (out of memory for K members together, a bug in the fused trainer) rather than that member.
GROUP_FAILURE = "group"


def _failed(exc: BaseException) -> tuple[Any, ...]:
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("failed", type(exc).__name__, _describe(exc), details)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, SystemExit):
        text = f"training code called sys.exit({exc.code!r})"
    elif isinstance(exc, KeyboardInterrupt):
        text = "training code raised KeyboardInterrupt"
    return text


def _flush_quietly(run: Any) -> None:
    # Keep the learning curve of a failing trial.
    if run is not None:
        with contextlib.suppress(Exception):
            run.flush()


def describe_exit(exitcode: int | None) -> str:
    """Why a trainer process ended, in words for a trial's fail reason."""
    if exitcode is None:
        return "trainer stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL":
            return "trainer killed by SIGKILL, probably out of memory (see dmesg)"
        if name == "SIGSEGV":
            return "trainer crashed with SIGSEGV (a segmentation fault in native code)"
        if name == "SIGABRT":
            return "trainer aborted (SIGABRT), e.g. a CUDA or C++ assertion"
        return f"trainer killed by {name}"
    return f"trainer exited with code {exitcode} (the training code ended its process)"


def jsonable(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(dict(mapping))))
