"""Every number traceable (the provenance in each output that carries it) and convertible (--scale).

Through the real CLI (typer's CliRunner) and the tiny real CLIP of conftest.py; hashes are checked against hashlib
and the `sha256sum` tool, versions against the imported libraries. Nothing is mocked.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import PIL
import pytest
import torch
import transformers

from pickrank import PickScorer
from pickrank.cli.app import app
from pickrank.core.provenance import compute
from pickrank.models.hashing import STORE_NAME, HashStore
from pickrank.models.source import TOKENIZER_FILES
from tests.support.images import draw_image

PROMPT = "a red cat on a blue sofa"
SCALES = ("raw", "cosine", "unit26")


def cli(runner, model_dir, *args: str):
    """The real CLI in process: the tiny model on the CPU, no decode workers (eval has no --workers)."""
    workers = [] if args[0] == "eval" else ["--workers", "0"]
    return runner.invoke(app, [*args, "--model", str(model_dir), "--device", "cpu", *workers])


def ok(res) -> str:
    assert res.exit_code == 0, res.output
    return res.stdout


def exp_logit_scale(model_dir: Path) -> float:
    """exp(logit_scale) read from the checkpoint itself (safetensors, no pickrank code)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return float(f.get_tensor("logit_scale").float().exp())


def check_provenance(meta: dict, model_dir: Path, scale: str = "raw") -> None:
    """The provenance names the tiny model as it is on disk: hashes from hashlib and sha256sum, not from pickrank."""
    assert meta["model"] == str(model_dir) and meta["processor"] == str(model_dir)
    assert meta["revision"] is None  # a local folder
    assert meta["weights"] == {"model.safetensors": hashlib.sha256((model_dir / "model.safetensors").read_bytes())
                               .hexdigest()}
    names = sorted(n for n in os.listdir(model_dir) if n in TOKENIZER_FILES)
    assert meta["tokenizer_files"] == names and "tokenizer.json" in names
    lines = subprocess.run(["sha256sum", *names], cwd=model_dir, capture_output=True, check=True).stdout
    assert meta["tokenizer_sha256"] == hashlib.sha256(lines).hexdigest()  # `sha256sum FILES | sha256sum`
    assert (meta["dtype"], meta["device"], meta["gpu"], meta["backend"]) == ("float32", "cpu", None, "torch")
    assert meta["scale"] == scale and meta["exp_logit_scale"] == pytest.approx(exp_logit_scale(model_dir), rel=1e-6)
    pre = meta["preprocessing"]
    assert (pre["resize_shortest_edge"], pre["crop"], pre["resample"]) == (224, [224, 224], "bicubic")
    assert (pre["alpha"], pre["decode"]) == ("white", "exact")
    v = meta["versions"]
    assert (v["torch"], v["transformers"], v["pillow"]) == (torch.__version__, transformers.__version__,
                                                           PIL.__version__)
    assert v["python"] == platform.python_version() and v["pickrank"]


# -- the provenance, where each output carries it -------------------------------------------------------

def test_with_meta_wraps_the_json_array_and_the_records_are_unchanged(runner, model_dir, images):
    plain = json.loads(ok(cli(runner, model_dir, "score", "-p", PROMPT, str(images), "--no-cache", "-f", "json")))
    wrapped = json.loads(ok(cli(runner, model_dir, "score", "-p", PROMPT, str(images), "--no-cache", "-f", "json",
                                "--with-meta")))
    assert list(wrapped) == ["meta", "records"] and wrapped["records"] == plain
    check_provenance(wrapped["meta"], model_dir)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json", "paths", "table"])
def test_meta_file_beside_any_format_leaves_the_records_as_they_were(runner, model_dir, images, tmp_path, fmt):
    args = ("score", "-p", PROMPT, str(images), "--no-cache", "-f", fmt)
    before = ok(cli(runner, model_dir, *args))
    meta = tmp_path / "out" / "meta.json"
    meta.parent.mkdir()
    assert ok(cli(runner, model_dir, *args, "--meta", str(meta))) == before  # CSV, JSON Lines...: pure records
    check_provenance(json.loads(meta.read_text()), model_dir)
    assert os.listdir(meta.parent) == ["meta.json"]  # written by temp file + rename: nothing left beside it


