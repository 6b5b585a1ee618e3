"""Small things people expect of the library and the CLI: torch dtypes and their names, a callable scorer with
.to(device), a ranking that shows as an HTML table in a notebook, and batch's paths shown by one rule."""

from __future__ import annotations

import json

import pytest
import torch

from pickrank import PickScorer
from pickrank.cli.app import app
from pickrank.errors import UsageError
from pickrank.options import DType, ModelOptions
from tests.support.images import draw_image


@pytest.mark.parametrize("given, member", [
    (torch.bfloat16, DType.bf16), (torch.float16, DType.fp16), (torch.float32, DType.fp32),
    ("bfloat16", DType.bf16), ("float16", DType.fp16), ("half", DType.fp16), ("float32", DType.fp32),
    ("float", DType.fp32), ("torch.float16", DType.fp16), ("BF16", DType.bf16), (DType.fp16, DType.fp16)])
def test_dtypes_by_torch_dtype_or_usual_name(given, member):
    assert ModelOptions(dtype=given).dtype is member


def test_unknown_dtype_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown dtype 'int8': use fp32, fp16 or bf16"):
        ModelOptions(dtype="int8")


def test_callable_to_device_and_html(model_dir, images):
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu", dtype=torch.float32)
    paths = [str(images / "img0.jpg"), str(images / "img1.png")]
    assert torch.equal(scorer("a red cat", paths), scorer.score("a red cat", paths))
    assert scorer.to("cpu") is scorer and scorer.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            scorer.to("cuda")
    with pytest.raises(UsageError, match="fp16 is not supported on CPU"):
        PickScorer.from_pretrained(str(model_dir), device="cpu", dtype="float16")
    evil = draw_image(images / "<b>x</b>.png", (64, 64), seed=7)
    ranked = scorer.rank("a <script> cat", [*paths, str(evil)], workers=0)
    html = ranked._repr_html_()
    assert html.startswith("<table><caption>a &lt;script&gt; cat</caption>") and html.count("<tr>") == 4
    assert "&lt;b&gt;x&lt;/b&gt;.png" in html and "<b>" not in html
    assert ranked == json.loads(json.dumps(ranked))  # still a plain list of dicts


def test_batch_shows_csv_paths_as_it_shows_path_arguments(runner, model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(2):
        draw_image(data / "imgs" / f"c{i}.png", (64, 64), seed=i)
    (data / "prompts.csv").write_text("prompt,images\na red cat,imgs\na blue dog,\n")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["batch", "data/prompts.csv", "data/imgs/c0.png", "--model", str(model_dir),
                              "-f", "jsonl", "--no-cache", "--workers", "0"])
    assert res.exit_code == 0, res.output
    paths = sorted({json.loads(line)["path"] for line in res.stdout.splitlines()})
    assert paths == ["data/imgs/c0.png", "data/imgs/c1.png"]  # relative, as typed, for both kinds
