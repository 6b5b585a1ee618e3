"""The options several commands share, declared once (`SHARED`), and `with_options`, which gives a command the
bundles it names, built: `pickrank.options`' dataclasses, the ones the library takes too."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

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
    RunOptions,
    Scale,
)

if TYPE_CHECKING:
    from pickrank.core.scoring import ScoringOptions


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
    "head": (ModelOptions, Annotated[Optional[str], Opt(
        "--head", metavar="FILE", help="A preference head made by `pickrank tune` (safetensors): scores, prob and "
                                       "ranks become PickScore tuned to your labels; refused on another base "
                                       "model.")], None),
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

    def scoring(self) -> ScoringOptions:
        """The bundles a scoring run takes (those this command did not take: their defaults)."""
        from pickrank.core.scoring import ScoringOptions  # the scoring core: not needed for --help

        given = {name: getattr(self, name) for name in ("model", "run", "cache", "output", "engine")}
        return ScoringOptions(**{name: value for name, value in given.items() if value is not None})


# Which field of Opts holds each bundle.
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
