"""The `pickrank` command line: parse, call the library, render; errors become one-line messages and exit codes.

No torch or transformers import happens at module load, so `pickrank --help` is instant.

Options shared by several commands are declared once, in `SHARED`; a command names the bundles it takes with
`@with_options(...)` and receives them built (`pickrank.options`' dataclasses, the library's own) in `opts`.
Every command runs inside `_Command`: logging, stop signals, one-line errors and exit codes, outputs kept or
discarded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Annotated, Any, Callable, Iterator, Optional, Sequence

import typer

from pickrank import __version__
from pickrank.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_SIGHUP,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    PickrankError,
    Terminated,
    UsageError,
)
from pickrank.models import loading
from pickrank.options import (
    Alpha,
    BackendName,
    CacheOptions,
    CommandOptions,
    Decode,
    DType,
    EngineName,
    EngineOptions,
    Format,
    ModelOptions,
    OnError,
    OutputOptions,
    PromptFrom,
    RunOptions,
    Scale,
    SummaryFormat,
)
from pickrank.output.guards import InputIsOutput, abandon

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


def _plain(text: str) -> str:
    """Help text shown as written: rich would read [ray] or [default: ...] as markup and drop it."""
    return text.replace("[", "\\[")


def Opt(*decls: str, help: str, **kw: Any) -> Any:  # noqa: N802 - reads as typer.Option
    """typer.Option with plain-text help."""
    return typer.Option(*decls, help=_plain(help), **kw)


def Arg(*, help: str, **kw: Any) -> Any:  # noqa: N802 - reads as typer.Argument
    """typer.Argument with plain-text help."""
    return typer.Argument(help=_plain(help), **kw)


# Every option shared by several commands, declared once, in the order --help lists them:
# name -> (the bundle it belongs to, its type with its flags and help, its default).
SHARED: dict[str, tuple[type, Any, Any]] = {
    "model": (ModelOptions, Annotated[Optional[str], Opt(
        "--model", envvar="PICKRANK_MODEL",
        help="Hub id or local folder of the model [default: yuvalkirstain/PickScore_v1].")], None),
    "processor": (ModelOptions, Annotated[Optional[str], Opt(
        help="Hub id or folder of the processor [default: the model folder if it has one, else "
             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K].")], None),
    "revision": (ModelOptions, Annotated[Optional[str], Opt(
        help="Model revision (branch, tag or commit) on the hub.")], None),
    "offline": (ModelOptions, Annotated[bool, Opt(
        "--offline", help="Never use the network; weights must be cached.")], False),
    "device": (ModelOptions, Annotated[str, Opt(
        help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU).")], "auto"),
    "dtype": (ModelOptions, Annotated[DType, Opt(help="Model precision; fp32 is the reference.")], DType.fp32),
    "alpha": (ModelOptions, Annotated[Alpha, Opt(
        help="Transparent images: white composites them onto white (transformers 5's CLIP processor); drop "
             "discards the alpha channel, as transformers 4.x and PickScore's training code did.")], Alpha.white),
    "backend": (ModelOptions, Annotated[Optional[BackendName], Opt(
        help="torch, or onnx: ONNX Runtime on a folder made by `pickrank export onnx` (no torch needed) "
             "[default: onnx when the model is such a folder, else torch].")], None),
    "decode": (ModelOptions, Annotated[Decode, Opt(
        help="exact decodes JPEGs as the reference does; fast decodes them at reduced DCT scale first (~1.8x "
             "faster on 1024x1024, scores not exact; its own cache entries).")], Decode.exact),
    "batch_size": (ModelOptions, Annotated[Optional[int], Opt(
        min=1, help="Images per model call [default: 32 on GPU, 8 on CPU].")], None),
    "workers": (RunOptions, Annotated[Optional[int], Opt(
        min=0, help="Decode worker processes; 0 decodes in the main process [default: CPU count, at most 8].")],
        None),
    "format": (OutputOptions, Annotated[Optional[Format], Opt(
        "--format", "-f", help="Output format [default: from -o's extension (.jsonl, .json, .csv; .txt: paths), "
                               "else table on a terminal, else jsonl].")], None),
    "output": (OutputOptions, Annotated[Optional[str], Opt(
        "--output", "-o", help="Write results to FILE (atomically; a device, FIFO or /dev/stdout is written "
                               "straight through).")], None),
    "quiet": (CommandOptions, Annotated[bool, Opt("--quiet", "-q", help="No progress bar or info messages.")],
              False),
    "cache": (CacheOptions, Annotated[Optional[str], Opt(
        "--cache", envvar="PICKRANK_CACHE",
        help="Embedding cache file [default: ~/.cache/pickrank/embeddings.sqlite3].")], None),
    "no_cache": (CacheOptions, Annotated[bool, Opt(
        "--no-cache", help="Neither read nor write the embedding cache.")], False),
    "on_error": (RunOptions, Annotated[OnError, Opt(
        help="continue: report bad images and go on (exit 3); fail: stop at the first (exit 1).")],
        OnError.continue_),
    "max_pixels": (RunOptions, Annotated[Optional[int], Opt(
        min=1, help="Refuse images with more pixels than this (decompression bombs) [default: Pillow's "
                    "89,478,485].")], None),
    "max_bytes": (RunOptions, Annotated[Optional[int], Opt(
        min=1, help="Refuse image files larger than this many bytes, before reading them [default: "
                    "536,870,912 = 512 MiB].")], None),
    "debug": (CommandOptions, Annotated[bool, Opt("--debug", help="Show tracebacks.")], False),
    "html": (OutputOptions, Annotated[Optional[str], Opt(
        "--html", metavar="FILE", help="Also write a self-contained HTML gallery of the ranking.")], None),
    "engine": (EngineOptions, Annotated[EngineName, Opt(
        help="local, or ray to run on a Ray cluster (pip install 'pickrank[ray]').")], EngineName.local),
    "ray_address": (EngineOptions, Annotated[Optional[str], Opt(
        envvar="RAY_ADDRESS", help="Ray cluster address [default: $RAY_ADDRESS, else a local Ray started for "
                                   "the run].")], None),
    "ray_actors": (EngineOptions, Annotated[Optional[int], Opt(
        min=1, help="Embedding actors on a cluster without GPUs [default: 1 per GPU, else 2].")], None),
    "null": (OutputOptions, Annotated[bool, Opt(
        "--null", "-0", help="End each path with NUL instead of a newline, for xargs -0 (implies -f paths).")],
        False),
    "scale": (RunOptions, Annotated[Scale, Opt(
        help="The unit of the scores: raw (exp(logit_scale) * cosine, the model card's ~21), cosine (raw / "
             "exp(logit_scale), as Diffusion-DPO and t2v_metrics) or unit26 (raw / 26, as flow_grpo, verl-omni and "
             "cosmos-rl); prob and ranks are the same in every unit.")], Scale.raw),
    "with_meta": (OutputOptions, Annotated[bool, Opt(
        "--with-meta", help="Add the run's provenance (model, revision, weight hashes, dtype, device, "
                            "preprocessing, scale, versions): -f json writes {\"meta\": ..., \"records\": [...]} "
                            "instead of the bare array; eval's summary gains it.")],
        False),
    "meta": (OutputOptions, Annotated[Optional[str], Opt(
        "--meta", metavar="FILE", help="Also write the run's provenance to FILE as JSON (beside any format; "
                                       "atomically, as -o).")], None),
}


@dataclass(frozen=True)
class Opts:
    """The option bundles a command asked for with `with_options` (None: not taken by this command)."""

    model: ModelOptions | None = None
    run: RunOptions | None = None
    cache: CacheOptions | None = None
    output: OutputOptions | None = None
    engine: EngineOptions | None = None
    command: CommandOptions = CommandOptions()


_SLOTS = {ModelOptions: "model", RunOptions: "run", CacheOptions: "cache", OutputOptions: "output",
          EngineOptions: "engine", CommandOptions: "command"}


def with_options(*bundles: type | tuple) -> Callable[[Callable], Callable]:
    """Give a command the shared options of some bundles: each a bundle class (all its options) or a tuple
    (bundle class, option name, ...) for some of them. The command declares `opts: Opts` (keyword-only) and gets
    the bundles built; Typer sees the shared options appended to the command's own parameters."""
    wanted: dict[type, set[str]] = {}
    for b in bundles:
        cls, names = (b, None) if isinstance(b, type) else (b[0], set(b[1:]))
        in_bundle = {n for n, (c, _, _) in SHARED.items() if c is cls}
        if cls not in _SLOTS or (names is not None and not names <= in_bundle):
            raise TypeError(f"with_options: {b!r} is not a bundle, or names options it does not have")
        wanted[cls] = in_bundle if names is None else names
    taken = [n for n in SHARED if any(n in names for names in wanted.values())]

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        clash = {p.name for p in own} & set(taken)
        if "opts" not in sig.parameters or clash:
            raise TypeError(f"{func.__name__}: declare `opts: Opts`, and none of the shared options it takes "
                            f"({clash or ''})")
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=SHARED[n][1],
                                    default=SHARED[n][2]) for n in taken]

        @functools.wraps(func)
        def command(**kw: Any) -> Any:
            built = {_SLOTS[cls]: cls.from_values(**{n: kw.pop(n) for n in SHARED if n in names})
                     for cls, names in wanted.items()}
            return func(**kw, opts=Opts(**built))

        command.__signature__ = sig.replace(parameters=own + shared)  # type: ignore[attr-defined]
        return command

    return decorate


