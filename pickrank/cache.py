"""A persistent image-embedding cache in SQLite, keyed on file content and model fingerprint."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("pickrank")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT NOT NULL,          -- SHA-256 of the image file's bytes
    model TEXT NOT NULL,        -- model fingerprint: id@revision (or folder hash) | dtype | preprocessing hash
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,          -- float32, little-endian, L2-normalised
    created REAL NOT NULL,
    PRIMARY KEY (key, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embeddings_created ON embeddings(created);
"""


def default_cache_path() -> Path:
    """$PICKRANK_CACHE, else $XDG_CACHE_HOME/pickrank/embeddings.sqlite3 (or ~/.cache/...)."""
    if os.environ.get("PICKRANK_CACHE"):
        return Path(os.environ["PICKRANK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pickrank" / "embeddings.sqlite3"


@dataclass(frozen=True)
class CacheInfo:
    """What `pickrank cache info` prints."""

    path: str
    entries: int
    size_bytes: int
    models: dict[str, int]


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
    """SQLite store (WAL, busy timeout) shared safely by concurrent processes; problems never fail a run."""

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 60.0) -> None:
        self.path = Path(path) if path else default_cache_path()
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._disabled = False
        self._open()

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
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":  # persistent once set
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("SELECT count(*) FROM embeddings WHERE key = ''").fetchone()  # touches the table: finds corruption
        return db

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
            self._db = self._retrying(self._connect)
        except sqlite3.DatabaseError as e:
            if self._is_corruption(e):
                self._move_aside(e)
                try:
                    self._db = self._connect()
                    return
                except (sqlite3.Error, OSError) as e2:
                    e = e2
            self._disable(e)
        except OSError as e:
            self._disable(e)

    @staticmethod
    def _is_corruption(e: Exception) -> bool:
        text = str(e).lower()
        return any(s in text for s in ("not a database", "malformed", "corrupt", "file is encrypted"))

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

    def _disable(self, e: Exception) -> None:
        if not self._disabled:
            log.warning("embedding cache %s disabled for this run: %s", self.path, e)
        self._disabled = True
        self.close()

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
            self._disable(e)
            return {}
        return found

    def put_many(self, items: dict[str, np.ndarray], model: str) -> None:
        """Store embeddings in one transaction, so an interrupted run keeps every finished batch."""
        if self._db is None or not items:
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
            self._disable(e)

    def info(self) -> CacheInfo:
        """Path, entry count, size on disk and entries per model."""
        models: dict[str, int] = {}
        if self._db is not None:
            models = dict(self._db.execute("SELECT model, count(*) FROM embeddings GROUP BY model ORDER BY model"))
        size = sum(os.path.getsize(str(self.path) + s) for s in ("", "-wal") if os.path.exists(str(self.path) + s))
        return CacheInfo(str(self.path), sum(models.values()), size, models)

    def clear(self, model: str | None = None) -> int:
        """Delete all entries, or those of models whose fingerprint contains `model`; return how many."""
        if self._db is None:
            return 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if model:
                cur = self._db.execute("DELETE FROM embeddings WHERE instr(model, ?) > 0", (model,))
            else:
                cur = self._db.execute("DELETE FROM embeddings")
        self._db.execute("VACUUM")
        return cur.rowcount

    def prune(self, older_than_days: float) -> int:
        """Delete entries created more than that many days ago; return how many."""
        if self._db is None:
            return 0
        cutoff = time.time() - older_than_days * 86400
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("DELETE FROM embeddings WHERE created < ?", (cutoff,))
        self._db.execute("VACUUM")
        return cur.rowcount

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
