"""`pickrank serve`: PickScore rewards over HTTP (`pickrank.serve`; on Ray Serve with --engine ray)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Optional

from pickrank.cli.lifecycle import Command, load_embedder
from pickrank.cli.shared import ENGINE, SERVER, Opt, Opts, with_options
from pickrank.errors import UsageError
from pickrank.options import CommandOptions, EngineOptions, ModelOptions, RunOptions


def _server(metavar: str, help: str, **kw: Any) -> Any:  # noqa: A002 - typer's name
    """An option of the Server help panel."""
    return Opt(metavar=metavar, panel=SERVER, help=help, **kw)


@with_options(ModelOptions, (RunOptions, "workers", "max_pixels", "scale"), (EngineOptions, "engine", "ray_address"),
              CommandOptions)
def serve(
    host: Annotated[str, _server("HOST", "Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, _server("PORT", "Port (0: a free one; the URL is printed on stderr).", min=0, max=65535)]
    = 8765,
    max_batch: Annotated[int, _server("N", "Images per model call, across requests.", min=1)] = 64,
    max_wait_ms: Annotated[float, _server("MS", "How long a request waits for others to share its batch.", min=0)]
    = 10.0,
    max_queue: Annotated[int, _server("N", "Images accepted and not yet answered; beyond, 503 with Retry-After.",
                                      min=1)] = 2048,
    max_body_mb: Annotated[float, _server("MB", "Largest request body in MiB (413 beyond).", min=0.001)] = 256.0,
    max_images: Annotated[int, _server("N", "Most images in one request (413 beyond).", min=1)] = 1024,
    token: Annotated[Optional[str], _server("TOKEN", "Bearer token every request must carry (Authorization: Bearer "
                                            "TOKEN) [default: $PICKRANK_TOKEN].", envvar="PICKRANK_TOKEN")] = None,
    insecure_no_auth: Annotated[bool, Opt("--insecure-no-auth", panel=SERVER,
                                          help="Serve a non-loopback --host without a token.")] = False,
    replicas: Annotated[Optional[int], Opt(min=1, metavar="N", panel=ENGINE,
                                           help="Model replicas on Ray (engine ray) [default: 1 per GPU, else 1].")]
    = None,
    *,
    max_inflight_mb: Annotated[float, _server("MB", "Memory the request bodies may take at once, in MiB, each counted "
                                              "twice while parsed (503 with Retry-After beyond).", min=0.001)] = 1024.0,
    read_timeout_s: Annotated[float, _server("S", "Seconds a client has to send a request's headers, and again its "
                                             "body (408 beyond).", min=0.001)] = 60.0,
    max_connections: Annotated[int, _server("N", "Open connections (the next gets 503 and is closed).", min=1)] = 512,
    grace_s: Annotated[float, _server("S", "After SIGTERM, seconds for the requests received to be answered (503 "
                                      "beyond; bodies still arriving get 503 at once).", min=0)] = 30.0,
    opts: Opts,
) -> None:
    """Serve PickScore rewards over HTTP, batched across callers (needs the serve extra of pickrank).

    POST /v1/score and /v1/rank take JSON (base64 images), a multipart form or
    a safetensors body of uint8 images; GET /healthz, /v1/info, /metrics; API
    docs at /docs. Scores are in the --scale unit unless a request asks for
    another. SIGTERM stops it gracefully within --grace-s seconds (exit 0).

    Examples:
      $ pickrank serve --port 8765 --max-batch 64
      $ pickrank serve --host 0.0.0.0 --token "$PICKRANK_TOKEN"
      $ pickrank serve --engine ray --replicas 4
    """
    with Command(opts.command):
        token = token or None  # PICKRANK_TOKEN= set empty is no token
        from pickrank.serve.server import check_exposure, check_limits, serve_workers

        check_exposure(host, token, insecure_no_auth)
        try:
            from pickrank.serve.requests import ServeLimits
            from pickrank.serve.server import serve_on
        except ImportError as e:  # the serve extra is not installed
            raise UsageError(f"pickrank serve needs the serve extra: pip install 'pickrank[serve]' ({e})") from None

        limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_body_mb=max_body_mb, max_images=max_images, max_pixels=opts.run.max_pixels,
                             workers=serve_workers(opts.run.workers), max_inflight_mb=max_inflight_mb,
                             read_timeout_s=read_timeout_s, max_connections=max_connections, grace_s=grace_s)
        check_limits(limits)
        model = replace(opts.model, batch_size=opts.model.batch_size or max_batch)
        serve_on(opts.engine, model, limits, host, port, token, opts.run.scale, replicas=replicas, load=load_embedder)