SCORING = (ModelOptions, RunOptions, CacheOptions, OutputOptions, EngineOptions, CommandOptions)


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
        from pickrank.output.terminal import terminal_safe

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
    from pickrank.output.terminal import terminal_safe  # messages may name files (--on-error fail)

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


class _Command:
    """The one lifecycle of every command: logging and stop signals set up; on leaving, any exception becomes one
    line and an exit code (`_exit_code`), the outputs in `sinks` are kept or discarded, and the command exits.

        with _Command(opts.command) as cmd:
            cmd.sinks.append(writer)  # closed (kept) or discarded whatever happens
            cmd.code = EXIT_PARTIAL   # the exit code of a run that ends normally
    """

    def __init__(self, options: CommandOptions) -> None:
        self.options = options
        self.sinks: list = []
        self.code = EXIT_OK

    def __enter__(self) -> "_Command":
        _setup_logging(self.options.quiet)
        _catch_stop_signals()
        return self

    def __exit__(self, kind: type | None, e: BaseException | None, tb: object) -> None:
        code = self.code
        late: list[int] = []
        with _stop_signals_noted(late):  # the outputs being closed stay whole, whatever signal comes now
            try:
                if e is not None:
                    if isinstance(e, InputIsOutput):
                        abandon(self.sinks)  # found while reading inputs: even the HTML page of a failed run goes
                    code = _exit_code(e, self.options.debug)  # --debug re-raises (after the finally)
            finally:
                code = _close_sinks(self.sinks, code)
        if late and code in (EXIT_OK, EXIT_PARTIAL):
            code = _exit_code(Terminated(late[0]) if late[0] != signal.SIGINT else KeyboardInterrupt(), False)
        raise typer.Exit(code)


