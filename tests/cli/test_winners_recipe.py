"""The README's recipe for copying best-of-n winners with xargs, run in a real shell: groups whose files share names
(every generator writes 00000.png) keep one winner each, side by side, where a flat `cp {} winners/` lost them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.images import draw_image

ROOT = Path(__file__).resolve().parents[1]


def winners_by(recipe: str, model_dir: Path, cwd: Path) -> dict[Path, bytes]:
    """The files `pickrank best-of-n out/ -f paths -0 | RECIPE` leaves in winners/ (a fresh folder): their bytes."""
    (cwd / "winners").mkdir()
    pick = f"{sys.executable} -m pickrank best-of-n out/ -p 'a red cat' -f paths -0 --no-cache --model {model_dir}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{pick} | {recipe}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = {p.relative_to(cwd / "winners"): p.read_bytes()
             for p in sorted((cwd / "winners").rglob("*")) if p.is_file()}
    shutil.rmtree(cwd / "winners")
    return found


@pytest.mark.skipif(shutil.which("xargs") is None or sys.platform != "linux", reason="GNU cp and xargs")
def test_the_readme_recipe_keeps_one_winner_per_group(model_dir: Path, tmp_path: Path) -> None:
    for group in ("g1", "g2", "g3"):
        for i in range(2):
            draw_image(tmp_path / "out" / group / f"cand{i}.png", (64, 64), seed=10 * int(group[1]) + i)
    kept = winners_by("xargs -0 cp --parents -t winners/", model_dir, tmp_path)
    assert [p.parent for p in kept] == [Path("out/g1"), Path("out/g2"), Path("out/g3")]
    assert all(data == (tmp_path / p).read_bytes() for p, data in kept.items())  # winners/out/GROUP/NAME
    # the recipe it replaces: the same names from different groups overwrite each other
    assert len(winners_by("xargs -0 -I{} cp {} winners/", model_dir, tmp_path)) < 3
