"""Running the reward server: the exposure policy (loopback by default, a token otherwise), the listening socket,
a uvicorn server that stops gracefully on a stop signal, and `serve_local`: listen, load the model in the
background, serve until a stop signal.

Importable without the serve extra (FastAPI, uvicorn): the exposure check comes before the extra is needed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pickrank.errors import UsageError
from pickrank.options import ModelOptions, Scale
from pickrank.signals import handlers

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pickrank.models.protocol import ImageTextEmbedder
    from pickrank.serve.requests import ServeLimits

log = logging.getLogger("pickrank")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost): reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Binding beyond loopback needs a token, or --insecure-no-auth said out loud."""
    if token is not None and insecure_no_auth:
        raise UsageError("give --token or --insecure-no-auth, not both")
    if not is_loopback(host) and token is None and not insecure_no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or set "
                         "PICKRANK_TOKEN), or --insecure-no-auth to serve without authentication")


def serve_workers(workers: int | None) -> int:
    """Decode processes of the server: as the CLI's --workers [default: one per CPU, at most 8]."""
    from pickrank.core.engine import default_workers

    return default_workers() if workers is None else workers


def bind(host: str, port: int) -> Any:
    """A listening TCP socket on host:port (port 0: a free one), for uvicorn to serve on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def url_of(sock: Any) -> str:
    """http://host:port of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def graceful_server(app: FastAPI) -> Any:
    """A uvicorn server whose SIGTERM, SIGINT and SIGHUP stop it gracefully (no new connections, requests in flight
    answered), and which does not raise the signal again once it has stopped: a stopped server exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with handlers(self.handle_exit):
                yield

    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30)
    return Server(config)


def stop_if_load_fails(embedder: ImageTextEmbedder, server: Any, failed: list[BaseException]) -> None:
    """In a thread: once the model's load has ended, stop the server (noting why in `failed`) if it failed."""

    def watch() -> None:
        error = embedder.error()
        if error is not None:
            failed.append(error)
            server.should_exit = True

    threading.Thread(target=watch, name="pickrank-load-watch", daemon=True).start()


def serve_local(model: ModelOptions, limits: ServeLimits, host: str, port: int, token: str | None, scale: Scale, *,
                load: Callable[[ModelOptions], ImageTextEmbedder] | None = None) -> None:
    """Listen first (the URL on stderr), load the model in the background (/healthz: 503 meanwhile), serve until a
    stop signal; a model that fails to load stops the server with its error. `load` starts loading the model
    [default: `loading.load_embedder`]."""
    from pickrank.serve.app import create_app

    if load is None:
        from pickrank.models import loading

        load = loading.load_embedder
    sock = bind(host, port)
    embedder = load(model)
    server = graceful_server(create_app(embedder, limits, token=token, scale=scale))
    failed: list[BaseException] = []
    stop_if_load_fails(embedder, server, failed)
    print(f"pickrank: listening on {url_of(sock)} (model loading; GET /healthz says when it is ready)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]
    log.info("stopped")


__all__ = ["is_loopback", "check_exposure", "serve_workers", "bind", "url_of", "graceful_server",
           "stop_if_load_fails", "serve_local"]