def test_meta_is_checked_before_the_model_loads_and_never_over_an_input(runner, model_dir, images, tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    res = cli(runner, broken, "score", "-p", PROMPT, str(images), "--meta", str(tmp_path / "no" / "m.json"))
    assert res.exit_code == 1 and "--meta" in res.stderr and "does not exist" in res.stderr  # not the model's error
    image = images / "img0.jpg"
    data = image.read_bytes()
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(images), "--meta", str(image))
    assert res.exit_code == 2 and "--meta" in res.stderr and image.read_bytes() == data
    out = tmp_path / "r.jsonl"
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(images), "-o", str(out), "--meta", str(out))
    assert res.exit_code == 2 and "same file" in res.stderr and not out.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_with_meta_is_refused_where_the_format_stays_pure_records(runner, model_dir, images, fmt):
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(images), "-f", fmt, "--with-meta")
    assert res.exit_code == 2 and "--with-meta" in res.stderr and "--meta FILE" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


def page_provenance(text: str) -> dict:
    """The provenance a page carries for machines: its provenance block's data-json attribute."""
    m = re.search(r'<details class="prov" id="provenance" data-json="([^"]*)">', text)
    assert m, "no provenance block"
    return json.loads(html.unescape(m.group(1)))


def test_html_report_shows_the_provenance_escaped_and_report_keeps_it(runner, model_dir, images, tmp_path):
    odd = tmp_path / "model <evil>&amp; <" / "script>x"  # a path that is markup ("...</script>x"): escaped
    odd.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy2(f, odd / f.name)
    page, saved = tmp_path / "p.html", tmp_path / "r.json"
    ok(cli(runner, odd, "score", "-p", PROMPT, str(images), "--no-cache", "--html", str(page), "-f", "json",
           "--with-meta", "-o", str(saved)))
    text = page.read_text()
    meta = page_provenance(text)
    assert meta == json.loads(saved.read_text())["meta"] and meta["model"] == str(odd)
    assert "<evil>" not in text and "</script>x" not in text  # neither in the visible table nor in data-json
    assert html.escape(str(odd)) in text and meta["weights"]["model.safetensors"] in text  # the visible block
    assert '<dd data-k="scale">raw</dd>' in text
    report = tmp_path / "again.html"
    ok(runner.invoke(app, ["report", str(saved), "-o", str(report)]))  # the wrapped JSON reads back
    assert page_provenance(report.read_text()) == meta


def test_eval_summary_and_table_carry_the_provenance_with_meta(runner, model_dir, tmp_path):
    imgs = [draw_image(tmp_path / f"i{i}.png", (90 + 7 * i, 80), seed=i) for i in range(4)]
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "image_0", "image_1", "label"], ["a cat", imgs[0].name, imgs[1].name, 0],
                     ["a dog", imgs[2].name, imgs[3].name, 1]])
    base = ("eval", str(pairs), "--bootstrap", "10")
    plain = json.loads(ok(cli(runner, model_dir, *base, "--json")))
    assert set(plain["model"]) == {"model", "revision", "device", "dtype"}  # as before, without the new options
    meta = tmp_path / "m.json"
    with_meta = json.loads(ok(cli(runner, model_dir, *base, "--json", "--with-meta", "--meta", str(meta))))
    check_provenance(with_meta["model"], model_dir)
    assert json.loads(meta.read_text()) == with_meta["model"]
    assert {k: v for k, v in with_meta.items() if k != "model"} == {k: v for k, v in plain.items() if k != "model"}
    table = ok(cli(runner, model_dir, *base, "--with-meta", "--scale", "unit26"))
    weights = with_meta["model"]["weights"]["model.safetensors"]
    assert f"weights     model.safetensors sha256:{weights}" in table and "scale       unit26" in table


def two_systems(root: Path) -> tuple[Path, Path, Path]:
    for system, seed in (("a", 1), ("b", 2)):
        for i in range(1, 4):
            draw_image(root / system / f"{i}.png", (64, 48), seed=seed * 10 + i)
    prompts = root / "p.csv"
    prompts.write_text("id,prompt\n1,a red cat\n2,a blue dog\n3,a green bird\n")
    return root / "a", root / "b", prompts