@contextlib.contextmanager
def _stop_signals_noted(noted: list[int]) -> Iterator[None]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP are noted in `noted` instead of raised (main thread only)."""
    saved = []
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not None:
                saved.append((sig, signal.signal(sig, lambda n, _frame: noted.append(n))))
    try:
        yield
    finally:
        for sig, handler in saved:
            signal.signal(sig, handler)


def _load_embedder(options: ModelOptions):
    """Start loading the model (`loading.load_embedder`: the library loads through it too) and say on stderr what
    runs where once it has loaded."""

    def loaded(embedder) -> None:
        d = embedder.describe()
        helps = "a GPU or --dtype bf16 helps" if embedder.backend == "torch" else "a GPU helps"
        slow = f" (CPU is slow: about 2 s per image for PickScore; {helps})" if embedder.device.type == "cpu" else ""
        log.info("%s on %s, %s%s", embedder.source.model, d["device"], d["dtype"], slow)

    return loading.load_embedder(options, on_loaded=loaded)


def _provenance(embedder, scale: Scale, cache: str | None) -> dict:
    """The run's provenance (`provenance.compute`: waits for the model), weight hashes remembered beside the
    embedding cache."""
    from pickrank.core.provenance import compute
    from pickrank.models.hashing import HashStore

    return compute(embedder, scale, store=HashStore.beside(cache)).as_dict()


def _meta_writer(path: str | None):
    """The --meta FILE sink (None without --meta); its path was checked with the other outputs."""
    from pickrank.output.writers import MetaWriter, Output

    return MetaWriter(Output(path, label="--meta")) if path else None


def _run(kind: str, opts: Opts, make_sets: Callable[[], list], copy_to: str | None = None,
         inputs: Sequence[str] = ()) -> None:
    """Everything a scoring command does, inside the command lifecycle.

    inputs: the paths named on the command line (files, folders, a prompts CSV), which no output may overwrite.
    """
    from pickrank.output.guards import check_copy_to, check_outputs, choose_format, guard_inputs

    out = opts.output
    with _Command(opts.command) as cmd:
        from pickrank.output.writers import Output, make_writer, record_fields

        # Inputs and output paths are checked before the (slow) model load.
        sets = make_sets()
        fmt = choose_format(out)
        files = check_outputs([("-o", out.output), ("--html", out.html), ("--meta", out.meta)], inputs)
        target = Output(out.output)
        fmt = fmt or ("table" if target.is_terminal else "jsonl")
        cmd.sinks.append(make_writer(fmt, target, record_fields(kind, copy=copy_to is not None), null=out.null,
                                     with_meta=out.with_meta))
        if out.meta:
            cmd.sinks.append(_meta_writer(out.meta))
        if out.html:
            from pickrank.report.gallery import HtmlReport

            cmd.sinks.append(HtmlReport(out.html, kind=kind))
        if copy_to:
            check_copy_to(copy_to)
        cmd.code = _score(opts, guard_inputs(sets, files), cmd.sinks, copy_to)


def _make_engine(engine: EngineOptions, embedder, cache, options: RunOptions, on_progress):
    """The local engine, or the Ray one with --engine ray; both yield the same Rankings."""
    if engine.engine is EngineName.ray:
        from pickrank.ray.engine import RayEngine

        if embedder.backend != "torch":  # Ray's actors load the torch model
            raise UsageError("--engine ray runs the torch backend only; an ONNX export runs with --engine local")
        return RayEngine(embedder, cache, options, on_progress=on_progress, address=engine.ray_address,
                         actors=engine.ray_actors)
    from pickrank.core.engine import Engine

    return Engine(embedder, cache, options, on_progress=on_progress)


def _score(opts: Opts, sets: list, sinks: list, copy_to: str | None) -> int:
    """Load the model, run the engine over the sets, hand each ranking to the sinks; the run's exit code."""
    from tqdm import tqdm

    from pickrank.core.cache import open_cache
    from pickrank.output.guards import MetaHandOver, copy_winners, write_ranking

    if opts.engine.engine is EngineName.ray:
        from pickrank.ray.engine import require_ray

        require_ray()  # without the extra: a one-line usage error before the (slow) model load
    embedder = _load_embedder(opts.model)
    meta = MetaHandOver(sinks, embedder, lambda: _provenance(embedder, opts.run.scale, opts.cache.cache))
    cache = open_cache(opts.cache.cache, enabled=not opts.cache.no_cache)
    bar = tqdm(unit="img", file=sys.stderr, disable=True if opts.command.quiet else None, dynamic_ncols=True,
               leave=False)
    options = replace(opts.run, batch_size=opts.model.batch_size)  # --batch-size is declared once, with the model's
    engine = _make_engine(opts.engine, embedder, cache, options, bar.update)
    failed = 0
    try:
        for ranking in engine.run(sets):
            meta.give()  # once, before the first records: -f json --with-meta writes the provenance first
            records = ranking.records
            failed += ranking.failed
            if copy_to:
                records, not_copied = copy_winners(records, copy_to)
                failed += not_copied
            for sink in sinks:
                write_ranking(sink, records)
        embedder.result()  # a run that never needed the model still reports a model that failed to load
        meta.give()
    except BaseException:
        meta.give_if_loaded()  # an interrupted run's page and --meta still say what ran
        raise
    finally:
        bar.close()
        cache.close()
    s = engine.summary
    log.info("%d image(s), %d embedded, %d from cache, %d failed, %d ranking(s)", s.images, s.embedded,
             s.cache_hits, s.failures, s.rankings)
    return EXIT_PARTIAL if failed or s.failures else EXIT_OK


