"""SHA-256 of model files, computed once per file and remembered (a 4 GB checkpoint takes ~10 s to hash).

The store is a small JSON file beside the embedding cache (`weight-hashes.json`), keyed by the file's real path,
size and modification time: a file that changes is hashed again. It is written only beside a pickrank cache (or
where one is to be made), else in pickrank's own cache folder: never beside a device, a folder or someone else's
file that --cache happens to name. Writes go through a temporary file and a rename, so two processes never leave a
torn store; a store that cannot be read or written only costs the memo. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

_CHUNK = 1 << 20
STORE_NAME = "weight-hashes.json"
_APP = "pickrank-weight-hashes"  # the store's own stamp: a JSON file that is not ours is never rewritten


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def store_for(cache: str | os.PathLike) -> Path:
    """Where the store goes for an embedding cache path: beside it when it holds a pickrank cache or nothing yet,
    else in pickrank's own cache folder."""
    from pickrank.core.cache import holds_cache_or_nothing, own_cache_folder

    return (Path(cache).parent if holds_cache_or_nothing(cache) else own_cache_folder()) / STORE_NAME


def default_store() -> Path:
    """The store of the default embedding cache ($PICKRANK_CACHE's, else ~/.cache/pickrank's): `store_for`."""
    from pickrank.core.cache import default_cache_path

    return store_for(default_cache_path())


class HashStore:
    """Remembered SHA-256s of files; `computed` counts the files actually read (tests check the memo works).
    `write=False` (the doctor) reads the memo but never writes it."""

    def __init__(self, path: str | os.PathLike | None = None, write: bool = True) -> None:
        self.path = Path(path) if path is not None else default_store()
        self.write = write
        self.computed = 0
        self.seen: dict[str, str] = {}  # what this object hashed or read: a store that may not write still remembers

    @classmethod
    def beside(cls, cache: str | os.PathLike | None, write: bool = True) -> "HashStore":
        """The store of an embedding cache path (--cache; `store_for`); None: the default cache's."""
        return cls(store_for(cache) if cache else None, write=write)

    def sha256(self, path: str | os.PathLike) -> str:
        """The file's SHA-256, from the store when its path, size and mtime are unchanged, else computed and kept."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        if key in self.seen:
            return self.seen[key]
        entries = self._load()
        if key in entries:
            self.seen[key] = entries[key]
            return entries[key]
        value = sha256_file(real)
        self.computed += 1
        self.seen[key] = value
        entries = self._load()  # another process may have added entries meanwhile
        entries[key] = value
        self._save(entries)
        return value

    def _read(self) -> str:
        """The store's text; OSError unless it is a regular file (a FIFO named like it must not hang the run)."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path}: not a regular file")
            return f.read().decode("utf-8")

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self._read())
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("app") != _APP or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(k, str) and isinstance(v, str)}

    def _save(self, entries: dict[str, str]) -> None:
        if not self.write or (os.path.lexists(self.path) and not self._is_ours()):
            return  # read-only (the doctor), or someone else's file: never overwritten
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".weight-hashes-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"app": _APP, "files": entries}, f, indent=0)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache folder only costs the memo

    def _is_ours(self) -> bool:
        try:
            return json.loads(self._read()).get("app") == _APP
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
