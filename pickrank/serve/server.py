"""Running the reward server: the exposure policy (loopback by default, a token otherwise), the listening socket,
uvicorn's HTTP protocol with the guards it lacks (connections bounded, headers in time, malformed requests answered
in JSON), a uvicorn server that stops gracefully on a stop signal, and `serve_local`: listen, load the model in the
background, serve until a stop signal.

Importable without the serve extra (FastAPI, uvicorn): the exposure check comes before the extra is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pickrank.errors import UsageError
from pickrank.options import EngineName, EngineOptions, ModelOptions, Scale
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


def check_token(token: str | None, where: str = "--token") -> None:
    """A bearer token travels in an HTTP header: printable ASCII without spaces, or a UsageError naming the first
    other character (a token that could never match is refused before it is used)."""
    bad = next((c for c in token or "" if not "!" <= c <= "~"), None)
    if bad is not None:
        raise UsageError(f"{where}: {bad!r} (U+{ord(bad):04X}) cannot travel in an HTTP header: use printable "
                         "ASCII without spaces (letters, digits, -._~+/=)")


def check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Binding beyond loopback needs a token, or --insecure-no-auth said out loud; the token must be one a client
    can send."""
    check_token(token)
    if token is not None and insecure_no_auth:
        raise UsageError("give --token or --insecure-no-auth, not both")
    if not is_loopback(host) and token is None and not insecure_no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or set "
                         "PICKRANK_TOKEN), or --insecure-no-auth to serve without authentication")


def check_limits(limits: ServeLimits) -> None:
    """Limits a server can keep: a body of the largest size, while it is parsed, must fit in the memory bodies may
    take at once."""
    from pickrank.serve.requests import BODY_COPIES

    if limits.max_inflight_mb < BODY_COPIES * limits.max_body_mb:
        raise UsageError(f"--max-inflight-mb {limits.max_inflight_mb:g} is below {BODY_COPIES} x --max-body-mb "
                         f"{limits.max_body_mb:g}: a body of the largest size could never be parsed")


def serve_workers(workers: int | None) -> int:
    """Decode processes of the server: as the CLI's --workers [default: one per CPU, at most 8]."""
    from pickrank.core.backend import default_workers

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


def refuse(transport: Any, status: int, message: str) -> None:
    """Answer a connection {"error": message} with `status` straight on its transport, and close it (for what
    uvicorn answers before any app sees a request)."""
    from pickrank.serve.requests import RETRY_AFTER_S

    if transport.is_closing():
        return
    body = json.dumps({"error": message}).encode()
    extra = f"retry-after: {RETRY_AFTER_S}\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n")
    transport.write(head.encode("ascii") + body)
    transport.close()


def guarded_protocol(limits: ServeLimits) -> type:
    """uvicorn's HTTP protocol (httptools where installed, else h11) with the guards uvicorn lacks: at most
    max_connections open (the next gets a 503 and is closed), every request's headers within read_timeout_s of its
    first byte or of the connection (408, closed; the body has its own timeout in the app), and a malformed request
    answered in JSON (400) rather than plain text."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Guarded(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                refuse(transport, 503, f"too many connections: {limits.max_connections} open (--max-connections)")
                return
            self.await_headers()

        def between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def await_headers(self) -> None:
            self.header_timer = self.loop.call_later(limits.read_timeout_s, self.headers_late)

        def headers_late(self) -> None:
            self.header_timer = None
            if self.between_requests():
                refuse(self.transport, 408, f"the request's headers did not arrive within {limits.read_timeout_s:g} "
                                            "s (--read-timeout-s)")

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self.header_timer is None and self.between_requests():
                self.await_headers()
            super().data_received(data)
            if self.header_timer is not None and not self.between_requests():
                self.header_timer.cancel()
                self.header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            refuse(self.transport, 400, f"malformed HTTP request ({msg.rstrip('.')}): check its request line, "
                                        "Content-Length and Transfer-Encoding")

    return Guarded


def graceful_server(app: FastAPI, limits: ServeLimits, on_stop: Callable[[], None]) -> Any:
    """A uvicorn server (the guarded protocol) whose SIGTERM, SIGINT and SIGHUP stop it gracefully: no new
    connections, `on_stop()` called on the event loop (the app answers bodies still arriving at once, and what it
    received within its grace period), then it exits; it does not raise the signal again once it has stopped, so a
    stopped server exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with handlers(self.handle_exit):
                yield

        async def shutdown(self, sockets: Any = None) -> None:
            on_stop()
            await super().shutdown(sockets)

    # uvicorn's own deadline only backs up the app's grace period (the app answers by then)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30, http=guarded_protocol(limits),
                            timeout_graceful_shutdown=int(limits.grace_s) + 10)
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
    app = create_app(embedder, limits, token=token, scale=scale)
    server = graceful_server(app, limits, app.state.service.stop)
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


def serve_on(engine: EngineOptions, model: ModelOptions, limits: ServeLimits, host: str, port: int, token: str | None,
             scale: Scale, *, replicas: int | None = None,
             load: Callable[[ModelOptions], ImageTextEmbedder] | None = None) -> None:
    """Serve on the engine asked for: in this process (`serve_local`), or on Ray Serve with `replicas`."""
    if engine.engine is EngineName.ray:
        from pickrank.ray.cluster import require_ray

        require_ray()  # without the extra: a one-line usage error
        from pickrank.ray.serve import serve_ray

        serve_ray(model, limits, host, port, token, scale, replicas, engine.ray_address)
        return
    if replicas is not None:
        raise UsageError("--replicas needs --engine ray")
    serve_local(model, limits, host, port, token, scale, load=load)


__all__ = ["is_loopback", "check_token", "check_exposure", "check_limits", "serve_workers", "bind", "url_of", "refuse",
           "guarded_protocol", "graceful_server", "stop_if_load_fails", "serve_local", "serve_on"]
