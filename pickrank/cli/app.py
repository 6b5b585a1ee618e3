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
from typing import Annotated

import typer

from pickrank import __version__
from pickrank.cli import cache, compare, doctor, evaluate, export, label, prompts, report, score, serve, tune
from pickrank.errors import EXIT_USAGE, UsageError
from pickrank.signals import STOP_SIGNALS, set_handlers

app = typer.Typer(
    name="pickrank",
    help="Rank AI-generated images by predicted human preference (PickScore_v1).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(help="Inspect and manage the image-embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
export_app = typer.Typer(help="Export the model for other runtimes.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pickrank {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    """Rank AI-generated images by predicted human preference (PickScore_v1).

    Example: pickrank score --prompt "a red cat on a sofa" images/
    """


# The commands, in the order --help lists them.
app.command("score")(score.score)
app.command("best-of-n")(score.best_of_n)
app.command("batch")(score.batch)
app.command("prompts")(prompts.prompts)
cache_app.command("info")(cache.cache_info)
cache_app.command("clear")(cache.cache_clear)
cache_app.command("prune")(cache.cache_prune)
app.command("report")(report.report)
app.command("eval")(evaluate.eval_)
app.command("label")(label.label)
app.command("tune")(tune.tune)
app.command("compare")(compare.compare)
app.command("serve")(serve.serve)
app.command("doctor")(doctor.doctor)
app.add_typer(export_app, name="export")
export_app.command("onnx")(export.export_onnx)


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
