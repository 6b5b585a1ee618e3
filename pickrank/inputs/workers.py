"""The decode worker pool: processes that decode and preprocess images (`decode.py`) off the main process.

Workers are forked from a fork server that imported this module once (`pickrank.inputs.forkserver`), never
`__main__`; they ignore the stop signals (the parent shuts them down) and end within a second of the parent's death.
A worker's unit returns a failure as a `ReadError` instance (exceptions pickle) instead of raising it, so that one
bad file never costs the chunk it came with.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from pickrank.inputs.decode import Decoded, ImageSpec, decode_and_preprocess
from pickrank.inputs.files import ReadError
from pickrank.signals import ignore_stop_signals


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for decode jobs: forkserver on POSIX (workers inherit no threads or locks of this process),
    each worker forked from a server that imported this module once (`pickrank.inputs.forkserver`), never
    `__main__`."""
    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    if os.name == "posix":
        ctx.set_forkserver_preload(["pickrank.inputs.forkserver"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(),))


def close_pool(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down, dropping queued jobs. An OSError from its internals meanwhile (a wake-up pipe already
    closed after an interrupt: CPython 3.11's executor) must not replace the reason the run is stopping."""
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except OSError:
        pass


def worker_init(parent: int | None = None) -> None:
    """Initialise a decode worker process: deaf to stop signals, gone within a second of its parent (`parent`'s pid)."""
    ignore_stop_signals()
    if parent is not None:
        threading.Thread(target=_exit_after, args=(parent,), name="pickrank-parent-watch", daemon=True).start()
    # One image per worker at a time: numpy/Pillow must not fan out into more threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _exit_after(pid: int) -> None:
    """End this process once process `pid` has ended (SIGKILL, the OOM killer): no pool is left to stop it, and it
    would keep the run's stdout, its fork server and resource tracker alive."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has ended
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(0.5)
    else:
        select.select([fd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (as far as this process can tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has taken the number: ours is gone
        return False
    return True


def decode_job(key: str, data: bytes, spec: ImageSpec, max_pixels: int | None) -> Decoded | ReadError:
    """A worker's unit (no torch imported here, so workers stay small): pixels, or why not as a ReadError
    (`TooLarge` over max_pixels), returned rather than raised."""
    try:
        return decode_and_preprocess(key, data, spec, max_pixels)
    except ReadError as e:
        return e.with_traceback(None)  # its frames hold the image's bytes
    except Exception as e:  # a decoder bug must not kill the run: report it like any bad file
        return ReadError(f"cannot decode: {type(e).__name__}: {e}")


def decode_many(jobs: list[tuple[str, bytes]], spec: ImageSpec,
                max_pixels: int | None) -> list[Decoded | ReadError]:
    """decode_job over a chunk of images (one round trip to a worker)."""
    return [decode_job(key, data, spec, max_pixels) for key, data in jobs]
