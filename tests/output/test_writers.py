"""Writers: every format streams whole records; files are written atomically; CSV formulas are escaped."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pickrank.errors import OutputError
from pickrank.output.targets import Output
from pickrank.output.writers import csv_safe, make_writer, record_fields
from pickrank.records import Record

RECS = (Record("p", "a.png", 21.5, 0.7, 1), Record("p", "=b.png", 20.0, 0.3, 2),
        Record("p", "c.png", error="not an image"))


def test_record_fields_per_command():
    assert record_fields("score")[:6] == ("prompt", "prompt_source", "path", "score", "prob", "rank")
    assert record_fields("batch")[0] == "id" and record_fields("best-of-n")[0] == "group"
    assert record_fields("best-of-n", copy=True)[-1] == "copied_to"


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "paths", "table"])
def test_file_output_is_atomic(tmp_path, fmt):
    target = tmp_path / f"out.{fmt}"
    target.write_text("old content")
    w = make_writer(fmt, Output(str(target)), record_fields("score"))
    w.write(RECS)
    assert target.read_text() == "old content"  # nothing visible until close
    w.close()
    text = target.read_text()
    assert text != "old content" and not list(tmp_path.glob("*.tmp"))
    if fmt == "json":
        assert [r["path"] for r in json.loads(text)] == ["a.png", "=b.png", "c.png"]
    if fmt == "jsonl":
        assert [json.loads(line)["rank"] for line in text.splitlines()] == [1, 2, None]
    if fmt == "paths":
        assert text.splitlines() == ["a.png", "=b.png"]


def test_json_array_is_valid_even_if_closed_early(tmp_path):
    target = tmp_path / "o.json"
    w = make_writer("json", Output(str(target)), record_fields("score"))
    w.close()
    assert json.loads(target.read_text()) == []


def test_csv_escapes_formulas():
    assert csv_safe("=1+1") == "'=1+1" and csv_safe("@x") == "'@x" and csv_safe("+x") == "'+x"
    assert csv_safe("-x") == "'-x" and csv_safe("ok") == "ok" and csv_safe(-1.5) == -1.5
    buf = io.StringIO()

    class Out:
        stream = buf

        def close(self):
            pass

    w = make_writer("csv", Out(), record_fields("score"))
    w.write(RECS)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rows[1]["path"] == "'=b.png" and rows[2]["error"] == "not an image" and rows[2]["score"] == ""


def test_unwritable_output_is_a_clear_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        Output(str(tmp_path / "no" / "such" / "dir" / "out.json"))
    with pytest.raises(OutputError, match="is a folder"):
        Output(str(tmp_path))
