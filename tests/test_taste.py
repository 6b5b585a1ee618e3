"""Teaching PickScore a taste, on the real code path with the tiny CLIP of conftest.py: a synthetic labeller with a
hidden taste (a direction in the model's image-embedding space) and 10% label noise; `pickrank tune` must learn it
from 400 pairs and write nothing for coin flips; the head then gives the same scores through the CLI, the API and
the server, and is refused on another base model."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pickrank.api import PickScorer
from pickrank.devtools import build_model
from pickrank.errors import PickrankError, UsageError
from pickrank.taste.fit import PairData, credits, fit, folds_by_prompt, problem
from pickrank.taste.head import HeadParams, read_head, tensors_sha256
from pickrank.taste.labels import LabelFile, new_label, read_labels
from pickrank.taste.pairs import PairPicker, pool_from_source

from .test_hardening import no_traceback, pickrank_cmd
from .test_server import TOL, RTOL, running_server

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


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pickrank_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tuned(synthetic: Synthetic, model_dir: Path) -> tuple[dict, Path]:
    """`pickrank tune` on the synthetic taste's labels: its JSON report and the head it wrote."""
    head = synthetic.folder / "head.safetensors"
    proc = run("tune", str(synthetic.taste), "-o", str(head), "--model", str(model_dir), "-f", "json", "-q")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), head


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


def test_tune_on_coin_flips_finds_no_gain_and_writes_nothing(synthetic: Synthetic, model_dir: Path) -> None:
    head = synthetic.folder / "coin.safetensors"
    proc = run("tune", str(synthetic.coin), "-o", str(head), "--model", str(model_dir), "-q")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not head.exists()
    assert "pickscore" in proc.stdout and "does not beat PickScore" in proc.stdout
    no_traceback(proc.stderr)


def test_a_head_gives_the_same_scores_through_cli_api_and_server(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                                    model_dir: Path) -> None:
    _, head = tuned
    files, prompt = synthetic.paths[:6], "a cat number 0"
    proc = run("score", "-p", prompt, *files, "--model", str(model_dir), "--head", str(head), "-f", "json",
               "--no-cache")
    assert proc.returncode == 0, proc.stderr
    cli = {r["path"]: r["score"] for r in json.loads(proc.stdout)}
    api = PickScorer.from_pretrained(str(model_dir), head=head).score(prompt, files).tolist()
    plain = PickScorer.from_pretrained(str(model_dir)).score(prompt, files).tolist()
    with running_server(model_dir, "--head", str(head)) as server:
        server.wait_ready()
        body = {"prompt": prompt, "images": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]}
        served = httpx.post(server.url + "/v1/score", json=body, timeout=60).json()
        info = httpx.get(server.url + "/v1/info", timeout=30).json()
    for i, f in enumerate(files):
        assert abs(cli[f] - api[i]) <= TOL + RTOL * abs(api[i])
        assert abs(served["scores"][i] - api[i]) <= TOL + RTOL * abs(api[i])
    assert max(abs(a - b) for a, b in zip(api, plain)) > 0.1  # the head changed them
    assert info["model"]["head"]["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest()


def test_the_provenance_names_the_head_and_eval_uses_it(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                        model_dir: Path, tmp_path: Path) -> None:
    _, head = tuned
    meta = tmp_path / "meta.json"
    proc = run("score", "-p", "x", *synthetic.paths[:2], "--model", str(model_dir), "--head", str(head), "--meta",
               str(meta), "-f", "json")
    assert proc.returncode == 0, proc.stderr
    named = json.loads(meta.read_text())["head"]
    assert named["sha256"] == hashlib.sha256(head.read_bytes()).hexdigest() and named["path"] == str(head)
    accuracy = {}
    for with_head in (False, True):
        extra = ["--head", str(head)] if with_head else []
        proc = run("eval", str(synthetic.taste), "--model", str(model_dir), "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        accuracy[with_head] = json.loads(proc.stdout)["accuracy"]
    assert accuracy[True] >= 0.85 > accuracy[False] + 0.2


def test_a_head_is_refused_on_another_base_model_or_alpha(synthetic: Synthetic, tuned: tuple[dict, Path],
                                                          tmp_path: Path, model_dir: Path) -> None:
    _, head = tuned
    other = build_model(tmp_path / "other", seed=1)
    proc = run("score", "-p", "x", synthetic.paths[0], "--model", str(other), "--head", str(head), "--no-cache")
    assert proc.returncode == 2 and "fitted on another base model" in proc.stderr, proc.stderr
    no_traceback(proc.stderr)
    with pytest.raises(UsageError, match="another base model"):
        PickScorer.from_pretrained(str(other), head=head)
    proc = run("score", "-p", "x", synthetic.paths[0], "--model", str(model_dir), "--head", str(head),
               "--alpha", "drop")
    assert proc.returncode == 2 and "--alpha white" in proc.stderr, proc.stderr


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


# -- the pieces -----------------------------------------------------------------------------------------------

def test_a_head_with_no_correction_is_pickscore() -> None:
    rng = np.random.default_rng(0)
    text, images = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    params = HeadParams.identity(8, rank=2)
    from pickrank.taste.head import Head

    head = Head(params, {})
    raw = 7.0 * text @ images.T
    assert np.array_equal(head.tuned(raw, text, images, paired=False), raw)
    paired = torch.from_numpy(raw[0, :3].copy())
    assert torch.equal(head.tuned(paired, torch.from_numpy(text), torch.from_numpy(images[:3]), paired=True), paired)
    assert tensors_sha256(params.tensors()) == tensors_sha256(HeadParams.identity(8, rank=2).tensors())


def test_fits_without_labels_or_with_infinite_regularisation_are_pickscore() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 6)).astype(np.float32)
    data = PairData(rng.normal(size=(4, 6)).astype(np.float32), x, rng.integers(0, 4, 30), rng.integers(0, 20, 30),
                    rng.integers(0, 20, 30), rng.integers(0, 2, 30).astype(np.float32), np.zeros(30, int), ("a",), 5.0)
    p = problem(data)
    assert not fit(p, float("inf")).any()
    assert np.allclose(p.basis.params(fit(p, float("inf"))).weight, 0)
    assert np.allclose(p.differences(fit(p, 1e6)), data.raw_difference(), atol=1e-3)
    folds, unit = folds_by_prompt(data.prompt, 5)
    assert unit == "prompts" and sorted(np.concatenate(folds).tolist()) == list(range(30))
    assert all(len(set(data.prompt[f]) & set(data.prompt[g])) == 0 for f in folds for g in folds if f is not g)
    assert credits(np.array([1.0, -1.0, 0.0, 2.0]), np.array([0.0, 0.0, 0.5, 0.5])).tolist() == [1, 0, 1, 0.5]


