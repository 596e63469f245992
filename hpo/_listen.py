"""Checks shared by the commands that listen on a port (``hpo dashboard``, ``hpo serve-storage``).

A server that cannot bind must say so in one line naming the host, the port and the flag to change,
before anything starts; a server reachable from other machines must say that too, because neither
optuna-dashboard nor Optuna's gRPC proxy authenticates anyone.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from hpo.errors import HpoError


@dataclass(frozen=True)
class ListenAddress:
    """Where a server will listen: the address family and the ``(host, port, ...)`` to bind."""

    host: str
    port: int
    family: socket.AddressFamily
    sockaddr: tuple[str, int] | tuple[str, int, int, int]

    @property
    def url_host(self) -> str:
        """The host as written in a URL that binds this address."""
        return f"[{self.host}]" if self.family == socket.AF_INET6 and ":" in self.host else self.host

    @property
    def public_host(self) -> str:
        """The host to give clients: this machine's name when listening on every interface."""
        if self.sockaddr[0] in ("0.0.0.0", "::"):
            return socket.gethostname()
        return self.url_host


def resolve(host: str, port: int) -> ListenAddress:
    """Resolve ``host`` to the address to bind; :class:`HpoError` if it is not a name or address here."""
    if not 0 < port < 65536:
        raise HpoError(f"port {port} is out of range (fix: --port N with 1 <= N <= 65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HpoError(
            f"cannot listen on host {host!r}: {exc.strerror} (fix: --host 127.0.0.1, or an address of this "
            "machine)"
        ) from None
    # Prefer IPv4 for names that resolve to both, as browsers and docs write http://127.0.0.1:PORT.
    for family in (socket.AF_INET, socket.AF_INET6):
        for info_family, _, _, _, sockaddr in infos:
            if info_family == family and isinstance(sockaddr[0], str):
                return ListenAddress(host, port, family, sockaddr)
    raise HpoError(f"cannot listen on host {host!r}: no IPv4 or IPv6 address (fix: --host 127.0.0.1)")


def bind_error(address: ListenAddress, exc: OSError) -> HpoError:
    """The one-line error for a failed bind of ``address``."""
    where = f"port {address.port} on {address.host}"
    if exc.errno == errno.EADDRINUSE:
        return HpoError(f"{where} is in use (fix: --port N with a free port, or stop what listens there)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return HpoError(
            f"cannot listen on {address.host}: not an address of this machine "
            "(fix: --host 127.0.0.1, or 0.0.0.0 for every interface)"
        )
    if exc.errno == errno.EACCES:
        return HpoError(f"{where}: permission denied (fix: --port N with N >= 1024)")
    return HpoError(f"cannot listen on {where}: {exc.strerror or exc}")


def check_free(address: ListenAddress) -> None:
    """Raise the :func:`bind_error` if ``address`` cannot be bound now.

    For servers that bind inside a library (gRPC) with ``SO_REUSEPORT``, where a second server on
    the same port would silently share it instead of failing: a plain socket without that option
    fails while anything listens there.
    """
    with socket.socket(address.family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR (not SO_REUSEPORT): a listening server still makes the bind fail, but the
        # TIME_WAIT connections a killed server leaves behind do not keep its restart away for 60 s.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address.sockaddr)
        except OSError as exc:
            raise bind_error(address, exc) from None


def is_loopback(address: ListenAddress) -> bool:
    try:
        return ipaddress.ip_address(address.sockaddr[0].split("%")[0]).is_loopback
    except ValueError:
        return False


def exposure_warning(address: ListenAddress, what: str) -> str | None:
    """A warning line when ``address`` is reachable from other machines (None on loopback)."""
    if is_loopback(address):
        return None
    return (
        f"warning: {what} listens on {address.url_host}:{address.port}, reachable from other machines, "
        "and has no authentication; anyone who can reach it can read and change studies "
        "(use --host 127.0.0.1 and an SSH tunnel, or a firewall, unless that is intended)"
    )