@app.command()
@with_options(*SCORING)
def score(
    paths: Annotated[list[str], Arg(help="Image files, folders, quoted globs ('**' too), or - for stdin.")],
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", help="The prompt the images were generated for "
                                         "[default: each image's own metadata prompt].")] = None,
    prompt_from: Annotated[Optional[PromptFrom], Opt(
        "--prompt-from", help="metadata: score each image against the prompt in its own metadata (what leaving "
                              "out --prompt does); images with the same prompt form one ranking.")] = None,
    top: Annotated[Optional[int], Opt(min=1, help="Show only the best K.")] = None,
    *, opts: Opts,
) -> None:
    """Score images against one prompt, or each against its own metadata prompt, and rank them.

    Example: pickrank score --prompt "a red cat on a sofa" sample_images/
    """
    from pickrank.inputs.sets import score_job

    run = replace(opts.run, top=top)
    opts = replace(opts, run=run)

    def sets() -> list:
        if prompt is not None and prompt_from is PromptFrom.metadata:
            raise UsageError("give --prompt or --prompt-from metadata, not both")
        return score_job(prompt, paths, sys.stdin, run.max_pixels, run.max_bytes)

    _run("score", opts, sets, inputs=paths)


@app.command("best-of-n")
@with_options(*SCORING)
def best_of_n(
    folder: Annotated[str, Arg(help="Folder of candidates; each subfolder with images is a group.")],
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", help="Prompt for every group [default: prompt.txt in "
                                         "the group, else the first image's metadata prompt].")] = None,
    top: Annotated[int, Opt(min=1, help="Keep the best K of each group.")] = 1,
    copy_to: Annotated[Optional[str], Opt(help="Copy the winners into this folder (never overwrites).")] = None,
    *, opts: Opts,
) -> None:
    """Keep the best of N candidates in each group of a folder.

    Example: pickrank best-of-n out/ --top 1 --copy-to keep/
    """
    from pickrank.inputs.sets import best_of_n_job

    run = replace(opts.run, top=top)
    opts = replace(opts, run=run)
    _run("best-of-n", opts, lambda: best_of_n_job(folder, prompt, run.max_pixels, run.max_bytes), copy_to=copy_to,
         inputs=[folder])


@app.command()
@with_options(*SCORING)
def batch(
    prompts_csv: Annotated[str, Arg(metavar="PROMPTS.csv", help="CSV with a 'prompt' column; optional 'id' and "
                                    "'images' (folder, glob or paths separated by ';').")],
    paths: Annotated[Optional[list[str]], Arg(help="Images for rows without an 'images' cell.")] = None,
    top: Annotated[Optional[int], Opt(min=1, help="Show only the best K of each row.")] = None,
    *, opts: Opts,
) -> None:
    """Rank images for every prompt of a CSV; each image is embedded once, each prompt encoded once.

    Example: pickrank batch prompts.csv generations/ -f csv -o scores.csv
    """
    from pickrank.inputs.sets import batch_job

    opts = replace(opts, run=replace(opts.run, top=top))
    _run("batch", opts, lambda: batch_job(prompts_csv, paths or [], sys.stdin),
         inputs=[prompts_csv, *(paths or [])])


@app.command()
@with_options((OutputOptions, "format", "output"), (RunOptions, "max_pixels", "max_bytes"), CommandOptions)
def prompts(
    paths: Annotated[list[str], Arg(help="Image files, folders, quoted globs ('**' too), or - for stdin.")],
    *, opts: Opts,
) -> None:
    """Show the prompt pickrank reads from each image's metadata, its source, and why there is none (no model).

    Example: pickrank prompts comfyui_output/
    """
    with _Command(opts.command) as cmd:
        from pickrank.inputs.promptlist import check_format, prompt_rows, write_prompts
        from pickrank.output.guards import check_outputs, choose_format
        from pickrank.output.writers import Output

        fmt = check_format(choose_format(opts.output))
        check_outputs([("-o", opts.output.output)], paths)
        out = Output(opts.output.output)
        cmd.sinks.append(out)  # an -o file is replaced only when every image was listed
        write_prompts(prompt_rows(paths, sys.stdin, opts.run.max_pixels, opts.run.max_bytes),
                      fmt or ("table" if out.is_terminal else "jsonl"), out)


def _cache_command(opts: Opts, action: Callable, check: Callable[[], None] = lambda: None) -> None:
    """Run check(), then open the cache for a `pickrank cache` command and run action(cache), inside the command
    lifecycle. A file that is not a pickrank cache is an error here, not a warning."""
    with _Command(opts.command):
        check()  # before the cache is opened (which would make the file)
        from pickrank.core.cache import CacheError, EmbeddingCache

        c = EmbeddingCache(opts.cache.cache, warn=False)
        try:
            if c.problem is not None:
                raise CacheError(c.problem)
            action(c)
        finally:
            c.close()


_CACHE_OPTIONS = ((CacheOptions, "cache"), (CommandOptions, "debug"))


@cache_app.command("info")
@with_options(*_CACHE_OPTIONS)
def cache_info(*, opts: Opts) -> None:
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

    _cache_command(opts, show)


@cache_app.command("clear")
@with_options(*_CACHE_OPTIONS)
def cache_clear(
    model: Annotated[Optional[str], Opt(help="Only entries of models whose fingerprint contains this.")] = None,
    *, opts: Opts,
) -> None:
    """Delete cached embeddings (all, or one model's).

    Example: pickrank cache clear --model PickScore_v1
    """
    def check() -> None:
        if model is not None and not model.strip():  # an empty pattern would match every fingerprint
            raise UsageError("--model must not be empty: leave it out to clear every entry")

    _cache_command(opts, lambda c: typer.echo(f"deleted {c.clear(model)} entries"), check)


