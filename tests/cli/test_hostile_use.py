"""Inputs, engine and library against hostile and careless use: thin strips that the resize
would blow up, ComfyUI graphs that feed themselves, prompts that are not text, JSON nested without end, models that
give NaN, tampered exports, a weight-hash memo that must not land beside a stranger's file, intervals that cannot be
trusted, and library arguments of the wrong kind.

Every case goes through the real CLI (a subprocess, or the Typer app in process) or the public API, with the tiny
real CLIP model of conftest.py; nothing is mocked.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import struct
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from pickrank import PickScorer
from pickrank.cli.app import app
from pickrank.errors import ArgumentTypeError, InvalidArgument, InvalidText, NonFiniteScores, PickrankError
from tests.support.commands import PROMPT, cli, invoke, no_traceback, pickrank_cmd, png_chunk
from tests.support.databases import foreign_database
from tests.support.images import draw_image
from tests.support.measured import GIB, run_cli, run_here


def records(text: str) -> list[dict]:
    """JSON Lines parsed strictly: NaN or Infinity in a record fails the test."""
    def refuse(name: str) -> float:
        raise AssertionError(f"{name} in the output: not strict JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def run_quick(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pickrank ARGS` (bytes allowed), killed and failed after `timeout` s."""
    try:
        return subprocess.run(pickrank_cmd(*args), capture_output=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"pickrank {args[:2]}: still running after {timeout} s (it hangs)")


# -- a thin strip: the resize, not the file, decides the work ---------------------------------------------------

def strip_png(path: Path, width: int, height: int = 1) -> Path:
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path, optimize=True)
    return path


def test_a_thin_strip_is_refused_by_its_resized_size_in_bounded_memory(model_dir, tmp_path):
    tiny = strip_png(tmp_path / "w.png", 20_000)  # ~150 bytes; the reference would resize it to 4480000x224
    good = draw_image(tmp_path / "good.png", (120, 90), seed=1)
    run = run_cli(model_dir, tmp_path, "score", "-p", PROMPT, str(tiny), str(good), timeout=120)
    assert run.code == 3, run.err
    errs = {os.path.basename(r["path"]): r["error"] for r in run.records}
    assert errs["good.png"] is None
    assert errs["w.png"].startswith("too large to resize safely: 20000x1 resizes to 4480000x224 = 1,003,520,000 "
                                    "pixels before the crop, limit 89,478,485")
    assert run.max_rss < 1 * GIB, f"peak memory {run.max_rss / GIB:.1f} GiB: the strip was resized"
    no_traceback(run.err)


def test_the_resize_limit_is_max_pixels_and_what_fits_is_scored(model_dir, tmp_path):
    strip = strip_png(tmp_path / "s.png", 2000)  # resizes to 448000x224 = 100 Mpx
    run = run_cli(model_dir, tmp_path, "score", "-p", PROMPT, str(strip), "--max-pixels", "50000000")
    assert run.code == 3 and "resizes to 448000x224" in run.records[0]["error"], run.err
    run = run_cli(model_dir, tmp_path, "score", "-p", PROMPT, str(strip), "--max-pixels", "200000000")
    assert run.code == 0 and run.records[0]["rank"] == 1, run.err


def test_the_library_refuses_the_strip_on_both_paths(scorer):
    strip = torch.full((1, 3, 1, 20_000), 0.5)
    with pytest.raises(InvalidArgument, match=r"images\[0\]: too large to resize safely"):
        scorer.score(PROMPT, strip)
    with pytest.raises(InvalidArgument, match="images: too large to resize safely"):
        scorer.score(PROMPT, strip, differentiable=True)
    with pytest.raises(InvalidArgument, match="images: too large to resize safely"):
        scorer.score(PROMPT, strip, preprocess="torch")


# -- ComfyUI graphs that feed themselves or double at each level ------------------------------------------------

def comfy_png(path: Path, graph: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _graph(text_input: list, extra: dict) -> dict:
    return {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "latent_image": ["5", 0]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text_input}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}}, **extra}


def self_linked(tmp_path: Path) -> Path:
    concat = {"class_type": "StringConcatenate",
              "inputs": {"string_a": ["10", 0], "string_b": ["10", 0], "delimiter": " "}}
    return comfy_png(tmp_path / "self.png", _graph(["10", 0], {"10": concat}))


