"""--help reads like the CLIs people like: options in panels, real metavars, examples, nothing cut at 80 columns,
numbers that agree with BENCHMARKS.md, and shell completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperOption

from pickrank.cli.app import app
from pickrank.cli.shared import PANELS

ROOT = Path(__file__).resolve().parents[2]


def commands() -> list[tuple[str, ...]]:
    """Every command path: (), ("score",), ..., ("cache", "clear"), ("export", "onnx")."""
    out: list[tuple[str, ...]] = [()]
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        out += [(name, s) for s in sub] if sub else [(name,)]
    return out


def help_text(runner, path: tuple[str, ...]) -> str:
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"}, prog_name="pickrank")
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.mark.parametrize("path", commands(), ids=lambda p: " ".join(p) or "pickrank")
def test_help_at_80_columns(runner, path):
    text = help_text(runner, path)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text  # no default or help cut off
    for python_type in ("<str>", "<int", "<float", "<bool>", "<list", "list[", "range>", "x>=", "<path>"):
        assert python_type not in text, (python_type, text)
    if path:  # each command: a few examples to copy
        assert "Examples:" in text and len(re.findall(r"^\s*\$ ", text, re.M)) >= 2, text
    assert "Options ─" in text


def test_each_command_is_summed_up_in_one_line():
    """The command list of `pickrank --help` shows a command's first paragraph with its line breaks kept: that
    paragraph is one line, so the list reads as sentences at any width."""
    root = typer.main.get_command(app)
    for path in commands()[1:]:
        cmd = root
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        summary = (cmd.help or "").strip().split("\n\n")[0]
        assert summary and "\n" not in summary, (path, summary)


def test_every_option_states_its_panel():
    """A new option names its help panel where it is declared (Opt(..., panel=...)); none is left in typer's
    catch-all "Options" panel with --help."""
    ctx = typer.Context(typer.main.get_command(app))
    for path in commands()[1:]:
        cmd = typer.main.get_command(app)
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        for p in cmd.get_params(ctx):
            if isinstance(p, TyperOption) and p.name != "help":
                assert getattr(p, "rich_help_panel", None) in PANELS, (path, p.name)
                assert p.metavar is not None, (path, p.name)  # what to type, or nothing for a flag
            if isinstance(p, TyperArgument):
                assert p.metavar and p.metavar[0].isupper(), (path, p.name)  # DATA, PATH, PROMPTS.csv


def test_panels_come_in_order(runner):
    text = help_text(runner, ("score",))
    found = [t for t in re.findall(r"╭─ (\w+) ─", text)]
    assert found == ["Arguments", "Options", "Input", "Datasets", "Model", "Output", "Cache", "Run", "Engine"]


def test_numbers_in_help_agree_with_the_benchmarks(runner):
    bench = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for path in commands():
        for figure in re.findall(r"\b\d+\.\d+x\b", help_text(runner, path)):
            assert figure in bench, (path, figure)
    assert "1.46x" in help_text(runner, ("score",))  # --decode fast's measured gain


def test_shell_completion(runner, tmp_path):
    assert "--install-completion" in help_text(runner, ())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_PICKRANK_COMPLETE": "complete_bash",
           "COMP_WORDS": "pickrank score --dtype ", "COMP_CWORD": "3"}
    code = "from pickrank.cli.app import app; app(prog_name='pickrank')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["fp32", "fp16", "bf16"], res.stderr