def compare_json(runner, model_dir, a, b, prompts, *extra: str) -> dict:
    return json.loads(ok(cli(runner, model_dir, "compare", str(a), str(b), "--prompts", str(prompts), "-f", "json",
                             "--no-cache", "--bootstrap", "50", *extra)))


def test_compare_json_and_html_carry_the_provenance(runner, model_dir, tmp_path):
    a, b, prompts = two_systems(tmp_path)
    page, meta = tmp_path / "c.html", tmp_path / "m.json"
    data = compare_json(runner, model_dir, a, b, prompts, "--html", str(page), "--meta", str(meta))
    check_provenance(data["model"], model_dir)
    assert page_provenance(page.read_text()) == data["model"] == json.loads(meta.read_text())


def test_the_api_gives_the_same_provenance_once(runner, model_dir, images):
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu", scale="unit26")
    first = scorer.provenance
    check_provenance(first, model_dir, scale="unit26")
    assert scorer.provenance is first  # computed once per scorer
    cli_meta = json.loads(ok(cli(runner, model_dir, "score", "-p", PROMPT, str(images), "--no-cache", "-f", "json",
                                 "--with-meta", "--scale", "unit26")))["meta"]
    assert cli_meta == first


def test_weight_hashes_are_computed_once_and_reused_across_runs(runner, model_dir, images, tmp_path):
    store = HashStore(tmp_path / "h" / STORE_NAME)
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu")
    first = compute(scorer.embedder, store=store)
    files = 1 + len(first.tokenizer_files)  # the weights, and each tokenizer file, read once
    assert store.computed == files
    again = HashStore(store.path)  # a later run: another store object over the same file
    assert compute(scorer.embedder, store=again) == first and again.computed == 0
    # Through the CLI: the store sits beside --cache; a planted value under the file's key is what a later run
    # reports, so that run read the store instead of hashing the weights again.
    cache = tmp_path / "c" / "emb.sqlite3"
    args = ("score", "-p", PROMPT, str(images), "--cache", str(cache), "-f", "json", "--with-meta")
    real = json.loads(ok(cli(runner, model_dir, *args)))["meta"]["weights"]["model.safetensors"]
    beside = cache.parent / STORE_NAME
    stored = json.loads(beside.read_text())
    key = next(k for k in stored["files"] if k.startswith(str(model_dir / "model.safetensors") + "|"))
    assert stored["files"][key] == real
    stored["files"][key] = "0" * 64
    beside.write_text(json.dumps(stored))
    assert json.loads(ok(cli(runner, model_dir, *args)))["meta"]["weights"]["model.safetensors"] == "0" * 64


# -- the scales -------------------------------------------------------------------------------------------

def by_scale(runner, model_dir, *args: str) -> dict[str, dict]:
    """The -f json --with-meta output of one command in each unit."""
    return {s: json.loads(ok(cli(runner, model_dir, *args, "--no-cache", "-f", "json", "--with-meta", "--scale", s)))
            for s in SCALES}


def assert_conversions(raw: list[float], cosine: list[float], unit26: list[float], exp_scale: float) -> None:
    assert len(raw) == len(cosine) == len(unit26) > 0
    for r, c, u in zip(raw, cosine, unit26):
        assert c * exp_scale == pytest.approx(r, rel=1e-12, abs=1e-12)
        assert u * 26 == pytest.approx(r, rel=1e-12, abs=1e-12)
        assert r != c and r != u  # really another unit


@pytest.mark.parametrize("command", ["score", "best-of-n", "batch"])
def test_the_three_scales_are_exact_conversions_and_prob_rank_are_untouched(runner, model_dir, images, tmp_path,
                                                                           command):
    if command == "score":
        args = ("score", "-p", PROMPT, str(images))
    elif command == "best-of-n":
        for g in ("g1", "g2"):
            shutil.copytree(images, tmp_path / "groups" / g)
        args = ("best-of-n", str(tmp_path / "groups"), "-p", PROMPT, "--top", "3")
    else:
        (tmp_path / "p.csv").write_text("id,prompt\na,a red cat\nb,a blue dog\n")
        args = ("batch", str(tmp_path / "p.csv"), str(images))
    out = by_scale(runner, model_dir, *args)
    exp_scale = out["raw"]["meta"]["exp_logit_scale"]
    assert {s: out[s]["meta"]["scale"] for s in SCALES} == {s: s for s in SCALES}
    recs = {s: [r for r in out[s]["records"] if r["error"] is None] for s in SCALES}
    assert_conversions(*([r["score"] for r in recs[s]] for s in SCALES), exp_scale)
    for s in ("cosine", "unit26"):  # prob, rank, order and everything else: identical
        assert [{k: v for k, v in r.items() if k != "score"} for r in out[s]["records"]] == \
            [{k: v for k, v in r.items() if k != "score"} for r in out["raw"]["records"]]