def doubling(tmp_path: Path, levels: int, name: str) -> Path:
    nodes = {"c0": {"class_type": "PrimitiveString", "inputs": {"value": "ab"}}}
    for i in range(1, levels + 1):
        nodes[f"c{i}"] = {"class_type": "StringConcatenate",
                          "inputs": {"string_a": [f"c{i - 1}", 0], "string_b": [f"c{i - 1}", 0], "delimiter": ""}}
    return comfy_png(tmp_path / name, _graph([f"c{levels}", 0], nodes))


def test_comfyui_graphs_that_feed_themselves_or_double_are_read_at_once(tmp_path):
    files = [self_linked(tmp_path), doubling(tmp_path, 12, "d12.png"), doubling(tmp_path, 48, "d48.png")]
    res = run_quick("prompts", *map(str, files), "-f", "jsonl", timeout=60)
    assert res.returncode in (0, 3), res.stderr
    rows = {os.path.basename(r["path"]): r for r in records(res.stdout.decode())}
    assert rows["d12.png"]["prompt"] == "ab" * 2 ** 12  # 8 KB: read, each node once
    assert rows["d48.png"]["prompt"] is None and "over 100,000 characters" in rows["d48.png"]["reason"]
    assert rows["self.png"]["prompt"] is None
    no_traceback(res.stderr.decode())


def test_score_without_prompt_reads_a_self_linked_graph_at_once(model_dir, tmp_path):
    run = run_cli(model_dir, tmp_path, "score", str(self_linked(tmp_path)), timeout=60)
    # read at once: no image has a prompt, a usage error naming why, before the model loads
    assert run.code == 2 and "no text encoder reachable" in run.err, run.err


# -- prompts that are not text ------------------------------------------------------------------------------

def test_a_prompt_of_bytes_that_are_not_utf8_is_a_usage_error(model_dir, tmp_path):
    img = draw_image(tmp_path / "a.png", (64, 48), seed=2)
    for prompt in (b"caf\xe9", b"\xff\xfe a cat"):  # argv bytes that are not UTF-8: lone surrogates in Python
        res = run_quick("score", "-p", prompt, str(img), "--model", str(model_dir), "--no-cache")
        err = res.stderr.decode()
        assert res.returncode == 2 and "--prompt: not valid text" in err and res.stdout == b"", err
        no_traceback(err)


def test_the_library_refuses_text_no_tokenizer_takes_as_a_value_error(scorer, tmp_path):
    img = draw_image(tmp_path / "a.png", (64, 48), seed=2)
    for bad in ("\ud800", ["fine", "caf\udce9"], "nul\0"):
        with pytest.raises(InvalidText) as e:
            scorer.score(bad, [str(img)] * (2 if isinstance(bad, list) else 1))
        assert isinstance(e.value, ValueError) and "not valid text" in str(e.value)
    with pytest.raises(InvalidText):
        scorer.rank("\ud800", [str(img)])
    with pytest.raises(InvalidText):
        scorer.embed_texts(["ok", "\ud800"])


def test_a_metadata_prompt_that_is_not_text_is_that_images_error(model_dir, tmp_path):
    bad = comfy_png(tmp_path / "bad.png", _graph("caf\udce9", {}))  # json.dumps writes the escape \udce9
    good = comfy_png(tmp_path / "good.png", _graph("a red cat", {}))
    run = run_here(model_dir, "score", str(bad), str(good))
    assert run.code == 3, run.err
    errs = {os.path.basename(r["path"]): r["error"] for r in run.records}
    assert errs["good.png"] is None and "not valid text: a lone surrogate U+DCE9" in errs["bad.png"]


# -- JSON nested without end --------------------------------------------------------------------------------

def test_eval_and_compare_refuse_deeply_nested_json_lines(runner, model_dir, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    data = tmp_path / "pairs.jsonl"
    data.write_text(deep + "\n")
    res = runner.invoke(app, ["eval", str(data), "--model", str(model_dir)])
    assert res.exit_code == 2 and "pairs.jsonl:1: not JSON: nested deeper than 64 levels" in res.output, res.output
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"system": "a", "prompt": "x", "image": "a.png"}\n' + deep + "\n")
    res = cli(runner, model_dir, "compare", "--manifest", str(manifest))
    assert res.exit_code == 2 and "line 2: not JSON (nested deeper than 64 levels)" in res.output, res.output


