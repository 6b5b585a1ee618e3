"""The candidate sets' images, listed in a background thread ahead of the engine: the run knows how many images it
has as soon as listing ends (folders: at once), while the engine already reads, decodes and embeds the first.

Listing stays lazy where it was (stdin, globs, a CSV's cells): nothing waits for it to end. An error raised while
listing a set (an output that is also an input) reaches the engine where it takes that set's images, as it did
when the engine listed them itself.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterator, Sequence

from pickrank.records import CandidateSet, Item


class Discovery:
    """Every set's images, pulled from its `paths` in a daemon thread; `paths(i)` yields set i's in order;
    `on_finished()` runs in that thread once all are listed."""

    def __init__(self, sets: Sequence[CandidateSet], on_finished: Callable[[], None] | None = None) -> None:
        self.found = 0  # images listed so far
        self.finished = False  # every set is listed: `found` is the run's total
        self._queues: list[collections.deque[Item]] = [collections.deque() for _ in sets]
        self._ended = [s.error is not None for s in sets]  # an error set lists nothing
        self._errors: dict[int, BaseException] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._on_finished = on_finished  # called in the listing thread once `finished`
        threading.Thread(target=self._list, args=(list(sets),), name="pickrank-discover", daemon=True).start()

    def _list(self, sets: list[CandidateSet]) -> None:
        for i, s in enumerate(sets):
            if s.error is not None:
                continue
            try:
                for item in s.paths:
                    with self._cond:
                        if self._stopped:
                            return
                        self._queues[i].append(item)
                        self.found += 1
                        self._cond.notify_all()
            except BaseException as e:  # raised again where the engine takes this set's images
                with self._cond:
                    self._errors[i] = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._ended[i] = True
                self._cond.notify_all()
        with self._cond:
            self.finished = True
            self._cond.notify_all()
        if self._on_finished is not None:
            self._on_finished()

    def paths(self, i: int) -> Iterator[Item]:
        """Set i's images, in order, as they are listed."""
        while True:
            with self._cond:
                while not self._queues[i] and not self._ended[i] and i not in self._errors:
                    self._cond.wait(0.5)  # a timeout: Ctrl-C is seen here
                if self._queues[i]:
                    item = self._queues[i].popleft()
                elif i in self._errors:
                    raise self._errors.pop(i)
                else:
                    return
            yield item

    def close(self) -> None:
        """Stop listing (the run is over, or interrupted)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
