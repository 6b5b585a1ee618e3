"""Through the real CLI: prompts read from generators' metadata (best-of-n, `score` without --prompt,
`pickrank prompts`), `prompt_source` in every output, and `--alpha white|drop`."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from pickrank.cli.app import app
from tests.support.commands import jsonl, pickrank_cmd
from tests.support.images import draw_image

GENERATORS = Path(__file__).parents[1] / "data" / "generators"
# The fixture files and the source each is read as (real files written by these tools; see NOTICE.txt there).
FIXTURES = {
    "automatic1111_cropped.png": "automatic1111", "automatic1111_cropped.jpg": "automatic1111",
    "fooocus1_cropped.png": "fooocus", "img2img_cropped.png": "comfyui", "unclip_2pass_cropped.png": "comfyui",
    "invokeai_dream1.png": "invokeai", "invokeai_imeta1.png": "invokeai", "invokeai_sdmeta1.png": "invokeai",
    "novelai1_cropped.png": "novelai",
}
UNKNOWN_JSON = '{"steps": 20, "seed": 1}'


def invoke(runner, model_dir, *args: str, input: str | None = None):
    """The real CLI in process, with the tiny model, no cache and in-process decoding."""
    return runner.invoke(app, [*args, "--model", str(model_dir), "--no-cache", "--workers", "0"], input=input)


def png_with_text(path: Path, seed: int, **text: str) -> Path:
    """A small PNG with tEXt chunks, as a generator writes them."""
    draw_image(path, (40, 30), seed=seed)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.open(path).save(path, pnginfo=info)
    return path


def copy_fixtures(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(GENERATORS / n, folder / n)) for n in names]


# -- best-of-n ----------------------------------------------------------------------------------------------

@pytest.fixture
def groups(tmp_path: Path) -> Path:
    """One group per generator fixture file (two copies each), a prompt.txt group, and an unknown-JSON group."""
    root = tmp_path / "gens"
    for name in FIXTURES:
        group = root / name.replace(".", "_")
        group.mkdir(parents=True)
        for i in range(2):
            shutil.copy(GENERATORS / name, group / f"{i}{Path(name).suffix}")
    for i in range(2):
        draw_image(root / "txt" / f"{i}.png", (40, 30), seed=i)
    (root / "txt" / "prompt.txt").write_text("a red cat\n")
    for i in range(2):
        png_with_text(root / "unknown" / f"img{i}.png", 10 + i, parameters=UNKNOWN_JSON)
    return root


def test_best_of_n_reads_every_generator(runner, model_dir, groups):
    from pickrank.inputs.metadata import prompt_from_image

    res = invoke(runner, model_dir, "best-of-n", str(groups), "-f", "jsonl")
    assert res.exit_code == 3, res.output  # the unknown group is an error record
    by_group: dict[str, list[dict]] = {}
    for r in jsonl(res.stdout):
        by_group.setdefault(r["group"], []).append(r)
    for name in FIXTURES:
        rec = by_group[name.replace(".", "_")][0]
        assert rec["error"] is None and rec["prompt"] == prompt_from_image(str(GENERATORS / name)).prompt
    assert by_group["fooocus1_cropped_png"][0]["prompt"] == "a smiling goldfish"  # not the JSON document
    assert by_group["txt"][0]["prompt"] == "a red cat"
    bad = by_group["unknown"]
    assert len(bad) == 1 and bad[0]["prompt"] is None and bad[0]["score"] is None
    assert bad[0]["error"] == ("no prompt: give --prompt, add prompt.txt, or embed it in the image metadata "
                               "(img0.png: parameters holds a JSON document of an unknown format)")
    assert "no prompt" in res.stderr and "img0.png" in res.stderr
    assert not any(r["prompt"] and r["prompt"].lstrip().startswith("{") for r in jsonl(res.stdout))


# -- prompt_source in every output ----------------------------------------------------------------------------

def parse(fmt: str, text: str) -> list[dict]:
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return jsonl(text)
    return [{k: (v or None) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_prompt_source_in_every_format(runner, model_dir, groups, fmt):
    res = invoke(runner, model_dir, "best-of-n", str(groups), "-f", fmt)
    rows = parse(fmt, res.stdout)
    assert list(rows[0]) == ["group", "prompt", "prompt_source", "path", "score", "prob", "rank", "truncated",
                             "error"]
    source = {r["group"]: r["prompt_source"] for r in rows}
    for name, fmt_name in FIXTURES.items():
        assert source[name.replace(".", "_")] == fmt_name
    assert source["txt"] == "prompt.txt" and source["unknown"] is None


def test_prompt_source_option_and_csv(runner, model_dir, groups, tmp_path):
    res = invoke(runner, model_dir, "best-of-n", str(groups), "--prompt", "a cat")
    assert {r["prompt_source"] for r in jsonl(res.stdout)} == {"option"}
    res = invoke(runner, model_dir, "score", "--prompt", "a cat", str(groups / "txt"))
    assert {r["prompt_source"] for r in jsonl(res.stdout)} == {"option"}
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    res = invoke(runner, model_dir, "batch", str(tmp_path / "p.csv"), str(groups / "txt"))
    recs = jsonl(res.stdout)
    assert list(recs[0])[:3] == ["id", "prompt", "prompt_source"] and {r["prompt_source"] for r in recs} == {"csv"}


def test_prompt_source_in_table_and_html(runner, model_dir, groups, tmp_path):
    page = tmp_path / "r.html"
    res = invoke(runner, model_dir, "best-of-n", str(groups), "-f", "table", "--html", str(page))
    assert "(prompt from fooocus)" in res.stdout and "(prompt from prompt.txt)" in res.stdout
    html = page.read_text()
    assert 'title="where the prompt came from">comfyui</span>' in html
    assert 'title="where the prompt came from">prompt.txt</span>' in html
    # and a report rendered from saved results keeps it
    saved = tmp_path / "r.jsonl"
    res = invoke(runner, model_dir, "best-of-n", str(groups), "-o", str(saved))
    res = runner.invoke(app, ["report", str(saved), "-o", str(tmp_path / "again.html")])
    assert res.exit_code == 0, res.output
    assert 'title="where the prompt came from">novelai</span>' in (tmp_path / "again.html").read_text()


# -- pickrank prompts -----------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Every generator fixture file in one folder, plus an unknown JSON document, a prompt with an escape
    sequence, and a picture without metadata."""
    folder = tmp_path / "mixed"
    copy_fixtures(folder, list(FIXTURES))
    png_with_text(folder / "unknown.png", 1, parameters=UNKNOWN_JSON)
    png_with_text(folder / "escape.png", 2, parameters="a \x1b[31mred\x1b[0m cat\nSteps: 20, Sampler: Euler")
    draw_image(folder / "plain.jpg", (40, 30), seed=3)
    return folder


