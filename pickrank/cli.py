"""The `pickrank` command line: parse, call the library, render; errors become one-line messages and exit codes.

No torch or transformers import happens at module load, so `pickrank --help` is instant.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Callable, Optional

import typer

from . import __version__
from .errors import (EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE,
                     PickrankError, Terminated, UsageError)

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
    "--format", "-f", help="Output format \\[default: table on a terminal, else jsonl].")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write results to FILE (atomically).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or info messages.")]
CacheOpt = Annotated[Optional[str], typer.Option("--cache", envvar="PICKRANK_CACHE",
                     help="Embedding cache file \\[default: ~/.cache/pickrank/embeddings.sqlite3].")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the embedding cache.")]
OnErrorOpt = Annotated[OnError, typer.Option(help="continue: report bad images and go on (exit 3); "
                                             "fail: stop at the first (exit 1).")]
MaxPixelsOpt = Annotated[Optional[int], typer.Option(min=1, help="Refuse images with more pixels than this "
                                                     "(decompression bombs) \\[default: Pillow's 89,478,485].")]
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
    debug: bool
    html: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None


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
    def emit(self, record: logging.LogRecord) -> None:
        level = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        msg = f"pickrank: {level}{record.getMessage()}"
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
    if isinstance(e, PickrankError):
        print(f"pickrank: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"pickrank: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
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
    from .source import load_in_background, resolve_source

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


def _run(kind: str, c: Common, make_sets: Callable[[], list], copy_to: str | None = None) -> None:
    """Everything a scoring command does, with errors translated into messages and exit codes in one place."""
    _setup_logging(c.quiet)
    _catch_stop_signals()
    sinks: list = []  # the result writer and the HTML report: closed (kept) whatever happens
    code = EXIT_OK
    try:
        from .writers import Output, make_writer, record_fields

        # Inputs and output paths are checked before the (slow) model load.
        sets = make_sets()
        out = Output(c.output)
        fmt = c.format or ("table" if out.is_terminal else "jsonl")
        sinks.append(make_writer(fmt, out, record_fields(kind, copy=copy_to is not None)))
        if c.html:
            from .html import HtmlReport

            sinks.append(HtmlReport(c.html, kind=kind))
        if copy_to:
            os.makedirs(copy_to, exist_ok=True)
        code = _score(c, sets, sinks, copy_to)
    except BaseException as e:
        code = _exit_code(e, c.debug)
    finally:
        code = _close_sinks(sinks, code)
    raise typer.Exit(code)


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
                         max_pixels=c.max_pixels)
    engine = _make_engine(c, embedder, cache, options, bar.update)
    failed = 0
    try:
        for ranking in engine.run(sets):
            records = ranking.records
            if copy_to:
                records = tuple(_copy_winners(records, copy_to))
            failed += ranking.failed
            for sink in sinks:
                sink.write(records)
        embedder.result()  # a run that never needed the model still reports a model that failed to load
    finally:
        bar.close()
        cache.close()
        _set_meta(sinks, embedder)
    s = engine.summary
    log.info("%d image(s), %d embedded, %d from cache, %d failed, %d ranking(s)", s.images, s.embedded,
             s.cache_hits, s.failures, s.rankings)
    return EXIT_PARTIAL if failed or s.failures else EXIT_OK


def _copy_winners(records, dest: str):
    """Copy each scored record's image into dest under a name that is not taken yet; never overwrite."""
    from .pipeline import with_copied

    for r in records:
        if r.error is not None or r.path is None:
            yield r
            continue
        stem, ext = os.path.splitext(os.path.basename(r.path))
        n = 0
        while True:
            name = f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}"
            target = os.path.join(dest, name)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                n += 1
        with os.fdopen(fd, "wb") as fout, open(r.path, "rb") as fin:
            shutil.copyfileobj(fin, fout)
        shutil.copystat(r.path, target)
        yield with_copied(r, target)


def _common(**kw) -> Common:
    kw["dtype"] = kw["dtype"].value
    kw["format"] = kw["format"].value if kw["format"] else None
    kw["on_error"] = kw["on_error"].value
    kw["engine"] = kw["engine"].value
    if kw["max_pixels"] is None:  # Pillow's limit; None would mean no limit downstream
        from .reader import DEFAULT_MAX_PIXELS

        kw["max_pixels"] = DEFAULT_MAX_PIXELS
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
    max_pixels: MaxPixelsOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
) -> None:
    """Score images against one prompt and rank them.

    Example: pickrank score --prompt "a red cat on a sofa" sample_images/
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("paths", "prompt")})
    from .jobs import score_job

    _run("score", c, lambda: score_job(prompt, paths, sys.stdin))


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
    max_pixels: MaxPixelsOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
) -> None:
    """Keep the best of N candidates in each group of a folder.

    Example: pickrank best-of-n out/ --top 1 --copy-to keep/
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("folder", "prompt", "copy_to")})
    from .jobs import best_of_n_job

    _run("best-of-n", c, lambda: best_of_n_job(folder, prompt), copy_to=copy_to)


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
    max_pixels: MaxPixelsOpt = None, debug: DebugOpt = False, html: HtmlOpt = None,
    engine: EngineOpt = EngineName.local, ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None,
) -> None:
    """Rank images for every prompt of a CSV; each image is embedded once, each prompt encoded once.

    Example: pickrank batch prompts.csv generations/ -f csv -o scores.csv
    """
    c = _common(**{k: v for k, v in locals().items() if k not in ("prompts_csv", "paths")})
    from .jobs import batch_job

    _run("batch", c, lambda: batch_job(prompts_csv, paths or [], sys.stdin))


def _open_cache_or_exit(path: str | None):
    from .cache import EmbeddingCache

    _setup_logging(False)
    return EmbeddingCache(path)


@cache_app.command("info")
def cache_info(cache: CacheOpt = None) -> None:
    """Show the cache's path, entries, size and models.

    Example: pickrank cache info
    """
    c = _open_cache_or_exit(cache)
    info = c.info()
    c.close()
    typer.echo(f"path:    {info.path}\nentries: {info.entries}\nsize:    {info.size_bytes / 1e6:.1f} MB")
    for model, n in info.models.items():
        typer.echo(f"model:   {model}  ({n} entries)")


@cache_app.command("clear")
def cache_clear(
    model: Annotated[Optional[str], typer.Option(help="Only entries of models whose fingerprint contains this.")
                     ] = None,
    cache: CacheOpt = None,
) -> None:
    """Delete cached embeddings (all, or one model's).

    Example: pickrank cache clear --model PickScore_v1
    """
    c = _open_cache_or_exit(cache)
    n = c.clear(model)
    c.close()
    typer.echo(f"deleted {n} entries")


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[float, typer.Option("--older-than", min=0, metavar="DAYS",
                                              help="Delete entries older than DAYS.")],
    cache: CacheOpt = None,
) -> None:
    """Delete cached embeddings older than some days.

    Example: pickrank cache prune --older-than 30
    """
    c = _open_cache_or_exit(cache)
    n = c.prune(older_than)
    c.close()
    typer.echo(f"deleted {n} entries")


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
