"""Turning ``--gpus`` and ``--trials-per-gpu`` into worker processes.

Each GPU slot is a child ``hpo worker`` process pinned to one GPU with ``CUDA_VISIBLE_DEVICES``;
K slots per GPU run K trials side by side on it. Without GPUs the worker runs in this process on
the CPU. The parent forwards SIGINT/SIGTERM to its children so that each records its running
trial before exiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hpo.errors import HpoError

# SQLite has one writer lock per database file. Measured by tests/test_sqlite_limit.py: 4 worker
# processes on one SQLite file record every trial exactly once with the busy timeout hpo sets;
# beyond that the lock queue grows with every heartbeat and report, so hpo refuses more and
# points to PostgreSQL.
SQLITE_MAX_WORKER_PROCESSES = 4

SLOTS_ENV = "HPO_SLOTS_PER_DEVICE"
"""How many worker slots share this process's GPU (``--trials-per-gpu``); set for each child."""


@dataclass(frozen=True)
class Slot:
    gpu: int | None  # physical GPU index, None for the CPU
    index: int  # slot number on that GPU

    @property
    def label(self) -> str:
        return "cpu" if self.gpu is None else f"gpu{self.gpu}.{self.index}"


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(value: str, available: int) -> list[int]:
    """``all`` (every visible GPU), ``none``, or a comma-separated list of indices."""
    value = value.strip().lower()
    if value == "none":
        return []
    if value == "all":
        return list(range(available))
    try:
        indices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise HpoError(f"--gpus {value!r}: expected all, none or indices like 0,1") from None
    for index in indices:
        if not 0 <= index < available:
            raise HpoError(
                f"--gpus {value}: GPU {index} does not exist; this machine has {available} visible GPU(s) "
                "(fix: use --gpus all, --gpus none or an index below the count)"
            )
    if len(set(indices)) != len(indices):
        raise HpoError(f"--gpus {value}: a GPU is listed twice (fix: use --trials-per-gpu for several slots)")
    return indices


def _cgroup_cpu_limit() -> float | None:
    """CPUs this process may use by its cgroup's quota (a container's ``--cpus``), if any."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota.

    PyTorch sizes its thread pool by the machine's cores, which in a container limited to a few
    CPUs oversubscribes them; an oversubscribed OpenMP pool spins and can be several times slower.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return max(1, cores)


def threads_per_slot(slots: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``slots`` trainers sharing this machine's cores (at least 1)."""
    return max(1, (available_cores() if cores is None else cores) // max(1, slots))


def slots_on_device() -> int:
    """The worker slots sharing this process's GPU (from :data:`SLOTS_ENV`; 1 when unset)."""
    try:
        return max(1, int(os.environ.get(SLOTS_ENV, "1")))
    except ValueError:
        return 1


def device_memory_budget(free: int, total: int, share: float, slots: int | None = None) -> float:
    """Bytes one trainer may keep resident on its GPU (a dataset, cached features): ``share`` of
    the free memory, and of the device's total divided among the ``slots`` sharing it (default:
    :func:`slots_on_device`). Why the total: K slots starting together all see the same free
    memory, and each taking half of it would overcommit the GPU K/2 times."""
    slots = slots_on_device() if slots is None else max(1, slots)
    return share * min(free, total / slots)


def plan_slots(gpus: Sequence[int], trials_per_gpu: int) -> list[Slot]:
    if trials_per_gpu < 1:
        raise HpoError(f"--trials-per-gpu must be at least 1, got {trials_per_gpu}")
    if not gpus:
        return [Slot(None, 0)]
    return [Slot(gpu, k) for gpu in gpus for k in range(trials_per_gpu)]


def _slot_files(database: Path) -> list[Path]:
    return [Path(f"{database}.worker-{k}.lock") for k in range(SQLITE_MAX_WORKER_PROCESSES)]


def free_sqlite_slots(database: Path) -> int:
    """How many of the SQLite file's worker slots no live process holds right now."""
    free = 0
    for path in _slot_files(database):
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            free += 1
    return free


def _limit_error(wanted: int, free: int) -> HpoError:
    running = SQLITE_MAX_WORKER_PROCESSES - free
    return HpoError(
        f"{wanted + running} worker processes on an SQLite storage exceed its safe limit of "
        f"{SQLITE_MAX_WORKER_PROCESSES} ({running} already running on this database file) (fix: use "
        "PostgreSQL, e.g. --storage postgresql+psycopg://user@host/db, or fewer --gpus/--trials-per-gpu)"
    )


def check_sqlite_limit(database: Path, new_processes: int) -> None:
    """Refuse to start more worker processes than the SQLite file's free slots (a first check;
    each process then takes its slot with :func:`sqlite_worker_slot`)."""
    free = free_sqlite_slots(database)
    if new_processes > free:
        raise _limit_error(new_processes, free)


@contextlib.contextmanager
def sqlite_worker_slot(database: Path) -> Iterator[int]:
    """Hold one of the SQLite file's :data:`SQLITE_MAX_WORKER_PROCESSES` worker slots.

    A slot is an exclusive ``flock`` on a file beside the database: the kernel releases it when
    the process ends however it ends (SIGKILL included), so the count is always that of live
    workers, and workers started at the same moment cannot all slip through. SQLite is one
    machine's database by nature (WAL needs a local disk), so file locks see every worker.
    """
    for index, path in enumerate(_slot_files(database)):
        handle = open(path, "a")  # noqa: SIM115 - held open for the slot's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield index
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    raise _limit_error(1, 0)


def child_env(slot: Slot, slots: Sequence[Slot], storage_url: str) -> dict[str, str]:
    """The environment of ``slot``'s worker: its GPU alone, the storage, and how many slots share the GPU."""
    env = dict(os.environ)
    env["OPTUNA_STORAGE"] = storage_url
    env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
    env[SLOTS_ENV] = str(sum(1 for other in slots if other.gpu == slot.gpu))
    return env


def run_children(slots: Sequence[Slot], child_args: Sequence[str], storage_url: str) -> int:
    """Start one ``hpo worker`` per slot and wait for all; the worst exit status is returned.

    The storage URL goes to the children in ``$OPTUNA_STORAGE``, never on their command line,
    where ``ps`` would show its password to every user of the machine.
    """
    children: list[subprocess.Popen[bytes]] = []
    for slot in slots:
        args = [sys.executable, "-m", "hpo", "worker", *child_args, "--slot-label", slot.label]
        children.append(subprocess.Popen(args, env=child_env(slot, slots, storage_url)))

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return max(codes, key=abs) if codes else 0
