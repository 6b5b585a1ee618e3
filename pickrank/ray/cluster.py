"""The one place pickrank starts or joins Ray: the import with its install hint, and `ray.init` at an address (or
$RAY_ADDRESS) or on a local Ray started for the run, keeping the CLI's SIGTERM handler."""

from __future__ import annotations

import logging
import os
import re
import signal
from typing import Any

from pickrank.errors import RayClusterError, RayNotInstalled
from pickrank.signals import handlers

RAY_MISSING = "--engine ray needs Ray: pip install 'pickrank[ray]'"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def require_ray() -> Any:
    """The ray module, or RayNotInstalled with the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra)
    except ImportError:
        raise RayNotInstalled(RAY_MISSING) from None
    return ray


def plain(text: str) -> str:
    """Text without terminal colours (Ray's error messages carry them)."""
    return _ANSI.sub("", text)


def first_line(e: BaseException) -> str:
    """The first line of an error's text, without terminal colours; its type's name when it has none."""
    text = plain(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def join_or_start(address: str | None) -> bool:
    """Connect to Ray at `address` (else $RAY_ADDRESS), or start a local one; True when this call started or joined
    it (the caller shuts it down), False when Ray was already initialised in this process (used as it is).

    ray.init installs a SIGTERM handler of its own: the one before it (the CLI's turns SIGTERM into exit 143) is
    put back. RayClusterError when Ray cannot be started or reached."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"address": address} if address else {"address": "local", "include_dashboard": False}
    try:
        with handlers(signal.getsignal(signal.SIGTERM), (signal.SIGTERM,)):
            ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)
    except Exception as e:
        where = f"at {address}" if address else "locally"
        raise RayClusterError(f"cannot start or reach Ray {where}: {first_line(e)}") from e
    return True


__all__ = ["RAY_MISSING", "require_ray", "plain", "first_line", "join_or_start"]
