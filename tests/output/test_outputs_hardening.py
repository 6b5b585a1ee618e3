"""-o, --html and report -o land where they point and never replace what is not a plain file of
ours; -0 for xargs -0; the format from -o's extension; --copy-to checked up front, one failed copy is one record's
error.

Everything runs through the real CLI (typer's CliRunner in process, or a subprocess where the process's own stdout
matters) with the tiny real model of conftest.py. Devices, FIFOs and symlinks are made in tmp_path: a character
device with /dev/null's or /dev/full's numbers (mknod, as root; skipped with the reason where refused), never /dev
itself.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pickrank.cli.app import app
from tests.support.commands import PROMPT, cli, jsonl, no_traceback, pickrank_cmd
from tests.support.images import draw_image, image_paths

HOWS = ["-o", "--html", "report"]  # the three ways a user names an output file


def results_file(tmp_path: Path, images: Path) -> Path:
    """Saved -f jsonl results for `pickrank report` (real image paths, made-up scores)."""
    path = tmp_path / "saved.jsonl"
    rows = [{"prompt": PROMPT, "path": p, "score": 20.0 - i, "prob": 0.1, "rank": i + 1, "truncated": False,
             "error": None} for i, p in enumerate(image_paths(images))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_to(how: str, target: Path | str, runner, model_dir, images: Path, tmp_path: Path, *extra: str):
    """Run the CLI so that its results (-o), its page (--html) or report's page (-o) go to target."""
    if how == "report":
        return runner.invoke(app, ["report", str(results_file(tmp_path, images)), "-o", str(target), *extra])
    return cli(runner, model_dir, "score", "-p", PROMPT, str(images), how, str(target), *extra)


def errors(res) -> list[str]:
    """The run's error lines, without the prefix; there is no traceback.

    (stderr is not compared whole: in process, a model still loading in the background for an earlier test's
    aborted run may log its 'loaded' line into this one.)
    """
    no_traceback(res.stderr)
    return [line[len("pickrank: error: "):] for line in res.stderr.splitlines() if line.startswith("pickrank: error")]


def check_content(how: str, text: str, images: Path) -> None:
    """What arrived is whole: every record (-o), or a whole page (--html, report)."""
    if how == "-o":
        assert sorted(r["path"] for r in jsonl(text)) == image_paths(images)
    else:
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def char_device(path: Path, minor: int) -> Path:
    """A character device with major 1 and the given minor (3: like /dev/null, 7: like /dev/full)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except OSError as e:
        pytest.skip(f"cannot make a character device here ({e.strerror}): mknod needs root with CAP_MKNOD")
    return path


def assert_char_device(path: Path, minor: int) -> None:
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, minor), "the device was replaced"


class FifoReader:
    """A thread that reads a FIFO to its end, as `cat fifo` would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as f:  # blocks until a writer opens it
            self.data = f.read()

    def text(self, timeout: float = 10) -> str:
        self.thread.join(timeout)  # called once the run has ended: whatever it wrote is there
        if self.thread.is_alive():  # nobody wrote: release the reader so that the test ends
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            self.thread.join(5)
            pytest.fail("nothing ever opened the FIFO for writing")
        return self.data.decode()


# -- where an output path leads -------------------------------------------------------------------------

