"""`pickrank prompts`' rows (path, prompt, source, reason) written as a table, JSON Lines, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Iterable

from pickrank.errors import UsageError
from pickrank.options import PromptsFormat
from pickrank.output.targets import Output
from pickrank.output.writers import csv_safe

FIELDS = ("path", "prompt", "source", "reason")
FORMATS = tuple(f.value for f in PromptsFormat)


def check_format(fmt: str | None) -> str | None:
    """fmt itself when `prompts` can write it (None: chosen later); a usage error otherwise (-f paths)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"pickrank prompts writes {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, not -f {fmt}")
    return fmt


def write_prompts(rows: Iterable[dict], fmt: str, out: Output) -> int:
    """Write the rows in fmt (table, jsonl, json or csv), streaming where the format allows; the number of rows."""
    check_format(fmt)
    if fmt == "table":
        return _table(list(rows), out)
    s, n = out.stream, 0
    if fmt == "csv":
        csv.writer(s, lineterminator="\n").writerow(FIELDS)
    elif fmt == "json":
        s.write("[")
    for row in rows:
        if fmt == "jsonl":
            s.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif fmt == "json":
            s.write(("," if n else "") + "\n  " + json.dumps(row, ensure_ascii=False))
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(["" if row[k] is None else csv_safe(row[k])
                                                           for k in FIELDS])
            s.write(buf.getvalue())
        s.flush()  # a pipe sees each image as it is read
        n += 1
    if fmt == "json":
        s.write("\n]\n" if n else "]\n")
    return n


def _table(rows: list[dict], out: Output) -> int:
    """A rich table for a terminal: control characters and rich markup in names and prompts shown, not obeyed."""
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from pickrank.output.terminal import print_titled, terminal_safe

    def safe(text: str | None) -> str:
        return markup_escape(terminal_safe(text or ""))

    table = Table()
    for name in ("path", "source", "prompt"):
        table.add_column(name, overflow="fold")
    for r in rows:
        prompt = safe(r["prompt"]) if r["prompt"] is not None else f"[dim](none: {safe(r['reason'])})[/dim]"
        table.add_row(safe(r["path"]), safe(r["source"] or "-"), prompt)
    print_titled(Console(file=out.stream, force_terminal=out.is_terminal or None,
                         width=None if out.is_terminal else 120), f"{len(rows)} image(s)", table)
    return len(rows)
