"""Files that are not pickrank's, for the tests that must leave them alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def foreign_database(path: Path, journal_mode: str = "delete") -> None:
    """Someone else's SQLite database, with a table and a row."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.execute("INSERT INTO notes (text) VALUES ('keep me')")
    db.commit()
    db.close()
