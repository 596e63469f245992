"""One decoded copy of a dataset per machine, shared by every trainer process on it.

K trials on one GPU (``--trials-per-gpu K``) or several ``hpo worker`` processes on one machine
each run their own trainer process, and each used to decode the dataset and hold its own copy
(CelebA at 224 px: 27.5 GB a copy). :func:`load_shared` keeps decoded tensors in files under a
machine-wide folder (``/dev/shm/hpo-data-<uid>`` by default, memory-backed) and maps them into
each process copy-on-write: the first process to ask decodes and writes, every other one waits
for it and maps the same pages, and a trainer restarted after a crash maps instead of decoding.

Crash safety: an entry is written to ``<digest>.building-<pid>/`` and renamed into place, so a
process killed while writing leaves no entry that looks complete; its leftovers are removed by
the next writer. Each entry has a lock file: writers hold it exclusively, and every process
mapping the entry holds it shared for as long as it keeps the tensors (:class:`Lease`), so
:func:`sweep_unused` (run when a worker stops) removes exactly the entries no process maps. An
entry whose files do not match its manifest (a truncated write on a disk folder) is rebuilt.

``$HPO_SHARED_DATA`` names another folder (a local disk, when ``/dev/shm`` is small), or
``none`` to keep every dataset private to its process, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["SHARED_DATA_ENV", "Lease", "load_shared", "shared_data_dir", "sweep_unused"]

logger = logging.getLogger(__name__)

SHARED_DATA_ENV = "HPO_SHARED_DATA"
"""Folder for the machine-wide decoded datasets, or ``none`` to keep them private."""

_MANIFEST = "manifest.json"
_FORMAT = 1
# Attempts to map an entry that another process removes or rebuilds at the same moment.
_ATTEMPTS = 5
# An entry may take at most this share of the folder's free space (tmpfs is memory).
_FILL = 0.8


def shared_data_dir() -> Path | None:
    """The machine-wide folder (from ``$HPO_SHARED_DATA``, else ``/dev/shm``), or None: no sharing."""
    value = os.environ.get(SHARED_DATA_ENV)
    if value is not None:
        if value.strip().lower() in ("", "none", "off", "0"):
            return None
        return Path(value).expanduser() / f"hpo-data-{os.getuid()}"
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / f"hpo-data-{os.getuid()}"
    return None


class Lease:
    """The shared lock of one mapped entry: while it is held no sweep removes the entry's files.

    Keep it as long as the tensors are used (next to them in a cache); it is released when closed
    or garbage-collected, and by the kernel when the process dies.
    """

    def __init__(self, handle: IO[str], entry: Path) -> None:
        self._handle: IO[str] | None = handle
        self.entry = entry

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()  # closing the last descriptor drops the flock
            self._handle = None

    def __del__(self) -> None:
        self.close()


Tensors = dict[str, "torch.Tensor | None"]
Built = tuple[Tensors, dict[str, Any]]


def load_shared(
    directory: Path, key: str, build: Callable[[], Built]
) -> tuple[Tensors, dict[str, Any], Lease | None]:
    """The tensors (and JSON metadata) stored under ``key``, built by ``build()`` only if no
    process has: ``build`` returns CPU tensors by name and a JSON-able mapping.

    Returns the tensors mapped from the shared entry, its metadata and the :class:`Lease` that
    keeps it, or, when the folder cannot take the entry (full, read-only), what ``build``
    returned and None. ``build``'s exceptions propagate (nothing is written).
    """
    problem = _unusable(directory)
    if problem is not None:
        logger.warning("cannot use %s for shared datasets (%s): keeping this one private", directory, problem)
        tensors, meta = build()
        return tensors, meta, None
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    entry = directory / digest
    lock_path = directory / f"{digest}.lock"
    for _ in range(_ATTEMPTS):
        try:
            handle: IO[str] | None = open(lock_path, "a+")  # noqa: SIM115 - kept open by the Lease
        except OSError as exc:
            logger.warning("cannot lock %s (%s): keeping this dataset private", lock_path, exc)
            tensors, meta = build()
            return tensors, meta, None
        try:
            assert handle is not None  # for mypy: set just above, cleared only on return
            fcntl.flock(handle, fcntl.LOCK_SH)
            if not _still_linked(handle, lock_path):
                continue  # swept while this process waited: lock the new file
            mapped = _map(entry, key)
            if mapped is not None:
                lease, handle = Lease(handle, entry), None
                return mapped[0], mapped[1], lease
            # Missing or broken: become the writer. Dropping the shared lock first lets two
            # processes that both found it missing queue for the exclusive one instead of deadlocking.
            fcntl.flock(handle, fcntl.LOCK_UN)
            fcntl.flock(handle, fcntl.LOCK_EX)
            if not _still_linked(handle, lock_path):
                continue
            if _map(entry, key) is None:  # nobody wrote it while this process waited
                tensors, meta = build()
                if not _write(directory, entry, key, tensors, meta):
                    return tensors, meta, None
        finally:
            if handle is not None:
                handle.close()
    raise RuntimeError(f"shared dataset {entry} kept changing while it was mapped; retry the trial")


def _unusable(directory: Path) -> str | None:
    """Why ``directory`` must not hold shared data (None: it may). It must be this user's own
    folder, writable by no one else: whoever can write it could plant tensors every trainer maps."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.lstat()
    except OSError as exc:
        return str(exc)
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user"
    if st.st_mode & 0o022:
        return "writable by other users"
    return None