@pytest.mark.parametrize("how", HOWS)
def test_character_device_is_written_through_and_stays_a_device(how, runner, model_dir, images, tmp_path):
    dev = char_device(tmp_path / "null", 3)
    res = write_to(how, dev, runner, model_dir, images, tmp_path)
    assert res.exit_code == 0, res.output
    assert_char_device(dev, 3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


@pytest.mark.parametrize("how", HOWS)
def test_full_device_is_a_one_line_error_and_stays_a_device(how, runner, model_dir, images, tmp_path):
    dev = char_device(tmp_path / "full", 7)
    res = write_to(how, dev, runner, model_dir, images, tmp_path)
    assert res.exit_code == 1, res.output
    opt = "-o" if how in ("-o", "report") else "--html"
    assert f"pickrank: error: {opt} {dev}: No space left on device" in res.stderr, res.stderr
    no_traceback(res.stderr)
    assert_char_device(dev, 7)


@pytest.mark.parametrize("how", HOWS)
def test_fifo_reader_gets_everything_and_the_fifo_stays(how, runner, model_dir, images, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    res = write_to(how, fifo, runner, model_dir, images, tmp_path)
    text = reader.text()
    assert res.exit_code == 0, res.output
    check_content(how, text, images)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("how", HOWS)
def test_fifo_without_a_reader_is_a_clear_error_not_a_hang(how, runner, model_dir, images, tmp_path, monkeypatch):
    import pickrank.output.targets

    monkeypatch.setattr(pickrank.output.targets, "FIFO_WAIT_S", 0.3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if how == "-o":  # -o is opened before the model loads: a missing model is not reached
        res = runner.invoke(app, ["score", "-p", PROMPT, str(images), "--model", str(tmp_path / "no-model"),
                                  "-o", str(fifo)])
    else:
        res = write_to(how, fifo, runner, model_dir, images, tmp_path)
    assert res.exit_code == 1, res.output
    opt = "--html" if how == "--html" else "-o"
    assert f"pickrank: error: {opt} {fifo}: no process is reading this FIFO (waited 0.3 s)" in res.stderr
    no_traceback(res.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if how == "--html":
        assert len(jsonl(res.stdout)) == 6  # the results are kept


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("dangling", [False, True], ids=["existing", "dangling"])
def test_symlink_is_followed_and_kept(how, dangling, runner, model_dir, images, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    ext = ".jsonl" if how == "-o" else ".out"  # -o names its format by its extension
    real = tmp_path / "elsewhere" / f"results{ext}"
    if not dangling:
        real.write_text("old results\n")
        real.chmod(0o640)
    link = tmp_path / f"latest{ext}"
    link.symlink_to(os.path.join("elsewhere", real.name))  # relative, into another folder
    res = write_to(how, link, runner, model_dir, images, tmp_path)
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == os.path.join("elsewhere", real.name)
    check_content(how, real.read_text(), images)
    if not dangling:
        assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == [real.name]  # no temp file left


@pytest.mark.parametrize("how", HOWS)
def test_read_only_file_is_refused_before_the_model_loads(how, runner, model_dir, images, tmp_path):
    target = tmp_path / "keep.jsonl"
    target.write_text("precious\n")
    target.chmod(0o444)  # refused even for root, who could write it
    if how == "report":
        res = write_to(how, target, runner, model_dir, images, tmp_path)
    else:
        res = runner.invoke(app, ["score", "-p", PROMPT, str(images), "--model", str(tmp_path / "no-model"),
                                  "-q", how, str(target)])
    assert res.exit_code == 1, res.output
    opt = "--html" if how == "--html" else "-o"
    assert errors(res) == [f"{opt} {target}: the file is read-only (mode 0444); not overwritten"]
    assert target.read_text() == "precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o444


@pytest.mark.parametrize("how", HOWS)
def test_replaced_file_keeps_its_permission_bits(how, runner, model_dir, images, tmp_path):
    target = tmp_path / ("private.jsonl" if how == "-o" else "private.out")
    target.write_text("old\n")
    target.chmod(0o600)
    res = write_to(how, target, runner, model_dir, images, tmp_path)
    assert res.exit_code == 0, res.output
    check_content(how, target.read_text(), images)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("how", HOWS)
def test_stdout_style_path_appends_to_what_the_shell_opened(how, model_dir, images, tmp_path):
    # A link made here to /proc/self/fd/1 is what /dev/stdout is: the output must go to the process's own stdout,
    # here a file the "shell" opened for appending, not replace the link or truncate the file.
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    log = tmp_path / "log.txt"
    log.write_text("previous line\n")
    if how == "report":
        args = ["report", str(results_file(tmp_path, images)), "-o", str(link), "-q"]
    else:
        args = ["score", "-p", PROMPT, str(images), "--model", str(model_dir), "--no-cache", "--workers", "0", "-q",
                how, str(link)]
        if how == "--html":
            args += ["-o", str(tmp_path / "res.jsonl")]  # the results elsewhere: stdout carries only the page
    with open(log, "a") as out:
        proc = subprocess.run(pickrank_cmd(*args), stdout=out, stderr=subprocess.PIPE, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    text = log.read_text()
    assert text.startswith("previous line\n")
    check_content(how, text[len("previous line\n"):], images)


# -- an output that is an input, or two outputs in one place ---------------------------------------------

@pytest.mark.parametrize("how", ["-o", "--html"])
def test_output_that_is_a_named_input_image_is_a_usage_error(how, runner, images, tmp_path):
    img = images / "img1.png"
    before = img.read_bytes()
    for inputs in ([str(img), str(images / "img0.jpg")], [str(images)]):  # named, or in a named folder
        res = runner.invoke(app, ["score", "-p", PROMPT, *inputs, "--model", str(tmp_path / "no-model"),
                                  how, str(img)])
        assert res.exit_code == 2, res.output
        (line,) = errors(res)  # one error: the (missing) model was not looked at
        assert line.startswith(f"{how} {img}: ") and line.endswith("; it would be overwritten")
    assert img.read_bytes() == before


@pytest.mark.parametrize("how", ["-o", "--html"])
def test_output_that_is_an_input_found_later_stops_the_run_and_writes_nothing(how, runner, model_dir, images,
                                                                              tmp_path):
    # Named on stdin, through a symlink: only seen while the inputs are read.
    img = images / "img3.png"
    before = img.read_bytes()
    link = tmp_path / "alias.png"
    link.symlink_to(img)
    other = tmp_path / "other.json"
    res = cli(runner, model_dir, "score", "-p", PROMPT, "-", how, str(link),
              *(["-o", str(other)] if how == "--html" else ["--html", str(tmp_path / "page.html"), "-f", "jsonl"]),
              input="".join(p + "\n" for p in image_paths(images)))
    assert res.exit_code == 2, res.output
    assert f"pickrank: error: {how} {link}: is also an input ({img}); it would be overwritten" in res.stderr
    assert img.read_bytes() == before and link.is_symlink()
    assert not other.exists() and not (tmp_path / "page.html").exists()  # nothing at all was written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_same_file_for_results_and_page_is_a_usage_error(runner, images, tmp_path):
    both = tmp_path / "out.html"
    existing = tmp_path / "old.json"
    existing.write_text("[]\n")
    alias = tmp_path / "alias.json"
    alias.symlink_to(existing)
    for o, h in [(both, both), (existing, alias)]:  # a new file; an existing one and a link to it
        res = runner.invoke(app, ["score", "-p", PROMPT, str(images), "--model", str(tmp_path / "no-model"),
                                  "-q", "-o", str(o), "--html", str(h)])
        assert res.exit_code == 2, res.output
        assert errors(res) == [f"-o {o} and --html {h} are the same file: give each output its own"]
    assert not both.exists() and existing.read_text() == "[]\n"


def test_page_on_stdout_while_the_results_go_there_too_is_a_usage_error(images, tmp_path):
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    with open(tmp_path / "both.txt", "w") as out:
        proc = subprocess.run(pickrank_cmd("score", "-p", PROMPT, str(images), "--model", str(tmp_path / "no-model"),
                                           "--html", str(link)),
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"pickrank: error: stdout and --html {link} are the same file: give each output its own\n"
    assert (tmp_path / "both.txt").read_text() == ""


def test_batch_output_over_its_prompts_csv_and_report_over_its_results_are_usage_errors(runner, images, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na red cat\n")
    res = runner.invoke(app, ["batch", str(prompts), str(images), "--model", str(tmp_path / "no-model"),
                              "-o", str(prompts)])
    assert res.exit_code == 2 and "would be overwritten" in res.stderr, res.output
    assert prompts.read_text() == "prompt\na red cat\n"
    saved = results_file(tmp_path, images)
    before = saved.read_text()
    res = runner.invoke(app, ["report", str(saved), "-o", str(saved), "-q"])
    assert res.exit_code == 2, res.output
    assert errors(res) == [f"-o {saved}: is the results file; give another name for the page"]
    assert saved.read_text() == before


# -- -0 for xargs -0 ---------------------------------------------------------------------------------

ODD_NAMES = ["it's.png", "two\nlines.png", " lead space.png", 'quote".png']


def test_null_separated_paths_survive_the_readme_xargs_recipe(model_dir, tmp_path):
    out = tmp_path / "out" / "g"
    for i, name in enumerate(ODD_NAMES):
        draw_image(out / name, (64, 48), seed=i)
    winners = tmp_path / "winners"
    winners.mkdir()
    cmd = (f"set -o pipefail; {sys.executable} -m pickrank best-of-n {tmp_path / 'out'} -p x --top 4 "
           f"--model {model_dir} --no-cache --workers 0 -q -f paths -0 | xargs -0 -I{{}} cp {{}} {winners}/")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(winners)) == sorted(ODD_NAMES)


def test_null_implies_paths_and_refuses_other_formats(runner, model_dir, tmp_path):
    for i, name in enumerate(ODD_NAMES):
        draw_image(tmp_path / "imgs" / name, (64, 48), seed=i)
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(tmp_path / "imgs"), "-0")
    assert res.exit_code == 0, res.output
    assert res.stdout.endswith("\0") and "\n" not in res.stdout.replace("two\nlines", "")
    assert sorted(res.stdout.split("\0")[:-1]) == image_paths(tmp_path / "imgs")
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(tmp_path / "imgs"), "-0", "-f", "csv", "-q")
    assert res.exit_code == 2 and errors(res) == ["-0/--null goes with -f paths only, not -f csv"]


def test_paths_without_null_warn_about_a_newline_in_a_name(runner, model_dir, tmp_path):
    draw_image(tmp_path / "imgs" / "two\nlines.png", (64, 48), seed=1)
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(tmp_path / "imgs"), "-f", "paths")
    assert res.exit_code == 0, res.output
    assert "has a newline in its name" in res.stderr and "use -0" in res.stderr


# -- the format from -o's extension -----------------------------------------------------------------------

def parse_as(fmt: str, text: str) -> list[str]:
    """The paths in text, read as fmt (fails if text is not that format)."""
    if fmt == "json":
        return [r["path"] for r in json.loads(text)]
    if fmt == "jsonl":
        return [json.loads(line)["path"] for line in text.splitlines()]
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert list(rows[0]) == ["prompt", "prompt_source", "path", "score", "prob", "rank", "truncated", "error"]
        return [r["path"] for r in rows]
    return text.splitlines()


@pytest.mark.parametrize("name,extra,fmt", [
    ("scores.csv", [], "csv"), ("x.json", [], "json"), ("x.JSONL", [], "jsonl"), ("x.ndjson", [], "jsonl"),
    ("keep.txt", [], "paths"), ("x.out", ["-f", "jsonl"], "jsonl"), ("x", [], "jsonl"),
    ("scores.csv", ["-f", "jsonl"], "jsonl"), ("x.json", ["-f", "csv"], "csv"),  # -f always wins
])
def test_format_comes_from_the_output_extension(name, extra, fmt, runner, model_dir, images, tmp_path):
    target = tmp_path / name
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(images), "-o", str(target), *extra)
    assert res.exit_code == 0, res.output
    assert sorted(parse_as(fmt, target.read_text())) == image_paths(images)


# -- --copy-to ------------------------------------------------------------------------------------------

@pytest.fixture
def groups(tmp_path: Path) -> Path:
    """best-of-n groups: 'big' with 120 KB PNGs (noise), 'small' with 100-byte ones."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "runs"
    for i in range(2):
        (root / "big").mkdir(parents=True, exist_ok=True)
        (root / "small").mkdir(exist_ok=True)
        noise = np.random.default_rng(i).integers(0, 256, (200, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "big" / f"big{i}.png")
        Image.new("RGB", (8, 8), (100 * i, 0, 0)).save(root / "small" / f"small{i}.png")
    return root


def test_copy_to_that_is_not_a_writable_folder_is_refused_before_the_model_loads(runner, groups, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    read_only.chmod(0o555)
    for dest, why in [(a_file, "not a folder"), (a_file / "sub", "cannot create the folder: Not a directory"),
                      (read_only, "the folder is not writable")]:
        out = tmp_path / "res.jsonl"
        res = runner.invoke(app, ["best-of-n", str(groups), "-p", PROMPT, "--model", str(tmp_path / "no-model"),
                                  "--copy-to", str(dest), "-o", str(out), "-q"])
        assert res.exit_code == 1, res.output
        assert errors(res) == [f"--copy-to {dest}: {why}"]  # and no model error: nothing was loaded
        assert not out.exists()
    assert a_file.read_text() == "mine\n" and os.listdir(read_only) == []


def _limit_file_size() -> None:
    """In the child: files may grow to 20 KB (a write past it fails with EFBIG instead of killing the process)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_failed_copy_is_that_records_error_and_the_results_are_kept(model_dir, groups, tmp_path):
    keep, out, page = tmp_path / "keep", tmp_path / "res.jsonl", tmp_path / "page.html"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(pickrank_cmd("best-of-n", str(groups), "-p", PROMPT, "--model", str(model_dir),
                                       "--no-cache", "--workers", "0", "--copy-to", str(keep), "-o", str(out),
                                       "--html", str(page)),
                          capture_output=True, text=True, timeout=180, env=env, preexec_fn=_limit_file_size)
    assert proc.returncode == 3, proc.stderr
    no_traceback(proc.stderr)
    recs = {r["group"]: r for r in jsonl(out.read_text())}
    assert set(recs) == {"big", "small"}
    big, small = recs["big"], recs["small"]
    assert big["error"] == f"not copied to {keep}: File too large" and big["copied_to"] is None
    assert isinstance(big["score"], float) and big["rank"] == 1  # scored; only the copy failed
    assert f"pickrank: warning: {big['path']}: not copied to {keep}: File too large" in proc.stderr
    assert small["error"] is None and Path(small["copied_to"]).read_bytes() == Path(small["path"]).read_bytes()
    assert os.listdir(keep / "small") == [os.path.basename(small["path"])]
    assert os.listdir(keep / "big") == []  # no half copy of the big one
    assert "not copied to" in page.read_text()
