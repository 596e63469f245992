"""SIGTERM and SIGINT for a worker: a flag the worker acts on at its next check."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class WorkerInterrupted(BaseException):
    """SIGTERM/SIGINT reached the worker; a BaseException so nothing swallows it."""


class Interrupts:
    """SIGTERM/SIGINT only set a flag (and wake waits); the worker acts on it at its next check,
    so a storage transaction is never abandoned half-way."""

    def __init__(self) -> None:
        self.pending: str | None = None
        self.wake = threading.Event()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending = self.pending or signal.Signals(signum).name
        self.wake.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals are delivered to the main thread only
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def check(self) -> None:
        if self.pending:
            raise WorkerInterrupted(self.pending)

    def sleep(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.check()
