"""Teaching PickScore a taste, on the real code path with the tiny CLIP of conftest.py: a synthetic labeller with a
hidden taste (a direction in the model's image-embedding space) and 10% label noise; `pickrank tune` must learn it
from 400 pairs and write nothing for coin flips; the head then gives the same scores through the CLI, the API and
the server, and is refused on another base model."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pickrank.api import PickScorer
from pickrank.cli.app import app
from pickrank.devtools import build_model
from pickrank.errors import PickrankError, UsageError
from pickrank.taste.head import read_head
from tests.support.commands import cli, jsonl
from tests.support.server import RTOL, TOL, running_server

PROMPTS, PER_PROMPT, PAIRS, NOISE = 40, 8, 400, 0.1


@dataclass(frozen=True)
class Synthetic:
    """Generated candidates (PER_PROMPT per prompt), their embeddings, and label files made from them."""

    folder: Path
    paths: list[str]
    prompts: list[str]  # per image
    taste: Path  # labels from the hidden taste, 10% flipped
    coin: Path  # labels that are coin flips


def _picture(rng: np.random.Generator, path: Path) -> None:
    im = Image.new("RGB", (64, 64), tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.integers(0, 64, 2)
        w, h = rng.integers(8, 64, 2)
        d.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    im.save(path)


def _write_labels(path: Path, rows: list[tuple[str, str, str, float]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for prompt, a, b, label in rows:
            f.write(json.dumps({"prompt": prompt, "image_0": Path(a).name, "image_1": Path(b).name, "label": label,
                                "labeler": "synthetic"}) + "\n")
    return path


@pytest.fixture(scope="module")
def synthetic(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    """The labeller prefers images further along the second principal direction of their embeddings (a visual
    factor PickScore knows nothing of); exactly 10% of its answers are flipped."""
    folder = tmp_path_factory.mktemp("taste")
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "house", "tree", "car", "boat", "bird", "flower"]
    paths, prompts = [], []
    for p in range(PROMPTS):
        for i in range(PER_PROMPT):
            path = folder / f"p{p:03d}_{i}.png"
            _picture(rng, path)
            paths.append(str(path))
            prompts.append(f"a {words[p % len(words)]} number {p}")
    x = PickScorer.from_pretrained(str(model_dir)).embed_images(paths).numpy()
    direction = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][1]
    utility = x @ direction
    pairs = [(p * PER_PROMPT + a, p * PER_PROMPT + b) for p in range(PROMPTS) for a in range(PER_PROMPT)
             for b in range(a + 1, PER_PROMPT)]
    chosen = [pairs[k] for k in rng.permutation(len(pairs))[:PAIRS]]
    flipped = set(rng.permutation(PAIRS)[:int(NOISE * PAIRS)].tolist())
    taste = [(prompts[a], paths[a], paths[b], float((utility[b] > utility[a]) != (k in flipped)))
             for k, (a, b) in enumerate(chosen)]
    coin = [(prompts[a], paths[a], paths[b], float(rng.random() < 0.5)) for a, b in chosen]
    return Synthetic(folder, paths, prompts, _write_labels(folder / "taste.jsonl", taste),
                     _write_labels(folder / "coin.jsonl", coin))


@pytest.fixture(scope="module")
def tuned(synthetic: Synthetic, model_dir: Path) -> tuple[dict, Path]:
    """`pickrank tune` on the synthetic taste's labels (in process): its JSON report and the head it wrote."""
    from typer.testing import CliRunner

    head = synthetic.folder / "head.safetensors"
    res = cli(CliRunner(), model_dir, "tune", str(synthetic.taste), "-o", str(head), "-f", "json", "-q")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), head