@cache_app.command("prune")
@with_options(*_CACHE_OPTIONS)
def cache_prune(
    older_than: Annotated[float, Opt("--older-than", min=0, metavar="DAYS", help="Delete entries older than DAYS.")],
    *, opts: Opts,
) -> None:
    """Delete cached embeddings older than some days.

    Example: pickrank cache prune --older-than 30
    """
    _cache_command(opts, lambda c: typer.echo(f"deleted {c.prune(older_than)} entries"))


@app.command()
@with_options(CommandOptions)
def report(
    results: Annotated[str, Arg(metavar="RESULTS.jsonl", help="Results saved with -f jsonl (or -f json); - for "
                                "stdin.")],
    output: Annotated[Optional[str], Opt("--output", "-o", metavar="FILE", help="The HTML page to write "
                                         "[default: RESULTS with .html].")] = None,
    *, opts: Opts,
) -> None:
    """Render saved results as a self-contained HTML gallery (image files must still exist for thumbnails).

    Example: pickrank report scores.jsonl -o report.html
    """
    with _Command(opts.command):
        if output is None:
            if results == "-":
                raise UsageError("give -o FILE when reading results from stdin")
            output = os.path.splitext(results)[0] + ".html"
        from pickrank.output.guards import same_file
        from pickrank.report.gallery import render_results

        if results != "-" and same_file(results, output):
            raise UsageError(f"-o {output}: is the results file; give another name for the page")
        rankings, missing = render_results(results, output)
        if missing:
            log.warning("%d image file(s) no longer exist: shown as placeholders", missing)
        log.info("wrote %s (%d ranking(s))", output, rankings)


@app.command("eval")
@with_options(ModelOptions, (RunOptions, "max_pixels", "scale"), (OutputOptions, "with_meta", "meta"),
              CommandOptions)
def eval_(
    data: Annotated[str, Arg(metavar="DATA", help="Pick-a-Pic parquet (a file, a folder or a quoted glob of "
                             "shards; needs pip install 'pickrank[eval]'), or CSV/JSONL with prompt, image_0, "
                             "image_1, label (0, 1 or 0.5; paths relative to the file).")],
    validation: Annotated[Optional[str], Opt("--validation", metavar="FILE", help="Choose the tie threshold from "
                          "0, 0.1, ..., 1 on this labelled file (max accuracy), then apply it.")] = None,
    tie_threshold: Annotated[Optional[float], Opt("--tie-threshold", min=0.0, max=1.0, help="Predict a tie when "
                             "|p0 - p1| <= this [default: 0, or chosen with --validation].")] = None,
    bootstrap: Annotated[int, Opt("--bootstrap", min=0, help="Bootstrap resamples for the 95% interval "
                                  "(0: none).")] = 1000,
    seed: Annotated[int, Opt(help="Seed of the bootstrap.")] = 0,
    output: Annotated[Optional[str], Opt("--output", "-o", metavar="FILE", help="Write per-pair results as JSON "
                      "Lines (index, prompt, score_0, score_1, p_0, p_1, label, prediction, credit).")] = None,
    format: Annotated[Optional[SummaryFormat], Opt("--format", "-f", help="How to print the summary: table (a "
                      "text table) or json (one JSON object) [default: table].")] = None,
    json_summary: Annotated[bool, Opt("--json", help="The same as -f json.")] = False,
    *, opts: Opts,
) -> None:
    """Measure pairwise preference accuracy on labelled pairs, with the Pick-a-Pic paper's tie protocol.

    Example: pickrank eval test.parquet --validation validation.parquet -o pairs.jsonl
    """
    import json

    from pickrank.output.guards import check_outputs

    with _Command(opts.command) as cmd:
        if tie_threshold is not None and validation is not None:
            raise UsageError("give --tie-threshold or --validation, not both")
        if json_summary and format is SummaryFormat.table:
            raise UsageError("--json is -f json: give one of -f table and --json")
        from pickrank.analysis.evaluate import Dataset, evaluate
        from pickrank.output.writers import Output

        # Inputs and the output path are checked before the (slow) model load.
        dataset = Dataset(data)
        val = Dataset(validation) if validation is not None else None
        check_outputs([("--meta", opts.output.meta), *([("-o", output)] if output else [])],
                      [data, *([validation] if validation else [])])
        out = Output(output) if output else None
        if out is not None:
            cmd.sinks.append(out)
        meta_out = _meta_writer(opts.output.meta)
        if meta_out is not None:
            cmd.sinks.append(meta_out)
        from tqdm import tqdm

        embedder = _load_embedder(opts.model)
        total = dataset.count if val is None else (
            dataset.count + val.count if dataset.count is not None and val.count is not None else None)
        bar = tqdm(total=total or None, unit="pair", file=sys.stderr, disable=True if opts.command.quiet else None,
                   dynamic_ncols=True, leave=False)
        try:
            result = evaluate(dataset, embedder, threshold=tie_threshold, validation=val, resamples=bootstrap,
                              seed=seed, out=out, max_pixels=opts.run.max_pixels, on_progress=bar.update,
                              scale=opts.run.scale)
        finally:
            bar.close()
        summary = _eval_meta(result, embedder, opts, meta_out)
        as_json = json_summary or format is SummaryFormat.json
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False) if as_json else summary)
        cmd.code = EXIT_PARTIAL if result.skipped else EXIT_OK


