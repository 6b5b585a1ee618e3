"""`pickrank serve`: PickScore rewards over HTTP (`pickrank.serve`; on Ray Serve with --engine ray)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import Opt, Opts, with_options
from pickrank.errors import UsageError
from pickrank.options import CommandOptions, EngineName, EngineOptions, ModelOptions, RunOptions


@with_options(ModelOptions, (RunOptions, "workers", "max_pixels", "scale"), (EngineOptions, "engine", "ray_address"),
              CommandOptions)
def serve(
    host: Annotated[str, Opt(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, help="Port (0: a free one; the URL is printed on stderr).")] = 8765,
    max_batch: Annotated[int, Opt(min=1, help="Images per model call, across requests.")] = 64,
    max_wait_ms: Annotated[float, Opt(min=0, help="How long a request waits for others to share its batch.")]
    = 10.0,
    max_queue: Annotated[int, Opt(min=1, help="Images accepted and not yet answered; beyond, 503 with "
                                  "Retry-After.")] = 2048,
    max_body_mb: Annotated[float, Opt(min=0.001, help="Largest request body in MiB (413 beyond).")] = 256.0,
    max_images: Annotated[int, Opt(min=1, help="Most images in one request (413 beyond).")] = 1024,
    token: Annotated[Optional[str], Opt(envvar="PICKRANK_TOKEN", help="Bearer token every request must carry "
                                        "(Authorization: Bearer TOKEN) [default: $PICKRANK_TOKEN].")] = None,
    insecure_no_auth: Annotated[bool, Opt("--insecure-no-auth", help="Serve a non-loopback --host without a "
                                          "token.")] = False,
    replicas: Annotated[Optional[int], Opt(min=1, help="Model replicas on Ray (engine ray) [default: 1 per GPU, "
                                           "else 1].")] = None,
    *, opts: Opts,
) -> None:
    """Serve PickScore rewards over HTTP, batched across callers (needs the serve extra of pickrank).

    POST /v1/score and /v1/rank take JSON (base64 images), a multipart form or a safetensors body of uint8
    images; GET /healthz, /v1/info, /metrics; API docs at /docs. Scores are in the scale option's unit unless a request
    asks for another. SIGTERM stops it gracefully (exit 0).

    Example: pickrank serve --port 8765 --max-batch 64
    """
    with Command(opts.command):
        token = token or None  # PICKRANK_TOKEN= set empty is no token
        _check_exposure(host, token, insecure_no_auth)
        try:
            from pickrank.serve.requests import ServeLimits
        except ImportError as e:  # the serve extra is not installed
            raise UsageError(f"pickrank serve needs the serve extra: pip install 'pickrank[serve]' ({e})") from None

        limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_body_mb=max_body_mb, max_images=max_images, max_pixels=opts.run.max_pixels,
                             workers=_serve_workers(opts.run.workers))
        model = replace(opts.model, batch_size=opts.model.batch_size or max_batch)
        if opts.engine.engine is EngineName.ray:
            from pickrank.ray.cluster import require_ray

            require_ray()  # without the extra: a one-line usage error
            from pickrank.ray.serve import serve_ray

            serve_ray(model, limits, host, port, token, opts.run.scale, replicas, opts.engine.ray_address)
            return
        if replicas is not None:
            raise UsageError("--replicas needs --engine ray")
        _serve_local(model, limits, host, port, token, opts.run.scale)


# TEMPORARY (moves to pickrank.serve when the serve split lands)
def _is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost): reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Binding beyond loopback needs a token, or --insecure-no-auth said out loud."""
    if token is not None and insecure_no_auth:
        raise UsageError("give --token or --insecure-no-auth, not both")
    if not _is_loopback(host) and token is None and not insecure_no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or set "
                         "PICKRANK_TOKEN), or --insecure-no-auth to serve without authentication")


def _serve_workers(workers: int | None) -> int:
    """Decode processes of the server: as the CLI's --workers [default: one per CPU, at most 8]."""
    from pickrank.core.engine import default_workers

    return default_workers() if workers is None else workers


def _serve_local(model, limits, host: str, port: int, token: str | None, scale) -> None:
    """Listen first (the URL on stderr), load the model in the background (/healthz: 503 meanwhile), serve until a
    stop signal; a model that fails to load stops the server with its error."""
    import logging
    import sys

    from pickrank.cli.lifecycle import load_embedder
    from pickrank.serve.app import create_app
    from pickrank.serve.server import bind, graceful_server, stop_if_load_fails, url_of

    sock = bind(host, port)
    embedder = load_embedder(model)
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
    logging.getLogger("pickrank").info("stopped")
