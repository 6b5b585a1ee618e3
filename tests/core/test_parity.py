"""pickrank's scores equal an independent reimplementation of the model card's reference code."""

from __future__ import annotations

import json

import pytest
import torch

from pickrank.cli.app import app
from tests.support.images import draw_image, image_paths
from tests.support.reference import reference_scores

PROMPTS = ["a red cat on a blue sofa", "an astronaut riding a horse, digital art",
           "a bowl of fruit with apples and bananas on a wooden table at sunset, oil painting"]




@pytest.fixture
def odd_images(tmp_path):
    folder = tmp_path / "odd"
    specs = [((300, 200), "RGB", "png"), ((201, 333), "RGBA", "png"), ((1, 1), "RGB", "png"),
             ((97, 1203), "L", "png"), ((640, 480), "RGB", "jpg"), ((225, 223), "P", "gif"),
             ((1000, 50), "RGB", "webp")]
    for i, (size, mode, ext) in enumerate(specs):
        draw_image(folder / f"odd{i}.{ext}", size, seed=100 + i, mode=mode)
    return folder


@pytest.mark.parametrize("prompt", PROMPTS)
def test_scores_equal_reference(model_dir, odd_images, runner, prompt):
    paths = image_paths(odd_images)
    ref = dict(zip(paths, reference_scores(model_dir, prompt, paths)))
    res = runner.invoke(app, ["score", "--prompt", prompt, "--model", str(model_dir), "-f", "json", "--no-cache",
                              str(odd_images)])
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert sorted(r["path"] for r in records) == paths
    for r in records:
        assert r["score"] == pytest.approx(ref[r["path"]], abs=1e-4)
    # prob is the softmax over the candidate set and rank orders by score
    ref_probs = torch.softmax(torch.tensor([ref[r["path"]] for r in records]), dim=0).tolist()
    assert [r["prob"] for r in records] == pytest.approx(ref_probs, abs=1e-5)
    assert [r["rank"] for r in records] == list(range(1, len(records) + 1))
    # the scores are spread enough that the test would notice a swapped image
    assert max(ref.values()) - min(ref.values()) > 0.05


def test_results_do_not_depend_on_batch_size_or_workers(model_dir, odd_images, runner):
    outs = []
    for bs, workers in [(1, 0), (3, 2), (64, 1)]:
        res = runner.invoke(app, ["score", "-p", PROMPTS[0], "--model", str(model_dir), "-f", "jsonl", "--no-cache",
                                  "--batch-size", str(bs), "--workers", str(workers), str(odd_images)])
        assert res.exit_code == 0, res.output
        outs.append({r["path"]: r for r in map(json.loads, res.stdout.splitlines())})
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        for path, r in other.items():
            assert r["score"] == pytest.approx(outs[0][path]["score"], abs=1e-4)
            assert r["rank"] == outs[0][path]["rank"]