def _eval_meta(result, embedder, opts: Opts, meta_out) -> str:
    """The provenance where eval's options ask for it (--meta FILE; --with-meta: the summary's "model" becomes the
    whole provenance, and the table gains its lines); returns the table. Without them the summary is as before."""
    from pickrank.analysis.evaluate import format_summary
    from pickrank.core.provenance import summary_lines

    wanted = opts.output.with_meta or meta_out is not None
    prov = _provenance(embedder, opts.run.scale, None) if wanted else None
    if meta_out is not None:
        meta_out.set_meta(prov)
    if opts.output.with_meta:
        result.model = prov
    return "\n".join([format_summary(result), *(summary_lines(prov) if opts.output.with_meta else [])])


# -- compare (issue 14) ------------------------------------------------------------------------------------

from enum import Enum  # noqa: E402 - kept with the one command it serves


class CompareFormat(str, Enum):
    """What `pickrank compare` prints: a text table, one JSON object, or CSV rows."""

    table = "table"
    json = "json"
    csv = "csv"


class _Gathered:
    """The sink `_score` hands compare's records to: kept in memory for the statistics, with the run's
    provenance."""

    def __init__(self) -> None:
        self.records: list = []
        self.meta: dict = {}

    def write(self, records: tuple) -> None:
        self.records.extend(records)

    def set_meta(self, meta: dict) -> None:
        self.meta = dict(meta)

    def raw_per_unit(self) -> float:
        """What one unit of the gathered scores is in raw PickScore (`Scale.divisor`; 1 when no model ran)."""
        if not self.meta:
            return 1.0
        return Scale(self.meta["scale"]).divisor(self.meta["exp_logit_scale"])


class _WrittenAtEnd:
    """An output that holds the comparison once it is complete: kept only then, so that a failed or interrupted
    run leaves an earlier file as it was (statistics over part of the images would mislead)."""

    def __init__(self, out) -> None:
        self.out = out
        self.done = False

    def close(self) -> None:
        (self.out.close if self.done else self.out.discard)()

    def discard(self) -> None:
        self.out.discard()


def _compare_format(fmt: CompareFormat | None, output: str | None) -> str:
    """-f; else what -o's extension names (.json, .csv); else table. A JSON Lines name is a usage error."""
    from pickrank.output.writers import format_for_path

    if fmt is not None:
        return fmt.value
    named = format_for_path(output)
    if named == "jsonl":
        raise UsageError(f"-o {output}: compare writes one summary (-f table, json or csv); per-prompt JSON Lines "
                         "go to --per-prompt FILE")
    return named if named in ("json", "csv") else "table"


def _say_left_out(result, verbose: bool) -> None:
    """Count on stderr, per system, the prompts without a scored image (left out of its pairs); -v names them."""
    for s in result.systems:
        if s.missing:
            names = f": {', '.join(s.missing)}" if verbose else " (-v names them)"
            log.info("%s: %d prompt(s) without a scored image, left out of its pairs%s", s.name, len(s.missing),
                     names)


@app.command()
@with_options(ModelOptions, RunOptions, CacheOptions, (OutputOptions, "output", "meta"), EngineOptions,
              CommandOptions)
