"""The three commands through the real CLI: inputs, formats, grouping, CSV semantics, exit codes, dedupe."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import PngImagePlugin

from pickrank import __version__
from pickrank.cli.app import app
from pickrank.models.torch_embedder import Embedder
from tests.support.commands import jsonl
from tests.support.images import draw_image, image_paths, mixed_batch_csv


def invoke(runner, model_dir, *args, input: str | None = None):
    return runner.invoke(app, [*args, "--model", str(model_dir)], input=input)


# -- score: inputs ------------------------------------------------------------------------------------------

def test_score_folder_jsonl_by_default_when_piped(runner, model_dir, images):
    res = invoke(runner, model_dir, "score", "--prompt", "a red cat", str(images))
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert sorted(r["path"] for r in recs) == image_paths(images)  # recursive, all formats
    assert [r["rank"] for r in recs] == list(range(1, 7))
    assert all(r["prompt"] == "a red cat" and r["error"] is None for r in recs)
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["prob"] for r in recs) == pytest.approx(1.0, abs=1e-5)


def by_path(recs: list[dict]) -> dict[str, float]:
    return {os.path.basename(r["path"]): r["score"] for r in recs}


def test_folder_glob_stdin_and_files_give_the_same_ranking(runner, model_dir, images):
    folder = jsonl(invoke(runner, model_dir, "score", "-p", "x", str(images)).stdout)
    glob_ = jsonl(invoke(runner, model_dir, "score", "-p", "x", str(images / "**" / "*")).stdout)
    stdin = jsonl(invoke(runner, model_dir, "score", "-p", "x", "-", input="\n".join(image_paths(images)) + "\n").stdout)
    files = jsonl(invoke(runner, model_dir, "score", "-p", "x", *image_paths(images)).stdout)
    assert len(folder) == 6
    for other in (glob_, stdin, files):
        assert by_path(other) == pytest.approx(by_path(folder), abs=1e-6)


def test_non_recursive_glob_and_extension_filter(runner, model_dir, images):
    (images / "notes.txt").write_text("not an image")
    res = invoke(runner, model_dir, "score", "-p", "x", str(images / "*.png"))
    assert res.exit_code == 0
    assert sorted(os.path.basename(r["path"]) for r in jsonl(res.stdout)) == ["img1.png", "img3.png"]
    res = invoke(runner, model_dir, "score", "-p", "x", str(images))  # folders skip non-image files
    assert "notes.txt" not in res.stdout


def test_duplicate_paths_scored_once(runner, model_dir, images, count_embeds):
    one = str(images / "img0.jpg")
    res = invoke(runner, model_dir, "score", "-p", "x", "--no-cache", one, one, str(images / "img0.jpg"),
                 str(images / ".." / "imgs" / "img0.jpg"))
    assert res.exit_code == 0, res.output
    assert len(jsonl(res.stdout)) == 1
    assert sum(count_embeds) == 1


def test_copies_under_two_names_are_embedded_once(runner, model_dir, images, count_embeds):
    shutil.copy(images / "img0.jpg", images / "copy_of_img0.jpg")
    res = invoke(runner, model_dir, "score", "-p", "x", "--no-cache", str(images))
    recs = jsonl(res.stdout)
    assert len(recs) == 7
    assert sum(count_embeds) == 6  # 7 files, 6 distinct contents
    s = by_path(recs)
    assert s["copy_of_img0.jpg"] == s["img0.jpg"]


def test_top_k(runner, model_dir, images):
    full = jsonl(invoke(runner, model_dir, "score", "-p", "x", str(images)).stdout)
    top = jsonl(invoke(runner, model_dir, "score", "-p", "x", "--top", "2", str(images)).stdout)
    assert top == full[:2]  # prob stays the softmax over the whole candidate set


# -- formats --------------------------------------------------------------------------------------------------

def test_formats_parse_back_to_the_same_records(runner, model_dir, images, tmp_path):
    base = jsonl(invoke(runner, model_dir, "score", "-p", "x", "-f", "jsonl", str(images)).stdout)
    as_json = json.loads(invoke(runner, model_dir, "score", "-p", "x", "-f", "json", str(images)).stdout)
    assert as_json == base
    rows = list(csv.DictReader(io.StringIO(invoke(runner, model_dir, "score", "-p", "x", "-f", "csv",
                                                  str(images)).stdout)))
    assert [r["path"] for r in rows] == [r["path"] for r in base]
    assert [float(r["score"]) for r in rows] == [r["score"] for r in base]
    assert list(rows[0].keys()) == ["prompt", "prompt_source", "path", "score", "prob", "rank", "truncated", "error"]
    paths = invoke(runner, model_dir, "score", "-p", "x", "-f", "paths", "--top", "3", str(images)).stdout
    assert paths.splitlines() == [r["path"] for r in base[:3]]
    table = invoke(runner, model_dir, "score", "-p", "x", "-f", "table", str(images)).stdout
    assert "rank" in table and "img0.jpg" in table and f"{base[0]['score']:.3f}" in table


def test_output_file_is_written_atomically(runner, model_dir, images, tmp_path):
    out = tmp_path / "res.json"
    res = invoke(runner, model_dir, "score", "-p", "x", "-f", "json", "-o", str(out), str(images))
    assert res.exit_code == 0
    assert res.stdout == ""  # results went to the file only
    assert len(json.loads(out.read_text())) == 6
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_stdout_carries_results_only(model_dir, images):
    proc = subprocess.run([sys.executable, "-m", "pickrank", "score", "-p", "x", "--model", str(model_dir),
                           str(images)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(jsonl(proc.stdout)) == 6  # every stdout line is a record
    assert "on cpu" in proc.stderr  # which device and dtype run is said on stderr


def test_closed_pipe_ends_quietly(model_dir, images):
    cmd = (f"{sys.executable} -m pickrank score -p x --model {model_dir} --batch-size 1 --workers 0 {images}"
           " | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert len(jsonl(proc.stdout)) == 1
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


# -- exit codes -----------------------------------------------------------------------------------------------

def test_unreadable_image_is_a_record_and_exit_3(runner, model_dir, images):
    (images / "broken.png").write_bytes(b"not a png at all")
    res = invoke(runner, model_dir, "score", "-p", "x", str(images))
    assert res.exit_code == 3
    recs = jsonl(res.stdout)
    bad = [r for r in recs if r["error"]]
    assert len(recs) == 7 and len(bad) == 1
    assert bad[0]["path"].endswith("broken.png") and bad[0]["score"] is None and bad[0]["rank"] is None
    assert "broken.png" in res.stderr


def test_no_images_found_is_usage_error(runner, model_dir, tmp_path):
    res = invoke(runner, model_dir, "score", "-p", "x", str(tmp_path))
    assert res.exit_code == 2
    assert "no images found" in res.stderr


def test_bad_option_is_usage_error(runner, model_dir, images):
    assert invoke(runner, model_dir, "score", "-p", "x", "--format", "xml", str(images)).exit_code == 2
    assert invoke(runner, model_dir, "score", "-p", "x", "--batch-size", "0", str(images)).exit_code == 2


def test_model_that_cannot_load_is_fatal(runner, images, tmp_path):
    res = runner.invoke(app, ["score", "-p", "x", "--model", str(tmp_path / "nope"), str(images)])
    assert res.exit_code == 1
    assert "pickrank: error:" in res.stderr and "Traceback" not in res.stderr


def test_hub_model_offline_without_cached_weights_is_a_clear_error(runner, images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    res = runner.invoke(app, ["score", "-p", "x", "--offline", str(images)])
    assert res.exit_code == 1
    assert "yuvalkirstain/PickScore_v1" in res.stderr and "offline" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_version():
    proc = subprocess.run([sys.executable, "-m", "pickrank", "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == f"pickrank {__version__}"


def test_help_does_not_import_torch():
    code = "import sys; from pickrank.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- shared options -------------------------------------------------------------------------------------------

def test_model_from_env(runner, model_dir, images, monkeypatch):
    monkeypatch.setenv("PICKRANK_MODEL", str(model_dir))
    res = runner.invoke(app, ["score", "-p", "x", str(images)])
    assert res.exit_code == 0, res.output
    assert len(jsonl(res.stdout)) == 6


def test_explicit_processor_device_and_quiet(runner, model_dir, images):
    res = invoke(runner, model_dir, "score", "-p", "x", "--processor", str(model_dir), "--device", "cpu",
                 "--quiet", str(images))
    assert res.exit_code == 0
    assert res.stderr == ""


def test_unavailable_device_and_dtype_are_usage_errors(runner, model_dir, images):
    res = invoke(runner, model_dir, "score", "-p", "x", "--device", "cuda", str(images))
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr
    res = invoke(runner, model_dir, "score", "-p", "x", "--dtype", "fp16", str(images))
    assert res.exit_code == 2 and "fp16" in res.stderr


def test_bf16_runs_where_the_cpu_supports_it(runner, model_dir, images):
    from pickrank.models.torch_embedder import cpu_has_bf16

    res = invoke(runner, model_dir, "score", "-p", "x", "--dtype", "bf16", "--no-cache", str(images))
    if not cpu_has_bf16():
        assert res.exit_code == 2 and "bf16 instructions" in res.stderr
        return
    assert res.exit_code == 0, res.output
    fp32 = by_path(jsonl(invoke(runner, model_dir, "score", "-p", "x", "--no-cache", str(images)).stdout))
    bf16 = by_path(jsonl(res.stdout))
    assert bf16.keys() == fp32.keys()
    assert max(abs(bf16[k] - fp32[k]) for k in fp32) < 1.0  # close, but a different precision
    assert "bfloat16" in res.stderr


# -- best-of-n ------------------------------------------------------------------------------------------------

def png_with_text(path: Path, seed: int, **text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    draw_image(path, (120, 90), seed)
    from PIL import Image

    Image.open(path).save(path, pnginfo=info)
    return path


@pytest.fixture
def generations(tmp_path) -> Path:
    root = tmp_path / "out"
    for i in range(3):
        draw_image(root / f"top{i}.png", (100, 80), seed=10 + i)
    (root / "prompt.txt").write_text("a top level prompt\n")
    for i in range(4):
        png_with_text(root / "a1111" / f"{i}.png", 20 + i,
                      parameters="a castle on a hill, oil painting\nNegative prompt: blurry\nSteps: 20, Sampler: Euler")
    for i in range(2):
        png_with_text(root / "desc" / f"{i}.png", 30 + i, Description="a bowl of fruit")
    for i in range(2):
        draw_image(root / "txt" / f"{i}.jpg", (64, 64), seed=40 + i)
    (root / "txt" / "prompt.txt").write_text("a red cat")
    for i in range(2):
        draw_image(root / "noprompt" / f"{i}.jpg", (64, 64), seed=50 + i)
    (root / "empty").mkdir()
    return root


def test_best_of_n_groups_and_prompts(runner, model_dir, generations):
    res = invoke(runner, model_dir, "best-of-n", str(generations), "--top", "2")
    assert res.exit_code == 3  # the group without a prompt is an error record
    recs = jsonl(res.stdout)
    groups = {}
    for r in recs:
        groups.setdefault(r["group"], []).append(r)
    assert set(groups) == {"out", "a1111", "desc", "txt", "noprompt"}
    assert groups["out"][0]["prompt"] == "a top level prompt"
    assert groups["a1111"][0]["prompt"] == "a castle on a hill, oil painting"
    assert groups["desc"][0]["prompt"] == "a bowl of fruit"
    assert groups["txt"][0]["prompt"] == "a red cat"
    assert groups["noprompt"][0]["error"].startswith("no prompt")
    assert [r["rank"] for r in groups["a1111"]] == [1, 2]  # top 2 of 4
    assert [r["rank"] for r in groups["txt"]] == [1, 2]
    assert all(os.path.dirname(r["path"]).endswith("a1111") for r in groups["a1111"])


def test_best_of_n_prompt_option_overrides(runner, model_dir, generations):
    res = invoke(runner, model_dir, "best-of-n", str(generations), "--prompt", "one prompt for all")
    assert res.exit_code == 0
    recs = jsonl(res.stdout)
    assert {r["prompt"] for r in recs} == {"one prompt for all"}
    assert len(recs) == 5 and all(r["rank"] == 1 for r in recs)  # top 1 per group by default


def test_best_of_n_copy_to_never_overwrites(runner, model_dir, generations, tmp_path):
    keep = tmp_path / "keep"
    (keep / "a1111").mkdir(parents=True)
    for name in ("0.png", "1.png", "2.png", "3.png"):  # whichever wins in group a1111, its name is taken
        (keep / "a1111" / name).write_bytes(b"already here")
    res = invoke(runner, model_dir, "best-of-n", str(generations), "-p", "x", "--copy-to", str(keep))
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    copied = [r["copied_to"] for r in recs]
    assert len(set(copied)) == len(recs) == 5
    assert all((keep / "a1111" / f"{i}.png").read_bytes() == b"already here" for i in range(4))
    for r in recs:
        assert Path(r["copied_to"]).read_bytes() == Path(r["path"]).read_bytes()
        # each winner keeps its group: KEEP/GROUP/NAME (a free NAME-1 when NAME is taken)
        assert Path(r["copied_to"]).parent == keep / r["group"]
    a1111 = next(r for r in recs if r["group"] == "a1111")
    assert Path(a1111["copied_to"]).name == Path(a1111["path"]).stem + "-1.png"


def test_best_of_n_paths_format_for_xargs(runner, model_dir, generations):
    res = invoke(runner, model_dir, "best-of-n", str(generations), "-p", "x", "-f", "paths")
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and all(os.path.isfile(p) for p in lines)


def test_best_of_n_not_a_folder(runner, model_dir, tmp_path):
    res = invoke(runner, model_dir, "best-of-n", str(tmp_path / "missing"), "-p", "x")
    assert res.exit_code == 2


# -- batch ----------------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def test_batch_shared_set_embeds_each_image_and_prompt_once(runner, model_dir, images, tmp_path, count_embeds,
                                                            monkeypatch):
    texts: list[list[str]] = []
    real = Embedder.embed_texts

    def counting_texts(self, t):
        texts.append(list(t))
        return real(self, t)

    monkeypatch.setattr(Embedder, "embed_texts", counting_texts)
    prompts = ["a red cat", "a blue dog", "a red cat", "the sea"]
    csv_path = write_csv(tmp_path / "p.csv", [{"prompt": p} for p in prompts], ["prompt"])
    res = invoke(runner, model_dir, "batch", str(csv_path), str(images), "--no-cache")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert len(recs) == 4 * 6
    assert [r["id"] for r in recs[::6]] == ["1", "2", "3", "4"]  # 1-based row numbers
    assert sum(count_embeds) == 6
    assert sorted(sum(texts, [])) == sorted(set(prompts))
    # the same prompt on two rows ranks identically
    assert [r["score"] for r in recs[0:6]] == [r["score"] for r in recs[12:18]]
    # and each row equals a plain `score` run
    single = jsonl(invoke(runner, model_dir, "score", "-p", "a blue dog", "--no-cache", str(images)).stdout)
    assert [r["score"] for r in recs[6:12]] == pytest.approx([r["score"] for r in single], abs=1e-5)


def test_batch_images_column_folder_glob_and_list(runner, model_dir, images, tmp_path, count_embeds):
    csv_path = mixed_batch_csv(images, tmp_path)
    res = invoke(runner, model_dir, "batch", str(csv_path), "--no-cache")
    assert res.exit_code == 3  # row d matches no image
    recs = jsonl(res.stdout)
    by_id: dict[str, list] = {}
    for r in recs:
        by_id.setdefault(r["id"], []).append(r)
    assert len(by_id["a"]) == 6 and len(by_id["b"]) == 2 and len(by_id["c"]) == 2
    assert by_id["d"][0]["error"] and by_id["d"][0]["score"] is None
    assert sum(count_embeds) == 6  # overlapping rows reuse embeddings


def test_batch_needs_prompt_column_and_paths(runner, model_dir, images, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", [{"text": "x"}], ["text"])
    res = invoke(runner, model_dir, "batch", str(bad), str(images))
    assert res.exit_code == 2 and "prompt" in res.stderr and "text" in res.stderr
    ok = write_csv(tmp_path / "ok.csv", [{"prompt": "x"}], ["prompt"])
    res = invoke(runner, model_dir, "batch", str(ok))
    assert res.exit_code == 2 and "no 'images'" in res.stderr


def test_batch_paths_from_stdin(runner, model_dir, images, tmp_path):
    csv_path = write_csv(tmp_path / "p.csv", [{"prompt": "x"}], ["prompt"])
    res = invoke(runner, model_dir, "batch", str(csv_path), "-", input="\n".join(image_paths(images)))
    assert res.exit_code == 0
    assert len(jsonl(res.stdout)) == 6


def test_a_command_run_in_process_leaves_logging_and_signal_handlers_as_they_were(runner, model_dir, images):
    """A notebook or a test that runs a command in its own process gets its logging and SIGTERM/SIGHUP handlers
    back when the command ends, whether it succeeded or failed."""
    import logging
    import signal

    log = logging.getLogger("pickrank")
    mine = logging.NullHandler()
    log.addHandler(mine)
    marker = lambda signum, frame: None  # noqa: E731
    saved = {s: signal.signal(s, marker) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        before = (list(log.handlers), log.level, log.propagate)
        for args in (["score", "-p", "x", str(images), "--model", str(model_dir), "--no-cache", "--workers", "0"],
                     ["score", "-p", "x", str(images), "--model", str(images / "no-model"), "--no-cache"]):
            res = runner.invoke(app, args)
            assert res.exit_code in (0, 1), res.output
            assert (list(log.handlers), log.level, log.propagate) == before
            assert all(signal.getsignal(s) is marker for s in saved)
    finally:
        log.removeHandler(mine)
        for s, h in saved.items():
            signal.signal(s, h)
