"""Imported only by the decode pool's fork server (multiprocessing's forkserver preload), which forks the workers.

It loads what the workers need once (`workers`, with numpy and Pillow; no torch), and keeps the workers' start-up
failures to one line. A worker still starting when the run is interrupted (Ctrl-C, SIGTERM) finds the pool's
semaphores and pipes already gone; multiprocessing would print that traceback on the shared stderr, after the
main process has said "interrupted" in one line. Those failures (OSError, EOFError) stay quiet; any other says
one line.
"""

from __future__ import annotations

import sys

from pickrank.inputs import workers  # preloaded: the forked workers share it
from pickrank.signals import ignore_stop_signals

__all__ = ["workers"]

# A group signal (Ctrl-C, `timeout`, `kill -TERM -PGID`, a closed terminal) must not kill the fork server while the
# pool still needs it; workers forked from here start deaf to them too. The server ends when its last client does.
ignore_stop_signals()


def _start_failure(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    if issubclass(exc_type, (OSError, EOFError, KeyboardInterrupt)):  # the pool went away while this worker started
        return
    print(f"pickrank: a decode worker failed to start: {exc_type.__name__}: {exc}", file=sys.stderr)


sys.excepthook = _start_failure
