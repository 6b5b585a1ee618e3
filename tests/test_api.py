"""The library API: PickScorer gives the CLI's scores, takes every image kind, and can carry gradients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickrank import PickScorer
from pickrank.api import torch_preprocess
from pickrank.cli.app import app
from pickrank.errors import InputFailed, UsageError
from pickrank.inputs.decode import ImageSpec, preprocess
from tests.support.images import draw_image, image_paths

PROMPT = "a red cat on a blue sofa"


@pytest.fixture(scope="module")
def scorer(model_dir) -> PickScorer:
    return PickScorer.from_pretrained(str(model_dir), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def same_size(tmp_path_factory) -> list[str]:
    """Five PNGs of one size (so they stack into one tensor), lossless so uint8 -> float -> uint8 is exact."""
    folder = tmp_path_factory.mktemp("same")
    return [str(draw_image(folder / f"s{i}.png", (320, 256), seed=10 + i)) for i in range(5)]


def as_float_batch(paths: list[str]) -> torch.Tensor:
    return as_uint8_batch(paths).float() / 255


def test_rank_and_score_equal_the_cli(scorer, model_dir, images, runner):
    paths = image_paths(images)
    # the scorer's batch size (3): batches of another size change the last float digits, in the CLI too
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(model_dir), "-f", "jsonl", "--no-cache",
                              "--batch-size", "3", *paths])
    assert res.exit_code == 0, res.output
    cli = [json.loads(line) for line in res.stdout.splitlines()]
    assert scorer.rank(PROMPT, paths) == cli  # the same records, the same floats
    direct = dict(zip(paths, scorer.score(PROMPT, paths).tolist()))
    for r in cli:
        assert direct[r["path"]] == pytest.approx(r["score"], abs=1e-4)
    # a folder expands as on the command line
    assert sorted(r["path"] for r in scorer.rank(PROMPT, [str(images)])) == paths


def test_rank_reports_bad_files_as_records(scorer, tmp_path, same_size):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    recs = scorer.rank(PROMPT, [same_size[0], str(bad)], workers=0)
    assert recs[0]["path"] == same_size[0] and recs[0]["rank"] == 1
    assert recs[1]["path"] == str(bad) and recs[1]["error"] and recs[1]["score"] is None
    with pytest.raises(UsageError):
        scorer.rank("  ", same_size)


def test_every_image_kind_gives_the_same_scores(scorer, same_size):
    ref = scorer.score(PROMPT, same_size)
    assert ref.shape == (5,) and ref.dtype == torch.float32
    pils = [Image.open(p) for p in same_size]
    arrays = [np.array(im.convert("RGB")) for im in pils]
    floats = as_float_batch(same_size)
    uint8 = (floats * 255).round().to(torch.uint8)
    rgba = [np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]) for a in arrays]  # opaque: same as RGB
    for other in (pils, arrays, rgba, floats, uint8, list(floats), (p for p in same_size),
                  [Path(p).read_bytes() for p in same_size]):
        assert torch.allclose(scorer.score(PROMPT, other), ref, atol=1e-5)
    assert ref.max() - ref.min() > 0.05  # the comparison would notice a swapped image


def test_pairs_and_embeddings(scorer, same_size):
    prompts = [PROMPT, "a dog", PROMPT, "an astronaut riding a horse", "a dog"]
    got = scorer.score(prompts, same_size)
    for i, (p, path) in enumerate(zip(prompts, same_size)):
        assert got[i].item() == pytest.approx(scorer.score(p, [path])[0].item(), abs=1e-4)
    text = scorer.embed_texts(prompts)
    image = scorer.embed_images(same_size)
    assert text.shape == image.shape == (5, text.shape[1])
    assert torch.allclose(text.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(scorer.scale * (text * image).sum(-1), got, atol=1e-4)
    assert scorer.score(PROMPT, []).shape == (0,)


def test_clear_errors(scorer, tmp_path, same_size):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputFailed, match="broken.png"):
        scorer.score(PROMPT, [same_size[0], str(bad)])
    with pytest.raises(InputFailed, match="missing.png: no such file"):
        scorer.score(PROMPT, [str(tmp_path / "missing.png")])
    with pytest.raises(UsageError, match="2 prompts for 5 images"):
        scorer.score([PROMPT, "a dog"], same_size)
    with pytest.raises(UsageError, match="float tensor"):
        scorer.score(PROMPT, same_size, differentiable=True)
    with pytest.raises(UsageError, match="uint8"):
        scorer.score(PROMPT, [np.zeros((8, 8, 3), dtype=np.float32)])


def test_differentiable_scores_carry_gradients_and_stay_close(scorer, same_size):
    exact = scorer.score(PROMPT, same_size)
    x = as_float_batch(same_size).requires_grad_(True)
    diff = scorer.score(PROMPT, x, differentiable=True)
    assert diff.requires_grad
    diff.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.embedder.model.parameters())  # the reward model stays frozen
    dev = (diff.detach() - exact).abs()
    spread = (exact.max() - exact.min()).item()
    # measured: max about 0.02 on a spread of about 13 (see pickrank/api.py); allow some margin
    assert dev.max().item() < 0.1 and dev.max().item() < 0.01 * spread


def test_differentiable_default_and_odd_sizes(model_dir):
    s = PickScorer.from_pretrained(str(model_dir), device="cpu", differentiable=True)
    for h, w in [(100, 60), (224, 224), (700, 1000), (50, 300)]:
        torch.manual_seed(h)
        x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, h, w), 5, 1, 2).requires_grad_(True)
        d = s.score(["a dog", "a cat"], x)  # differentiable by default for float tensors
        d.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert torch.allclose(d.detach(), s.score(["a dog", "a cat"], x, differentiable=False), atol=0.15)
    # paths still take the exact path under the default
    assert s.score("a dog", [draw_image(model_dir.parent / "x.png", (64, 64), seed=3)]).shape == (1,)


def test_torch_preprocess_matches_pillow_on_exact_sizes():
    """At 224x224 there is no resize: the torch path equals the Pillow path up to float rounding."""
    spec = ImageSpec()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    exact = (preprocess(Image.fromarray(arr), spec).astype(np.float32) / 255 - np.array(spec.image_mean,
             dtype=np.float32)[:, None, None]) / np.array(spec.image_std, dtype=np.float32)[:, None, None]
    got = torch_preprocess(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, spec)[0].numpy()
    assert np.abs(got - exact).max() < 1e-5
    # a smaller image is padded around the centre, as transformers' center_crop does
    small = torch_preprocess(torch.ones(1, 3, 224, 100), ImageSpec(shortest_edge=None))
    assert small.shape == (1, 3, 224, 224)
    assert torch.allclose(small[0, :, :, 62], small[0, :, :, 100]) and not torch.allclose(small[0, :, :, 0],
                                                                                           small[0, :, :, 100])


def as_uint8_batch(paths: list[str]) -> torch.Tensor:
    """Same-size image files as one uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


