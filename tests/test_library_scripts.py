"""The README's library example runs as people paste it: a script file, `python -` and a REPL, with no
`if __name__ == "__main__":` guard (decoding happens in threads; worker processes would re-import the script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.images import draw_image

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """\
from pickrank import PickScorer

scorer = PickScorer.from_pretrained({model!r}, device="cpu")
records = scorer.rank("a red cat on a sofa", [{folder!r}])
print("ranked", len(records), [r["rank"] for r in records])
print("scores", len(scorer.score("a red cat on a sofa", [r["path"] for r in records])))
"""


@pytest.fixture(scope="module")
def script(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("script-images")
    for i in range(6):  # more images than one decode thread takes at a time
        draw_image(folder / f"img{i}.png", (300, 200), seed=i)
    return SCRIPT.format(model=str(model_dir), folder=str(folder))


def run_python(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ranked 6 [1, 2, 3, 4, 5, 6]" in res.stdout and "scores 6" in res.stdout
    assert "bootstrapping" not in res.stderr and "BrokenProcessPool" not in res.stderr


def test_as_a_script_file(script: str, tmp_path: Path) -> None:
    path = tmp_path / "rank_them.py"
    path.write_text(script)
    check(run_python([str(path)], "", tmp_path))


def test_as_python_dash(script: str, tmp_path: Path) -> None:
    check(run_python(["-"], script, tmp_path))


def test_in_a_repl(script: str, tmp_path: Path) -> None:
    # -i: the interactive interpreter, reading the lines as typed ones (its prompts go to stderr)
    res = run_python(["-i", "-q"], script + "\n", tmp_path)
    check(res)
    assert ">>>" in res.stderr  # it really was the REPL
