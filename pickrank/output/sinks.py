"""What a run hands its results to: the `Closable` and `Sink` protocols, the provenance hand-over, and the guarded
write of one ranking."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from pickrank.errors import OutputError
from pickrank.records import Record

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


class Closable(Protocol):
    """An output a command's lifecycle finishes: kept, given up, or never written at all."""

    def close(self) -> None:
        """Keep it: the run finished or was interrupted (whatever was written is whole)."""

    def discard(self) -> None:
        """The run failed: an earlier file at the same place is left as it was."""

    def abandon(self) -> None:
        """The run would overwrite one of its inputs: nothing at all is written."""


class Sink(Closable, Protocol):
    """Where finished rankings go: the record writers, the HTML gallery, --meta, compare's gathering."""

    wants_meta: bool  # takes the run's provenance (set_meta) before its first ranking

    def write(self, records: tuple[Record, ...]) -> None:
        """One finished ranking, whole (an interrupt lands between rankings)."""

    def set_meta(self, meta: dict) -> None:
        """The run's provenance (`Provenance.as_dict()`), once the model has loaded."""

    def describe(self) -> str:
        """How messages name this output: "-o out.csv", "--html page.html", "stdout"."""


class SinkBase:
    """What most sinks share: no provenance wanted, abandoning is discarding."""

    wants_meta = False

    def set_meta(self, meta: dict) -> None:
        """Not wanted (wants_meta is False)."""

    def discard(self) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        self.discard()


class MetaHandOver:
    """Hands the run's provenance to the sinks that want it, once: computed only when one does (the weight hashes
    cost a read of the weights the first time), and only from a model that loaded."""

    def __init__(self, sinks: Sequence[Sink], embedder: ImageTextEmbedder, compute: Callable[[], dict]) -> None:
        self.takers = [s for s in sinks if s.wants_meta]
        self.embedder, self.compute = embedder, compute
        self.done = not self.takers

    def give(self) -> None:
        """Compute the provenance and hand it over (waits for the model; a failed load raises its error)."""
        if not self.done:
            meta = self.compute()
            for sink in self.takers:
                sink.set_meta(meta)
            self.done = True

    def give_if_loaded(self) -> None:
        """For a run that is failing or interrupted: hand it over if the model has loaded, never raising (the page
        of an interrupted run still says which model ran; the run's own error is the one reported)."""
        if self.done or not self.embedder.ready or self.embedder.error() is not None:
            return
        try:
            self.give()
        except Exception as e:  # the run's own error or interrupt matters more
            log.warning("provenance left out: %s", e)


def write_ranking(sink: Sink, records: tuple[Record, ...]) -> None:
    """Hand a ranking to a sink; a failed write (a full disk, /dev/full) is an output error naming the output."""
    try:
        sink.write(records)
    except BrokenPipeError:
        raise  # the reader went away: a quiet stop (the CLI's exit code 0)
    except OSError as e:
        raise OutputError(f"{sink.describe()}: {e.strerror or e}") from None


def abandon(sinks: list[Closable]) -> None:
    """Write no output at all: temp files removed, the HTML page not rendered."""
    for sink in sinks:
        try:
            sink.abandon()
        except Exception:
            pass  # clean-up of a run that is already failing
    sinks.clear()
