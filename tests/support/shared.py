"""Set-ups made once per test run and shared by pytest-xdist's workers."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, made by build(path) once per test run (`path` does not exist yet; its parent holds nothing
    else). With pytest-xdist the first worker to ask builds it in the run's shared temp folder; the others wait."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        target = tmp_path_factory.mktemp(name) / name
        build(target)
        return target
    shared = run_folder(tmp_path_factory)
    target = shared / f"shared-{name}" / name
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = shared / f"shared-{name}.done"
        if not done.exists():
            shutil.rmtree(target.parent, ignore_errors=True)  # what a failed build left
            target.parent.mkdir()
            build(target)
            done.touch()
    return target


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's temp folder, shared by its pytest-xdist workers (each has its own basetemp inside)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
