"""Webdataset shards: a tar read as a stream (`tarfile` mode "r|*": plain, gzip, bzip2 or xz), member by member,
grouped into samples by key as webdataset does. Nothing is extracted and no member's path is ever followed or
opened: members live in memory one sample at a time, within --max-bytes, each checked before it is read."""

from __future__ import annotations

import io
import json
import lzma
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pickrank.inputs.datasets.samples import Sample, ShardError
from pickrank.inputs.files import ReadError, TooLarge, check_size, open_regular
from pickrank.options import DatasetOptions

# The image members tried, in this order, when --image-key is not given.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# tarfile reads a pax or GNU long-name header whole into memory: one larger than this is taken for damage.
MAX_HEADER_BYTES = 1 << 20
READ_BUFFER = 1 << 20
# tarfile's own stream buffer: it keeps what is left of it after each read by copying it, so a large one costs a
# copy of itself per member header; the file's buffer (READ_BUFFER) does the large reads.
TAR_BUFFER = tarfile.RECORDSIZE
_HEADER_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                           tarfile.GNUTYPE_LONGLINK})
# What reading a damaged tar or compressed stream raises.
_DAMAGE = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Member:
    """One member of a sample: its name in the tar, its extension, and its bytes (None: not read, not wanted)."""

    name: str
    ext: str
    data: bytes | None
    mtime: float = 0.0