def _still_linked(handle: IO[str], lock_path: Path) -> bool:
    """Whether the locked file is still the one at ``lock_path`` (a sweep unlinks it under its lock)."""
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
    except OSError:
        return False


def sweep_unused(directory: Path | None = None) -> list[Path]:
    """Remove the entries (and half-written leftovers) that no process maps; the removed paths."""
    directory = directory if directory is not None else shared_data_dir()
    if directory is None or not directory.is_dir():
        return []
    removed: list[Path] = []
    for lock_path in sorted(directory.glob("*.lock")):
        digest = lock_path.name.removesuffix(".lock")
        with _exclusive_now(lock_path) as held:
            if not held:
                continue  # mapped by a live process, or being written
            for path in [directory / digest, *directory.glob(f"{digest}.building-*")]:
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            with contextlib.suppress(OSError):
                lock_path.unlink()  # under the lock: a process waiting on it re-checks the entry
    return removed


@contextlib.contextmanager
def _exclusive_now(lock_path: Path) -> Iterator[bool]:
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        handle.close()


def _map(entry: Path, key: str) -> Built | None:
    """The entry's tensors mapped copy-on-write and its metadata, or None when it is missing,
    partial or another key's."""
    import torch

    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        if manifest.get("format") != _FORMAT or manifest.get("key") != key:
            return None
        tensors: Tensors = {}
        for name, meta in manifest["tensors"].items():
            if meta is None:
                tensors[name] = None
                continue
            dtype = getattr(torch, meta["dtype"])
            shape = tuple(meta["shape"])
            numel = 1
            for side in shape:
                numel *= side
            if numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            path = entry / f"{name}.bin"
            if path.stat().st_size != numel * torch.empty((), dtype=dtype).element_size():
                return None  # a truncated file: rebuild
            flat = torch.from_file(str(path), shared=False, size=numel, dtype=dtype)
            tensors[name] = flat.view(shape)
        return tensors, dict(manifest["meta"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None


def _write(directory: Path, entry: Path, key: str, tensors: Tensors, extra: dict[str, Any]) -> bool:
    """Write ``tensors`` as the entry (under the exclusive lock); False if the folder cannot take it."""
    import torch

    for leftover in directory.glob(f"{entry.name}.building-*"):  # a writer killed mid-way
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(entry, ignore_errors=True)  # a broken entry
    building = directory / f"{entry.name}.building-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
    try:
        free = shutil.disk_usage(directory).free
        if needed > free * _FILL:
            # e.g. a container's 64 MB /dev/shm: decoding again per process beats failing mid-write
            logger.warning(
                "the dataset (%.2f GiB) does not fit in %s (%.2f GiB free): keeping it private to this "
                "process; set %s to a larger folder to share it",
                needed / 2**30,
                directory,
                free / 2**30,
                SHARED_DATA_ENV,
            )
            return False
        building.mkdir(mode=0o700)
        meta: dict[str, Any] = {}
        for name, tensor in tensors.items():
            if tensor is None:
                meta[name] = None
                continue
            array = tensor.detach().cpu().contiguous()
            meta[name] = {"dtype": str(array.dtype).removeprefix("torch."), "shape": list(array.shape)}
            if array.numel():
                with open(building / f"{name}.bin", "wb") as out:
                    array.view(-1).view(torch.uint8).numpy().tofile(out)
        (building / _MANIFEST).write_text(
            json.dumps({"format": _FORMAT, "key": key, "tensors": meta, "meta": extra})
        )
        os.rename(building, entry)  # atomic: the entry appears complete or not at all
        return True
    except OSError as exc:
        shutil.rmtree(building, ignore_errors=True)
        logger.warning("cannot write the shared dataset to %s (%s): keeping this one private", directory, exc)
        return False
