"""SHA-256 of model files, computed once per file and remembered (a 4 GB checkpoint takes ~10 s to hash).

The store is a small JSON file beside the embedding cache (`weight-hashes.json`), keyed by the file's real path,
size and modification time: a file that changes is hashed again. Writes go through a temporary file and a rename,
so two processes never leave a torn store; a store that cannot be read or written only costs the memo.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def default_store() -> Path:
    """`weight-hashes.json` in the embedding cache's folder ($PICKRANK_CACHE's, else ~/.cache/pickrank)."""
    from pickrank.core.cache import default_cache_path

    return default_cache_path().parent / STORE_NAME


class HashStore:
    """Remembered SHA-256s of files; `computed` counts the files actually read (tests check the memo works)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_store()
        self.computed = 0

    @classmethod
    def beside(cls, cache: str | os.PathLike | None) -> "HashStore":
        """The store beside an embedding cache file (--cache); None: beside the default one."""
        return cls(Path(cache).parent / STORE_NAME if cache else None)

    def sha256(self, path: str | os.PathLike) -> str:
        """The file's SHA-256, from the store when its path, size and mtime are unchanged, else computed and kept."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        entries = self._load()
        if key in entries:
            return entries[key]
        value = sha256_file(real)
        self.computed += 1
        entries = self._load()  # another process may have added entries meanwhile
        entries[key] = value
        self._save(entries)
        return value

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("app") != _APP or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(k, str) and isinstance(v, str)}

    def _save(self, entries: dict[str, str]) -> None:
        if self.path.exists() and not self._is_ours():
            return  # someone else's file: never overwritten
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
            return json.loads(self.path.read_text(encoding="utf-8")).get("app") == _APP
        except (OSError, ValueError, AttributeError):
            return False