def test_on_device_path_is_batched_close_to_exact_and_gradient_free(scorer, same_size):
    exact = scorer.score(PROMPT, same_size)
    batch = as_uint8_batch(same_size)
    fast = scorer.score(PROMPT, batch, preprocess="torch")
    assert fast.shape == exact.shape and fast.device == batch.device and not fast.requires_grad
    dev = (fast - exact).abs().max().item()
    spread = (exact.max() - exact.min()).item()
    # measured on drawn images (pickrank/api.py's docstring): max ~0.005 on a spread of ~14
    assert 0 < dev < 0.02 and dev < 0.002 * spread
    # float input in [0, 1] is the same pixels: the same scores
    assert torch.allclose(scorer.score(PROMPT, batch.float() / 255, preprocess="torch"), fast, atol=1e-5)
    # the same math as the differentiable path, without autograd
    x = (batch.float() / 255).requires_grad_(True)
    assert torch.allclose(scorer.score(PROMPT, x, differentiable=True).detach(), fast, atol=1e-5)


def test_on_device_path_equals_exact_without_resizing(scorer, tmp_path):
    paths = [str(draw_image(tmp_path / f"e{i}.png", (224, 224), seed=i)) for i in range(3)]
    # 224x224 uint8 images: no resize and no crop, so nothing is rounded differently
    assert torch.allclose(scorer.score(["a dog", "a cat", "a dog"], as_uint8_batch(paths), preprocess="torch"),
                          scorer.score(["a dog", "a cat", "a dog"], paths), atol=1e-4)


def test_on_device_path_as_default_and_refusals(model_dir, same_size):
    s = PickScorer.from_pretrained(str(model_dir), device="cpu", preprocess="torch")
    batch = as_uint8_batch(same_size)
    assert torch.equal(s.score(PROMPT, batch), s.score(PROMPT, batch, preprocess="torch"))
    assert s.score(PROMPT, same_size).shape == (len(same_size),)  # paths: the exact path under the default
    with pytest.raises(UsageError, match="one tensor"):
        s.score(PROMPT, same_size, preprocess="torch")
    with pytest.raises(UsageError, match="unknown preprocess"):
        s.score(PROMPT, batch, preprocess="pillow")
    with pytest.raises(UsageError, match="unknown preprocess"):
        PickScorer(s.embedder, preprocess="fast")
