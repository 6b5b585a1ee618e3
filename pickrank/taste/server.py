"""The label page's server: the standard library's threading HTTP server on 127.0.0.1 (no extra to install for a
local page of four routes and one user), with `serve`'s exposure policy: any other address needs a token.

    GET  /               the page (with ?token=TOKEN once: a cookie carries it from then on)
    GET  /api/state      the current pair, the next one, the counts (JSON)
    POST /api/answer     {"pair": id, "answer": "left" | "right" | "tie" | "skip"} -> the next state
    POST /api/undo       {} -> the state, the undone pair shown again
    GET  /img/ID         candidate ID's picture (JPEG); any other id, or anything that looks like a path: 404

Requests to the API must be JSON (a cross-site form cannot send that), and without a token the Host header must
name this server (a DNS-rebinding page cannot reach it). Every error is JSON {"error": ...}.
"""

from __future__ import annotations

import hmac
import http.cookies
import json
import logging
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from pickrank.taste.session import LabelSession, StalePair

log = logging.getLogger("pickrank")

COOKIE = "pickrank_label"
MAX_BODY = 16 << 10
_IMAGE = re.compile(r"/img/([0-9]{1,9})")


@dataclass(frozen=True)
class Reply:
    """One HTTP answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, value: Any) -> Reply:
    return Reply(status, json.dumps(value, ensure_ascii=False).encode("utf-8"), headers={"Cache-Control": "no-store"})


def error(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


@dataclass(frozen=True)
class Request:
    """What a route needs of a request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


class LabelApp:
    """The routes (see the module docstring), independent of the HTTP server that carries them."""

    def __init__(self, session: LabelSession, page: str, policy: str, token: str | None,
                 hosts: frozenset[str]) -> None:
        self.session, self.page, self.policy, self.token, self.hosts = session, page.encode("utf-8"), policy, \
            token, hosts

    def handle(self, req: Request) -> Reply:
        """A request's answer; a bug in a route is a 500 for that request alone."""
        try:
            return self._route(req)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the page
            log.error("%s %s failed: %s: %s", req.method, req.path, type(e).__name__, e)
            return error(500, f"internal error: {type(e).__name__}: {e}")

    def _allowed(self, req: Request) -> Reply | None:
        """None when the request may go on, else the refusal."""
        if self.token is None:
            if req.headers.get("host", "").lower() not in self.hosts:
                return error(403, "this server answers requests for its own address only")
            return None
        given = http.cookies.SimpleCookie(req.headers.get("cookie", "")).get(COOKIE)
        scheme, _, bearer = req.headers.get("authorization", "").partition(" ")
        for candidate in (given.value if given else "", bearer.strip() if scheme.lower() == "bearer" else ""):
            if candidate and hmac.compare_digest(candidate.encode(), self.token.encode()):
                return None
        return error(401, "open the URL with ?token=TOKEN that pickrank label printed")

    def _route(self, req: Request) -> Reply:
        if req.method == "GET" and req.path == "/" and self.token and "token" in req.query:
            return self._login(req.query["token"][0])
        refused = self._allowed(req)
        if refused is not None:
            return refused
        if req.method == "GET" and req.path == "/":
            return Reply(200, self.page, "text/html; charset=utf-8",
                         {"Content-Security-Policy": self.policy, "Cache-Control": "no-store",
                          "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})
        if req.method == "GET" and req.path == "/api/state":
            return json_reply(200, self.session.state())
        if req.method == "POST" and req.path in ("/api/answer", "/api/undo"):
            return self._post(req)
        image = _IMAGE.fullmatch(req.path) if req.method == "GET" else None
        if image is not None and int(image.group(1)) < len(self.session.pool.candidates):
            return self._picture(int(image.group(1)))
        return error(404, "not found")

    def _login(self, given: str) -> Reply:
        if not hmac.compare_digest(given.encode(), (self.token or "").encode()):
            return error(401, "wrong token")
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        return Reply(303, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie, "Cache-Control": "no-store"})

    def _post(self, req: Request) -> Reply:
        if not req.headers.get("content-type", "").lower().startswith("application/json"):
            return error(415, "send JSON (Content-Type: application/json)")
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return error(400, "the body is not JSON")
        if req.path == "/api/undo":
            return json_reply(200, self.session.undo())
        if not isinstance(body, dict) or not isinstance(body.get("pair"), int) or isinstance(body["pair"], bool):
            return error(400, 'give {"pair": ID, "answer": "left" | "right" | "tie" | "skip"}')
        try:
            return json_reply(200, self.session.answer(body["pair"], str(body.get("answer"))))
        except ValueError as e:
            return error(400, str(e))
        except StalePair as e:
            return error(409, f"{e}: reload the page")

    def _picture(self, cid: int) -> Reply:
        images = self.session.images
        if images is None:
            return error(404, "not found")
        made = images.get(cid)
        if isinstance(made, str):
            return error(422, f"this image cannot be shown: {made}")
        return Reply(200, made, "image/jpeg", {"Cache-Control": "private, max-age=3600"})


def handler_for(app: LabelApp) -> type[BaseHTTPRequestHandler]:
    """A request handler class that hands every request to `app` (keep-alive HTTP/1.1, no access log)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "pickrank-label"
        sys_version = ""

        def _answer(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                reply = error(413, f"a request body of at most {MAX_BODY} bytes")
                self.close_connection = True
            else:
                body = self.rfile.read(length) if length > 0 else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = app.handle(Request(self.command, url.path, urllib.parse.parse_qs(url.query), headers, body))
            self.send_response(reply.status)
            for name, value in {"Content-Type": reply.content_type, "Content-Length": str(len(reply.body)),
                                "X-Content-Type-Options": "nosniff", **reply.headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    return Handler


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host headers a loopback server answers: its address, and localhost, with the port."""
    names = {host, "localhost", "127.0.0.1", "[::1]"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    return frozenset(f"{n}:{port}".lower() for n in names)


def serve(app_for: Callable[[int], LabelApp], host: str, port: int, on_listening: Callable[[str], None]) -> None:
    """Listen on host:port (0: a free port), build the app for the port, say the URL, serve until a stop signal
    (KeyboardInterrupt or `errors.Terminated` from the command's handlers ends it; the socket is closed)."""
    from pickrank.serve.server import bind, url_of

    sock = bind(host, port)
    server = ThreadingHTTPServer(sock.getsockname()[:2], handler_for(app_for(sock.getsockname()[1])),
                                 bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    try:
        on_listening(url_of(sock))
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        sys.stderr.flush()


__all__ = ["COOKIE", "Reply", "Request", "LabelApp", "json_reply", "error", "handler_for", "allowed_hosts", "serve"]
