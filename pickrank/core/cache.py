"""A persistent image-embedding cache in SQLite, keyed on file content and model fingerprint."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pickrank.errors import PickrankError, UsageError

log = logging.getLogger("pickrank")

# Stamped into the SQLite header (offset 68) of every cache pickrank creates: "PkRk". A file without it is only
# treated as a cache when it has the embeddings table below (caches made before the stamp existed).
APPLICATION_ID = int.from_bytes(b"PkRk", "big")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_COLUMNS = ("key", "model", "dim", "vec", "created")
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, which has no FIFOs to fear either

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT NOT NULL,          -- SHA-256 of the image file's bytes
    model TEXT NOT NULL,        -- model fingerprint: id@revision (or folder hash) | dtype | preprocessing hash
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,          -- float32, little-endian, L2-normalised
    created REAL NOT NULL,
    PRIMARY KEY (key, model)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS embeddings_created ON embeddings(created)",
)


class CacheError(PickrankError):
    """The cache cannot do what a `pickrank cache` command asks (not a cache, read-only, unreadable)."""


class _NotOurs(Exception):
    """The file at the cache path is not a pickrank cache: it must be left exactly as it is."""


def own_cache_folder() -> Path:
    """pickrank's own cache folder: $XDG_CACHE_HOME/pickrank (or ~/.cache/pickrank), whatever $PICKRANK_CACHE says."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pickrank"


def default_cache_path() -> Path:
    """$PICKRANK_CACHE, else $XDG_CACHE_HOME/pickrank/embeddings.sqlite3 (or ~/.cache/...)."""
    if os.environ.get("PICKRANK_CACHE"):
        return Path(os.environ["PICKRANK_CACHE"])
    return own_cache_folder() / "embeddings.sqlite3"


