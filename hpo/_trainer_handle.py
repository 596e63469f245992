"""The supervisor's handle on its trainer process (:mod:`hpo.trainer` is the process's side):
spawning it, its warm-up, the pipe's messages, and stopping it. The process may die at any
line (a crash in native code, the OOM killer, a trial's ``os._exit``): every call here turns
that into :class:`TrainerDied`, and the supervisor records the trial and starts a new one."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from hpo._interrupts import Interrupts
from hpo.errors import HpoError
from hpo.objective import Objective
from hpo.trainer import THREADS_ENV, TrialJob, describe_exit, inline_main, trainer_main

# How long a new trainer may take to import the objective (torch, torchvision) and say ready.
TRAINER_START_TIMEOUT_S = 300.0
# How long a trainer may take to exit after SIGTERM before it is killed.
TRAINER_STOP_GRACE_S = 10.0
# How long the supervisor waits for a message before it checks signals and leases again.
POLL_S = 0.2
# How long a new trainer's warm-up (importing the objective) may hold back the first claim; a
# slower import then overlaps the first trial instead.
TRAINER_WARM_WAIT_S = 120.0
# How many trainers in a row may die before they are ready (the out-of-memory killer during their
# imports, say) before the worker gives up: a crash that repeats is no passing accident.
TRAINER_START_ATTEMPTS = 3


class TrainerDied(Exception):
    """The trainer process ended. ``starting``: how many trainers in a row died before they were
    ready (:meth:`Trainer.ensure_started` gave up), 0 for one that died while it worked."""

    def __init__(self, exitcode: int | None, starting: int = 0) -> None:
        reason = describe_exit(exitcode)
        if starting:
            reason = f"{starting} trainer processes in a row died while starting; the last: {reason}"
        super().__init__(reason)
        self.exitcode = exitcode
        self.starting = starting


class Trainer:
    """The trainer child process (spawned; see :mod:`hpo.trainer`), started on first use and
    again after it died."""

    def __init__(self, threads: int | None, warm: TrialJob | None = None) -> None:
        """``warm``: a job standing for the trials to come; each new trainer is sent it to import
        their objective before the first one is claimed (see :func:`hpo.trainer._warm`)."""
        self.threads = threads
        self.warm = warm
        self._process: Any = None
        self._conn: Connection | None = None
        # Whether the current process answered "ready" (and its warm-up was sent and waited for).
        self._ready = False
        # Whether the current process was sent its warm-up (by warm_up, before it said ready).
        self._warm_sent = False
        self._spawned_at = 0.0
        # Counts the trainers started: a message sent to one is not in a later one's pipe.
        self.generation = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def spawn(self) -> None:
        """Start a trainer process and return at once: :meth:`ensure_started` waits for it.

        ``hpo worker`` spawns its trainer before it opens the storage and imports the objective
        itself, so that the trainer's own imports (PyTorch, then ``torch._dynamo`` on its first
        optimizer: seconds) run on another core meanwhile instead of after them."""
        self.close()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        # spawn copies the environment when the process starts: set the thread counts for it
        # (OpenMP/MKL read theirs at load time, PyTorch's pool is sized in hpo.trainer).
        names = (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        previous = {name: os.environ.get(name) for name in names}
        if self.threads is not None:
            os.environ.update(dict.fromkeys(names, str(self.threads)))
        try:
            process = context.Process(
                target=trainer_main, args=(child, os.getpid()), name="hpo-trainer", daemon=False
            )
            process.start()
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        child.close()
        self._process, self._conn = process, parent
        self._spawned_at = time.monotonic()
        self.generation += 1

    def ensure_started(self, interrupts: Interrupts) -> None:
        """A trainer that answered "ready" and did its warm-up (or waited TRAINER_WARM_WAIT_S for
        it): the one :meth:`spawn` started, or a new one if none runs (the first, or after one
        died).

        A trainer that dies before it is ready (the out-of-memory killer during its imports, a
        crash importing the objective) is replaced, up to TRAINER_START_ATTEMPTS in a row; then
        :class:`TrainerDied` (``starting`` set). No trial is sent to a trainer before it is ready,
        so a replaced one took none with it."""
        for attempt in range(1, TRAINER_START_ATTEMPTS + 1):
            try:
                self._start(interrupts)
                return
            except TrainerDied as died:
                self.close()
                if attempt == TRAINER_START_ATTEMPTS:
                    raise TrainerDied(died.exitcode, starting=attempt) from None

    def _start(self, interrupts: Interrupts) -> None:
        alive = self._process is not None and self._process.is_alive()
        if alive and self._ready:
            return
        if not alive:
            self.spawn()
        deadline = self._spawned_at + TRAINER_START_TIMEOUT_S
        warm_until: float | None = None  # set once the warm-up job is sent
        while True:
            try:
                message = self._receive(POLL_S)
            except TrainerDied:
                if warm_until is not None:
                    # Importing the objective killed the trainer (a crash in native code): the
                    # next one starts without the warm-up; the first trial meets the same crash
                    # and records it.
                    self.warm = None
                raise
            if message is not None and message[0] == "ready" and self.warm is not None:
                if not self._warm_sent:
                    self.send(("warm", asdict(self.warm)))  # answered ("warm",) once imported
                    self._warm_sent = True
                warm_until = time.monotonic() + TRAINER_WARM_WAIT_S
            elif message is not None and message[0] in ("ready", "warm"):
                self._ready = True
                return
            interrupts.check()
            if warm_until is not None and time.monotonic() > warm_until:
                self._ready = True
                return  # a slow import: the first trial waits for it (poll drops the late answer)
            if warm_until is None and time.monotonic() > deadline:
                self.kill()
                raise HpoError(f"the trainer process did not start within {TRAINER_START_TIMEOUT_S:g}s")

    def warm_up(self, job: TrialJob) -> None:
        """Send the spawned trainer its warm-up now, without waiting for its "ready": it reads the
        message once PyTorch is imported. ``hpo worker`` calls it as soon as the policy has
        allowed the objective, so the trainer imports the objective while this process imports
        it too (to check it), instead of after; :meth:`ensure_started` then waits for the
        answer. A trainer already dead is left to :meth:`ensure_started`, which starts another
        and warms it."""
        self.warm = job
        if self._conn is None or self._warm_sent:
            return
        with contextlib.suppress(TrainerDied):
            self.send(("warm", asdict(job)))
            self._warm_sent = True

    def check_alive(self) -> None:
        """TrainerDied if the trainer process has exited (or none was started)."""
        if self._process is None:
            raise TrainerDied(None)
        if not self._process.is_alive():
            raise TrainerDied(self._exitcode())

    def send(self, message: tuple[Any, ...]) -> None:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise TrainerDied(self._exitcode()) from None

    def poll(self, timeout: float) -> tuple[Any, ...] | None:
        """The trainer's next message, None if none came within ``timeout``; TrainerDied if it died."""
        message = self._receive(timeout)
        return None if message == ("warm",) else message  # a warm-up answered after its wait

    def _receive(self, timeout: float) -> tuple[Any, ...] | None:
        assert self._conn is not None
        try:
            if self._conn.poll(timeout):
                return tuple(self._conn.recv())
        except (EOFError, ConnectionResetError, OSError):
            raise TrainerDied(self._exitcode()) from None
        if not self._process.is_alive():
            raise TrainerDied(self._exitcode())
        return None

    def _exitcode(self) -> int | None:
        self._process.join(timeout=5)
        return self._process.exitcode

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self.close()

    def stop(self) -> None:
        """End the trainer: SIGTERM (the training code stops where it is), then SIGKILL."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=TRAINER_STOP_GRACE_S)
        self.kill()

    def shutdown(self) -> None:
        """Ask an idle trainer to exit, then make sure it has."""
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.send(("exit",))
            self._process.join(timeout=TRAINER_STOP_GRACE_S)
        self.kill()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
        self._process = None
        self._ready = False
        self._warm_sent = False


class InlineTrainer(Trainer):
    """The trainer as a thread of this process (no isolation; see :func:`hpo.trainer.inline_main`)."""

    def __init__(self, objective: Objective, cache: dict[str, Any]) -> None:
        super().__init__(threads=None)
        self._objective = objective
        self._cache = cache

    def ensure_started(self, interrupts: Interrupts) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self.close()
        parent, child = multiprocessing.Pipe(duplex=True)
        thread = threading.Thread(
            target=inline_main, args=(child, self._objective, self._cache), name="hpo-trainer", daemon=True
        )
        thread.start()
        self._process, self._conn = _ThreadHandle(thread, child), parent
        self.generation += 1
        while self.poll(POLL_S) is None:
            interrupts.check()


class _ThreadHandle:
    """What :class:`Trainer` asks of its process, for a thread (which cannot be killed: closing
    its pipe ends it at its next message)."""

    pid = None
    exitcode = None

    def __init__(self, thread: threading.Thread, conn: Connection) -> None:
        self._thread = thread
        self._conn = conn

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout=min(timeout or 0.0, 1.0))

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
