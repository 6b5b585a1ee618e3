"""`pickrank filter --reshard DIR`: new webdataset shards holding only the kept samples, every member of each
sample copied byte for byte, in the dataset's order; each shard (DIR/00000.tar, ...) written atomically when full.

The source shards are read again as streams, with the same guards as for scoring: a member is never followed or
extracted, and a sample that was unusable then is not copied now.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from typing import TYPE_CHECKING, Any

from pickrank.errors import OutputError, UsageError
from pickrank.inputs.datasets.paths import dataset_kind
from pickrank.inputs.datasets.samples import ShardError
from pickrank.inputs.datasets.sets import shard_identity
from pickrank.inputs.datasets.webdataset import RawSample, raw_samples
from pickrank.output.targets import Output
from pickrank.signals import signals_deferred

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("pickrank")
DEFAULT_SAMPLES_PER_SHARD = 10_000


def check_reshard_folder(folder: str) -> None:
    """The folder exists (made now if missing) and holds no shard yet: new shards never replace or mix with others."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--reshard {folder}: cannot make the folder: {e.strerror or e}") from None
    taken = sorted(n for n in os.listdir(folder) if dataset_kind(n) == "tar")
    if taken:
        raise UsageError(f"--reshard {folder}: already holds shards ({taken[0]}, ...): give an empty folder")


class _ShardWriter:
    """The output shard being filled: a tar stream into a temp file, renamed into place when full or at the end."""

    def __init__(self, folder: str, per_shard: int) -> None:
        self.folder, self.per_shard = folder, per_shard
        self.index = 0  # the next shard's number
        self.count = 0  # samples in the open shard
        self.out: Output | None = None
        self.tar: tarfile.TarFile | None = None

    def add(self, sample: RawSample) -> None:
        if self.tar is None:
            self.out = Output(os.path.join(self.folder, f"{self.index:05d}.tar"), label="--reshard", binary=True)
            self.tar = tarfile.open(fileobj=self.out.stream, mode="w|")
        for m in sample.members:
            info = tarfile.TarInfo(m.name)
            info.size, info.mtime, info.mode = len(m.data or b""), int(m.mtime), 0o644
            self.tar.addfile(info, io.BytesIO(m.data or b""))
        self.count += 1
        if self.count >= self.per_shard:
            self.seal()

    def seal(self) -> None:
        """Finish the open shard: its end blocks written, the file renamed into place."""
        if self.tar is None:
            return
        with signals_deferred():  # a stop signal lands after the rename: never a half-written shard
            self.tar.close()
            self.out.close()  # type: ignore[union-attr]
        self.tar, self.out, self.count = None, None, 0
        self.index += 1

    def discard(self) -> None:
        if self.out is not None:
            self.out.discard()
        self.tar, self.out = None, None


class Resharder:
    """Gathers the kept keys per source shard, then copies those samples into new shards (a `KeptSink`)."""

    def __init__(self, folder: str, per_shard: int, scored: dict[str, tuple[int, int]],
                 max_bytes: int | None) -> None:
        self.writer = _ShardWriter(folder, per_shard)
        self.scored, self.max_bytes = scored, max_bytes
        self.keys: dict[str, set[str]] = {}  # source shard -> kept keys, shards in dataset order
        self.copied = self.failed = 0

    def take(self, kept: pa.Table) -> None:
        for shard, key in zip(kept.column("shard").to_pylist(), kept.column("key").to_pylist()):
            self.keys.setdefault(shard, set()).add(key)

    def _check_sources(self) -> None:
        for shard in self.keys:
            if dataset_kind(shard) != "tar":
                raise UsageError(f"--reshard copies webdataset samples; {shard} is not a tar shard")
            then = self.scored.get(shard)
            if then is not None and shard_identity(shard) != then:
                raise UsageError(f"--reshard: {shard} changed since it was scored: score it again first")

    def finish(self, summary: dict[str, Any]) -> None:
        self._check_sources()
        try:
            for shard, keys in self.keys.items():
                self._copy(shard, keys)
            self.writer.seal()
        except BaseException:
            self.writer.discard()
            raise

    def _copy(self, shard: str, keys: set[str]) -> None:
        """The kept samples of one source shard, in its order; those not found whole are counted and said."""
        left = set(keys)
        try:
            for sample in raw_samples(shard, self.max_bytes):
                if sample.key in left and sample.error is None:
                    left.discard(sample.key)
                    self.writer.add(sample)
                    self.copied += 1
        except ShardError as e:
            log.warning("%s: %s", shard, e)
        if left:
            self.failed += len(left)
            log.warning("%s: %d kept sample(s) not copied (gone or unusable now), e.g. %r", shard, len(left),
                        sorted(left)[0])

    def close(self) -> None:
        """Every shard is sealed as it fills; nothing is left open."""

    def discard(self) -> None:
        self.writer.discard()

    def abandon(self) -> None:
        self.discard()