def test_prompts_jsonl_in_a_pipe_without_torch(mixed):
    res = subprocess.run(pickrank_cmd("prompts", str(mixed)), capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time")}
    assert "pickrank.inputs.metadata" in imported  # the profile is really on
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
    rows = {Path(r["path"]).name: r for r in jsonl(res.stdout)}
    assert all(list(r) == ["path", "prompt", "source", "reason"] for r in rows.values())
    for name, source in FIXTURES.items():
        assert rows[name]["source"] == source and rows[name]["prompt"] and rows[name]["reason"] is None
    assert rows["fooocus1_cropped.png"]["prompt"] == "a smiling goldfish"
    assert rows["unknown.png"] == {"path": str(mixed / "unknown.png"), "prompt": None, "source": None,
                                   "reason": "parameters holds a JSON document of an unknown format"}
    assert rows["plain.jpg"]["prompt"] is None and rows["plain.jpg"]["reason"]
    assert rows["escape.png"]["prompt"] == "a \x1b[31mred\x1b[0m cat"  # machine formats keep the real text


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_prompts_json_and_csv(runner, mixed, fmt):
    res = runner.invoke(app, ["prompts", str(mixed), "-f", fmt])
    assert res.exit_code == 0, res.output
    rows = parse(fmt, res.stdout)
    assert len(rows) == len(FIXTURES) + 3 and list(rows[0]) == ["path", "prompt", "source", "reason"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["novelai1_cropped.png"]["source"] == "novelai"
    assert by_name["unknown.png"]["prompt"] is None


def test_prompts_table_escapes_control_characters(runner, mixed, tmp_path):
    res = runner.invoke(app, ["prompts", str(mixed), "-f", "table"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\\x1b[31mred" in res.stdout
    assert "invokeai" in res.stdout and "unknown format" in res.stdout
    out = tmp_path / "p.jsonl"
    assert runner.invoke(app, ["prompts", str(mixed / "escape.png"), "-o", str(out)]).exit_code == 0
    assert jsonl(out.read_text())[0]["source"] == "automatic1111"
    res = runner.invoke(app, ["prompts", str(mixed), "-f", "paths"])
    assert res.exit_code == 2 and "not -f paths" in res.stderr
    res = runner.invoke(app, ["prompts", str(tmp_path / "missing.png")])  # named, as `score` reports it
    assert res.exit_code == 0 and jsonl(res.stdout)[0]["reason"].startswith("unreadable")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["prompts", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no images found" in res.stderr


# -- score without --prompt -------------------------------------------------------------------------------------

def test_score_without_prompt_ranks_each_prompt_apart(runner, model_dir, mixed):
    copy_fixtures(mixed, ["sdparsers_text_after_idat.png"])  # a third A1111 image of "photo of a duck"
    res = invoke(runner, model_dir, "score", str(mixed))
    assert res.exit_code == 3, res.output  # the images without a prompt are error records
    recs = jsonl(res.stdout)
    assert not any(r["prompt"] and r["prompt"].lstrip().startswith(("{", "[")) for r in recs)
    by_name = {Path(r["path"]).name: r for r in recs}
    assert by_name["fooocus1_cropped.png"]["prompt"] == "a smiling goldfish"
    for name, source in FIXTURES.items():
        assert by_name[name]["prompt_source"] == source and by_name[name]["error"] is None
    unknown = by_name["unknown.png"]
    assert unknown["prompt"] is None and unknown["score"] is None
    assert unknown["error"] == "no prompt: parameters holds a JSON document of an unknown format (give --prompt " \
                               "to score it)"
    assert by_name["plain.jpg"]["error"].startswith("no prompt")
    assert f"{mixed / 'unknown.png'}: no prompt" in res.stderr
    # images with the same prompt form one ranking, scored exactly as with that prompt given
    duck = [r for r in recs if r["prompt"] == "photo of a duck"]
    assert sorted(Path(r["path"]).name for r in duck) == ["automatic1111_cropped.jpg", "automatic1111_cropped.png",
                                                          "sdparsers_text_after_idat.png"]
    assert sorted(r["rank"] for r in duck) == [1, 2, 3] and abs(sum(r["prob"] for r in duck) - 1) < 1e-5
    given = jsonl(invoke(runner, model_dir, "score", "-p", "photo of a duck", *[r["path"] for r in duck]).stdout)
    mine = {r["path"]: r["score"] for r in duck}  # other batches change the last float digits only
    assert {r["path"]: r["score"] for r in given} == {p: pytest.approx(v, abs=1e-4) for p, v in mine.items()}
    assert {r["prompt_source"] for r in given} == {"option"}
    # each prompt's records are consecutive: one ranking each
    prompts = [r["prompt"] for r in recs if r["prompt"]]
    assert len(set(prompts)) == sum(1 for a, b in zip([None] + prompts, prompts) if a != b)
    # --prompt-from metadata says the same; with --prompt too, it is a usage error
    again = invoke(runner, model_dir, "score", "--prompt-from", "metadata", str(mixed))
    assert jsonl(again.stdout) == recs
    both = invoke(runner, model_dir, "score", "--prompt-from", "metadata", "-p", "x", str(mixed))
    assert both.exit_code == 2 and "not both" in both.stderr


def test_score_without_prompt_unreadable_and_empty(runner, model_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = invoke(runner, model_dir, "score", str(tmp_path / "bad.png"), str(GENERATORS / "novelai1_cropped.png"))
    recs = {Path(r["path"]).name: r for r in jsonl(res.stdout)}
    assert res.exit_code == 3 and recs["bad.png"]["error"] == "not an image (unrecognised format)"
    assert recs["novelai1_cropped.png"]["prompt_source"] == "novelai"
    (tmp_path / "empty").mkdir()
    res = invoke(runner, model_dir, "score", str(tmp_path / "empty"))
    assert res.exit_code == 2 and "no images found" in res.stderr


# -- --alpha white|drop -------------------------------------------------------------------------------------------

def transparent_png(path: Path, seed: int = 7) -> Path:
    """A picture with every alpha from fully transparent to opaque, and colours under the transparent parts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (180, 240, 4), dtype=np.uint8)
    rgba[:60, :, 3] = 0  # a fully transparent band: white with white, its colours with drop
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_alpha_matches_each_reference(model_dir, tmp_path):
    import numpy as np
    from transformers import AutoProcessor

    from pickrank.inputs.decode import ImageSpec, normalize, open_image, preprocess

    png = transparent_png(tmp_path / "t.png")
    data = png.read_bytes()
    processor = AutoProcessor.from_pretrained(str(model_dir))  # the installed transformers (5: onto white)
    white = ImageSpec.from_config(json.loads((model_dir / "preprocessor_config.json").read_text()))
    drop = ImageSpec(**{**white.__dict__, "alpha": "drop"})

    def mine(spec: ImageSpec) -> np.ndarray:
        return normalize(preprocess(open_image(data), spec)[None], spec)[0]

    ref_white = processor(images=Image.open(png), return_tensors="np")["pixel_values"][0]
    # transformers 4.x's convert_to_rgb was image.convert("RGB"), which for RGBA drops the alpha channel
    rgb = Image.open(png).convert("RGB")
    assert np.array_equal(np.asarray(rgb), np.asarray(Image.open(png))[..., :3])
    ref_drop = processor(images=rgb, return_tensors="np")["pixel_values"][0]
    assert np.abs(mine(white) - ref_white).max() < 1e-4
    assert np.abs(mine(drop) - ref_drop).max() < 1e-4
    assert np.abs(ref_white - ref_drop).max() > 0.5  # the two behaviours really differ on this image


def score_of(runner, model_dir, path: Path, *extra: str) -> tuple[float, str]:
    res = runner.invoke(app, ["score", "-p", "a red cat", str(path), "--model", str(model_dir), *extra])
    assert res.exit_code == 0, res.output
    return jsonl(res.stdout)[0]["score"], res.stderr


def test_alpha_through_the_cli_workers_and_cache(runner, model_dir, tmp_path):
    png = transparent_png(tmp_path / "t.png")
    opaque = tmp_path / "opaque.png"
    Image.open(png).convert("RGB").save(opaque)  # what transformers 4.x fed the model
    flat = Image.new("RGB", (240, 180), "white")
    flat.paste(Image.open(png), mask=Image.open(png).getchannel("A"))
    flat.save(tmp_path / "on_white.png")
    no_cache = ("--no-cache", "--workers", "0")
    white, _ = score_of(runner, model_dir, png, *no_cache)
    drop, _ = score_of(runner, model_dir, png, "--alpha", "drop", *no_cache)
    assert abs(drop - score_of(runner, model_dir, opaque, *no_cache)[0]) < 1e-4
    assert abs(white - score_of(runner, model_dir, tmp_path / "on_white.png", *no_cache)[0]) < 1e-3
    assert abs(white - drop) > 1e-3
    # the decode workers get it too
    assert abs(score_of(runner, model_dir, png, "--alpha", "drop", "--no-cache", "--workers", "1")[0] - drop) < 1e-4
    # and the cache never serves one behaviour's embedding to the other
    cache = ("--cache", str(tmp_path / "c.sqlite3"), "--workers", "0")
    got, err = score_of(runner, model_dir, png, *cache)
    assert abs(got - white) < 1e-4 and "1 embedded, 0 from cache" in err
    got, err = score_of(runner, model_dir, png, "--alpha", "drop", *cache)
    assert abs(got - drop) < 1e-4 and "1 embedded, 0 from cache" in err
    got, err = score_of(runner, model_dir, png, "--alpha", "white", *cache)
    assert abs(got - white) < 1e-4 and "0 embedded, 1 from cache" in err
    res = runner.invoke(app, ["score", "-p", "x", str(png), "--alpha", "grey", "--model", str(model_dir)])
    assert res.exit_code == 2


def test_alpha_white_fingerprint_is_unchanged_and_drop_differs(model_dir):
    import dataclasses

    from pickrank.inputs.decode import ImageSpec
    from pickrank.models.source import inspect_model, resolve_source

    spec = ImageSpec()
    # the spec's fields before --alpha and --decode (both left out while at their defaults)
    before = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("alpha", "decode")}
    assert spec.fingerprint() == json.dumps(before, sort_keys=True)  # existing cache entries stay valid
    source = resolve_source(str(model_dir), None, None, True)
    white, drop = inspect_model(source, "fp32"), inspect_model(source, "fp32", "drop")
    assert white.fingerprint == inspect_model(source, "fp32", "white").fingerprint != drop.fingerprint
    assert drop.spec.alpha == "drop" and white.spec.alpha == "white"
