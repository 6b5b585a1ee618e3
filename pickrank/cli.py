"""The `pickrank` command line: parse, call the library, render; errors become one-line messages and exit codes.

No torch or transformers import happens at module load, so `pickrank --help` is instant.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import stat
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Callable, Optional, Sequence

import typer

from . import __version__
from .errors import (EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE,
                     OutputError, PickrankError, Terminated, UsageError)

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

log = logging.getLogger("pickrank")


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    paths = "paths"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class OnError(str, Enum):
    continue_ = "continue"
    fail = "fail"


# Options shared by score, best-of-n and batch.
ModelOpt = Annotated[Optional[str], typer.Option("--model", envvar="PICKRANK_MODEL",
                     help="Hub id or local folder of the model \\[default: yuvalkirstain/PickScore_v1].")]
ProcessorOpt = Annotated[Optional[str], typer.Option(
    help="Hub id or folder of the processor \\[default: the model folder if it has one, else "
         "laion/CLIP-ViT-H-14-laion2B-s32B-b79K].")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Model revision (branch, tag or commit) on the hub.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never use the network; weights must be cached.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU).")]
DTypeOpt = Annotated[DType, typer.Option(help="Model precision; fp32 is the reference.")]
BatchOpt = Annotated[Optional[int], typer.Option(min=1, help="Images per model call \\[default: 32 on GPU, 8 on CPU].")]
WorkersOpt = Annotated[Optional[int], typer.Option(min=0, help="Decode worker processes; 0 decodes in the main "
                                                   "process \\[default: CPU count, at most 8].")]
FormatOpt = Annotated[Optional[Format], typer.Option(
    "--format", "-f", help="Output format \\[default: from -o's extension (.jsonl, .json, .csv; .txt: paths), "
                           "else table on a terminal, else jsonl].")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write results to FILE (atomically; a "
                      "device, FIFO or /dev/stdout is written straight through).")]
NullOpt = Annotated[bool, typer.Option("--null", "-0", help="End each path with NUL instead of a newline, for "
                    "xargs -0 (implies -f paths).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or info messages.")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache", envvar="PICKRANK_CACHE",
                     help="Embedding cache file \\[default: ~/.cache/pickrank/embeddings.sqlite3].")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the embedding cache.")]
OnErrorOpt = Annotated[OnError, typer.Option(help="continue: report bad images and go on (exit 3); "
                                             "fail: stop at the first (exit 1).")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(min=1, help="Refuse images with more pixels than this "
                                                     "(decompression bombs) \\[default: Pillow's 89,478,485].")]
MaxBytesOpt = Annotated[Optional[int], typer.Option(min=1, help="Refuse image files larger than this many bytes, "
                                                   "before reading them \\[default: 536,870,912 = 512 MiB].")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
HtmlOpt = Annotated[Optional[str], typer.Option("--html", metavar="FILE",
                    help="Also write a self-contained HTML gallery of the ranking.")]


class EngineName(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[EngineName, typer.Option(help="local, or ray to run on a Ray cluster (pip install "
                                               "'pickrank[ray]').")]
RayAddressOpt = Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Ray cluster address "
                          "\\[default: $RAY_ADDRESS, else a local Ray started for the run].")]
RayActorsOpt = Annotated[Optional[int], typer.Option(min=1, help="Embedding actors on a cluster without GPUs "
                                                     "\\[default: 1 per GPU, else 2].")]


@dataclass(frozen=True)
class Common:
    """The shared options, as the library needs them."""

    model: str | None
    processor: str | None
    revision: str | None
    offline: bool
    device: str
    dtype: str
    batch_size: int | None
    workers: int | None
    top: int | None
    format: str | None
    output: str | None
    quiet: bool
    cache: str | None
    no_cache: bool
    on_error: str
    max_pixels: int | None
    max_bytes: int | None
    debug: bool
    html: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None
    null: bool = False


class _InputIsOutput(UsageError):
    """An output would be written over one of the run's inputs: nothing at all is written (exit 2)."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pickrank {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Rank AI-generated images by predicted human preference (PickScore_v1).

    Example: pickrank score --prompt "a red cat on a sofa" images/
    """


class _StderrHandler(logging.Handler):
    """Log records as one `pickrank: warning: ...` line each on stderr, control characters escaped (a file name or
    prompt in a message cannot drive the terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        from .terminal import terminal_safe

        level = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        msg = f"pickrank: {level}{terminal_safe(record.getMessage())}"
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)  # keeps the progress bar intact
        except Exception:
            print(msg, file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _on_stop_signal(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _catch_stop_signals() -> None:
    """SIGTERM and SIGHUP stop a run as Ctrl-C does: outputs keep their whole records, workers are shut down."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_stop_signal)


def _fail(message: str, code: int) -> None:
    print(f"pickrank: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _exit_code(e: BaseException, debug: bool) -> int:
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
    from .terminal import terminal_safe  # messages may name files (--on-error fail)

    if isinstance(e, PickrankError):
        print(f"pickrank: error: {terminal_safe(str(e))}", file=sys.stderr)
        return e.exit_code
    print(f"pickrank: error: {type(e).__name__}: {terminal_safe(str(e))} (run with --debug for the traceback)",
          file=sys.stderr)
    return EXIT_FATAL


def _close_sinks(sinks: list, code: int) -> int:
    """Keep outputs of finished or interrupted runs (whole records); discard those of failed runs."""
    keep = code in (EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGHUP)
    for sink in sinks:
        try:
            if keep or not hasattr(sink, "discard"):
                sink.close()
            else:
                sink.discard()  # a failed run leaves an earlier -o file as it was
        except BrokenPipeError:
            pass
        except Exception as e:
            print(f"pickrank: error: {e}", file=sys.stderr)
            code = code or EXIT_FATAL
    return code


def _load_embedder(model, processor, revision, offline, device, dtype, batch_size):
    """Check the model, start loading it in a thread (the run reads and decodes images meanwhile), and say on stderr
    what runs where once it has loaded."""
    from .loading import load_in_background
    from .source import resolve_source

    source = resolve_source(model, processor, revision, offline)

    def loaded(embedder) -> None:
        d = embedder.describe()
        slow = " (CPU is slow: about 2 s per image for PickScore; a GPU or --dtype bf16 helps)" \
            if embedder.device.type == "cpu" else ""
        log.info("%s on %s, %s%s", source.model, d["device"], d["dtype"], slow)

    return load_in_background(source, device=device, dtype=dtype, batch_size=batch_size, on_loaded=loaded)


def _set_meta(sinks: list, embedder) -> None:
    """Tell the HTML report which model ran (known once it has loaded; a failed load leaves it out)."""
    if not embedder.ready or embedder.error() is not None:
        return
    d = embedder.describe()
    for sink in sinks:
        if hasattr(sink, "set_meta"):
            sink.set_meta(d)


def _run(kind: str, c: Common, make_sets: Callable[[], list], copy_to: str | None = None,
         inputs: Sequence[str] = ()) -> None:
    """Everything a scoring command does, with errors translated into messages and exit codes in one place.

    inputs: the paths named on the command line (files, folders, a prompts CSV), which no output may overwrite.
    """
    _setup_logging(c.quiet)
    _catch_stop_signals()
    sinks: list = []  # the result writer and the HTML report: closed (kept) whatever happens
    code = EXIT_OK
    try:
        from .writers import Output, make_writer, record_fields

        # Inputs and output paths are checked before the (slow) model load.
        sets = make_sets()
        fmt = _choose_format(c)
        files = _check_outputs([("-o", c.output), ("--html", c.html)], inputs)
        out = Output(c.output)
        fmt = fmt or ("table" if out.is_terminal else "jsonl")
        sinks.append(make_writer(fmt, out, record_fields(kind, copy=copy_to is not None), null=c.null))
        if c.html:
            from .html import HtmlReport

            sinks.append(HtmlReport(c.html, kind=kind))
        if copy_to:
            _check_copy_to(copy_to)
        code = _score(c, _guard_inputs(sets, files), sinks, copy_to)
    except BaseException as e:
        if isinstance(e, _InputIsOutput):
            _abandon(sinks)  # found while reading inputs: even the HTML page of a failed run is not written
        code = _exit_code(e, c.debug)
    finally:
        code = _close_sinks(sinks, code)
    raise typer.Exit(code)


def _choose_format(c: Common) -> str | None:
    """-f; else paths for -0; else what the -o file's extension names; None: table on a terminal, else jsonl."""
    from .writers import format_for_path

    if c.null and c.format not in (None, "paths"):
        raise UsageError(f"-0/--null goes with -f paths only, not -f {c.format}")
    return c.format or ("paths" if c.null else format_for_path(c.output))


def _stdout_target():
    """Where results go without -o, as a writers.Target (None when stdout has no descriptor, as under a test)."""
    from .writers import Target

    try:
        fd = sys.stdout.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):  # ValueError, OSError: io.UnsupportedOperation, a closed fd
        return None
    return Target("fd", "stdout", fd=fd)


def _check_outputs(outputs: list[tuple[str, str | None]], inputs: Sequence[str]) -> dict[tuple[int, int], str]:
    """No two outputs in one place, and no output over a named input (usage errors, before the model loads).

    Returns the outputs that are existing files, by (device, inode) -> "OPTION PATH", for `_guard_inputs` to
    check the inputs discovered later (globs, stdin, CSV cells) against.
    """
    from .writers import resolve_output

    targets = []
    for label, path in outputs:
        if label == "-o" and path in (None, "-"):
            target = _stdout_target()
            if target is not None:
                targets.append(("stdout", target))
        elif path is not None:  # (--html - is a file named '-', as before)
            targets.append((f"{label} {path}", resolve_output(path, label)))
    for i, (a, ta) in enumerate(targets):
        for b, tb in targets[i + 1:]:
            if ta.identity() == tb.identity() and not ta.harmless_to_share:
                raise UsageError(f"{a} and {b} are the same file: give each output its own")
    files = {}
    for name, t in targets:
        if t.kind == "file" and t.st is not None:
            _check_not_an_input(name, t.path, t.st, inputs)
            files[(t.st.st_dev, t.st.st_ino)] = name
    return files


def _check_not_an_input(name: str, real: str, st: os.stat_result, inputs: Sequence[str]) -> None:
    """An existing output file must not be a named input, nor an image inside a named input folder."""
    from .discover import is_image_name

    for arg in inputs:
        if arg == "-":
            continue
        try:
            ast = os.stat(arg)
        except OSError:  # a glob, or missing: checked as paths are read (_guard_inputs)
            continue
        if stat.S_ISDIR(ast.st_mode):
            folder = os.path.realpath(arg)
            if is_image_name(real) and os.path.commonpath([real, folder]) == folder:
                raise _InputIsOutput(f"{name}: is an image in the input folder {arg}; it would be overwritten")
        elif os.path.samestat(ast, st):
            raise _InputIsOutput(f"{name}: is also an input ({arg}); it would be overwritten")


def _guard_inputs(sets: list, files: dict[tuple[int, int], str]) -> list:
    """Sets whose paths stop the run (usage error, nothing written) at an input that is also an output file.

    Costs one stat per input path, and only when an output file already exists.
    """
    if not files:
        return sets
    from dataclasses import replace

    def guarded(paths):
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:  # reported as the image's error when it is read
                yield p
                continue
            if (st.st_dev, st.st_ino) in files:
                raise _InputIsOutput(f"{files[(st.st_dev, st.st_ino)]}: is also an input ({p}); "
                                     "it would be overwritten")
            yield p

    return [s if s.error is not None else replace(s, paths=guarded(s.paths)) for s in sets]


def _abandon(sinks: list) -> None:
    """Write no output at all: temp files removed, the HTML page not rendered."""
    for sink in sinks:
        try:
            (sink.abandon if hasattr(sink, "abandon") else sink.discard)()
        except Exception:
            pass  # clean-up of a run that is already failing
    sinks.clear()


def _check_copy_to(dest: str) -> None:
    """--copy-to must be a folder this user may write (made if missing); checked before the model loads."""
    from .writers import may_write

    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise OutputError(f"--copy-to {dest}: not a folder")
    try:
        os.makedirs(dest, exist_ok=True)
        st = os.stat(dest)
    except OSError as e:
        raise OutputError(f"--copy-to {dest}: cannot create the folder: {e.strerror or e}") from None
    if not may_write(dest, st):
        raise OutputError(f"--copy-to {dest}: the folder is not writable")


def _make_engine(c: Common, embedder, cache, options, on_progress):
    """The local engine, or the Ray one with --engine ray; both yield the same Rankings."""
    if c.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(embedder, cache, options, on_progress=on_progress, address=c.ray_address,
                         actors=c.ray_actors)
    from .pipeline import Engine

    return Engine(embedder, cache, options, on_progress=on_progress)


def _score(c: Common, sets: list, sinks: list, copy_to: str | None) -> int:
    from tqdm import tqdm

    from .cache import open_cache
    from .pipeline import RunOptions

    if c.engine == "ray":
        from .ray_engine import require_ray

        require_ray()  # without the extra: a one-line usage error before the (slow) model load
    embedder = _load_embedder(c.model, c.processor, c.revision, c.offline, c.device, c.dtype, c.batch_size)
    cache = open_cache(c.cache, enabled=not c.no_cache)
    bar = tqdm(unit="img", file=sys.stderr, disable=True if c.quiet else None, dynamic_ncols=True, leave=False)
    options = RunOptions(batch_size=c.batch_size, workers=c.workers, top=c.top, on_error=c.on_error,
                         max_pixels=c.max_pixels, max_bytes=c.max_bytes)
    engine = _make_engine(c, embedder, cache, options, bar.update)
    failed = 0
    try:
        for ranking in engine.run(sets):
            records = ranking.records
            failed += ranking.failed
            if copy_to:
                records, not_copied = _copy_winners(records, copy_to)
                failed += not_copied
            for sink in sinks:
                _write(sink, records)
        embedder.result()  # a run that never needed the model still reports a model that failed to load
    finally:
        bar.close()
        cache.close()
        _set_meta(sinks, embedder)
    s = engine.summary
    log.info("%d image(s), %d embedded, %d from cache, %d failed, %d ranking(s)", s.images, s.embedded,
             s.cache_hits, s.failures, s.rankings)
    return EXIT_PARTIAL if failed or s.failures else EXIT_OK


def _write(sink, records: tuple) -> None:
    """Hand a ranking to a sink; a failed write (a full disk, /dev/full) is an output error naming the output."""
    try:
        sink.write(records)
    except BrokenPipeError:
        raise  # the reader went away: a quiet stop (_exit_code)
    except OSError as e:
        out = getattr(sink, "out", None)
        where = f"{out.label} {out.path}" if out is not None and out.path else "stdout"
        raise OutputError(f"{where}: {e.strerror or e}") from None


def _copy_winners(records: tuple, dest: str) -> tuple[tuple, int]:
    """Copy each scored record's image into dest under a name not taken yet (never overwriting).

    A copy that fails becomes that record's error (its score stays); returns the records and how many failed.
    """
    from dataclasses import replace

    from .pipeline import with_copied

    out = []
    failed = 0
    for r in records:
        if r.error is not None or r.path is None:
            out.append(r)
            continue
        try:
            out.append(with_copied(r, _copy_one(r.path, dest)))
        except OSError as e:
            reason = f"not copied to {dest}: {e.strerror or e}"
            log.warning("%s: %s", r.path, reason)
            out.append(replace(r, error=reason))
            failed += 1
    return tuple(out), failed


def _copy_one(path: str, dest: str) -> str:
    """Copy path into dest as NAME, NAME-1, ... (the first free one); a failed copy leaves no partial file."""
    stem, ext = os.path.splitext(os.path.basename(path))
    with open(path, "rb") as fin:
        n = 0
        while True:
            target = os.path.join(dest, f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}")
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                n += 1
        try:
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except BaseException:
            os.unlink(target)  # ours (O_EXCL): a half copy is not left behind
            raise
    try:
        shutil.copystat(path, target)
    except OSError:
        pass  # times and mode are a nicety; the copy itself is whole
    return target


def _common(**kw) -> Common:
    kw["dtype"] = kw["dtype"].value
    kw["format"] = kw["format"].value if kw["format"] else None
    kw["on_error"] = kw["on_error"].value
    kw["engine"] = kw["engine"].value
    if kw["max_pixels"] is None:  # Pillow's limit; None would mean no limit downstream
        from .reader import DEFAULT_MAX_PIXELS

        kw["max_pixels"] = DEFAULT_MAX_PIXELS
    if kw["max_bytes"] is None:
        from .reader import DEFAULT_MAX_BYTES

        kw["max_bytes"] = DEFAULT_MAX_BYTES
    return Common(**kw)


@app.command()
def score(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders, quoted globs ('**' too), or - for stdin.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt the images were generated for.")],
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the best K.")] = None,
    model: ModelOpt = None, processor: ProcessorOpt = None, revision: RevisionOpt = None, offline: OfflineOpt = False,
    device: DeviceOpt = "auto", dtype: DTypeOpt = DType.fp32, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, format: FormatOpt = None, output: OutputOpt = None, quiet: QuietOpt = False,
    cache: CacheOpt = None, no_cache: NoCacheOpt = False, on_error: OnErrorOpt = OnError.continue_,
    max_pixels: MaxPixelsOpt = None, max_bytes: MaxBytesOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
    null: NullOpt = False,
) -> None:
    """Score images against one prompt and rank them.

    Example: pickrank score --prompt "a red cat on a sofa" sample_images/
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("paths", "prompt")})
    from .jobs import score_job

    _run("score", c, lambda: score_job(prompt, paths, sys.stdin), inputs=paths)


@app.command("best-of-n")
def best_of_n(
    folder: Annotated[str, typer.Argument(help="Folder of candidates; each subfolder with images is a group.")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt for every group \\[default: "
                                                  "prompt.txt in the group, else the PNG metadata's prompt].")] = None,
    top: Annotated[int, typer.Option(min=1, help="Keep the best K of each group.")] = 1,
    copy_to: Annotated[Optional[str], typer.Option(help="Copy the winners into this folder (never overwrites).")
                       ] = None,
    model: ModelOpt = None, processor: ProcessorOpt = None, revision: RevisionOpt = None, offline: OfflineOpt = False,
    device: DeviceOpt = "auto", dtype: DTypeOpt = DType.fp32, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, format: FormatOpt = None, output: OutputOpt = None, quiet: QuietOpt = False,
    cache: CacheOpt = None, no_cache: NoCacheOpt = False, on_error: OnErrorOpt = OnError.continue_,
    max_pixels: MaxPixelsOpt = None, max_bytes: MaxBytesOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
    null: NullOpt = False,
) -> None:
    """Keep the best of N candidates in each group of a folder.

    Example: pickrank best-of-n out/ --top 1 --copy-to keep/
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("folder", "prompt", "copy_to")})
    from .jobs import best_of_n_job

    _run("best-of-n", c, lambda: best_of_n_job(folder, prompt, c.max_pixels, c.max_bytes), copy_to=copy_to,
         inputs=[folder])