def test_the_label_file_appends_undoes_and_resumes(tmp_path: Path) -> None:
    img = tmp_path / "imgs"
    img.mkdir()
    path = tmp_path / "labels.jsonl"
    f = LabelFile(str(path))
    first = new_label("p", str(img / "a.png"), str(img / "b.png"), 0.0, labeler="ann")
    second = new_label("p", str(img / "b.png"), str(img / "c.png"), 0.5, labeler="bob")
    f.append(first)
    f.append(second)
    assert [json.loads(line)["image_0"] for line in path.read_text().splitlines()] == ["imgs/a.png", "imgs/b.png"]
    assert f.remove(first.id)  # not the last line: another labeller wrote after it
    assert [lab.id for lab in read_labels(str(path))] == [second.id]
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"prompt": "p", "image_0": "x')  # a label in flight when a run was killed
    again = LabelFile(str(path))
    assert [lab.id for lab in again.existing] == [second.id] and path.read_text().endswith("\n")
    assert again.existing[0].key() == new_label("p", str(img / "c.png"), str(img / "b.png"), 1.0).key()
    (tmp_path / "notes.jsonl").write_text('{"something": "else"}\n')
    with pytest.raises(UsageError, match="not a label"):
        LabelFile(str(tmp_path / "notes.jsonl"))
    assert (tmp_path / "notes.jsonl").read_text() == '{"something": "else"}\n'


def test_pairs_are_never_asked_twice_and_the_closest_come_first(tmp_path: Path) -> None:
    for g in ("g0", "g1"):
        (tmp_path / "src" / g).mkdir(parents=True)
        (tmp_path / "src" / g / "prompt.txt").write_text(f"prompt {g}")
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "src" / g / f"{i}.png")
    pool = pool_from_source([str(tmp_path / "src")])
    assert [len(s.members) for s in pool.slots] == [5, 5]
    picker = PairPicker(pool, set(), "uncertain", seed=3, random_share=0.0)
    picker.set_scores(0, {m: float(i * i) for i, m in enumerate(pool.slots[0].members)})
    first = picker.next()
    assert first.chosen_by == "uncertain" and {first.left, first.right} == set(pool.slots[0].members[:2])
    asked = [first] + [picker.next() for _ in range(19)]
    keys = [pool.key(p.left, p.right) for p in asked]
    assert len(set(keys)) == 20 and picker.next() is None
