"""What the page tests share: a comparison page rendered once per module."""

from __future__ import annotations

import csv

import pytest

from pickrank.analysis.comparison import collect_scores, compare_systems, plan_comparison
from pickrank.records import Record
from pickrank.report.comparison import write_html
from tests.support.browser import EVIL, EVIL_SYSTEM
from tests.support.images import draw_image


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A three-system comparison over five prompts (one missing, one failed image), rendered to a page."""
    root = tmp_path_factory.mktemp("cmp")
    shared = draw_image(root / "shared.png", (120, 90), seed=99)
    for s, name in enumerate(("base", "dpo", "grpo")):
        for i in range(1, 6):
            if (name, i) == ("grpo", 5):
                continue  # missing
            if i == 3:
                for j in range(2):
                    draw_image(root / name / "3" / f"{j}.png", (80, 60), seed=10 * s + j)
            elif (name, i) == ("dpo", 4):
                (root / name / "4.png").write_bytes(b"not an image")
            else:
                draw_image(root / name / f"{i}.png", (100, 80), seed=100 * s + i)
    (root / "grpo" / "2.png").unlink()
    (root / "grpo" / "2.png").symlink_to(shared)  # the same image as base's: embedded once
    (root / "base" / "2.png").unlink()
    (root / "base" / "2.png").symlink_to(shared)
    prompts = root / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        csv.writer(f).writerows([["prompt"]] + [[f"{EVIL} prompt {i}"] for i in range(1, 6)])
    plan = plan_comparison([str(root / n) for n in ("base", "dpo", "grpo")], prompts_csv=str(prompts),
                           names=["base", EVIL_SYSTEM, "grpo"])
    records = []
    for slot in plan.slots:
        for s, imgs in enumerate(slot.images):
            for j, p in enumerate(imgs):
                bad = p.endswith("dpo/4.png")
                records.append(Record(prompt=slot.prompt, path=p, error="not an image" if bad else None,
                                      score=None if bad else 20.0 + s * 0.4 + ((int(slot.id) * 7 + j) % 5) * 0.3))
    table = collect_scores(plan, records)
    result = compare_systems(table, bootstrap=500, all_pairs=True, best_of_n=True)
    out = root / "compare.html"
    write_html(str(out), table, result, meta={"model": "tiny", "device": "cpu", "dtype": "float32"}, workers=0)
    return root, out, table, result
