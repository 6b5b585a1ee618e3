"""The options several commands share, declared once (`SHARED`), and `with_options`, which gives a command the
bundles it names, built: `pickrank.options`' dataclasses, the ones the library takes too."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from pickrank.options import (
    Alpha,
    BackendName,
    CacheOptions,
    CommandOptions,
    DatasetOptions,
    Decode,
    DType,
    EngineName,
    EngineOptions,
    Format,
    ModelOptions,
    OnError,
    OutputOptions,
    RunOptions,
    Scale,
)

if TYPE_CHECKING:
    from pickrank.core.scoring import ScoringOptions


# The help panels, in the order --help lists them. Every option names its panel where it is declared
# (`Opt(..., panel=MODEL)`: in SHARED below, or in a command's own parameters); a test checks that none is left
# in typer's catch-all "Options" panel.
INPUT, MODEL, OUTPUT, CACHE, RUN, ENGINE = "Input", "Model", "Output", "Cache", "Run", "Engine"
STATS, SERVER, DATASETS, FILTER = "Statistics", "Server", "Datasets", "Filter"
PANELS = (INPUT, DATASETS, FILTER, MODEL, OUTPUT, CACHE, RUN, ENGINE, STATS, SERVER)


def _plain(text: str) -> str:
    """Help text shown as written: rich would read [ray] or [default: ...] as markup and drop it."""
    return text.replace("[", "\\[")


def _in_range(low: float | None, high: float | None) -> Callable[[Any], Any]:
    """A callback refusing values outside [low, high] (a usage error, exit 2); None (not given) passes."""
    def check(value: Any) -> Any:
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            bounds = (f"at least {low:g}" if high is None else f"at most {high:g}" if low is None
                      else f"from {low:g} to {high:g}")
            raise typer.BadParameter(f"must be {bounds} (got {value:g})")
        return value

    return check


def Opt(*decls: str, help: str, panel: str | None = None, min: float | None = None,  # noqa: N802, A002
        max: float | None = None, **kw: Any) -> Any:  # noqa: A002 - the names typer.Option uses
    """typer.Option with plain-text help, listed in help panel `panel`. min and max are checked by a callback:
    typer's own check would print its range ("[x>=1]") where the help shows the option's metavar."""
    if min is not None or max is not None:
        kw["callback"] = _in_range(min, max)
    return typer.Option(*decls, help=_plain(help), rich_help_panel=panel, **kw)


def Arg(*, help: str, **kw: Any) -> Any:  # noqa: N802 - reads as typer.Argument
    """typer.Argument with plain-text help."""
    return typer.Argument(help=_plain(help), **kw)


# Every option shared by several commands, declared once, with its help panel and metavar:
# name -> (the bundle it belongs to, its type with its flags and help, its default). Grouped by panel, in PANELS
# order: --help lists them in this order.
SHARED: dict[str, tuple[type, Any, Any]] = {
    "max_pixels": (RunOptions, Annotated[Optional[int], Opt(
        min=1, metavar="PIXELS", panel=INPUT,
        help="Refuse images with more pixels than this (decompression bombs) [default: Pillow's 89,478,485].")],
        None),
    "max_bytes": (RunOptions, Annotated[Optional[int], Opt(
        min=1, metavar="BYTES", panel=INPUT,
        help="Refuse image files larger than this, before reading them [default: 536,870,912 = 512 MiB].")],
        None),
    "image_key": (DatasetOptions, Annotated[Optional[str], Opt(
        metavar="EXT", panel=DATASETS,
        help="Webdataset: the image member's extension [default: the first of jpg, jpeg, png, webp].")], None),
    "caption_key": (DatasetOptions, Annotated[str, Opt(
        metavar="EXT", panel=DATASETS, help="Webdataset: the caption member's extension.")], "txt"),
    "image_column": (DatasetOptions, Annotated[Optional[str], Opt(
        metavar="NAME", panel=DATASETS, help="Parquet: the column of image bytes (binary, or a struct with bytes) "
                                             "[default: jpg, image, ... or the one binary column].")], None),
    "caption_column": (DatasetOptions, Annotated[Optional[str], Opt(
        metavar="NAME", panel=DATASETS, help="Parquet: the caption column [default: caption, txt, text or "
                                             "prompt].")], None),
    "key_column": (DatasetOptions, Annotated[Optional[str], Opt(
        metavar="NAME", panel=DATASETS, help="Parquet: the key column [default: key, __key__, id, image_id or uid; "
                                             "else the row number].")], None),
    "model": (ModelOptions, Annotated[Optional[str], Opt(
        "--model", envvar="PICKRANK_MODEL", metavar="ID|DIR", panel=MODEL,
        help="Hub id or local folder of the model [default: yuvalkirstain/PickScore_v1].")], None),
    "processor": (ModelOptions, Annotated[Optional[str], Opt(
        metavar="ID|DIR", panel=MODEL,
        help="Hub id or folder of the processor [default: the model folder if it has one, else "
             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K].")], None),
    "revision": (ModelOptions, Annotated[Optional[str], Opt(
        metavar="REV", panel=MODEL, help="Model revision (branch, tag or commit) on the hub.")], None),
    "offline": (ModelOptions, Annotated[bool, Opt(
        "--offline", panel=MODEL, help="Never use the network; weights must be cached.")], False),
    "device": (ModelOptions, Annotated[str, Opt(
        metavar="DEVICE", panel=MODEL, help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU).")],
        "auto"),
    "dtype": (ModelOptions, Annotated[DType, Opt(
        metavar="fp32|fp16|bf16", panel=MODEL, help="Model precision; fp32 is the reference.")], DType.fp32),
    "alpha": (ModelOptions, Annotated[Alpha, Opt(
        metavar="white|drop", panel=MODEL,
        help="Transparent images: white composites them onto white (transformers 5's CLIP processor); drop "
             "discards the alpha channel, as transformers 4.x and PickScore's training code did.")], Alpha.white),
    "backend": (ModelOptions, Annotated[Optional[BackendName], Opt(
        metavar="torch|onnx", panel=MODEL,
        help="torch, or onnx: ONNX Runtime on a folder made by `pickrank export onnx` (no torch needed) "
             "[default: onnx when the model is such a folder, else torch].")], None),
    "decode": (ModelOptions, Annotated[Decode, Opt(
        metavar="exact|fast", panel=MODEL,
        help="exact decodes JPEGs as the reference does; fast decodes them at reduced DCT scale first (whole runs "
             "1.46x faster on 1024x1024 JPEGs, 1.95x on 2048x2048 where decoding is the work; scores not exact; "
             "its own cache entries).")], Decode.exact),
    "batch_size": (ModelOptions, Annotated[Optional[int], Opt(
        min=1, metavar="N", panel=MODEL, help="Images per model call [default: 32 on GPU, 8 on CPU].")], None),
    "head": (ModelOptions, Annotated[Optional[str], Opt(
        "--head", metavar="FILE", panel=MODEL,
        help="A preference head made by `pickrank tune` (safetensors): scores, prob and ranks become PickScore "
             "tuned to your labels; refused on another base model.")], None),
    "format": (OutputOptions, Annotated[Optional[Format], Opt(
        "--format", "-f", metavar="FORMAT", panel=OUTPUT,
        help="table, json, jsonl, csv, parquet or paths [default: from -o's extension (.jsonl, .json, .csv, "
             ".parquet; .txt: paths), else table on a terminal, else jsonl].")], None),
    "output": (OutputOptions, Annotated[Optional[str], Opt(
        "--output", "-o", metavar="FILE", panel=OUTPUT,
        help="Write results to FILE (atomically; a device, FIFO or /dev/stdout is written straight through); for "
             "dataset shards, DIR/ writes one parquet per shard.")], None),
    "null": (OutputOptions, Annotated[bool, Opt(
        "--null", "-0", panel=OUTPUT,
        help="End each path with NUL instead of a newline, for xargs -0 (implies -f paths).")], False),
    "html": (OutputOptions, Annotated[Optional[str], Opt(
        "--html", metavar="FILE", panel=OUTPUT, help="Also write a self-contained HTML gallery of the ranking.")],
        None),
    "scale": (RunOptions, Annotated[Scale, Opt(
        metavar="raw|cosine|unit26", panel=OUTPUT,
        help="The unit of the scores: raw (exp(logit_scale) * cosine, the model card's ~21), cosine (raw / "
             "exp(logit_scale), as Diffusion-DPO and t2v_metrics) or unit26 (raw / 26, as flow_grpo, verl-omni and "
             "cosmos-rl); prob and ranks are the same in every unit.")], Scale.raw),
    "with_meta": (OutputOptions, Annotated[bool, Opt(
        "--with-meta", panel=OUTPUT,
        help="Add the run's provenance (model, revision, weight hashes, dtype, device, preprocessing, scale, "
             "versions): -f json writes {\"meta\": ..., \"records\": [...]} instead of the bare array; eval's "
             "summary gains it.")], False),
    "meta": (OutputOptions, Annotated[Optional[str], Opt(
        "--meta", metavar="FILE", panel=OUTPUT,
        help="Also write the run's provenance to FILE as JSON (beside any format; atomically, as -o).")], None),
    "cache": (CacheOptions, Annotated[Optional[str], Opt(
        "--cache", envvar="PICKRANK_CACHE", metavar="FILE", panel=CACHE,
        help="Embedding cache file [default: ~/.cache/pickrank/embeddings.sqlite3].")], None),
    "no_cache": (CacheOptions, Annotated[bool, Opt(
        "--no-cache", panel=CACHE, help="Neither read nor write the embedding cache.")], False),
    "workers": (RunOptions, Annotated[Optional[int], Opt(
        min=0, metavar="N", panel=RUN,
        help="Decode worker processes; 0 decodes in the main process [default: CPU count, at most 8].")], None),
    "on_error": (RunOptions, Annotated[OnError, Opt(
        metavar="continue|fail", panel=RUN,
        help="continue: report bad images and go on (exit 3); fail: stop at the first (exit 1).")],
        OnError.continue_),
    "quiet": (CommandOptions, Annotated[bool, Opt(
        "--quiet", "-q", panel=RUN, help="No progress bar or info messages.")], False),
    "debug": (CommandOptions, Annotated[bool, Opt("--debug", panel=RUN, help="Show tracebacks.")], False),
    "engine": (EngineOptions, Annotated[EngineName, Opt(
        metavar="local|ray", panel=ENGINE,
        help="local, or ray to run on a Ray cluster (pip install 'pickrank[ray]').")], EngineName.local),
    "ray_address": (EngineOptions, Annotated[Optional[str], Opt(
        envvar="RAY_ADDRESS", metavar="HOST:PORT", panel=ENGINE,
        help="Ray cluster address [default: $RAY_ADDRESS, else a local Ray started for the run].")], None),
    "ray_actors": (EngineOptions, Annotated[Optional[int], Opt(
        min=1, metavar="N", panel=ENGINE,
        help="Embedding actors on a cluster without GPUs [default: 1 per GPU, else 2].")], None),
}


@dataclass(frozen=True)
class Opts:
    """The option bundles a command asked for with `with_options` (None: not taken by this command)."""

    model: ModelOptions | None = None
    run: RunOptions | None = None
    cache: CacheOptions | None = None
    output: OutputOptions | None = None
    engine: EngineOptions | None = None
    dataset: DatasetOptions | None = None
    command: CommandOptions = CommandOptions()

    def scoring(self) -> ScoringOptions:
        """The bundles a scoring run takes (those this command did not take: their defaults)."""
        from pickrank.core.scoring import ScoringOptions  # the scoring core: not needed for --help

        given = {name: getattr(self, name) for name in ("model", "run", "cache", "output", "engine")}
        return ScoringOptions(**{name: value for name, value in given.items() if value is not None})


# Which field of Opts holds each bundle.
_SLOTS = {ModelOptions: "model", RunOptions: "run", CacheOptions: "cache", OutputOptions: "output",
          EngineOptions: "engine", DatasetOptions: "dataset", CommandOptions: "command"}


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
        params = by_panel(own + shared)

        @functools.wraps(func)
        def command(**kw: Any) -> Any:
            built = {_SLOTS[cls]: cls.from_values(**{n: kw.pop(n) for n in SHARED if n in names})
                     for cls, names in wanted.items()}
            return func(**kw, opts=Opts(**built))

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return decorate


def _info(param: inspect.Parameter) -> Any:
    """The typer OptionInfo or ArgumentInfo in a parameter's Annotated type (None: neither)."""
    from typer.models import ArgumentInfo, OptionInfo

    return next((m for m in getattr(param.annotation, "__metadata__", ()) if isinstance(m, (OptionInfo,
                                                                                           ArgumentInfo))), None)