def compare(
    systems: Annotated[Optional[list[str]], Arg(metavar="SYSTEM_FOLDER", help="One folder of images per "
                       "system (or one manifest file).")] = None,
    prompts: Annotated[Optional[str], Opt("--prompts", metavar="CSV", help="Prompts CSV (id,prompt; id "
                       "defaults to the row number): a system's images for id are id.<ext> or the files in id/.")]
    = None,
    manifest: Annotated[Optional[str], Opt("--manifest", metavar="FILE", help="CSV or JSONL with "
                        "system,prompt,image[,id] (image paths relative to the file), instead of folders.")] = None,
    names: Annotated[Optional[str], Opt("--names", metavar="A,B,...", help="System names, comma-separated "
                     "[default: the folder names, or the manifest's system column].")] = None,
    baseline: Annotated[Optional[str], Opt("--baseline", metavar="NAME", help="The reference for win rates "
                        "[default: the first system].")] = None,
    all_pairs: Annotated[bool, Opt("--all-pairs", help="Every pair of systems (a win-rate matrix), not only "
                                   "each against the baseline.")] = False,
    best_of_n: Annotated[bool, Opt("--best-of-n", help="For systems with n >= 2 samples per prompt: the win rate "
                                   "of their best of k (k = 1..n) against one sample of the other.")] = False,
    bootstrap: Annotated[int, Opt("--bootstrap", min=0, metavar="N", help="Bootstrap resamples (of prompts) "
                                  "for the 95% intervals (0: none).")] = 10_000,
    seed: Annotated[int, Opt("--seed", help="Seed of the bootstrap.")] = 0,
    per_prompt: Annotated[Optional[str], Opt("--per-prompt", metavar="FILE", help="Also write one JSON line per "
                          "prompt: id, prompt, each system's score and samples, winner.")] = None,
    html: Annotated[Optional[str], Opt("--html", metavar="FILE", help="Also write a self-contained HTML page: "
                    "the summary, charts, and each prompt's images side by side.")] = None,
    format: Annotated[Optional[CompareFormat], Opt("--format", "-f", help="table, json (one object: settings, "
                      "systems, pairs, model) or csv [default: from -o's extension (.json, .csv), else table].")]
    = None,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Name the prompts left out, per system.")] = False,
    *, opts: Opts,
) -> None:
    """Compare text-to-image systems on the same prompts: mean PickScore, win rate, 95% intervals, sign test.

    Per system: the mean over prompts (a prompt's score: the mean of its samples), with a bootstrap interval.

    Per pair: the win rate (a tie counts 0.5), the mean difference, the preference probability, a sign test.

    Layouts, detected from the arguments (stderr names the one used):

    prompts-csv: SYSTEM_FOLDER... --prompts CSV; a system's images for id are id.<ext> (00042.png is id 42) or id/*.

    paired-folders: SYSTEM_FOLDER... alone; images paired by relative path, prompts from prompt.txt or metadata.

    manifest: --manifest FILE, or one file argument: CSV or JSONL rows with system,prompt,image[,id].

    Each distinct image is embedded once, through the cache. Exit 3 when an image failed (counted per system).

    Example: pickrank compare base/ dpo/ --prompts prompts.csv --html compare.html
    """
    from pickrank.output.guards import check_outputs, guard_inputs

    with _Command(opts.command) as cmd:
        from pickrank.analysis.compare import LAYOUTS, plan_comparison
        from pickrank.output.writers import Output
        from pickrank.report.comparison import check_html

        # The layout and the outputs are checked before the (slow) model load.
        run = opts.run
        plan = plan_comparison(systems or (), prompts_csv=prompts, manifest=manifest,
                               names=names.split(",") if names is not None else None, baseline=baseline,
                               max_pixels=run.max_pixels, max_bytes=run.max_bytes)
        log.info("layout: %s (%s); %d systems, %d prompts, %d distinct image paths; baseline %s", plan.layout,
                 LAYOUTS[plan.layout], len(plan.systems), len(plan.slots), len(plan.image_paths()), plan.baseline)
        fmt = _compare_format(format, opts.output.output)
        inputs = [*(systems or ()), *(p for p in (prompts, manifest) if p)]
        files = check_outputs([("-o", opts.output.output), ("--per-prompt", per_prompt), ("--html", html),
                               ("--meta", opts.output.meta)], inputs)
        if html:
            check_html(html)
        main_out = _WrittenAtEnd(Output(opts.output.output))
        cmd.sinks.append(main_out)
        rows_out = _WrittenAtEnd(Output(per_prompt, label="--per-prompt")) if per_prompt else None
        if rows_out is not None:
            cmd.sinks.append(rows_out)
        gathered = _Gathered()
        meta_out = _meta_writer(opts.output.meta)
        if meta_out is not None:
            cmd.sinks.append(meta_out)
        sinks = [gathered, *([meta_out] if meta_out is not None else [])]
        cmd.code = _score(opts, guard_inputs(plan.candidate_sets(), files), sinks, None)
        _write_comparison(plan, gathered, fmt, main_out, rows_out, html, verbose,
                          dict(all_pairs=all_pairs, best_of_n=best_of_n, bootstrap=bootstrap, seed=seed,
                               raw_per_unit=gathered.raw_per_unit()), opts.run.workers)


def _write_comparison(plan, gathered: _Gathered, fmt: str, main_out: _WrittenAtEnd,
                      rows_out: _WrittenAtEnd | None, html: str | None, verbose: bool, settings: dict,
                      workers: int | None) -> None:
    """The statistics over the gathered scores, written to the outputs (each then marked complete)."""
    import json

    from pickrank.analysis import compare as cmp

    table = cmp.collect_scores(plan, gathered.records)
    result = cmp.compare(table, baseline=plan.baseline, **settings)
    _say_left_out(result, verbose)
    out = main_out.out
    if fmt == "json":
        out.stream.write(json.dumps(cmp.to_json(result, model=gathered.meta), ensure_ascii=False) + "\n")
    elif fmt == "csv":
        cmp.write_csv(result, out.stream)
    else:
        cmp.print_table(result, out.stream, is_terminal=out.is_terminal)
    main_out.done = True
    if rows_out is not None:
        cmp.write_per_prompt(table, rows_out.out.stream)
        rows_out.done = True
    if html:
        from pickrank.report.comparison import write_html

        write_html(html, table, result, meta=gathered.meta, workers=workers)


# --- serve (issue 15) ----------------------------------------------------------------------------------------

from pickrank.options import Scale  # noqa: E402 - kept with the one command it serves


