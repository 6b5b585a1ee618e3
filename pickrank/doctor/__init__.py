"""`pickrank doctor`: the checks a user runs before trusting their numbers, each a small function returning a `Check`.

Nothing here uses the network: a hub model is looked at in the local Hugging Face cache only (what `--offline`
would find). The checks are grouped by what they look at: the model's files (`model`), this install and machine
(`machine`), and the known-answer self-test (`selftest`), which compares pickrank's own preprocessing with
transformers' Pillow CLIP image processor on generated images, and the score of a generated pair through the
`Engine` with the reference math (transformers' CLIPModel: `logit_scale.exp() * cosine`). torch and transformers are
imported inside the checks that need them, so that a broken install fails those checks instead of the command. A new
check is a function decorated with `@check(name, needs=...)` in the module of what it looks at.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from typing import Callable

from pickrank.doctor import machine, model, selftest
from pickrank.doctor.registry import NOT_CACHED, NOT_CHECKED, Check, Registered, Status, Subject, make_subject
from pickrank.errors import PickrankError
from pickrank.options import CacheOptions, ModelOptions

__all__ = ["CHECKS", "Check", "ChecksFailed", "Status", "failed", "render", "run_checks"]

# Every check in the order they run and are listed (a check runs after those it needs): the model's files, this
# install and machine, the known-answer self-test.
CHECKS: list[Registered] = [*model.CHECKS, *machine.CHECKS, *selftest.CHECKS]


class ChecksFailed(PickrankError):
    """Some checks failed (exit 1): the message names them."""


def run_checks(model: ModelOptions, cache: CacheOptions, debug: bool = False) -> list[Check]:
    """Every check in order; one that needs a failed check is not run (a warning saying which), one that crashes
    fails with the exception's text (with `debug`, raises it)."""
    subject = make_subject(model, cache)
    done: dict[str, Check] = {}
    with contextlib.ExitStack() as scope:
        _quiet_transformers(scope)
        for name, needs, fn in CHECKS:
            blocked = [n for n in needs if _blocks(done[n])]
            done[name] = (Check(name, Status.warn, f"{NOT_CHECKED}{', '.join(blocked)}") if blocked
                          else _guarded(name, fn, subject, debug))
    return list(done.values())


def _blocks(c: Check) -> bool:
    """Whether a check's outcome stops those that need it: a failure, or a warning that it found nothing to check."""
    return c.status is Status.fail or c.detail.startswith((NOT_CHECKED, NOT_CACHED))


def _guarded(name: str, fn: Callable[[Subject], Check], subject: Subject, debug: bool) -> Check:
    """fn(subject); an exception becomes a failed check (a broken install must be reported, not crash the doctor)."""
    try:
        return fn(subject)
    except Exception as e:  # whatever torch, transformers or a file raise: the text is what the user needs
        if debug:  # --debug: the traceback
            raise
        return Check(name, Status.fail, _one_line(e))


def _one_line(e: Exception) -> str:
    """pickrank's own message (one line for users already), else the exception's type and first line."""
    if isinstance(e, PickrankError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def failed(checks: list[Check]) -> list[str]:
    """The names of the failed checks."""
    return [c.name for c in checks if c.status is Status.fail]


def _quiet_transformers(scope: contextlib.ExitStack) -> None:
    """transformers' load reports and progress bars would mix into the doctor's output: off while the checks run,
    the host's settings back after them."""
    try:
        from pickrank.models.torch_embedder import quiet_transformers

        scope.enter_context(quiet_transformers())
    except Exception:  # a broken torch or transformers: the checks that need them say so
        return


# -- output -------------------------------------------------------------------------------------------------------

def render(checks: list[Check], fmt: str) -> str:
    """The checks as a text table (a summary line first) or one JSON object {ok, failed, checks}."""
    bad = failed(checks)
    if fmt == "json":
        rows = [{**asdict(c), "status": c.status.value} for c in checks]
        return json.dumps({"ok": not bad, "failed": bad, "checks": rows}, ensure_ascii=False, indent=2)
    from pickrank.output.terminal import terminal_safe

    warned = sum(c.status is Status.warn for c in checks)
    width = max(len(c.name) for c in checks)
    lines = [f"pickrank doctor: {len(checks)} checks, {len(bad)} failed, {warned} warning(s)"]
    lines += [f"{c.status.value:<4}  {c.name:<{width}}  {terminal_safe(c.detail)}" for c in checks]
    return "\n".join(lines)
