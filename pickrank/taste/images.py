"""The pictures the label page shows: each candidate as a JPEG of at most DISPLAY_SIZE pixels a side, made in the
decode worker processes ahead of time (the pairs coming next), with the same guarded reading as scoring
(regular files only, --max-bytes, --max-pixels, the format told from the first bytes). The browser never gets a
file's own bytes, only what was decoded and encoded here.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Sequence

from pickrank.inputs.workers import close_pool, worker_pool
from pickrank.signals import signals_deferred

DISPLAY_SIZE = 1024
KEEP = 96  # pictures remembered (about 100 KB each)


def display_jpeg(source: str | bytes, size: int, max_pixels: int | None, max_bytes: int | None) -> bytes | str:
    """A JPEG of the image (a file, or a dataset sample's bytes, read within --max-bytes already), long side at
    most `size`, or why there is none (a worker's unit: never raises)."""
    from pickrank.inputs.decode import make_thumbnail, open_image
    from pickrank.inputs.files import ReadError, read_bytes

    try:
        data = source if isinstance(source, bytes) else read_bytes(source, max_bytes)
        return make_thumbnail(open_image(data, max_pixels), size)
    except ReadError as e:
        return str(e)
    except Exception as e:  # a decoder bug costs one picture, not the page
        return f"cannot decode: {type(e).__name__}: {e}"


class DisplayImages:
    """Pictures by candidate id: asked for ahead of time (`prefetch`), made in a worker pool (or in the asking
    thread with no workers), the last KEEP remembered."""

    def __init__(self, paths: Sequence[str | bytes], workers: int, size: int = DISPLAY_SIZE,
                 max_pixels: int | None = None, max_bytes: int | None = None) -> None:
        self.paths, self.size, self.limits = paths, size, (max_pixels, max_bytes)
        self.pool: ProcessPoolExecutor | None = worker_pool(workers) if workers > 0 else None
        self.made: collections.OrderedDict[int, Future | bytes | str] = collections.OrderedDict()
        self.lock = threading.Lock()

    def _make(self, cid: int) -> Future | bytes | str:
        if self.pool is None:
            return display_jpeg(self.paths[cid], self.size, *self.limits)
        with signals_deferred():
            return self.pool.submit(display_jpeg, self.paths[cid], self.size, *self.limits)

    def prefetch(self, cids: Sequence[int]) -> None:
        """Start making these pictures (those not made or being made)."""
        if self.pool is None:
            return
        with self.lock:
            for cid in cids:
                if cid not in self.made:
                    self.made[cid] = self._make(cid)
                self.made.move_to_end(cid)
            self._forget()

    def _forget(self) -> None:
        while len(self.made) > KEEP:
            self.made.popitem(last=False)

    def get(self, cid: int) -> bytes | str:
        """The picture of candidate `cid` (waits for it), or why there is none."""
        with self.lock:
            item = self.made.get(cid)
            if item is None:
                item = self.made[cid] = self._make(cid)
            self.made.move_to_end(cid)
            self._forget()
        if isinstance(item, Future):
            try:
                item = item.result()
            except Exception:  # the pool broke (a worker was killed): make it here
                item = display_jpeg(self.paths[cid], self.size, *self.limits)
            with self.lock:
                if cid in self.made:
                    self.made[cid] = item
        return item

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None


__all__ = ["DISPLAY_SIZE", "display_jpeg", "DisplayImages"]