@app.command()
def batch(
    prompts_csv: Annotated[str, typer.Argument(metavar="PROMPTS.csv", help="CSV with a 'prompt' column; optional "
                                               "'id' and 'images' (folder, glob or paths separated by ';').")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Images for rows without an 'images' cell.")] = None,
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the best K of each row.")] = None,
    model: ModelOpt = None, processor: ProcessorOpt = None, revision: RevisionOpt = None, offline: OfflineOpt = False,
    device: DeviceOpt = "auto", dtype: DTypeOpt = DType.fp32, batch_size: BatchOpt = None,
    workers: WorkersOpt = None, format: FormatOpt = None, output: OutputOpt = None, quiet: QuietOpt = False,
    cache: CacheOpt = None, no_cache: NoCacheOpt = False, on_error: OnErrorOpt = OnError.continue_,
    max_pixels: MaxPixelsOpt = None, max_bytes: MaxBytesOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
    null: NullOpt = False,
) -> None:
    """Rank images for every prompt of a CSV; each image is embedded once, each prompt encoded once.

    Example: pickrank batch prompts.csv generations/ -f csv -o scores.csv
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("prompts_csv", "paths")})
    from .jobs import batch_job

    _run("batch", c, lambda: batch_job(prompts_csv, paths or [], sys.stdin),
         inputs=[prompts_csv, *(paths or [])])


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def _cache_command(path: str | None, debug: bool, action: Callable) -> None:
    """Open the cache for a `pickrank cache` command and run action(cache); errors become one line and an exit
    code, as for the scoring commands. A file that is not a pickrank cache is an error here, not a warning."""
    from .cache import CacheError, EmbeddingCache

    _setup_logging(False)
    code = EXIT_OK
    try:
        c = EmbeddingCache(path, warn=False)
        try:
            if c.problem is not None:
                raise CacheError(c.problem)
            action(c)
        finally:
            c.close()
    except BaseException as e:
        code = _exit_code(e, debug)
    raise typer.Exit(code)


@cache_app.command("info")
def cache_info(cache: CacheOpt = None, debug: DebugOpt = False) -> None:
    """Show the cache's path, entries, size and models.

    Example: pickrank cache info
    """
    def show(c) -> None:
        info = c.info()
        typer.echo(f"path:    {info.path}\nentries: {info.entries}\nsize:    {info.size_bytes / 1e6:.1f} MB")
        if info.read_only:
            typer.echo("access:  read-only (runs use its entries but save no new ones; clear/prune cannot delete)")
        for model, n in info.models.items():
            typer.echo(f"model:   {model}  ({n} entries)")

    _cache_command(cache, debug, show)


@cache_app.command("clear")
def cache_clear(
    model: Annotated[Optional[str], typer.Option(help="Only entries of models whose fingerprint contains this.")
                     ] = None,
    cache: CacheOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Delete cached embeddings (all, or one model's).

    Example: pickrank cache clear --model PickScore_v1
    """
    if model is not None and not model.strip():  # an empty pattern would match every fingerprint
        _fail("--model must not be empty: leave it out to clear every entry", EXIT_USAGE)
    _cache_command(cache, debug, lambda c: typer.echo(f"deleted {c.clear(model)} entries"))


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[float, typer.Option("--older-than", min=0, metavar="DAYS",
                                              help="Delete entries older than DAYS.")],
    cache: CacheOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Delete cached embeddings older than some days.

    Example: pickrank cache prune --older-than 30
    """
    _cache_command(cache, debug, lambda c: typer.echo(f"deleted {c.prune(older_than)} entries"))


@app.command()
def report(
    results: Annotated[str, typer.Argument(metavar="RESULTS.jsonl", help="Results saved with -f jsonl (or -f json); "
                                           "- for stdin.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="The HTML page to write "
                                                  "\\[default: RESULTS with .html].")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Render saved results as a self-contained HTML gallery (image files must still exist for thumbnails).

    Example: pickrank report scores.jsonl -o report.html
    """
    _setup_logging(quiet)
    if output is None:
        if results == "-":
            _fail("give -o FILE when reading results from stdin", EXIT_USAGE)
        output = os.path.splitext(results)[0] + ".html"
    try:
        from .html import render_results

        if results != "-" and _same_file(results, output):
            raise UsageError(f"-o {output}: is the results file; give another name for the page")
        rankings, missing = render_results(results, output)
    except BaseException as e:
        raise typer.Exit(_exit_code(e, debug))
    if missing:
        log.warning("%d image file(s) no longer exist: shown as placeholders", missing)
    log.info("wrote %s (%d ranking(s))", output, rankings)


@app.command("eval")
def eval_(
    data: Annotated[str, typer.Argument(metavar="DATA", help="Pick-a-Pic parquet (a file, a folder or a quoted "
                                        "glob of shards; needs pip install 'pickrank[eval]'), or CSV/JSONL with "
                                        "prompt, image_0, image_1, label (0, 1 or 0.5; paths relative to the file).")],
    validation: Annotated[Optional[str], typer.Option("--validation", metavar="FILE", help="Choose the tie "
                          "threshold from 0, 0.1, ..., 1 on this labelled file (max accuracy), then apply it.")
                          ] = None,
    tie_threshold: Annotated[Optional[float], typer.Option("--tie-threshold", min=0.0, max=1.0, help="Predict a "
                             "tie when |p0 - p1| <= this [default: 0, or chosen with --validation].")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% interval "
                                           "(0: none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write per-pair results "
                      "as JSON Lines (index, prompt, score_0, score_1, p_0, p_1, label, prediction, credit).")] = None,
    json_summary: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    model: ModelOpt = None, processor: ProcessorOpt = None, revision: RevisionOpt = None, offline: OfflineOpt = False,
    device: DeviceOpt = "auto", dtype: DTypeOpt = DType.fp32, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = None, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Measure pairwise preference accuracy on labelled pairs, with the Pick-a-Pic paper's tie protocol.

    Example: pickrank eval test.parquet --validation validation.parquet -o pairs.jsonl
    """
    import json

    _setup_logging(quiet)
    _catch_stop_signals()
    out = None
    code = EXIT_OK
    try:
        if tie_threshold is not None and validation is not None:
            raise UsageError("give --tie-threshold or --validation, not both")
        from .evaluate import Dataset, evaluate, format_summary
        from .reader import DEFAULT_MAX_PIXELS
        from .writers import Output

        # Inputs and the output path are checked before the (slow) model load.
        dataset = Dataset(data)
        val = Dataset(validation) if validation is not None else None
        out = Output(output) if output else None
        from tqdm import tqdm

        embedder = _load_embedder(model, processor, revision, offline, device, dtype.value, batch_size)
        total = dataset.count if val is None else (
            dataset.count + val.count if dataset.count is not None and val.count is not None else None)
        bar = tqdm(total=total or None, unit="pair", file=sys.stderr, disable=True if quiet else None,
                   dynamic_ncols=True, leave=False)
        try:
            result = evaluate(dataset, embedder, threshold=tie_threshold, validation=val, resamples=bootstrap,
                              seed=seed, out=out, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                              on_progress=bar.update)
        finally:
            bar.close()
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False) if json_summary else format_summary(result))
        code = EXIT_PARTIAL if result.skipped else EXIT_OK
    except BaseException as e:
        code = _exit_code(e, debug)
    finally:
        code = _close_sinks([out] if out is not None else [], code)
    raise typer.Exit(code)


def run() -> None:
    """Console-script entry point: usage errors exit 2, as Click does."""
    # Before torch loads: idle OpenMP threads must sleep, not spin on the cores the decode workers need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except UsageError as e:  # raised outside _run (should not happen, but keep the promise of one line)
        print(f"pickrank: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        # At exit the interpreter's collector walks the ~million objects of torch and transformers several times
        # (~0.7 s here); frozen objects are skipped. Outputs are closed by now, and the memory goes with the process.
        gc.freeze()