def test_report_refuses_results_nested_without_end(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    (tmp_path / "deep.jsonl").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000 + "\n")
    for name in ("deep.json", "deep.jsonl"):
        res = run_quick("report", str(tmp_path / name), "-o", str(tmp_path / "r.html"))
        err = res.stderr.decode()
        assert res.returncode == 2 and "not" in err and "JSON" in err, err
        no_traceback(err)
    assert not (tmp_path / "r.html").exists()


def test_the_doctor_reports_a_safetensors_header_nested_without_end(model_dir, tmp_path):
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    header = ("[" * 100_000 + "]" * 100_000).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    res = invoke("doctor", "-f", "json", "--model", str(folder))
    err = res.stderr
    assert res.returncode == 1, err
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["weights_complete"]["status"] == "fail"
    assert "nested deeper than 64 levels" in checks["weights_complete"]["detail"], checks["weights_complete"]
    no_traceback(err)


def test_eval_pairs_with_prompts_that_are_not_text_are_skipped_not_fatal(runner, model_dir, tmp_path):
    for i in range(2):
        draw_image(tmp_path / f"{i}.png", (64, 48), seed=i)
    rows = [{"prompt": "caf\udce9", "image_0": "0.png", "image_1": "1.png", "label": 0},
            {"prompt": "a red cat", "image_0": "0.png", "image_1": "1.png", "label": 1}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs-out.jsonl"
    res = runner.invoke(app, ["eval", str(data), "-o", str(out), "--model", str(model_dir), "--bootstrap", "0"])
    assert res.exit_code == 3, res.output
    recs = records(out.read_text())
    assert "not valid text" in recs[0]["error"] and recs[1]["error"] is None


# -- models that give NaN -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_model(model_dir, tmp_path_factory) -> Path:
    """The tiny model with a NaN image projection: every image embedding is NaN."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("nan-model")
    for f in model_dir.iterdir():
        shutil.copy(f, folder / f.name)
    weights = load_file(folder / "model.safetensors")
    weights["visual_projection.weight"] = torch.full_like(weights["visual_projection.weight"], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_model_giving_nan_for_every_image_is_fatal_and_never_ranks(nan_model, tmp_path):
    paths = [str(draw_image(tmp_path / f"{i}.png", (64, 48), seed=i)) for i in range(3)]
    run = run_here(nan_model, "score", "-p", PROMPT, *paths, "-f", "jsonl")
    assert run.code == 1, run.err
    recs = records(run.stdout.decode())  # every record written, none with NaN
    assert len(recs) == 3 and all(r["rank"] is None and r["score"] is None for r in recs)
    assert all(r["error"] == "the model gave a non-finite embedding (NaN or infinity)" for r in recs)
    assert f"{nan_model}: the model gave NaN or infinity for every image (3)" in run.err
    no_traceback(run.err)


def test_compare_with_a_nan_model_fails_naming_it(runner, nan_model, tmp_path):
    for system in ("a", "b"):
        draw_image(tmp_path / system / "1.png", (48, 40), seed=ord(system))
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red cat\n")
    res = cli(runner, nan_model, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--prompts",
              str(tmp_path / "p.csv"), "--bootstrap", "0")
    assert res.exit_code == 1 and "NaN or infinity for every image" in res.output, res.output


def test_eval_with_a_nan_model_fails_naming_it_and_writes_no_nan(runner, nan_model, tmp_path):
    for i in range(2):
        draw_image(tmp_path / f"{i}.png", (64, 48), seed=i)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a red cat", "image_0": "0.png", "image_1": "1.png", "label": 0}) + "\n")
    out = tmp_path / "pairs-out.jsonl"
    res = runner.invoke(app, ["eval", str(data), "-o", str(out), "--model", str(nan_model), "--bootstrap", "0"])
    assert res.exit_code == 1 and "NaN or infinity for every image" in res.output, res.output
    assert not out.exists() or all(r.get("score_0") is None for r in records(out.read_text()))


def test_a_nan_embedding_from_the_cache_is_that_images_error(model_dir, tmp_path):
    from pickrank.core.cache import EmbeddingCache
    from pickrank.inputs.files import content_key
    from pickrank.models.source import inspect_model, resolve_source

    paths = [draw_image(tmp_path / f"{i}.png", (64, 48), seed=i) for i in range(3)]
    cache = tmp_path / "emb.sqlite3"
    fingerprint = inspect_model(resolve_source(str(model_dir)), "fp32").fingerprint
    with_nan = EmbeddingCache(cache)
    with_nan.put_many({content_key(paths[0].read_bytes()): np.full(32, np.nan, np.float32)}, fingerprint)
    with_nan.close()
    res = subprocess.run(pickrank_cmd("score", "-p", PROMPT, *map(str, paths), "--model", str(model_dir),
                                      "--cache", str(cache), "--workers", "0", "-f", "jsonl"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    recs = {os.path.basename(r["path"]): r for r in records(res.stdout)}
    assert recs["0.png"]["rank"] is None and recs["0.png"]["error"].startswith("non-finite score")
    assert sorted(recs[n]["rank"] for n in ("1.png", "2.png")) == [1, 2]


# -- the weight-hash memo lands only beside a pickrank cache -------------------------------------------------

@pytest.mark.parametrize("kind", ["foreign database", "folder", "fifo"])
def test_the_weight_hash_memo_is_never_written_beside_a_stranger(model_dir, tmp_path, kind):
    own = tmp_path / "own"
    own.mkdir()
    cache = own / "thing"
    if kind == "foreign database":
        foreign_database(cache)
    elif kind == "folder":
        cache.mkdir()
    else:
        os.mkfifo(cache)
    img = draw_image(tmp_path / "a.png", (64, 48), seed=3)
    xdg = tmp_path / "xdg"
    res = run_quick("score", "-p", PROMPT, str(img), "--model", str(model_dir), "--cache", str(cache),
                    "--workers", "0", "--meta", str(tmp_path / "meta.json"), env={"XDG_CACHE_HOME": str(xdg)})
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(own)) == ["thing"] and (not cache.is_dir() or not os.listdir(cache))
    assert (xdg / "pickrank" / "weight-hashes.json").is_file()  # pickrank's own folder keeps the memo
    assert json.loads((tmp_path / "meta.json").read_text())["weights"]


def test_a_cache_on_a_device_gets_no_memo_beside_it(model_dir, tmp_path):
    img = draw_image(tmp_path / "a.png", (64, 48), seed=3)
    assert not os.path.exists("/dev/weight-hashes.json")
    res = run_quick("score", "-p", PROMPT, str(img), "--model", str(model_dir), "--cache", "/dev/null",
                    "--workers", "0", "--meta", str(tmp_path / "meta.json"),
                    env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert not os.path.exists("/dev/weight-hashes.json"), "a file was written beside /dev/null"
    assert res.returncode == 0 and (tmp_path / "xdg" / "pickrank" / "weight-hashes.json").is_file(), res.stderr
    no_traceback(res.stderr.decode())


# -- intervals that cannot be trusted are marked, a bootstrap that cannot fit is refused first --------------

def _one_prompt(tmp_path: Path) -> list[str]:
    for system in ("a", "b"):
        draw_image(tmp_path / system / "1.png", (48, 40), seed=ord(system))
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red cat\n")
    return [str(tmp_path / "a"), str(tmp_path / "b"), "--prompts", str(tmp_path / "p.csv")]


def test_compare_marks_unreliable_intervals_in_every_format(runner, model_dir, tmp_path):
    args = _one_prompt(tmp_path)
    res = cli(runner, model_dir, "compare", *args, "--bootstrap", "1", "-f", "json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["unreliable_intervals"] == "* unreliable interval: 1 prompt(s), under 20; 1 resample(s), under 1000"
    assert all(s["caveat"] for s in out["systems"]) and all(p["caveat"] for p in out["pairs"])
    assert "unreliable intervals (marked *)" in res.stderr
    res = cli(runner, model_dir, "compare", *args, "--bootstrap", "2000", "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert rows and all(r["interval_caveat"] == "1 prompt(s), under 20" for r in rows), res.stdout
    res = cli(runner, model_dir, "compare", *args, "--bootstrap", "2000", "--html", str(tmp_path / "c.html"))
    assert "]*" in res.stdout and "* unreliable interval: 1 prompt(s), under 20" in res.stdout
    assert "* unreliable interval: 1 prompt(s), under 20" in (tmp_path / "c.html").read_text()


def test_a_bootstrap_that_cannot_fit_in_memory_is_refused_before_the_model_loads(runner, tmp_path):
    args = _one_prompt(tmp_path)
    start = time.monotonic()
    res = runner.invoke(app, ["compare", *args, "--model", str(tmp_path / "no-such-model"), "--bootstrap",
                              str(10 ** 12)])
    assert res.exit_code == 2 and "--bootstrap 1000000000000: the intervals of 6 statistics" in res.output, \
        res.output
    assert time.monotonic() - start < 60


def test_compare_with_a_system_without_images_is_a_usage_error(runner, model_dir, tmp_path):
    draw_image(tmp_path / "a" / "1.png", (48, 40), seed=1)
    (tmp_path / "a" / "prompt.txt").write_text("a red cat")
    (tmp_path / "empty").mkdir()
    res = cli(runner, model_dir, "compare", str(tmp_path / "a"), str(tmp_path / "empty"))
    assert res.exit_code == 2 and "system 'empty' has no images to compare" in res.output, res.output


# -- generator metadata that cannot be read is said to be unreadable --------------------------------------------

def itxt(key: str, value: bytes) -> bytes:
    return png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value)


def test_an_itxt_chunk_that_is_not_utf8_is_unreadable_not_absent(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "base.png")
    png = (tmp_path / "base.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(png[:33] + itxt("parameters", b"caf\xe9 au lait\nSteps: 20") + png[33:])
    res = run_quick("prompts", str(tmp_path / "bad.png"), "-f", "jsonl")
    row = records(res.stdout.decode())[0]
    assert row["prompt"] is None and row["reason"].startswith("unreadable metadata: the 'parameters' text"), row


def _jpeg_with_user_comment(path: Path, comment: bytes) -> Path:
    value = comment
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(value), 40)
    exif = b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + value
    Image.new("RGB", (8, 8)).save(path, exif=exif)
    return path


def test_exif_user_comments_in_unknown_charsets_or_cut_short_never_leak_into_the_prompt(tmp_path):
    foobar = _jpeg_with_user_comment(tmp_path / "foobar.jpg", b"FOOBAR\0\0a castle on a hill\nSteps: 20")
    odd = _jpeg_with_user_comment(tmp_path / "odd.jpg",
                                  b"UNICODE\0" + "a castle\nSteps: 20".encode("utf_16_be") + b"\0")
    res = run_quick("prompts", str(foobar), str(odd), "-f", "jsonl")
    rows = {os.path.basename(r["path"]): r for r in records(res.stdout.decode())}
    assert rows["foobar.jpg"]["prompt"] is None and "charset pickrank cannot read (FOOBAR)" in \
        rows["foobar.jpg"]["reason"]
    assert rows["odd.jpg"]["prompt"] == "a castle"  # no trailing U+FFFD from the half character


# -- library arguments of the wrong kind ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def scorer(model_dir) -> PickScorer:
    return PickScorer.from_pretrained(str(model_dir), device="cpu")


def test_images_without_pixels_are_value_errors_naming_the_argument(scorer):
    for images, where in ((Image.new("RGB", (0, 0)), r"images\[0\]"), ([np.zeros((2, 2, 3), np.uint8),
                                                                         np.zeros((0, 5, 3), np.uint8)], r"images\[1\]"),
                          (torch.zeros(1, 3, 0, 5), r"images\[0\]")):
        with pytest.raises(InvalidArgument, match=f"{where}: an image of .* pixels has nothing to score"):
            scorer.score(PROMPT, images)
    with pytest.raises(InvalidArgument, match="images: an image of 5x0 pixels"):
        scorer.score(PROMPT, torch.zeros(1, 3, 0, 5), differentiable=True)


def test_prompts_of_the_wrong_type_are_type_errors(scorer):
    img = np.zeros((8, 8, 3), np.uint8)
    for bad, said in ((None, "prompts: a string or a list of strings, got NoneType"),
                      (3, "prompts: a string or a list of strings, got int"),
                      (b"abc", "prompts: bytes are not text"), ([None], r"prompts\[0\]: a string, got NoneType")):
        with pytest.raises(ArgumentTypeError, match=said) as e:
            scorer.score(bad, img)
        assert isinstance(e.value, TypeError)
    with pytest.raises(ArgumentTypeError, match="prompt: a string"):
        scorer.rank(None, [])
    with pytest.raises(InvalidArgument, match="2 prompts for 1 images"):
        scorer.score(["a", "b"], img)


def test_float_tensors_with_nan_are_refused_and_out_of_range_warned_on_every_path(scorer):
    x = torch.rand(2, 3, 64, 48)
    x[1, 0, 5, 5] = float("nan")
    for kw in ({}, {"differentiable": True}, {"preprocess": "torch"}):
        with pytest.raises(InvalidArgument, match="holds NaN or infinity"):
            scorer.score(PROMPT, x, **kw)
    y = torch.rand(2, 3, 64, 48) * 1.5 - 0.2
    for kw in ({}, {"differentiable": True}, {"preprocess": "torch"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = scorer.score(PROMPT, y, **kw)
        assert any("outside [0, 1]" in str(w.message) for w in caught), kw
        assert bool(torch.isfinite(scores).all())


def test_finite_exact_path_scores_are_unchanged_by_the_checks(scorer, tmp_path):
    """The checks only refuse: an ordinary image scores as the CLI scores it."""
    img = draw_image(tmp_path / "a.png", (300, 200), seed=5)
    direct = scorer.score(PROMPT, [str(img)])[0].item()
    ranked = scorer.rank(PROMPT, [str(img)])[0]["score"]
    assert math.isfinite(direct) and direct == pytest.approx(ranked, abs=1e-4)



def test_the_library_refuses_nan_scores_from_a_broken_model(nan_model, tmp_path):
    """A reward is never NaN: PickScorer.score raises NonFiniteScores naming the model, on the exact and the
    tensor paths; rank() keeps its error records."""
    nan_scorer = PickScorer.from_pretrained(str(nan_model), device="cpu")
    img = draw_image(tmp_path / "a.png", (64, 48), seed=3)
    with pytest.raises(NonFiniteScores, match="NaN or infinity for 1 of 1 image"):
        nan_scorer.score(PROMPT, [str(img)])
    with pytest.raises(NonFiniteScores, match=str(nan_model)):
        nan_scorer.score(PROMPT, torch.rand(2, 3, 64, 64), preprocess="torch")
    assert issubclass(NonFiniteScores, PickrankError)


# -- the server bounds the resize too: a thin strip is its request's 413 ----------------------------------------

def test_the_server_answers_413_for_a_strip_whose_resize_is_too_large(model_dir, tmp_path):
    import base64
    import io

    import httpx
    from safetensors.numpy import save

    from tests.support.server import running_server

    buf = io.BytesIO()
    Image.fromarray(np.full((1, 20_000, 3), 128, np.uint8)).save(buf, format="PNG", optimize=True)
    encoded = {"prompts": [PROMPT], "images": [base64.b64encode(buf.getvalue()).decode()]}
    array = save({"images.0": np.full((1, 1, 10_000, 3), 128, np.uint8)}, metadata={"prompt": PROMPT})
    good = {"prompts": [PROMPT], "images": [base64.b64encode((draw_image(tmp_path / "g.png", (64, 48), seed=1))
                                                             .read_bytes()).decode()]}
    with running_server(model_dir, workers=0) as s:
        s.wait_ready()
        for res in (httpx.post(s.url + "/v1/score", json=encoded, timeout=60),
                    httpx.post(s.url + "/v1/score", content=array, timeout=60,
                               headers={"content-type": "application/x-safetensors"})):
            assert res.status_code == 413, res.text
            assert "images[0]: too large to resize safely" in res.json()["error"], res.text
        ok = httpx.post(s.url + "/v1/score", json=good, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 1, ok.text