@dataclass
class RawSample:
    """The members of one key, as they follow each other in the tar; `error` when the sample is unusable."""

    key: str
    offset: int
    members: list[Member] = field(default_factory=list)
    error: str | None = None

    def member(self, ext: str) -> Member | None:
        return next((m for m in self.members if m.ext == ext), None)


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the member's path up to the first dot of its file name, the extension the
    rest (lower-cased); None for a name without one, which belongs to no sample."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def unsafe_name(name: str) -> bool:
    """A member name that would leave a folder it were written to: absolute, or with a `..` part."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/")


def _not_regular(m: tarfile.TarInfo) -> str | None:
    """What a member that is not a regular file is, or None for a regular one."""
    if m.isreg():
        return None
    return ("a symlink" if m.issym() else "a hard link" if m.islnk() else "a device" if m.ischr() or m.isblk()
            else "a FIFO" if m.isfifo() else "not a regular file")


def _info_class(ends: list[Exception]) -> type[tarfile.TarInfo]:
    """A TarInfo that notes why the archive's iteration stopped (tarfile ends quietly at a bad header after the
    first) and refuses pax and long-name headers larger than MAX_HEADER_BYTES (tarfile reads them whole)."""

    class Info(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):  # type: ignore[no-untyped-def]
            try:
                info = super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as e:
                ends[:] = [e]
                raise
            if info.type in _HEADER_TYPES and info.size > MAX_HEADER_BYTES:
                ends[:] = [tarfile.InvalidHeaderError(f"an extended header of {info.size:,} bytes")]
                raise ends[0]
            return info

    return Info


def _end_problem(ends: list[Exception]) -> str | None:
    """Why an archive whose iteration ended is damaged, or None when it ended with its end-of-archive block."""
    if not ends or isinstance(ends[-1], tarfile.EOFHeaderError):
        return None
    if isinstance(ends[-1], tarfile.EmptyHeaderError):
        return "truncated: the file ends without the end-of-archive blocks"
    if isinstance(ends[-1], tarfile.TruncatedHeaderError):
        return "truncated inside a header"
    return f"corrupt header ({ends[-1]})"


class _Grouper:
    """Members into samples: consecutive members of one key are a sample; a key met again later is a duplicate."""

    def __init__(self, max_bytes: int | None, wanted: Callable[[str], bool] | None) -> None:
        self.max_bytes, self.wanted = max_bytes, wanted
        self.first_at: dict[str, int] = {}
        self.current: RawSample | None = None

    def start(self, key: str, offset: int) -> RawSample | None:
        """Begin the sample of a key; returns the one it ends, if any."""
        done = self.current
        self.current = RawSample(key, offset)
        if key in self.first_at:
            self.current.error = f"duplicate key (first at offset {self.first_at[key]})"
        else:
            self.first_at[key] = offset
        return done

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo, ext: str) -> None:
        """A member of the current sample: checked, then read when wanted (a sample with an error reads no more)."""
        sample = self.current
        if sample is None or sample.error is not None:
            return
        kind = _not_regular(m)
        if unsafe_name(m.name):
            sample.error = f"member {m.name!r} names a path outside the shard: not used"
        elif kind is not None:
            sample.error = f"member {m.name!r} is {kind}: not followed"
        elif sample.member(ext) is not None:
            sample.error = f"member {m.name!r} appears twice"
        elif self.wanted is not None and not self.wanted(ext):
            sample.members.append(Member(m.name, ext, None, m.mtime))
        else:
            try:
                check_size(m.size, self.max_bytes)
            except TooLarge as e:
                sample.error = f"member {m.name!r}: {e}"
                return
            f = tar.extractfile(m)
            sample.members.append(Member(m.name, ext, f.read() if f is not None else b"", m.mtime))


def _open_tar(path: str, ends: list[Exception]) -> tuple[io.BufferedReader, tarfile.TarFile]:
    """The shard open as a tar stream, or ShardError saying why not."""
    try:
        f = io.BufferedReader(open_regular(path), READ_BUFFER)
    except ReadError as e:
        raise ShardError(str(e)) from None
    try:
        return f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_info_class(ends), bufsize=TAR_BUFFER)
    except _DAMAGE as e:
        f.close()
        raise ShardError(f"not a readable tar file ({e})") from None


def raw_samples(path: str, max_bytes: int | None,
                wanted: Callable[[str], bool] | None = None) -> Iterator[RawSample]:
    """The shard's samples in order; members whose extension is not `wanted` are skipped unread (None: every
    member is read). Damage (truncation, a corrupt header or stream) raises ShardError after the samples before it;
    a member with an unsafe name, of another type than a regular file, or over max_bytes makes its sample unusable.
    """
    ends: list[Exception] = []
    f, tar = _open_tar(path, ends)
    group = _Grouper(max_bytes, wanted)
    with f, tar:
        while True:
            in_data = False  # whether damage met now cuts the current sample's member short
            try:
                m = tar.next()
                tar.members.clear()  # a stream's members are never looked up again: memory stays flat
                if m is None:
                    break
                parsed = None if m.isdir() else (m.name, "") if unsafe_name(m.name) else split_name(m.name)
                if parsed is None:
                    continue  # a folder, or no extension: no sample's member, as for webdataset
                if group.current is None or parsed[0] != group.current.key:
                    done = group.start(parsed[0], m.offset)
                    if done is not None:
                        yield done
                in_data = True
                group.add(tar, m, parsed[1])
            except _DAMAGE as e:
                at = tar.offset
                if group.current is not None:
                    if in_data and group.current.error is None:
                        group.current.error = f"cut short by damage to the shard at offset {at}"
                    yield group.current
                raise ShardError(f"truncated or corrupt at offset {at}: {e}") from None
        if group.current is not None:
            yield group.current
        problem = _end_problem(ends)
        if problem is not None:
            raise ShardError(f"{problem}, at offset {tar.offset}")


def _caption(member: Member | None) -> tuple[str | None, str | None]:
    """A caption member's text (stripped) and the reason it is unusable."""
    if member is None or member.data is None:
        return None, None
    try:
        return member.data.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        return None, f"caption {member.name!r} is not UTF-8"


def _uid(member: Member | None) -> str | None:
    """The `uid` of a sample's json member (DataComp's), or None."""
    if member is None or not member.data:
        return None
    try:
        uid = json.loads(member.data).get("uid")
    except (ValueError, AttributeError, RecursionError):
        return None
    return uid if isinstance(uid, str) else None


def tar_samples(path: str, options: DatasetOptions, max_bytes: int | None) -> Iterator[Sample]:
    """The shard's samples with their image (the --image-key member, else the first of IMAGE_EXTENSIONS found),
    caption (the --caption-key member) and uid (from the json member); see raw_samples for damage."""
    images = (options.image_key,) if options.image_key else IMAGE_EXTENSIONS
    wanted = {*images, options.caption_key, "json"}
    for raw in raw_samples(path, max_bytes, wanted.__contains__):
        where = f"offset {raw.offset}"
        if raw.error is not None:
            yield Sample(raw.key, where, error=raw.error)
            continue
        image = next((m for m in (raw.member(e) for e in images) if m is not None), None)
        caption, bad = _caption(raw.member(options.caption_key))
        yield Sample(raw.key, where, image.data if image else None, caption, _uid(raw.member("json")), bad)
