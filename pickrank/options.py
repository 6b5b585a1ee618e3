"""The options of a run, as typed objects declared once: the CLI builds them from its flags, the library from its
keyword arguments, so the two cannot drift.

Torch-free and typer-free (the CLI's flags for these fields are declared in `pickrank.cli.app`'s option table).
Each bundle's `from_values` takes plain values (an enum or its name) and applies the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

from pickrank.errors import UsageError


class DType(str, Enum):
    """Model precision: the one list of dtype names (fp32 is the reference)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def torch_name(self) -> str:
        """The torch dtype's name without "torch." (what `str(torch_dtype)` and `Embedder.describe()` say)."""
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.value]

    @classmethod
    def parse(cls, value: object) -> "DType":
        """A member from itself, its name (fp32, fp16, bf16), a torch dtype (torch.bfloat16) or a usual name of one
        ("float32", "float", "float16", "half", "bfloat16"); anything else is a usage error naming the choices."""
        if isinstance(value, cls):
            return value
        name = str(value).lower().removeprefix("torch.")
        aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
        return as_enum(cls, aliases.get(name, name), "dtype")


class Format(str, Enum):
    """Every output format: the one list (the scoring commands write all of them; other commands some: `subset`)."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    paths = "paths"
    parquet = "parquet"


def subset(name: str, *members: str) -> Any:
    """An enum of some of Format's members, in this order: the -f choices of a command that writes only those."""
    return Enum(name, [(m, Format(m).value) for m in members], type=str)


# eval's summary and the doctor's report: a text table, or one JSON object.
SummaryFormat = subset("SummaryFormat", "table", "json")
# compare's summary: a text table, one JSON object, or CSV rows.
CompareFormat = subset("CompareFormat", "table", "json", "csv")
# `pickrank prompts`: one row per image.
PromptsFormat = subset("PromptsFormat", "table", "jsonl", "json", "csv")


class Alpha(str, Enum):
    """What happens to transparency before the model: composite onto white (transformers 5's CLIP processor), or
    drop the alpha channel (transformers 4.x and PickScore's training code, `image.convert("RGB")`)."""

    white = "white"
    drop = "drop"


class PromptFrom(str, Enum):
    """Where `pickrank score` takes its prompt from without --prompt: each image's own metadata, or each dataset
    sample's own caption."""

    metadata = "metadata"
    caption = "caption"


class OnError(str, Enum):
    """What a run does with an image that cannot be read: report it and go on, or stop (a str, so that code
    comparing with "fail" keeps working)."""

    continue_ = "continue"
    fail = "fail"


class EngineName(str, Enum):
    """Where a run embeds: this process, or a Ray cluster."""

    local = "local"
    ray = "ray"


class Scale(str, Enum):
    """The unit a score is reported in: the one list (prob, a softmax of raw scores, is the same in every unit)."""

    raw = "raw"  # exp(logit_scale) * cos: the model card's number (~21 for a good match)
    cosine = "cosine"  # raw / exp(logit_scale): the cosine similarity (Diffusion-DPO, t2v_metrics)
    unit26 = "unit26"  # raw / 26: what flow_grpo, verl-omni and cosmos-rl use as a reward

    def divisor(self, logit_scale_exp: float) -> float:
        """What a raw score is divided by to give this unit (`logit_scale_exp` is exp(logit_scale))."""
        return {"raw": 1.0, "cosine": float(logit_scale_exp), "unit26": 26.0}[self.value]

    def convert(self, raw: float, logit_scale_exp: float) -> float:
        """A raw PickScore in this unit."""
        return raw / self.divisor(logit_scale_exp)


class BackendName(str, Enum):
    """What runs the model: PyTorch (the reference), or ONNX Runtime on an exported model (no torch)."""

    torch = "torch"
    onnx = "onnx"


class Decode(str, Enum):
    """How JPEGs are decoded: exactly (the reference), or at reduced DCT scale first (faster, opt-in, not exact)."""

    exact = "exact"
    fast = "fast"


DTYPE_NAMES: tuple[str, ...] = tuple(d.value for d in DType)
FORMATS: tuple[str, ...] = tuple(f.value for f in Format)

E = TypeVar("E", bound=Enum)


def as_enum(cls: type[E], value: E | str, what: str) -> E:
    """An enum member from itself or its name; an unknown name is a usage error naming the choices."""
    try:
        return cls(value)
    except ValueError:
        names = [m.value for m in cls]
        raise UsageError(f"unknown {what} {value!r}: use {', '.join(names[:-1])} or {names[-1]}") from None


def _default_max_pixels() -> int:
    # lazily: decode imports Pillow and numpy, which --help does not need
    from pickrank.inputs.decode import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS


def _default_max_bytes() -> int:
    from pickrank.inputs.files import DEFAULT_MAX_BYTES

    return DEFAULT_MAX_BYTES


B = TypeVar("B")


