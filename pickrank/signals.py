"""The signals that stop a run, and the one way to change their handlers for the length of a block."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Union

# Ctrl-C, and SIGTERM / SIGHUP (timeout, Slurm, systemd, docker stop, a closed terminal).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                                      if hasattr(signal, name))

Handler = Union[Callable[[int, object], object], int, signal.Handlers]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def set_handlers(handler: Handler, signals: tuple[int, ...] = STOP_SIGNALS) -> list[tuple[int, object]]:
    """Give `signals` this handler (main thread only: elsewhere nothing changes); returns the previous handlers.

    A signal whose handler was not set from Python (`getsignal` is None) is left alone: it cannot be put back."""
    saved: list[tuple[int, object]] = []
    if not _in_main_thread():
        return saved
    for sig in signals:
        if signal.getsignal(sig) is not None:
            saved.append((sig, signal.signal(sig, handler)))
    return saved


def restore_handlers(saved: list[tuple[int, object]]) -> None:
    """Put each handler back, even if a signal arriving meanwhile raises (each restore in its own `finally`)."""
    if saved:
        sig, handler = saved[0]
        try:
            signal.signal(sig, handler)  # type: ignore[arg-type]
        finally:
            restore_handlers(saved[1:])


@contextlib.contextmanager
def handlers(handler: Handler, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block `handler` handles `signals` (main thread only); the previous handlers come back after it."""
    saved = set_handlers(handler, signals)
    try:
        yield
    finally:
        restore_handlers(saved)


@contextlib.contextmanager
def noted(into: list[int], signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of `signals` is appended to `into` instead of acting."""
    with handlers(lambda n, _frame: into.append(n), signals):
        yield


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving inside the block take effect as it ends.

    Around a pool's submit: it may start a worker, and a worker whose start is interrupted halfway waits forever
    for its start-up data, and the pool's shutdown with it. (Signal handlers belong to the main thread: elsewhere
    this does nothing.)
    """
    caught: list[int] = []
    try:
        with noted(caught):
            yield
    finally:
        for sig in caught:
            signal.raise_signal(sig)


def ignore_stop_signals() -> None:
    """Ignore STOP_SIGNALS in a helper process: they go to the whole process group, and a worker killed halfway
    through a transfer would hang its pool; the parent shuts its workers down instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