def _is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost): reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_exposure(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Binding beyond loopback needs a token, or --insecure-no-auth said out loud."""
    if token is not None and insecure_no_auth:
        raise UsageError("give --token or --insecure-no-auth, not both")
    if not _is_loopback(host) and token is None and not insecure_no_auth:
        raise UsageError(f"--host {host} is reachable from other machines: give --token TOKEN (or set "
                         "PICKRANK_TOKEN), or --insecure-no-auth to serve without authentication")


@app.command()
@with_options(ModelOptions, (RunOptions, "workers", "max_pixels", "scale"), (EngineOptions, "engine", "ray_address"),
              CommandOptions)
def serve(
    host: Annotated[str, Opt(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, help="Port (0: a free one; the URL is printed on stderr).")] = 8765,
    max_batch: Annotated[int, Opt(min=1, help="Images per model call, across requests.")] = 64,
    max_wait_ms: Annotated[float, Opt(min=0, help="How long a request waits for others to share its batch.")]
    = 10.0,
    max_queue: Annotated[int, Opt(min=1, help="Images accepted and not yet answered; beyond, 503 with "
                                  "Retry-After.")] = 2048,
    max_body_mb: Annotated[float, Opt(min=0.001, help="Largest request body in MiB (413 beyond).")] = 256.0,
    max_images: Annotated[int, Opt(min=1, help="Most images in one request (413 beyond).")] = 1024,
    token: Annotated[Optional[str], Opt(envvar="PICKRANK_TOKEN", help="Bearer token every request must carry "
                                        "(Authorization: Bearer TOKEN) [default: $PICKRANK_TOKEN].")] = None,
    insecure_no_auth: Annotated[bool, Opt("--insecure-no-auth", help="Serve a non-loopback --host without a "
                                          "token.")] = False,
    replicas: Annotated[Optional[int], Opt(min=1, help="Model replicas on Ray (engine ray) [default: 1 per GPU, "
                                           "else 1].")] = None,
    *, opts: Opts,
) -> None:
    """Serve PickScore rewards over HTTP, batched across callers (needs the serve extra of pickrank).

    POST /v1/score and /v1/rank take JSON (base64 images), a multipart form or a safetensors body of uint8
    images; GET /healthz, /v1/info, /metrics; API docs at /docs. Scores are in the scale option's unit unless a request
    asks for another. SIGTERM stops it gracefully (exit 0).

    Example: pickrank serve --port 8765 --max-batch 64
    """
    with _Command(opts.command):
        token = token or None  # PICKRANK_TOKEN= set empty is no token
        _check_exposure(host, token, insecure_no_auth)
        try:
            from pickrank.serve.app import ServeLimits
        except ImportError as e:  # the serve extra is not installed
            raise UsageError(f"pickrank serve needs the serve extra: pip install 'pickrank[serve]' ({e})") from None

        limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_body_mb=max_body_mb, max_images=max_images, max_pixels=opts.run.max_pixels,
                             workers=_serve_workers(opts.run.workers))
        model = replace(opts.model, batch_size=opts.model.batch_size or max_batch)
        if opts.engine.engine is EngineName.ray:
            from pickrank.ray.engine import require_ray

            require_ray()  # without the extra: a one-line usage error
            from pickrank.ray.serve import serve_ray

            serve_ray(model, limits, host, port, token, opts.run.scale, replicas, opts.engine.ray_address)
            return
        if replicas is not None:
            raise UsageError("--replicas needs --engine ray")
        _serve_local(model, limits, host, port, token, opts.run.scale)


def _serve_workers(workers: int | None) -> int:
    """Decode processes of the server: as the CLI's --workers [default: one per CPU, at most 8]."""
    from pickrank.core.engine import default_workers

    return default_workers() if workers is None else workers


def _serve_local(model: ModelOptions, limits, host: str, port: int, token: str | None, scale: Scale) -> None:
    """Listen first (the URL on stderr), load the model in the background (/healthz: 503 meanwhile), serve until a
    stop signal; a model that fails to load stops the server with its error."""
    from pickrank.serve.app import bind, create_app, graceful_server, stop_if_load_fails, url_of

    sock = bind(host, port)
    embedder = _load_embedder(model)
    server = graceful_server(create_app(embedder, limits, token=token, scale=scale))
    failed: list[BaseException] = []
    stop_if_load_fails(embedder, server, failed)
    print(f"pickrank: listening on {url_of(sock)} (model loading; GET /healthz says when it is ready)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]
    log.info("stopped")


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
        # The command is over and its outputs are closed: a stop signal from now on ends the process at once,
        # instead of raising inside the interpreter's clean-up (multiprocessing's finalizers print that traceback).
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        # At exit the interpreter's collector walks the ~million objects of torch and transformers several times
        # (~0.7 s here); frozen objects are skipped. Outputs are closed by now, and the memory goes with the process.
        gc.freeze()


# --- doctor ------------------------------------------------------------------------------------------------

@app.command()
@with_options((ModelOptions, "model", "processor", "revision", "offline", "device", "dtype", "alpha"), CacheOptions,
              CommandOptions)
def doctor(
    format: Annotated[Optional[SummaryFormat], Opt("--format", "-f", help="table (one line per check) or json "
                      "(one object: ok, failed, checks with name, status, detail) [default: table].")] = None,
    *, opts: Opts,
) -> None:
    """Check the model, the install and this machine before trusting the numbers (paste it into a bug report).

    Which model and processor would load (cached for --offline?), the weights (safetensors, complete, hashes),
    PickScore_v1's architecture and tokenizer, the image-processor backend, devices and precisions, the cache, the
    decode workers, and a known-answer self-test against transformers. No network is used.

    Exit 0 when no check fails (warnings do not), 1 naming the failed checks.

    Example: pickrank doctor --offline
    """
    with _Command(opts.command):
        from pickrank.doctor import ChecksFailed, failed, render, run_checks

        log.info("doctor: checking (the self-test loads the model twice: seconds for a small model, up to a "
                 "minute for PickScore_v1 on a CPU)")
        checks = run_checks(opts.model, opts.cache, debug=opts.command.debug)
        typer.echo(render(checks, (format or SummaryFormat.table).value))
        bad = failed(checks)
        if bad:
            raise ChecksFailed(f"doctor: {len(bad)} check(s) failed: {', '.join(bad)}")


# --- export ---------------------------------------------------------------------------------------------------

export_app = typer.Typer(help="Export the model for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@with_options((ModelOptions, "model", "processor", "revision", "offline"), CommandOptions)
def export_onnx(
    out_dir: Annotated[str, Arg(metavar="OUT_DIR", help="New (or empty) folder for the export; an earlier export "
                                "there is replaced, anything else is refused.")],
    *, opts: Opts,
) -> None:
    """Export the vision and text towers as ONNX graphs (fp32), checked against torch, for the onnx backend (the
    folder is then the model of any scoring command, run by ONNX Runtime).

    Example: pickrank export onnx pickscore-onnx/
    """
    with _Command(opts.command):
        loading.require_torch("pickrank export onnx")  # it traces the torch model
        from pickrank.models.onnx_export import export_onnx as export

        manifest = export(opts.model, out_dir)
        log.info("wrote %s (max score difference to torch %.2g)", out_dir, manifest["parity"]["max_score_diff"])
