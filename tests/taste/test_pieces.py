"""The parts of a taste, each alone: the head file and its maths, the fit, the label file, the pair order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickrank.errors import UsageError
from pickrank.taste.fit import PairData, credits, fit, folds_by_prompt, problem
from pickrank.taste.head import Head, HeadParams, tensors_sha256
from pickrank.taste.labels import LabelFile, new_label, read_labels
from pickrank.taste.pairs import PairPicker, pool_from_source


def test_a_head_with_no_correction_is_pickscore() -> None:
    rng = np.random.default_rng(0)
    text, images = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    params = HeadParams.identity(8, rank=2)
    head = Head(params, {})
    raw = 7.0 * text @ images.T
    assert np.array_equal(head.tuned(raw, text, images, paired=False), raw)
    paired = torch.from_numpy(raw[0, :3].copy())
    assert torch.equal(head.tuned(paired, torch.from_numpy(text), torch.from_numpy(images[:3]), paired=True), paired)
    assert tensors_sha256(params.tensors()) == tensors_sha256(HeadParams.identity(8, rank=2).tensors())


def test_a_head_scores_every_pair_as_it_scores_them_one_by_one() -> None:
    """The (P, N) form every command uses and the paired (N,) form of PickScorer.score agree, numpy and torch."""
    rng = np.random.default_rng(2)
    d, r = 8, 2
    params = HeadParams(1.3, rng.normal(size=(r + 1, d)).astype(np.float32), rng.normal(size=(r, d)).astype(
        np.float32), rng.normal(size=d).astype(np.float32))
    head = Head(params, {})
    text, images = rng.normal(size=(3, d)).astype(np.float32), rng.normal(size=(4, d)).astype(np.float32)
    grid = head.tuned(5.0 * text @ images.T, text, images, paired=False)
    for p in range(3):
        row = head.tuned(5.0 * (text[p] * images).sum(-1), np.repeat(text[p:p + 1], 4, 0), images, paired=True)
        assert np.allclose(grid[p], row, atol=1e-5)
    as_torch = head.tuned(torch.from_numpy(5.0 * text @ images.T), torch.from_numpy(text), torch.from_numpy(images),
                          paired=False)
    assert np.allclose(as_torch.numpy(), grid, atol=1e-5)
    assert not np.allclose(grid, 5.0 * text @ images.T)


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


def test_a_compare_layout_pairs_across_systems_only(tmp_path: Path) -> None:
    for system in ("base", "dpo"):
        for p in ("p1", "p2"):
            (tmp_path / system / p).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 20, 0)).save(tmp_path / system / p / f"{i}.png")
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,prompt\np1,a red cat\np2,a blue dog\n")
    pool = pool_from_source([str(tmp_path / "base"), str(tmp_path / "dpo")], prompts_csv=str(csv))
    assert pool.kind == "compare" and [pool.pair_count(s) for s in pool.slots] == [4, 4]
    picker = PairPicker(pool, set(), "random", seed=0)
    asked = [picker.next() for _ in range(8)]
    assert picker.next() is None
    assert all(pool.candidates[p.left].system != pool.candidates[p.right].system for p in asked)


def test_several_labellers_share_one_file_each_asked_what_they_have_not_labelled(tmp_path: Path) -> None:
    from pickrank.taste.session import LabelSession, SessionOptions

    (tmp_path / "src" / "g").mkdir(parents=True)
    (tmp_path / "src" / "g" / "prompt.txt").write_text("a red cat")
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(tmp_path / "src" / "g" / f"{i}.png")
    pool = pool_from_source([str(tmp_path / "src")])
    path = str(tmp_path / "labels.jsonl")
    ann = LabelSession(pool, LabelFile(path), SessionOptions("ann", "random"))
    for choice in ("left", "right", "tie"):
        state = ann.answer(ann.state()["current"]["id"], choice)
    assert state["current"] is None and state["labelled"] == 3
    bob = LabelSession(pool, LabelFile(path), SessionOptions("bob", "random"))
    assert bob.state()["labelled"] == 0 and bob.state()["current"] is not None  # ann's labels are not bob's
    bob.answer(bob.state()["current"]["id"], "left")
    again = LabelSession(pool, LabelFile(path), SessionOptions("ann", "random"))
    assert again.state()["current"] is None and again.state()["labelled"] == 3
    assert [lab.labeler for lab in read_labels(path)] == ["ann", "ann", "ann", "bob"]


def test_per_labeller_figures_count_agreement_on_shared_pairs_shown_either_way() -> None:
    from pickrank.taste.fit import labeler_figures

    rng = np.random.default_rng(3)
    # pairs 0 and 1: the same pair (images 0, 1) shown both ways, ann and bob agree (0 then its mirror 1);
    # pair 2: (2, 3) by ann, pair 3: the same by bob, who disagrees; pair 4: bob alone
    data = PairData(rng.normal(size=(1, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32),
                    np.zeros(5, int), np.array([0, 1, 2, 2, 4]), np.array([1, 0, 3, 3, 5]),
                    np.array([0.0, 1.0, 0.0, 1.0, 0.5], np.float32), np.array([0, 1, 0, 1, 1]), ("ann", "bob"), 5.0)
    head, base = np.array([1.0, 1.0, 0.0, 1.0, 0.5]), np.array([0.0, 0.0, 1.0, 1.0, 0.5])
    figures = labeler_figures(data, head, base)
    assert figures["ann"] == {"labels": 2, "pickscore": 0.5, "head": 0.5, "agreement": 0.5, "compared": 2}
    assert figures["bob"]["labels"] == 3 and figures["bob"]["agreement"] == 0.5 and figures["bob"]["compared"] == 2
