"""Background ``hpo`` processes for tests of long-running commands (servers, workers)."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Output:
    """Collects a background process's output lines as they come (so its pipe never fills up)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first line matching ``pattern``, waiting for it; AssertionError with the output if none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in time; output:\n{self.text}")

    def finish(self, timeout: float) -> int:
        """Wait for the process to exit and for its last lines to be read; its exit status."""
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not exited after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
