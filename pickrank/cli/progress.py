"""The one progress bar on stderr: what a run is doing (discovering, downloading the model, loading it, embedding N
of M images with a rate and an ETA), drawn from the engine's and the model loader's `records.Progress` events.

The engine counts; this module only draws. The bar is redrawn twice a second while it is up (its clock never
freezes), at once when something notable happens (a new phase, the total becoming known, the last image), and it
steps aside before anything is written to the terminal: a "writing" event clears its line until the next event,
and log lines are printed above it (`write_line`). On anything but a terminal, or with --quiet, there is no bar.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from dataclasses import replace
from typing import IO, Callable, Iterator

from pickrank.records import Progress

_active: "ProgressBar | None" = None  # the bar on screen, which log lines go above


def write_line(text: str, stream: IO[str] | None = None) -> None:
    """One line on stderr, above the progress bar when one is up."""
    bar = _active
    if bar is not None:
        bar.write_line(text)
    else:
        print(text, file=stream or sys.stderr)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _meter(done: int, total: int, width: int = 12) -> str:
    filled = round(width * min(1.0, done / total)) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


class _Rate:
    """Items per second since a phase began (from its own first item on)."""

    def __init__(self, done: int = 0) -> None:
        self.start, self.done0 = time.monotonic(), done

    def per_second(self, done: int) -> float | None:
        elapsed = time.monotonic() - self.start
        return (done - self.done0) / elapsed if done > self.done0 and elapsed > 0 else None


class ProgressBar:
    """The bar: call it with each Progress event (from any thread); `close()` clears it."""

    TICK = 0.5  # seconds between redraws

    def __init__(self, stream: IO[str], unit: str = "images", singular: str = "img") -> None:
        self.stream, self.unit, self.singular = stream, unit, singular
        self.lock = threading.RLock()
        self.work = Progress("discovering")
        self.download: Progress | None = None
        self.started = time.monotonic()
        self.rates: dict[str, _Rate] = {}
        self.shown = self.paused = self.closed = self.ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="pickrank-progress", daemon=True)
        self._thread.start()

    # -- events -----------------------------------------------------------------------------------------
    def __call__(self, event: Progress) -> None:
        with self.lock:
            if event.phase == "downloading":
                self._downloading(event)
            elif event.phase == "writing":
                self._clear()
                self.paused = True
            else:
                self._working(event)

    def _downloading(self, event: Progress) -> None:
        notable = self.download is None or self.download.detail != event.detail
        if notable:
            self.rates["downloading"] = _Rate(event.done)
        finished = event.total is not None and event.done >= event.total
        self.download = None if finished else event
        if notable or finished:
            self._draw()

    def _working(self, event: Progress) -> None:
        if event.phase == "loading" and self.ready:  # counted just before the load ended
            event = replace(event, phase="embedding")
        self.ready = self.ready or event.phase == "embedding"
        old = self.work
        if event.phase != old.phase:
            self.rates[event.phase] = _Rate(event.done)  # a rate counts from its phase's start
        notable = (event.phase != old.phase or (event.total is not None and old.total is None)
                   or (event.total is not None and event.done >= event.total > old.done) or self.paused)
        self.work, self.paused = event, False
        if notable:
            self._draw()

    def model_ready(self) -> None:
        """The model has loaded: from now on the run is embedding (not waiting for the load)."""
        with self.lock:
            if not self.ready:
                self._working(replace(self.work, phase="embedding"))

    def on_loaded(self, then: Callable[[object], None]) -> Callable[[object], None]:
        """A model-loaded hook: `then(embedder)` (say what loaded), and the bar leaves "loading"."""
        def loaded(embedder: object) -> None:
            then(embedder)
            self.model_ready()

        return loaded

    def counter(self, phase: str, total: int | None) -> Callable[[int], None]:
        """A callback counting items done one call at a time (eval's pairs), shown as `phase` N of `total`."""
        done = [0]

        def count(n: int = 1) -> None:
            done[0] += n
            self(Progress(phase, done[0], total))

        return count

    # -- drawing ----------------------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self.lock:
                if not self.paused and not self.closed:
                    self._draw()

    def _line(self) -> str:
        elapsed = _clock(time.monotonic() - self.started)
        if self.download is not None:
            return self._download_line()
        w = self.work
        if w.phase == "discovering":
            return f"pickrank: discovering {self.unit}  {elapsed}"
        extras = ", ".join(x for x in (f"{w.cached:,} cached" if w.cached else "",
                                       f"{w.failed:,} failed" if w.failed else "") if x)
        extras = f"  ({extras})" if extras else ""
        if w.phase == "loading":
            found = f"{w.total:,} {self.unit}" if w.total is not None else f"{self.unit} still being listed"
            return f"pickrank: loading the model  {elapsed}  ({found}){extras}"
        return f"pickrank: {w.phase}  {self._count(w)}{self._speed(w)}  {elapsed}{extras}"

    def _count(self, w: Progress) -> str:
        if w.total is None:
            return f"{w.done:,} {self.unit} (more still being listed)"
        pct = 100 * w.done / w.total if w.total else 100.0
        return f"{w.done:,}/{w.total:,} {self.unit} {_meter(w.done, w.total)} {pct:3.0f}%"

    def _speed(self, w: Progress) -> str:
        rate = self.rates.get(w.phase)
        per_s = rate.per_second(w.done) if rate is not None else None
        if not per_s:
            return ""
        speed = f"{1 / per_s:.1f} s/{self.singular}" if per_s < 1 else f"{per_s:.1f} {self.singular}/s"
        left = f", {_clock((w.total - w.done) / per_s)} left" if w.total is not None and w.total > w.done else ""
        return f"  {speed}{left}"

    def _download_line(self) -> str:
        d = self.download
        assert d is not None
        rate = self.rates.get("downloading")
        per_s = rate.per_second(d.done) if rate is not None else None
        speed = f"  {_size(per_s)}/s" if per_s else ""
        if d.total:
            left = f", {_clock((d.total - d.done) / per_s)} left" if per_s else ""
            return (f"pickrank: downloading {d.detail}  {_size(d.done)}/{_size(d.total)} {_meter(d.done, d.total)} "
                    f"{100 * d.done / d.total:3.0f}%{speed}{left}")
        return f"pickrank: downloading {d.detail}  {_size(d.done)}{speed}"

    def _draw(self) -> None:
        if self.closed:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        line = self._line()[:max(10, width - 1)]  # never wraps: a wrapped line could not be cleared
        self._write("\r" + line + "\x1b[K")
        self.shown = True

    def _clear(self) -> None:
        if self.shown:
            self._write("\r\x1b[K")
            self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away (a hang-up): the bar is not worth an error
            self.closed = True

    def write_line(self, text: str) -> None:
        """A line of text above the bar (the bar is drawn again below it)."""
        with self.lock:
            self._clear()
            self._write(text + "\n")
            if not self.paused:
                self._draw()

    def close(self) -> None:
        """Stop drawing and clear the line."""
        with self.lock:
            self._clear()
            self.closed = True
        self._stop.set()


class NoBar:
    """What commands get when there is no bar (--quiet, or stderr is not a terminal): it ignores every event."""

    def __call__(self, event: Progress) -> None:
        """Nothing to draw."""

    def on_loaded(self, then: Callable[[object], None]) -> Callable[[object], None]:
        return then

    def counter(self, phase: str, total: int | None) -> Callable[[int], None]:
        return lambda n=1: None

    def model_ready(self) -> None:
        """Nothing to draw."""


@contextlib.contextmanager
def progress_bar(quiet: bool, unit: str = "images", singular: str = "img") -> Iterator[ProgressBar | NoBar]:
    """The run's bar on stderr for the block (none when quiet or stderr is not a terminal); cleared at the end."""
    global _active
    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if quiet or not tty:
        yield NoBar()
        return
    bar = ProgressBar(stream, unit, singular)
    _active = bar
    try:
        yield bar
    finally:
        _active = None
        bar.close()
