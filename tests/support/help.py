"""What every command's --help promises about the shared options."""

from __future__ import annotations

import inspect
import re
from typing import Callable

import pytest
from typer.testing import CliRunner

from pickrank.cli.app import app
from pickrank.cli.shared import SHARED


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def assert_shared_options_once(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...],
                               func: Callable, takes: list[str]) -> None:
    """The command's --help lists each shared option it takes once, and none it does not; it declares none itself."""
    monkeypatch.setenv("COLUMNS", "250")  # no wrapped lines
    res = runner.invoke(app, [*command, "--help"])
    assert res.exit_code == 0, res.output
    own = inspect.signature(func.__wrapped__).parameters
    panels = res.stdout[res.stdout.index("╭─"):]  # the option panels (the examples above them name options too)
    for name in SHARED:
        if name in own:
            continue  # the command's own option of that name (eval's -f/-o, report's -o, cache clear's --model)
        n = len(re.findall(rf"(?<![\w-]){re.escape(flag(name))}(?![\w-])", panels))
        assert n == (1 if name in takes else 0), (name, res.stdout)
    assert "opts" in own and not (set(own) & set(takes)), own  # the shared ones come from the table only
    seen = [p for p in inspect.signature(func).parameters if p in takes]  # what Typer sees, in table order
    assert seen == [n for n in SHARED if n in takes]