def test_eval_pairs_convert_and_probabilities_do_not(runner, model_dir, tmp_path):
    imgs = [draw_image(tmp_path / f"i{i}.png", (90 + 7 * i, 80), seed=i) for i in range(4)]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"prompt,image_0,image_1,label\na cat,{imgs[0].name},{imgs[1].name},0\n"
                     f"a dog,{imgs[2].name},{imgs[3].name},1\n")
    rows = {}
    for s in SCALES:
        out = tmp_path / f"{s}.jsonl"
        summary = json.loads(ok(cli(runner, model_dir, "eval", str(pairs), "--json", "-o", str(out), "--scale", s)))
        rows[s] = ([json.loads(line) for line in out.read_text().splitlines()], summary)
    exp_scale = exp_logit_scale(model_dir)
    for key in ("score_0", "score_1"):
        assert_conversions(*([r[key] for r in rows[s][0]] for s in SCALES), exp_scale)
    for s in ("cosine", "unit26"):
        strip = lambda rs: [{k: v for k, v in r.items() if k not in ("score_0", "score_1")} for r in rs]  # noqa: E731
        assert strip(rows[s][0]) == strip(rows["raw"][0]) and rows[s][1] == rows["raw"][1]


def test_compare_means_convert_and_win_rates_and_preference_do_not(runner, model_dir, tmp_path):
    a, b, prompts = two_systems(tmp_path)
    out = {s: compare_json(runner, model_dir, a, b, prompts, "--scale", s) for s in SCALES}
    exp_scale = out["raw"]["model"]["exp_logit_scale"]
    assert_conversions(*([x["mean"] for x in out[s]["systems"]] for s in SCALES), exp_scale)
    assert_conversions(*([p["mean_diff"] for p in out[s]["pairs"]] for s in SCALES), exp_scale)
    for s in ("cosine", "unit26"):
        for p, q in zip(out[s]["pairs"], out["raw"]["pairs"]):
            assert (p["win_rate"], p["wins"], p["losses"], p["p_value"]) == \
                (q["win_rate"], q["wins"], q["losses"], q["p_value"])
            assert p["pref_prob"] == pytest.approx(q["pref_prob"], rel=1e-9)  # PickScore's softmax, in any unit


def test_api_scales(model_dir, images):
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu")
    files = [str(images / "img0.jpg"), str(images / "img1.png")]
    raw = scorer.score(PROMPT, files)
    assert torch.allclose(scorer.score(PROMPT, files, scale="cosine") * scorer.scale, raw, rtol=1e-6)
    assert torch.allclose(scorer.score(PROMPT, files, scale="unit26") * 26, raw, rtol=1e-6)
    unit26 = PickScorer.from_pretrained(str(model_dir), device="cpu", scale="unit26")
    assert torch.allclose(unit26.score(PROMPT, files) * 26, raw, rtol=1e-6)
    ranked, raw_ranked = unit26.rank(PROMPT, files, workers=0), scorer.rank(PROMPT, files, workers=0)
    assert [r["score"] * 26 for r in ranked] == pytest.approx([r["score"] for r in raw_ranked], rel=1e-12)
    assert [r["prob"] for r in ranked] == [r["prob"] for r in raw_ranked]
    x = torch.rand(2, 3, 64, 48, requires_grad=True)  # the differentiable path converts too, gradients flow
    unit26.score(PROMPT, x, differentiable=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(Exception, match="unknown scale"):
        scorer.score(PROMPT, files, scale="percent")


def test_an_unknown_scale_is_a_usage_error(runner, model_dir, images):
    res = cli(runner, model_dir, "score", "-p", PROMPT, str(images), "--scale", "percent")
    assert res.exit_code == 2 and "percent" in res.output
