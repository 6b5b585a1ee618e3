"""The `pickrank` Typer app: every command registered in one place, and the console-script entry point.

No torch or transformers import happens here, so `pickrank --help` is instant. A command's module (cli/score.py,
cli/compare.py, ...) only parses, calls the library and renders; the lifecycle all commands share is
`cli.lifecycle.Command`, the options several commands share are `cli.shared.SHARED`.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from pickrank import __version__
from pickrank.cli import cache, compare, doctor, evaluate, export, filter, label, prompts, report, score, serve, tune
from pickrank.errors import EXIT_USAGE, UsageError
from pickrank.signals import STOP_SIGNALS, set_handlers


def _no_type(ctx: Any) -> None:
    return None


class _PlainHelp:
    """A command or group whose --help shows what to type, not Python types: no type beside a flag (--help,
    --version, the completion options) or an argument (its metavar says it); typer would print <bool>, <str>."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if isinstance(p, TyperArgument):
                p.display_type_rich = _no_type  # this command's own argument object
            elif getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_PlainHelp, TyperCommand):
    """A command, as typer makes them."""


class _Group(_PlainHelp, TyperGroup):
    """A command group (pickrank itself, cache, export), as typer makes them."""


app = typer.Typer(  # its help is _root's docstring
    name="pickrank",
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(cls=_Group, help="Inspect and manage the image-embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
export_app = typer.Typer(cls=_Group, help="Export the model for other runtimes.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pickrank {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                                help="Show the version and exit.")] = False) -> None:
    """Rank AI-generated images by predicted human preference (PickScore_v1).

    Examples:
      $ pickrank score -p "a red cat on a sofa" images/
      $ pickrank best-of-n out/ --copy-to keep/
      $ pickrank compare base/ tuned/ --prompts prompts.csv --html compare.html

    The first run downloads PickScore_v1 (3.9 GB) into the Hugging Face cache.
    Run pickrank COMMAND --help for a command's options and examples.
    """


# The commands, in the order --help lists them: (the app or group, the name, the function).
COMMANDS = ((app, "score", score.score), (app, "best-of-n", score.best_of_n), (app, "batch", score.batch),
            (app, "filter", filter.filter_),
            (app, "prompts", prompts.prompts), (cache_app, "info", cache.cache_info),
            (cache_app, "clear", cache.cache_clear), (cache_app, "prune", cache.cache_prune),
            (app, "report", report.report), (app, "eval", evaluate.eval_), (app, "label", label.label),
            (app, "tune", tune.tune), (app, "compare", compare.compare),
            (app, "serve", serve.serve), (app, "doctor", doctor.doctor), (export_app, "onnx", export.export_onnx))
for _group, _name, _function in COMMANDS:
    _group.command(_name, cls=_Command)(_function)
app.add_typer(export_app, name="export")


def main() -> None:
    """Console-script entry point: usage errors exit 2, as Click does."""
    # Before torch loads: idle OpenMP threads must sleep, not spin on the cores the decode workers need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except UsageError as e:  # raised outside a command's lifecycle (should not happen; keep the promise anyway)
        print(f"pickrank: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        # The command is over and its outputs are closed: a stop signal from now on ends the process at once,
        # instead of raising inside the interpreter's clean-up (multiprocessing's finalizers print that traceback).
        set_handlers(signal.SIG_DFL, STOP_SIGNALS)
        # At exit the interpreter's collector walks the objects of torch and transformers several times; frozen
        # objects are skipped. Outputs are closed by now, and the memory goes with the process.
        gc.freeze()
