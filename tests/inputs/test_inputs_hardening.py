"""The best-of-n prompt lookup opens files as scoring does, files are capped and checked before
they are read whole, unreadable folders are reported, and names cannot drive the terminal.

Every case runs the real CLI in a subprocess (real FIFOs, sparse files, folders without permission, control
characters in file names, all made in tmp_path), with the tiny real CLIP model of conftest.py; nothing is mocked.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tests.support.commands import PROMPT, drop_file_access_override, invoke, no_traceback, png_chunk
from tests.support.images import draw_image
from tests.support.measured import GIB, Run, run_cli, run_here


def png_text(path: Path, seed: int, size: tuple[int, int] = (120, 90), **text: str) -> Path:
    """A real PNG with text chunks (written by Pillow: before the image data, as A1111 writes them)."""
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    draw_image(path, size, seed)
    Image.open(path).save(path, pnginfo=info)
    return path


def ihdr_1bit(width: int, height: int) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))


def text_chunk(key: str, value: str) -> bytes:
    return png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def blank_1bit_png(width: int, height: int, *, text_before: bytes = b"") -> bytes:
    """A valid, all-black 1-bit PNG: tiny on disk, width*height pixels once decoded."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    return (b"\x89PNG\r\n\x1a\n" + ihdr_1bit(width, height) + text_before + png_chunk(b"IDAT", idat + z.flush())
            + png_chunk(b"IEND", b""))


def groups(records: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["group"], []).append(r)
    return by


def errors(records: list[dict]) -> dict[str, str | None]:
    return {os.path.basename(r["path"]): r["error"] for r in records}


# -- the best-of-n prompt lookup opens files as scoring does ------------------------------------------

def test_best_of_n_prompt_lookup_does_not_hang_on_a_fifo(model_dir, tmp_path):
    group = tmp_path / "group"
    group.mkdir()
    os.mkfifo(group / "a.png")  # looked at first for the prompt: a plain open() blocks forever
    png_text(group / "b.png", seed=1, parameters="a castle on a hill\nNegative prompt: blurry")
    run = run_cli(model_dir, tmp_path, "best-of-n", str(group), "--top", "5", timeout=90)
    assert run.code == 3, run.err  # the FIFO is an error record when scored
    recs = run.records
    assert {r["prompt"] for r in recs} == {"a castle on a hill"}
    errs = errors(recs)
    assert errs["b.png"] is None
    assert errs["a.png"] == "not a regular file (a FIFO)"
    no_traceback(run.err)


def test_best_of_n_prompt_lookup_checks_max_pixels_before_decoding(model_dir, tmp_path):
    group = tmp_path / "group"
    group.mkdir()
    # 144 megapixels (over Pillow's and pickrank's default 89.5 Mpx, under twice that: Pillow only warns), ~20 KB
    # on disk, with a prompt before the image data: the lookup must not decode it, nor take its prompt.
    (group / "a.png").write_bytes(blank_1bit_png(12_000, 12_000, text_before=text_chunk("parameters", "huge")))
    png_text(group / "b.png", seed=2, parameters="a small boat")
    run = run_here(model_dir, "best-of-n", str(group), "--top", "5")
    assert run.code == 3, run.err
    assert "DecompressionBombWarning" not in run.err and "exceeds limit" not in run.err  # nothing leaks from Pillow
    recs = run.records
    assert {r["prompt"] for r in recs} == {"a small boat"}
    errs = errors(recs)
    assert errs["b.png"] is None
    assert errs["a.png"].startswith("too large to decode safely: 12000x12000")
    no_traceback(run.err)