def test_tune_learns_a_hidden_taste_from_400_pairs(tuned: tuple[dict, Path]) -> None:
    report, head = tuned
    held = report["heldout"]
    assert report["labels"] == PAIRS and held["folds"] == 5 and held["fold_unit"] == "prompts"
    assert held["head"] >= 0.85, held
    assert abs(held["pickscore"] - 0.5) <= 0.12, held  # PickScore knows nothing of this taste
    assert held["interval"][0] > 0
    found = read_head(str(head))
    assert found.sha256 == hashlib.sha256(head.read_bytes()).hexdigest() == report["sha256"]
    assert found.meta["labels"] == PAIRS and found.meta["report"]["heldout"]["head"] == held["head"]
    assert found.meta["alpha"] == "white" and list(found.meta["base_weights"]) == ["model.safetensors"]
    assert head.stat().st_size < 1 << 20


def test_tune_on_coin_flips_finds_no_gain_and_writes_nothing(synthetic: Synthetic, model_dir: Path, runner) -> None:
    head = synthetic.folder / "coin.safetensors"
    res = cli(runner, model_dir, "tune", str(synthetic.coin), "-o", str(head), "-q")
    assert res.exit_code == 1, res.output
    assert not head.exists() and not list(synthetic.folder.glob(".head-*"))
    assert "pickscore" in res.stdout and "does not beat PickScore" in res.stdout
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_a_head_gives_the_same_scores_through_cli_api_and_server(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                                    model_dir: Path, runner) -> None:
    _, head = tuned
    files, prompt = synthetic.paths[:6], "a cat number 0"
    res = cli(runner, model_dir, "score", "-p", prompt, *files, "--head", str(head), "-f", "json")
    assert res.exit_code == 0, res.output
    via_cli = {r["path"]: r["score"] for r in json.loads(res.stdout)}
    api = PickScorer.from_pretrained(str(model_dir), head=head).score(prompt, files).tolist()
    plain = PickScorer.from_pretrained(str(model_dir)).score(prompt, files).tolist()
    with running_server(model_dir, "--head", str(head)) as server:
        server.wait_ready()
        body = {"prompt": prompt, "images": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]}
        served = httpx.post(server.url + "/v1/score", json=body, timeout=60).json()
        info = httpx.get(server.url + "/v1/info", timeout=30).json()
    for i, f in enumerate(files):
        assert abs(via_cli[f] - api[i]) <= TOL + RTOL * abs(api[i])
        assert abs(served["scores"][i] - api[i]) <= TOL + RTOL * abs(api[i])
    assert max(abs(a - b) for a, b in zip(api, plain)) > 0.1  # the head changed them
    assert info["model"]["head"]["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest()


def test_best_of_n_batch_and_the_scale_go_through_the_head(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                         model_dir: Path, runner, tmp_path: Path) -> None:
    _, head = tuned
    group = tmp_path / "out" / "g0"
    group.mkdir(parents=True)
    (group / "prompt.txt").write_text("a cat number 0")
    for f in synthetic.paths[:4]:
        (group / Path(f).name).write_bytes(Path(f).read_bytes())
    files = sorted(str(p) for p in group.glob("*.png"))
    api = dict(zip(files, PickScorer.from_pretrained(str(model_dir), head=head).score("a cat number 0", files)
                   .tolist()))
    res = cli(runner, model_dir, "best-of-n", str(tmp_path / "out"), "--head", str(head), "--top", "4", "-f",
              "jsonl")
    assert res.exit_code == 0, res.output
    rows = jsonl(res.stdout)
    assert {r["path"]: r["score"] for r in rows} == pytest.approx(api, abs=1e-4)
    best = max(api, key=api.get)
    assert [r["path"] for r in rows if r["rank"] == 1] == [best]
    assert sum(r["prob"] for r in rows) == pytest.approx(1, abs=1e-5)
    csv = tmp_path / "rows.csv"
    csv.write_text("id,prompt,images\ng0,a cat number 0," + ";".join(files) + "\n")
    res = cli(runner, model_dir, "batch", str(csv), "--head", str(head), "-f", "jsonl", "--scale", "unit26")
    assert res.exit_code == 0, res.output
    assert {r["path"]: r["score"] for r in jsonl(res.stdout)} == pytest.approx(
        {f: s / 26 for f, s in api.items()}, abs=1e-5)


def test_the_provenance_and_report_name_the_head_and_eval_uses_it(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                                  model_dir: Path, runner, tmp_path: Path) -> None:
    _, head = tuned
    meta, results = tmp_path / "meta.json", tmp_path / "results.json"
    res = cli(runner, model_dir, "score", "-p", "x", *synthetic.paths[:2], "--head", str(head), "--meta", str(meta),
              "--with-meta", "-o", str(results))
    assert res.exit_code == 0, res.output
    named = json.loads(meta.read_text())["head"]
    assert named["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest() and named["path"] == str(head)
    page = tmp_path / "page.html"
    res = runner.invoke(app, ["report", str(results), "-o", str(page)])
    assert res.exit_code == 0, res.output
    assert f"head.safetensors sha256:{named['sha256'][:12]}" in page.read_text()
    accuracy = {}
    for with_head in (False, True):
        extra = ["--head", str(head)] if with_head else []
        res = runner.invoke(app, ["eval", str(synthetic.taste), "--model", str(model_dir), "--json", *extra])
        assert res.exit_code == 0, res.output
        accuracy[with_head] = json.loads(res.stdout)["accuracy"]
    assert accuracy[True] >= 0.85 > accuracy[False] + 0.2


def test_a_head_is_refused_on_another_base_model_or_alpha(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                          tmp_path: Path, model_dir: Path, runner) -> None:
    _, head = tuned
    other = build_model(tmp_path / "other", seed=1)
    res = cli(runner, other, "score", "-p", "x", synthetic.paths[0], "--head", str(head))
    assert res.exit_code == 2 and "fitted on another base model" in res.stderr, res.output
    assert "Traceback" not in res.output
    with pytest.raises(UsageError, match="another base model"):
        PickScorer.from_pretrained(str(other), head=head)
    res = cli(runner, model_dir, "score", "-p", "x", synthetic.paths[0], "--head", str(head), "--alpha", "drop")
    assert res.exit_code == 2 and "--alpha white" in res.stderr, res.output


def test_a_damaged_or_foreign_head_file_is_refused(tuned: tuple[dict, Path], tmp_path: Path) -> None:
    _, head = tuned
    data = bytearray(head.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(PickrankError, match="SHA-256"):
        read_head(str(damaged))
    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UsageError):
        read_head(str(foreign))


def test_compare_ranks_systems_by_the_tuned_score(synthetic: Synthetic, tuned: tuple[dict, Path], model_dir: Path,
                                                  runner, tmp_path: Path) -> None:
    """Two systems on the same two prompts: compare's per-system means are those of the head's scores."""
    _, head = tuned
    api = PickScorer.from_pretrained(str(model_dir), head=head)
    means = {}
    for s, system in enumerate(("base", "dpo")):
        per_prompt = []
        for p in range(2):
            folder = tmp_path / system / f"p{p}"
            folder.mkdir(parents=True)
            prompt = f"a dog number {p}"
            (folder / "prompt.txt").write_text(prompt)
            src = synthetic.paths[16 * p + 8 * s]
            (folder / "0.png").write_bytes(Path(src).read_bytes())
            per_prompt.append(float(api.score(prompt, [src])[0]))
        means[system] = sum(per_prompt) / 2
    res = cli(runner, model_dir, "compare", str(tmp_path / "base"), str(tmp_path / "dpo"), "--head", str(head),
              "-f", "json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {s["name"]: s["mean"] for s in out["systems"]} == pytest.approx(means, abs=1e-4)
    assert out["model"]["head"]["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest()


def test_a_head_fitted_on_a_model_serves_on_its_onnx_export(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                            model_dir: Path, export_dir: Path, runner) -> None:
    """The export's manifest names the weights it came from: the head is accepted there, and scores as on torch."""
    _, head = tuned
    files, prompt = synthetic.paths[:4], "a cat number 0"
    api = PickScorer.from_pretrained(str(model_dir), head=head).score(prompt, files).tolist()
    res = cli(runner, export_dir, "score", "-p", prompt, *files, "--head", str(head), "-f", "json")
    assert res.exit_code == 0, res.output
    onnx = {r["path"]: r["score"] for r in json.loads(res.stdout)}
    assert max(abs(onnx[f] - api[i]) for i, f in enumerate(files)) <= 1e-4  # the ONNX path's own tolerance


def test_a_head_is_a_differentiable_reward(tuned: tuple[dict, Path], model_dir: Path) -> None:
    """Gradients reach the pixels through the head, and the tuned reward is the head applied to that path's
    embeddings (the head file's own numbers, read back)."""
    import torch

    _, head = tuned
    scorer = PickScorer.from_pretrained(str(model_dir), head=head, differentiable=True)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reward = scorer.score("a cat number 0", pixels)
    reward.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    with torch.no_grad():
        x = scorer.embed_images_differentiable(pixels).numpy()
    t = scorer.embed_texts("a cat number 0").numpy()
    p = read_head(str(head)).params
    expected = p.a * scorer.scale * (x @ t[0]) + x @ p.weight[0]
    assert np.allclose(reward.detach().numpy(), expected, atol=1e-4)


def test_dataset_shards_are_a_source_and_eval_and_tune_read_their_samples_back(model_dir: Path, runner,
                                                                               tmp_path: Path) -> None:
    """Samples grouped by caption; labels name them SHARD#KEY; eval scores them as the same images as files, tune
    embeds them; the page's pictures are made from their bytes."""
    from pickrank.taste.images import DisplayImages
    from pickrank.taste.labels import LabelFile
    from pickrank.taste.pairs import pool_from_source
    from pickrank.taste.session import LabelSession, SessionOptions
    from tests.support.shards import CAPTIONS, build_shards

    build_shards(tmp_path / "shards", n_shards=2, per_shard=4, files=tmp_path / "files")
    pool = pool_from_source([str(tmp_path / "shards")])
    assert pool.kind == "dataset" and sorted(s.prompt for s in pool.slots) == sorted(CAPTIONS)
    assert [len(s.members) for s in pool.slots] == [4, 4]
    assert DisplayImages([pool.candidates[0].data], 0).get(0)[:3] == b"\xff\xd8\xff"  # a JPEG
    labels = tmp_path / "labels.jsonl"
    session = LabelSession(pool, LabelFile(str(labels)), SessionOptions("ann", "random"))
    state = session.state()
    while state["current"] is not None:
        state = session.answer(state["current"]["id"], "left")
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 12 and all(r["image_0"].startswith("shards/0000") and ".tar#" in r["image_0"] for r in rows)
    pairs = tmp_path / "pairs.jsonl"
    res = runner.invoke(app, ["eval", str(labels), "--model", str(model_dir), "-o", str(pairs), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["pairs"] == 12, res.output
    scorer = PickScorer.from_pretrained(str(model_dir))
    for row, scored in zip(rows, jsonl(pairs.read_text())):
        files = [str(next((tmp_path / "files").glob(f"*/{row[k].rpartition('#')[2]}.*"))) for k in ("image_0",
                                                                                                     "image_1")]
        expected = scorer.score(row["prompt"], files).tolist()
        assert [scored["score_0"], scored["score_1"]] == pytest.approx(expected, abs=1e-4)
    res = cli(runner, model_dir, "tune", str(labels), "-o", str(tmp_path / "h.safetensors"), "-f", "json",
              "--force")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["labels"] == 12 and report["skipped"] == 0 and report["images"] == 8