def _build(cls: type[B], values: dict[str, Any]) -> B:
    """cls(**values); a name that is not a field is a TypeError, as for a function's keyword arguments."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(sorted(unknown))}")
    return cls(**values)


class _Bundle:
    """What every option bundle shares: `from_values` builds it from plain values (an enum or its name) and the
    defaults; an unknown name is a TypeError, as for a function."""

    @classmethod
    def from_values(cls: type[B], **values: Any) -> B:
        return _build(cls, values)


@dataclass(frozen=True)
class ModelOptions(_Bundle):
    """Which model runs, where and how: what `load_embedder` needs."""

    model: str | None = None  # None: $PICKRANK_MODEL, else yuvalkirstain/PickScore_v1
    processor: str | None = None  # None: the model folder if it has processor files, else LAION's
    revision: str | None = None
    offline: bool = False
    device: str = "auto"
    dtype: DType = DType.fp32
    batch_size: int | None = None  # None: 32 on a GPU, 8 on the CPU
    alpha: Alpha = Alpha.white  # part of the preprocessing, hence of the cache fingerprint
    backend: BackendName | None = None  # None: onnx when `model` is an ONNX export folder, else torch
    # Part of the preprocessing (as alpha), hence of the cache fingerprint: here, where the fingerprint is made.
    decode: Decode = Decode.exact
    # A preference head file (`pickrank tune`): every score goes through it, after the embeddings (not part of the
    # cache fingerprint: embeddings are PickScore's with or without it).
    head: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType.parse(self.dtype))
        object.__setattr__(self, "alpha", as_enum(Alpha, self.alpha, "--alpha value"))
        object.__setattr__(self, "decode", as_enum(Decode, self.decode, "--decode value"))
        if self.backend is not None:
            object.__setattr__(self, "backend", as_enum(BackendName, self.backend, "backend"))
        if self.head is not None:  # read where the model loads: a Ray replica's working folder is not ours
            object.__setattr__(self, "head", os.path.abspath(os.fspath(self.head)))


@dataclass(frozen=True)
class RunOptions(_Bundle):
    """How a run behaves, independent of what it scores (the engine's options)."""

    workers: int | None = None  # decode processes (threads with `threads`); None: one per CPU, at most 8
    top: int | None = None
    on_error: OnError = OnError.continue_
    max_pixels: int | None = field(default_factory=_default_max_pixels)  # None: no limit
    max_bytes: int | None = field(default_factory=_default_max_bytes)  # files larger are refused unread; None: none
    # The unit of the scores the engine reports (prob and ranks come from raw scores, so they never change). Here,
    # not in OutputOptions: the Engine, which every command and PickScorer.rank score through, reads RunOptions.
    scale: Scale = Scale.raw
    # Decode in threads of this process instead of worker processes: the library's default, since a process pool
    # re-imports the caller's script (`__main__`) in each worker, which fails without `if __name__ == "__main__":`.
    threads: bool = False
    # Image statistics computed in the decode workers and kept, with each image's embedding, for the run's caller
    # (`core.engine.Kept`): compare's signals. Cache entries without statistics are then embedded again.
    signals: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_error", as_enum(OnError, self.on_error, "--on-error value"))
        object.__setattr__(self, "scale", as_enum(Scale, self.scale, "--scale value"))

    @classmethod
    def from_values(cls, **values: Any) -> "RunOptions":
        """From plain values; max_pixels/max_bytes None mean the defaults (Pillow's limit, 512 MiB), as on the CLI."""
        for name in ("max_pixels", "max_bytes"):
            if name in values and values[name] is None:
                del values[name]
        return _build(cls, values)


@dataclass(frozen=True)
class CacheOptions(_Bundle):
    """The embedding cache: which file, or none at all."""

    cache: str | None = None  # None: $PICKRANK_CACHE, else ~/.cache/pickrank/embeddings.sqlite3
    no_cache: bool = False


@dataclass(frozen=True)
class OutputOptions(_Bundle):
    """Where and how results are written."""

    format: Format | None = None  # None: from the output's extension, else table on a terminal, else jsonl
    output: str | None = None  # None or "-": stdout
    html: str | None = None
    null: bool = False
    with_meta: bool = False  # -f json: {"meta": provenance, "records": [...]} instead of the bare array
    meta: str | None = None  # also write the provenance, as JSON, to this file

    def __post_init__(self) -> None:
        if self.format is not None:
            object.__setattr__(self, "format", as_enum(Format, self.format, "format"))


@dataclass(frozen=True)
class EngineOptions(_Bundle):
    """Which engine embeds: local, or Ray (with its cluster address and actor count)."""

    engine: EngineName = EngineName.local
    ray_address: str | None = None
    ray_actors: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", as_enum(EngineName, self.engine, "engine"))


@dataclass(frozen=True)
class DatasetOptions(_Bundle):
    """Where a dataset sample's parts are: its webdataset members (by extension) or its parquet columns (by name).
    None: found from the usual names."""

    image_key: str | None = None  # None: the first of jpg, jpeg, png, webp a sample has
    caption_key: str = "txt"
    image_column: str | None = None  # None: jpg, image, png, ... or the one binary column
    caption_column: str | None = None  # None: caption, text, txt, prompt
    key_column: str | None = None  # None: key, __key__, id, uid; else the row number

    def __post_init__(self) -> None:
        for name in ("image_key", "caption_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, value.lower().lstrip("."))


@dataclass(frozen=True)
class CommandOptions(_Bundle):
    """What every command's lifecycle needs: how much it says on stderr, and whether errors show tracebacks."""

    quiet: bool = False
    debug: bool = False