def test_best_of_n_prompt_after_the_image_data_is_read_without_decoding(model_dir, tmp_path):
    group = tmp_path / "group"
    group.mkdir()
    # A 3000x3000 PNG whose image data stops after 64 rows, then a text chunk: decoding it fails (truncated), so
    # a prompt found here proves that the chunks were walked, not the pixels decoded.
    row = b"\0" * (1 + 3000 // 8 + 1)
    z = zlib.compressobj(9)
    idat = z.compress(row * 64) + z.flush(zlib.Z_SYNC_FLUSH)
    (group / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr_1bit(3000, 3000) + png_chunk(b"IDAT", idat)
                                  + text_chunk("parameters", "a lighthouse at dusk\nSteps: 20")
                                  + png_chunk(b"IEND", b""))
    draw_image(group / "b.png", (100, 80), seed=3)  # no metadata
    run = run_here(model_dir, "best-of-n", str(group), "--top", "5")
    assert run.code == 3, run.err
    recs = run.records
    assert {r["prompt"] for r in recs} == {"a lighthouse at dusk"}
    errs = errors(recs)
    assert errs["b.png"] is None and errs["a.png"] == "truncated image"
    no_traceback(run.err)


# -- files are checked from their first bytes and capped by --max-bytes --------------------------------

def test_huge_files_are_refused_without_reading_them(model_dir, tmp_path):
    with open(tmp_path / "x.png", "wb") as f:
        f.truncate(3 * GIB)  # sparse: 3 GB of zeros, no disk used
    with open(tmp_path / "y.png", "wb") as f:  # a real PNG start, then 3 GB
        f.write(b"\x89PNG\r\n\x1a\n" + ihdr_1bit(100, 100))
        f.truncate(3 * GIB)
    good = draw_image(tmp_path / "z.png", (100, 80), seed=4)
    run = run_cli(model_dir, tmp_path, "score", "-p", PROMPT, str(tmp_path / "x.png"), str(tmp_path / "y.png"),
                  str(good), timeout=300)
    assert run.code == 3, run.err
    errs = errors(run.records)
    assert errs == {"x.png": "not an image (unrecognised format)",
                    "y.png": "too large: 3,221,225,472 bytes, limit 536,870,912 (raise it with --max-bytes)",
                    "z.png": None}
    assert f"{tmp_path / 'y.png'}: too large" in run.err
    assert run.max_rss < 1 * GIB, f"peak memory {run.max_rss / GIB:.1f} GiB: the file was read"
    no_traceback(run.err)


def test_explicit_files_of_other_formats_pillow_reads_are_still_scored(model_dir, tmp_path):
    # TGA has no magic number (Pillow tells it by parsing its header), PPM and ICO have one; none is an extension
    # folders are searched for, so each is named explicitly.
    paths = []
    for i, fmt in enumerate(("TGA", "PPM", "ICO")):
        paths.append(str(draw_image(tmp_path / f"pic.{fmt.lower()}", (64, 48), seed=20 + i, fmt=fmt)))
    (tmp_path / "notes.txt").write_text("hello, I am not a picture\n")
    run = run_here(model_dir, "score", "-p", PROMPT, *paths, str(tmp_path / "notes.txt"))
    assert run.code == 3, run.err
    assert errors(run.records) == {"pic.tga": None, "pic.ppm": None, "pic.ico": None,
                                   "notes.txt": "not an image (unrecognised format)"}


def test_max_bytes_option(model_dir, tmp_path):
    big = png_text(tmp_path / "group" / "a.png", seed=5, size=(200, 160), parameters="a big picture")
    small = png_text(tmp_path / "group" / "b.png", seed=6, size=(40, 30), parameters="a small picture")
    limit = big.stat().st_size - 1
    assert small.stat().st_size <= limit
    # score: the file over the limit is an error record, the other is scored
    run = run_here(model_dir, "score", "-p", PROMPT, "--max-bytes", str(limit), str(big), str(small))
    assert run.code == 3, run.err
    assert errors(run.records) == {
        "a.png": f"too large: {limit + 1:,} bytes, limit {limit:,} (raise it with --max-bytes)", "b.png": None}
    # best-of-n: the prompt lookup skips it too (its prompt comes first by name)
    run = run_here(model_dir, "best-of-n", str(tmp_path / "group"), "--top", "5", "--max-bytes", str(limit))
    assert run.code == 3, run.err
    assert {r["prompt"] for r in run.records} == {"a small picture"}
    assert errors(run.records)["a.png"].startswith("too large")
    # documented on every scoring command
    for command in ("score", "best-of-n", "batch"):
        res = invoke(command, "--help", env={"COLUMNS": "200"})
        assert "--max-bytes" in res.stdout and "512 MiB" in res.stdout, res.stdout


# -- a folder that cannot be read is reported --------------------------------------------------------

def _run_without_permissions(model_dir: Path, tmp_path: Path, *args: str) -> Run:
    """The CLI with file modes applying: as root, without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return run_cli(model_dir, tmp_path, *args)
    try:
        return run_cli(model_dir, tmp_path, *args, preexec_fn=drop_file_access_override)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({e}): a chmod 000 folder stays readable")


def test_unreadable_folder_is_a_warning_and_an_error_record(model_dir, tmp_path):
    root = tmp_path / "root"
    draw_image(root / "ok.png", (100, 80), seed=7)
    draw_image(root / "locked" / "hidden.png", (100, 80), seed=8)
    locked = root / "locked"
    out = tmp_path / "out"
    out.mkdir()
    reason = "cannot read folder: permission denied"
    locked.chmod(0)
    try:
        walked = _run_without_permissions(model_dir, out, "score", "-p", PROMPT, str(root))
        named = _run_without_permissions(model_dir, out, "score", "-p", PROMPT, str(locked))
        best = _run_without_permissions(model_dir, out, "best-of-n", str(root), "-p", PROMPT)
        best_named = _run_without_permissions(model_dir, out, "best-of-n", str(locked), "-p", PROMPT)
    finally:
        locked.chmod(0o755)
    # score, the folder met while walking: in its place, like an unreadable file
    assert walked.code == 3, walked.err
    assert [(r["path"], r["error"]) for r in walked.records] == [(str(root / "ok.png"), None), (str(locked), reason)]
    assert f"pickrank: warning: {locked}: {reason}" in walked.err
    # score, the folder named alone: reported, not "no images found"
    assert named.code == 3, named.err
    assert [(r["path"], r["error"]) for r in named.records] == [(str(locked), reason)]
    assert "no images found" not in named.err and f"pickrank: warning: {locked}: {reason}" in named.err
    # best-of-n: the folder is a group of its own, an error record
    assert best.code == 3, best.err
    by = groups(best.records)
    assert set(by) == {"root", "locked"}
    assert [r["error"] for r in by["root"]] == [None]
    assert [(r["path"], r["error"]) for r in by["locked"]] == [(str(locked), reason)]
    assert f"pickrank: warning: {locked}: {reason}" in best.err
    assert best_named.code == 3, best_named.err
    assert [(r["group"], r["path"], r["error"]) for r in best_named.records] == [("locked", str(locked), reason)]
    assert "no images found" not in best_named.err
    for run in (walked, named, best, best_named):
        no_traceback(run.err)


# -- control characters never reach the terminal ----------------------------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2Jx.png"  # retitles the window, then clears the screen
BAD = "\x1b[31mred\x9b2Jbad.png"  # colours, and a C1 CSI (U+009B)
TWO_LINES = "two\nlines.png"
RAW = os.fsdecode(b"raw\x9b2J.png")  # not UTF-8: a lone 0x9b byte is an 8-bit CSI
CONTROL = ("\x1b", "\x07", "\x9b", "\udc9b")  # \udc9b: the raw byte 0x9b, decoded with surrogateescape


def test_control_characters_in_names_are_escaped_on_the_terminal(model_dir, tmp_path):
    folder = tmp_path / "imgs"
    draw_image(folder / EVIL, (100, 80), seed=9)
    (folder / BAD).write_text("not a picture")  # its warning names it
    (folder / TWO_LINES).write_text("not a picture either")
    (tmp_path / "raw").mkdir()
    raw = os.path.join(tmp_path, "raw", RAW)
    with open(raw, "w") as f:
        f.write("no picture here")
    prompt = "a cat\x1b[2J on a sofa"

    table = run_cli(model_dir, tmp_path, "score", "-p", prompt, "-f", "table", str(folder), raw)
    assert table.code == 3, table.err
    out, err = table.stdout.decode(errors="surrogateescape"), table.stderr.decode(errors="surrogateescape")
    for c in CONTROL:
        assert c not in out, (c, out)
        assert c not in err, (c, err)
    # the path column, its pieces joined: a long name folds over lines
    flat = "".join(ln.split("│")[-2].strip() for ln in out.splitlines() if ln.count("│") >= 2)
    assert "\\x1b]0;pwned\\x07\\x1b[2Jx.png" in flat and "a cat\\x1b[2J on a sofa" in out
    assert "\\x1b[31mred\\x9b2Jbad.png" in flat and "two\\nlines.png" in flat and "raw\\x9b2J.png" in flat
    # one warning line per bad file, its name escaped
    warnings = [ln for ln in err.splitlines() if ln.startswith("pickrank: warning:")]
    assert any(ln.endswith("\\x1b[31mred\\x9b2Jbad.png: not an image (unrecognised format)") for ln in warnings), err
    assert any(ln.endswith("two\\nlines.png: not an image (unrecognised format)") for ln in warnings), err
    assert any(ln.endswith("raw\\x9b2J.png: not an image (unrecognised format)") for ln in warnings), err
    assert "lines.png" not in "".join(ln for ln in err.splitlines() if not ln.startswith("pickrank: "))

    # machine formats keep the real names
    lines = run_cli(model_dir, tmp_path, "score", "-p", prompt, "-f", "jsonl", str(folder))
    assert lines.code == 3
    assert sorted(r["path"] for r in lines.records) == sorted(str(folder / n) for n in (EVIL, BAD, TWO_LINES))
    assert {r["prompt"] for r in lines.records} == {prompt}

    # and the one-line error of --on-error fail is escaped too
    fail = run_cli(model_dir, tmp_path, "score", "-p", prompt, "--on-error", "fail", str(folder / BAD))
    assert fail.code == 1
    for c in CONTROL:
        assert c not in fail.err, (c, fail.err)
    assert "pickrank: error: " in fail.err and "\\x1b[31mred\\x9b2Jbad.png: not an image" in fail.err
    no_traceback(table.err)