def by_panel(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """A command's parameters as --help lists them: its arguments first, in order, then its options grouped by
    help panel in PANELS order (declaration order within a panel). Options get a metavar where typer would show a
    Python type: none for a flag, the choices for an enum."""
    from typer.models import OptionInfo

    def place(item: tuple[int, inspect.Parameter]) -> tuple[int, int]:
        info = _info(item[1])
        if not isinstance(info, OptionInfo):
            return (-1, item[0])
        panel = info.rich_help_panel
        return (PANELS.index(panel) if panel in PANELS else len(PANELS), item[0])

    ordered = [p for _, p in sorted(enumerate(params), key=place)]
    for p in ordered:
        info = _info(p)
        if isinstance(info, OptionInfo) and info.metavar is None:
            kind = typing.get_args(p.annotation)[0]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
            if kind is bool:
                info.metavar = ""
            elif isinstance(kind, type) and issubclass(kind, Enum):
                info.metavar = "|".join(m.value for m in kind)
    # Arguments keep their kind; options are keyword-only (typer calls commands with keywords).
    return [p if not isinstance(_info(p), OptionInfo) else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in ordered]


SCORING = (ModelOptions, RunOptions, CacheOptions, OutputOptions, EngineOptions, DatasetOptions, CommandOptions)