def holds_cache_or_nothing(path: str | os.PathLike) -> bool:
    """Whether path holds nothing yet (a cache may be made there) or a cache stamped as pickrank's, told from its
    first bytes alone: a device, a FIFO, a folder or someone else's file is not (nothing is written beside those)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    except FileNotFoundError:
        return not os.path.islink(path)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, 100)
    finally:
        os.close(fd)
    return not head or (head.startswith(_SQLITE_MAGIC) and int.from_bytes(head[68:72], "big") == APPLICATION_ID)


@dataclass(frozen=True)
class CacheInfo:
    """What `pickrank cache info` prints."""

    path: str
    entries: int
    size_bytes: int
    models: dict[str, int]
    read_only: bool = False


class NullCache:
    """The cache used with --no-cache: knows nothing, keeps nothing."""

    path: Path | None = None

    def get_many(self, keys: list[str], model: str) -> dict[str, np.ndarray]:
        return {}

    def put_many(self, items: dict[str, np.ndarray], model: str) -> None:
        pass

    def close(self) -> None:
        pass


class EmbeddingCache(NullCache):
    """SQLite store (WAL, busy timeout) shared safely by concurrent processes; problems never fail a run.

    A file at the path that is not a pickrank cache is never written, moved or deleted: the cache is then disabled
    (`problem` says why). A cache file without write permission is opened read-only (`read_only`): lookups work,
    nothing is stored."""

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0, warn: bool = True,
                 peek: bool = False) -> None:
        self.path = Path(path) if path else default_cache_path()
        self.timeout = timeout
        self.warn = warn  # False for `pickrank cache` commands, which report `problem` as an error instead
        self.peek = peek  # `pickrank doctor`: only look (no file made, nothing moved aside, nothing written)
        self.read_only = False
        self.problem: str | None = None
        self.not_ours = False  # the path holds a file that is not a pickrank cache (`problem` says what)
        self._db: sqlite3.Connection | None = None
        self._open()

    # -- whose file is it? ---------------------------------------------------------------------------------

    def _uri(self, query: str) -> str:
        return f"{self.path.absolute().as_uri()}?{query}"

    def _header(self) -> bytes | None:
        """The file's first 100 bytes (the SQLite header); None when there is no file or it is empty."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _NONBLOCK)  # a FIFO must not hang the run
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _NotOurs("a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
            return os.read(fd, 100) or None
        finally:
            os.close(fd)

    def _probe(self, query: str) -> bool:
        """Whether a read-only look (no write, no lock with immutable=1) finds pickrank's stamp or schema."""
        db = sqlite3.connect(self._uri(query), uri=True, timeout=self.timeout, check_same_thread=False)
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            columns = tuple(row[1] for row in db.execute("PRAGMA table_info(embeddings)"))
            return app_id == APPLICATION_ID or columns == _COLUMNS
        finally:
            db.close()

    def _claim(self) -> bool:
        """True when the path holds a pickrank cache, False when there is none yet (no file, or an empty one:
        nothing to lose); raises _NotOurs for anything else."""
        head = self._header()
        if head is None:
            return False
        if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
            raise _NotOurs("not a pickrank cache (not an SQLite database)")
        if int.from_bytes(head[68:72], "big") == APPLICATION_ID:
            return True
        # Unstamped: an old pickrank cache, or someone else's database. Look without writing anything: first at
        # the main file alone (immutable: no -wal/-shm files are created next to it); a WAL database with a
        # -wal file may hold its schema there, so look again normally (still read-only).
        try:
            if self._retrying(lambda: self._probe("mode=ro&immutable=1")):
                return True
            in_wal = head[18] == 2 and os.path.exists(f"{self.path}-wal")
        except sqlite3.DatabaseError:
            in_wal = True
        try:
            if in_wal and self._retrying(lambda: self._probe("mode=ro")):
                return True
        except sqlite3.DatabaseError as e:
            raise _NotOurs(f"an unreadable SQLite database not known to be a pickrank cache ({e})") from None
        raise _NotOurs("an SQLite database but not a pickrank cache")

    def _writable(self) -> bool:
        """Whether the cache file may be written: it has a write permission bit (root ignores modes, a chmod a-w
        file is still meant read-only) and opens for writing."""
        try:
            if not os.stat(self.path).st_mode & 0o222:
                return False
            os.close(os.open(self.path, os.O_RDWR | _NONBLOCK))
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return False
            raise
        return True

    # -- connecting ----------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            return self._setup(db)
        except BaseException:
            db.close()
            raise

    def _setup(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        if not self._is_set_up(db):
            # Stamp and schema in the first transaction, before WAL mode: a process that opens the file meanwhile
            # sees either an empty file or a stamped cache, never an unknown SQLite database.
            with db:
                db.execute("BEGIN IMMEDIATE")
                if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                for statement in _SCHEMA:
                    db.execute(statement)
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":  # persistent once set
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("SELECT count(*) FROM embeddings WHERE key = ''").fetchone()  # touches the table: finds corruption
        return db

    @staticmethod
    def _is_set_up(db: sqlite3.Connection) -> bool:
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(embeddings)"))
        return columns == _COLUMNS and db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID

    def _connect_read_only(self, query: str = "mode=ro") -> sqlite3.Connection:
        db = sqlite3.connect(self._uri(query), uri=True, timeout=self.timeout, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            db.execute("SELECT count(*) FROM embeddings WHERE key = ''").fetchone()
            return db
        except BaseException:
            db.close()
            raise

    def _retrying(self, fn):
        """fn(), retried while another process holds a lock that SQLite's busy handler does not wait for
        (switching to WAL, a schema change, a checkpoint)."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not any(w in str(e).lower() for w in ("locked", "busy")) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _open(self) -> None:
        try:
            ours = self._claim()
            if self.peek:
                if ours:  # without a -wal file to read, immutable: not even a -shm file is made
                    query = "mode=ro" if os.path.exists(f"{self.path}-wal") else "mode=ro&immutable=1"
                    self._db = self._retrying(lambda: self._connect_read_only(query))
                    self.read_only = not self._writable()
                return
            if not self._writable():
                if not ours:  # an empty file, and its mode says leave it so
                    raise _NotOurs("an empty read-only file")
                self._open_read_only()
                return
            self._open_read_write(ours)
        except _NotOurs as e:
            self.not_ours = True
            self._disable(f"{self.path}: {e}; left untouched (give --cache another file)")
        except (sqlite3.Error, OSError) as e:
            self._disable(f"{self.path}: {e}")

    def _open_read_write(self, ours: bool) -> None:
        try:
            self._db = self._retrying(self._connect)
        except sqlite3.DatabaseError as e:
            if ours and self._is_corruption(e):
                self._move_aside(e)
                self._db = self._connect()
            elif ours and self._is_read_only_error(e):  # a read-only folder or file system
                self._open_read_only()
            else:
                raise

    def _open_read_only(self) -> None:
        self._db = self._retrying(self._connect_read_only)
        self.read_only = True
        if self.warn:
            log.warning("embedding cache %s is read-only: cached embeddings are used, new ones are not saved",
                        self.path)

    @staticmethod
    def _is_corruption(e: Exception) -> bool:
        text = str(e).lower()
        return any(s in text for s in ("not a database", "malformed", "corrupt", "file is encrypted"))

    @staticmethod
    def _is_read_only_error(e: Exception) -> bool:
        text = str(e).lower()
        return "readonly" in text or "read-only" in text or "unable to open" in text

    def _move_aside(self, e: Exception) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.warning("cache %s is unreadable (%s); moved aside to %s, starting a new one", self.path, e, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                try:
                    os.replace(src, Path(str(aside) + suffix))
                except OSError:
                    pass

    def _disable(self, problem: str) -> None:
        if self.problem is None and self.warn:
            log.warning("embedding cache disabled for this run: %s", problem)
        self.problem = self.problem or problem
        self.close()

    # -- use -----------------------------------------------------------------------------------------------

    def get_many(self, keys: list[str], model: str) -> dict[str, np.ndarray]:
        """Cached embeddings for those keys that have one under this model fingerprint."""
        if self._db is None or not keys:
            return {}
        db = self._db
        found: dict[str, np.ndarray] = {}

        def select() -> None:
            for i in range(0, len(keys), 500):  # SQLite's limit on bound parameters
                chunk = keys[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for key, vec in db.execute(
                        f"SELECT key, vec FROM embeddings WHERE model = ? AND key IN ({marks})", [model, *chunk]):
                    found[key] = np.frombuffer(vec, dtype="<f4").copy()

        try:
            self._retrying(select)
        except sqlite3.Error as e:
            self._disable(f"{self.path}: {e}")
            return {}
        return found

    def put_many(self, items: dict[str, np.ndarray], model: str) -> None:
        """Store embeddings in one transaction, so an interrupted run keeps every finished batch."""
        if self._db is None or self.read_only or not items:
            return
        now = time.time()
        rows = [(k, model, int(v.shape[-1]), np.asarray(v, dtype="<f4").tobytes(), now) for k, v in items.items()]
        db = self._db

        def insert() -> None:
            with db:  # BEGIN ... COMMIT (or ROLLBACK on error)
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?)", rows)

        try:
            self._retrying(insert)
        except sqlite3.Error as e:
            self._disable(f"{self.path}: {e}")

    # -- `pickrank cache` commands: these raise CacheError instead of disabling --------------------------------

    def _usable(self, writing: bool) -> sqlite3.Connection:
        if self._db is None:
            raise CacheError(self.problem or f"{self.path}: closed")
        if writing and self.read_only:
            raise CacheError(f"{self.path} is read-only: cannot delete entries (make it writable first)")
        return self._db

    def info(self) -> CacheInfo:
        """Path, entry count, size on disk and entries per model."""
        db = self._usable(writing=False)
        try:
            models = dict(db.execute("SELECT model, count(*) FROM embeddings GROUP BY model ORDER BY model"))
        except sqlite3.Error as e:
            raise CacheError(f"{self.path}: {e}") from None
        size = sum(os.path.getsize(str(self.path) + s) for s in ("", "-wal") if os.path.exists(str(self.path) + s))
        return CacheInfo(str(self.path), sum(models.values()), size, models, self.read_only)

    def clear(self, model: str | None = None) -> int:
        """Delete all entries, or those of models whose fingerprint contains `model`; return how many."""
        if model is not None and not model.strip():
            raise UsageError("--model must not be empty: leave it out to clear every entry")
        if model:
            return self._delete("DELETE FROM embeddings WHERE instr(model, ?) > 0", (model,))
        return self._delete("DELETE FROM embeddings", ())

    def prune(self, older_than_days: float) -> int:
        """Delete entries created more than that many days ago; return how many."""
        return self._delete("DELETE FROM embeddings WHERE created < ?", (time.time() - older_than_days * 86400,))

    def _delete(self, sql: str, params: tuple) -> int:
        db = self._usable(writing=True)
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                n = db.execute(sql, params).rowcount
            db.execute("VACUUM")
        except sqlite3.Error as e:
            raise CacheError(f"{self.path}: {e}") from None
        return n

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None


def open_cache(path: str | os.PathLike | None = None, enabled: bool = True) -> NullCache:
    """The cache for a run: the SQLite store, or a NullCache with --no-cache."""
    return EmbeddingCache(path) if enabled else NullCache()


@contextlib.contextmanager
def managed_cache(path: str | os.PathLike | None) -> Iterator[EmbeddingCache]:
    """The cache a `pickrank cache` command manages, closed after the block; a file that is not a pickrank cache (or
    one that cannot be opened) is a CacheError here, not a warning."""
    c = EmbeddingCache(path, warn=False)
    try:
        if c.problem is not None:
            raise CacheError(c.problem)
        yield c
    finally:
        c.close()
