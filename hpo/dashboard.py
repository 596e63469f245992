"""``hpo dashboard``: optuna-dashboard on the study storage, to watch searches live.

Everything hpo records is Optuna's own data, so optuna-dashboard shows it as it arrives:

* the **study list**, and for each study its trials and their states (queued ones as Waiting);
* on a **study's page**: Optuna's plots, among them the study metric's learning curves (its
  intermediate values, one point per epoch); the **Note**, which holds the study definition as
  YAML and the study's extend/enqueue history (written by :mod:`hpo._dashboard_data` when the
  study is created, replaced, extended or retrained); **one figure per metric** the objective
  reports (``val_acc by epoch`` ...: every finished trial's curve, rewritten by the worker as
  trials end); and the study user attributes (``hpo:uid``);
* on a **trial's page**: its value, parameters, intermediate values, the user attributes
  ``last_epoch`` (the last epoch's metrics, rounded) and ``fail_reason``, and the files it stored
  as artifacts (:mod:`hpo.artifacts`).

Long records (the definition, the per-epoch metric history) are system attributes, which the
dashboard does not print as attribute rows (:mod:`hpo._records`), so no attribute widens a page.
The server listens on loopback unless ``--host`` says otherwise, since optuna-dashboard lets
anyone who reaches it edit studies.
"""

from __future__ import annotations

import argparse
import socketserver
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from hpo import _listen
from hpo._commands.dashboard import DEFAULT_HOST, DEFAULT_PORT
from hpo.artifacts import open_artifact_store, resolve_artifact_dir
from hpo.storage import open_storage, redact, resolve_storage_url


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # The page polls several API endpoints at once; one thread per request keeps it responsive.
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall for seconds on a
        # machine without DNS; the bound address is all the WSGI environ needs.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per request would drown the terminal; errors are still logged."""


def make_server(address: _listen.ListenAddress, app: Callable[..., Any]) -> WSGIServer:
    """A threaded WSGI server bound to ``address``; :class:`HpoError` when the port is taken."""
    server_class = type("DashboardServer", (_Server,), {"address_family": address.family})
    try:
        server: WSGIServer = server_class(address.sockaddr, _QuietHandler)
    except OSError as exc:
        raise _listen.bind_error(address, exc) from None
    server.set_app(app)
    return server


def serve(
    storage_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    artifact_dir: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve optuna-dashboard for ``storage_url`` until interrupted.

    Raises :class:`HpoError` (before serving anything) when the storage cannot be opened, the
    artifact folder cannot be created, or ``host:port`` cannot be bound. ``on_ready`` receives the
    dashboard's URL once the port is bound.
    """
    address = _listen.resolve(host, port)
    storage = open_storage(storage_url)
    store = open_artifact_store(artifact_dir or resolve_artifact_dir())
    import optuna_dashboard  # imported here: 1 s of imports every other hpo command should not pay

    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    server = make_server(address, app)
    warning = _listen.exposure_warning(address, "the dashboard")
    if warning:
        print(warning, file=sys.stderr)
    url = f"http://{address.public_host}:{address.port}/dashboard"
    if on_ready is not None:
        on_ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def cmd_dashboard(args: argparse.Namespace) -> int:
    url = resolve_storage_url(args.storage)
    artifact_dir = resolve_artifact_dir(args.artifact_dir)

    def announce(dashboard_url: str) -> None:
        print(
            f"optuna-dashboard for {redact(url)} on {dashboard_url} (artifacts: {artifact_dir}); "
            "Ctrl-C to stop",
            flush=True,
        )

    serve(url, args.host, args.port, artifact_dir, on_ready=announce)
    return 0
