"""pickrank's exceptions: the library raises these, the CLI turns them into one-line messages and exit codes."""

from __future__ import annotations

# Exit codes, documented in the README ("When things go wrong").
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_SIGINT = 130
EXIT_SIGHUP = 129
EXIT_SIGTERM = 143


class PickrankError(Exception):
    """Base class: a problem pickrank can explain in one line."""

    exit_code = EXIT_FATAL


class UsageError(PickrankError):
    """Bad arguments or input files: the user must change the command (exit 2)."""

    exit_code = EXIT_USAGE


class NoImages(UsageError):
    """The arguments name no image at all (exit 2)."""


class InvalidText(UsageError, ValueError):
    """A prompt that is not valid text: a lone surrogate (bytes that were not UTF-8) or a NUL (exit 2; a
    ValueError to the library's callers, a 400 from the server)."""


class ModelLoadError(PickrankError):
    """The model or processor cannot be loaded (missing, not CLIP, unsafe format, offline)."""


class NonFiniteScores(PickrankError):
    """The model gave NaN or infinity: for every image of a run (exit 1, after the error records are written), or
    for any image `PickScorer.score` was asked for (broken weights, or a precision that overflows)."""


class InputFailed(PickrankError):
    """An input failed and `--on-error fail` asked to stop (exit 1)."""


class InvalidArgument(UsageError, ValueError):
    """A library argument of the right type whose value cannot be used (an image without pixels, a tensor holding
    NaN): a ValueError to the library's callers, exit 2 on the command line."""


class ArgumentTypeError(UsageError, TypeError):
    """A library argument of a type pickrank does not take (a prompt that is None, bytes or a number): a TypeError
    to the library's callers."""


class OutputError(PickrankError):
    """The output cannot be written (unwritable path, full disk)."""


class RayNotInstalled(UsageError):
    """--engine ray without Ray installed (exit 2)."""


class RayClusterError(PickrankError):
    """The Ray cluster cannot be reached or was lost, or it failed the run (exit 1)."""


class Terminated(BaseException):
    """Raised by the SIGTERM/SIGHUP handler so that clean-up runs as for Ctrl-C (exit 128 + the signal's number)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RemoteError(PickrankError):
    """The reward server answered with an error (`status`, its `message`), or could not be reached in time
    (`status` None, or 503 when it stayed unavailable until the deadline)."""

    def __init__(self, message: str, status: int | None = None, server_message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
