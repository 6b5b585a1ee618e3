"""The one lifecycle every command runs in: logging to stderr, stop signals, exceptions turned into one line and an
exit code, outputs kept or discarded. Also what several commands say the same way (the model that loaded; the
progress bar is `cli.progress`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Callable

import typer

from pickrank.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_SIGHUP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    PickrankError,
    Terminated,
)
from pickrank.options import CommandOptions, ModelOptions
from pickrank.output.guards import InputIsOutput
from pickrank.output.sinks import Closable, abandon
from pickrank.signals import noted, restore_handlers, set_handlers

if TYPE_CHECKING:
    from pickrank.cli.progress import NoBar, ProgressBar
    from pickrank.models.loading import LoadingEmbedder
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


class _StderrHandler(logging.Handler):
    """Log records as one `pickrank: warning: ...` line each on stderr, control characters escaped (a file name or
    prompt in a message cannot drive the terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        from pickrank.cli.progress import write_line
        from pickrank.output.terminal import terminal_safe

        level = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        write_line(f"pickrank: {level}{terminal_safe(record.getMessage())}")  # above the progress bar, if up


def setup_logging(quiet: bool) -> Callable[[], None]:
    """pickrank's messages go to stderr as one line each (info unless quiet); returns what puts the logger's
    previous settings back."""
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False

    def restore() -> None:
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate

    return restore


def _on_stop_signal(signum: int, frame: object) -> None:
    raise Terminated(signum)


def exit_code(e: BaseException, debug: bool) -> int:
    """The one place exceptions become a one-line message on stderr and an exit code (--debug re-raises)."""
    if isinstance(e, KeyboardInterrupt):
        print("pickrank: interrupted; results so far were kept", file=sys.stderr)
        return EXIT_SIGINT
    if isinstance(e, Terminated):
        what = "hung up (SIGHUP)" if e.exit_code == EXIT_SIGHUP else "terminated"
        try:  # after a hang-up, the terminal may be gone
            print(f"pickrank: {what}; results so far were kept", file=sys.stderr)
        except OSError:
            pass
        return e.exit_code
    if isinstance(e, BrokenPipeError):
        # The reader went away (| head): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    if debug or isinstance(e, typer.Exit) or not isinstance(e, Exception):  # --debug, or an exit passing through
        raise e
    from pickrank.output.terminal import terminal_safe  # messages may name files (--on-error fail)

    if isinstance(e, PickrankError):
        print(f"pickrank: error: {terminal_safe(str(e))}", file=sys.stderr)
        return e.exit_code
    print(f"pickrank: error: {type(e).__name__}: {terminal_safe(str(e))} (run with --debug for the traceback)",
          file=sys.stderr)
    return EXIT_FATAL


def close_outputs(sinks: list[Closable], code: int) -> int:
    """Keep outputs of finished or interrupted runs (whole records); discard those of failed runs."""
    keep = code in (EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGHUP)
    for sink in sinks:
        try:
            if keep:
                sink.close()
            else:
                sink.discard()  # a failed run leaves an earlier -o file as it was
        except BrokenPipeError:
            pass
        except Exception as e:
            print(f"pickrank: error: {e}", file=sys.stderr)
            code = code or EXIT_FATAL
    return code


class Command:
    """The one lifecycle of every command: logging and stop signals set up; on leaving, any exception becomes one
    line and an exit code (`exit_code`), the outputs in `sinks` are kept or discarded, and the command exits.

        with Command(opts.command) as cmd:
            cmd.sinks.append(writer)  # closed (kept) or discarded whatever happens
            cmd.code = EXIT_PARTIAL   # the exit code of a run that ends normally
    """

    def __init__(self, options: CommandOptions) -> None:
        self.options = options
        self.sinks: list = []
        self.code = EXIT_OK

    def __enter__(self) -> "Command":
        self._restore_logging = setup_logging(self.options.quiet)
        # SIGTERM and SIGHUP stop a run as Ctrl-C does: outputs keep their whole records, workers are shut down.
        # The host's handlers and logging come back when the command ends (a command run in process, as tests and
        # notebooks do, leaves them as they were).
        self._saved_handlers = set_handlers(_on_stop_signal, tuple(
            s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None))
        return self

    def __exit__(self, kind: type | None, e: BaseException | None, tb: object) -> None:
        try:
            code = self._end(e)
        finally:
            try:
                restore_handlers(self._saved_handlers)
            finally:
                self._restore_logging()
        raise typer.Exit(code)

    def _end(self, e: BaseException | None) -> int:
        """The outputs kept or discarded, and the command's exit code (--debug re-raises)."""
        code = self.code
        late: list[int] = []
        with noted(late):  # the outputs being closed stay whole, whatever signal comes now
            try:
                if e is not None:
                    if isinstance(e, InputIsOutput):
                        abandon(self.sinks)  # found while reading inputs: even the HTML page of a failed run goes
                    code = exit_code(e, self.options.debug)  # --debug re-raises (after the finally)
            finally:
                code = close_outputs(self.sinks, code)
        if late and code in (EXIT_OK, EXIT_PARTIAL):
            code = exit_code(Terminated(late[0]) if late[0] != signal.SIGINT else KeyboardInterrupt(), False)
        return code


def say_loaded(embedder: ImageTextEmbedder) -> None:
    """Say on stderr what runs where, once the model has loaded."""
    d = embedder.describe()
    helps = "a GPU or --dtype bf16 helps" if embedder.backend == "torch" else "a GPU helps"
    slow = f" (CPU is slow: about 2 s per image for PickScore; {helps})" if embedder.device.type == "cpu" else ""
    log.info("%s on %s, %s%s", embedder.source.model, d["device"], d["dtype"], slow)


def load_embedder(options: ModelOptions, bar: ProgressBar | NoBar | None = None) -> LoadingEmbedder:
    """Start loading the model (as the library loads it), saying on stderr what runs where once it has loaded; a
    first download and the load are shown on `bar`."""
    from pickrank.models.loading import load_embedder as load

    if bar is None:
        return load(options, on_loaded=say_loaded)
    return load(options, on_loaded=bar.on_loaded(say_loaded), on_progress=bar)
