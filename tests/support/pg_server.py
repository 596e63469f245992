"""A PostgreSQL server of a test's own, for tests that stop, kill and restart the database.

The shared server of ``HPO_TEST_POSTGRES_URL`` must never be restarted by one test; a
:class:`PgServer` is a fresh cluster (``initdb``) in a temporary folder, on a free port, with
trust authentication for the user ``postgres``, that one test may stop and start at will::

    with PgServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)
        pg.restart(down_for=2.0)          # stop (fast shutdown), wait 2 s, start again
        pg.stop(mode="immediate")         # as if the server crashed (recovery on the next start)

It needs only Debian's PostgreSQL binaries (``/usr/lib/postgresql/<version>/bin``, the newest
version found; ``HPO_TEST_PG_BIN`` names another folder). Debian's ``initdb`` refuses to run as
root, so as root the cluster belongs to the ``postgres`` system user and every binary runs through
``runuser -u postgres --``; as any other user the binaries run as that user.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from background import free_port

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
DB_USER = "postgres"
_NEEDED = ("initdb", "pg_ctl", "postgres")


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, pg_ctl and postgres."""
    override = os.environ.get("HPO_TEST_PG_BIN")
    candidates = [Path(override)] if override else []
    if DEBIAN_ROOT.is_dir():
        versions = [p for p in DEBIAN_ROOT.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(x) for x in p.name.split(".")), reverse=True)
        candidates += [p / "bin" for p in versions]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in _NEEDED):
            return directory
    return None


def missing_reason() -> str | None:
    """Why no :class:`PgServer` can be started here (None when one can)."""
    if find_bin_dir() is None:
        return f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) under {DEBIAN_ROOT}/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root, and there is no {SYSTEM_USER!r} system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root, and runuser (util-linux) is missing"
    return None


class PgServerError(RuntimeError):
    """A PostgreSQL command of :class:`PgServer` failed; the message holds its output and the log."""


class PgServer:
    """One PostgreSQL cluster in a temporary folder; see the module docstring.

    ``start()`` creates the cluster on first use. ``url`` is a SQLAlchemy URL (psycopg 3) for
    ``database`` (created on first start when it is not ``postgres``). The port stays the same
    across restarts, so URLs and engines made before a restart stay valid.
    """

    def __init__(self, *, database: str = "postgres", port: int | None = None) -> None:
        reason = missing_reason()
        if reason:
            raise PgServerError(reason)
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        self.bin_dir = bin_dir
        self.database = database
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_file = self.base / "server.log"
        self.socket_dir.mkdir()
        if self._as_root:
            account = pwd.getpwnam(SYSTEM_USER)
            for path in (self.base, self.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._initialised = False
        self._database_created = database == "postgres"
        self._closed = False
        atexit.register(self.close)  # never leave a server behind, even when a test is interrupted

    # -- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{database}"

    # -- running commands ----------------------------------------------------------------------

    def _command(self, name: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / name), *args]
        if self._as_root:
            return ["runuser", "-u", SYSTEM_USER, "--", *argv]
        return argv

    def _run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.base, check=False
        )
        if result.returncode != 0:
            raise PgServerError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}\n"
                f"server log:\n{self.log_text()}"
            )
        return result

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._run(
            self._command(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                DB_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ),
            timeout=180,
        )
        self._initialised = True

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (creating the cluster on first use) and wait until it takes connections."""
        if self._closed:
            raise PgServerError("this PgServer was closed")
        if not self._initialised:
            self._initdb()
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                # Speed without losing commits when the test crashes the server (stop "immediate"):
                # fsync and full-page writes only matter if the machine itself crashes.
                # synchronous_commit stays on: off, a crash forgets the last acknowledged commits.
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c shared_buffers=16MB",
                "-c max_connections=50",
            ]
        )
        self._run(
            self._command(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                options,
            ),
            timeout=timeout + 30,
        )
        if not self._database_created:
            self._create_database(self.database)
            self._database_created = True

    def _create_database(self, name: str) -> None:
        createdb = self.bin_dir / "createdb"
        self._run([str(createdb), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, name], timeout=60)

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server: ``fast`` (disconnect clients, clean shutdown), ``immediate`` (like a
        crash: no shutdown checkpoint, recovery on the next start) or ``smart`` (wait for clients)."""
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"mode must be fast, immediate or smart, not {mode!r}")
        if not self.running:
            return
        self._run(
            self._command(
                "pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.data_dir)
            ),
            timeout=timeout + 30,
        )

    def restart(self, down_for: float = 0.0, mode: str = "fast") -> None:
        """Stop (``mode``), stay down for ``down_for`` seconds, start again on the same port."""
        self.stop(mode=mode)
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server (immediate) and delete its folder; the object is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.running:
                self.stop(mode="immediate")
        except (PgServerError, subprocess.TimeoutExpired):
            pass
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def pg_server(database: str = "postgres") -> Iterator[PgServer]:
    """A started :class:`PgServer`, closed afterwards; for fixtures::

    @pytest.fixture
    def pg() -> Iterator[PgServer]:
        reason = missing_reason()
        if reason:
            require_real(reason)
        with pg_server() as server:
            yield server
    """
    server = PgServer(database=database)
    try:
        server.start()
        yield server
    finally:
        server.close()
