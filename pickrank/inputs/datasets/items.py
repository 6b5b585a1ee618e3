"""Dataset shards among the PATH arguments of the commands that take images (batch, best-of-n, prompts): images as
`discover.expand` finds them, and in its place each shard's samples, read as `score` reads them (`shard_samples`:
the same guards), one at a time. A sample is an image in memory named SHARD#KEY; nothing is extracted, and no path
taken from inside a shard is opened or written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, TextIO, Union

from pickrank.errors import UsageError
from pickrank.inputs.datasets.parquet import require_pyarrow
from pickrank.inputs.datasets.paths import Shard, find_shards, is_dataset_arg
from pickrank.inputs.datasets.samples import Sample, sample_name, to_item
from pickrank.inputs.datasets.sets import Reading, check_layouts, shard_samples
from pickrank.inputs.discover import expand
from pickrank.options import DatasetOptions
from pickrank.records import Item


@dataclass(frozen=True)
class NamedSample:
    """A shard's sample as these commands list it: the name its records carry (SHARD#KEY), and the sample."""

    name: str
    sample: Sample


# What the expanded arguments give, in order: an image path, or a shard's sample.
Input = Union[str, NamedSample]


def refuse_shards(arg: str, files_only: str | None) -> None:
    """A usage error when an option that needs image files (`files_only`: --html, --copy-to) meets a shard."""
    if files_only is not None:
        raise UsageError(f"{files_only} needs image files, and {arg} names dataset shards, whose samples have no "
                         "file of their own (keep samples with pickrank filter --reshard)")


def dataset_shards(args: Sequence[str], max_bytes: int | None = None, files_only: str | None = None,
                   options: DatasetOptions = DatasetOptions()) -> tuple[list[list[Shard] | str], Reading]:
    """Each argument as its shards (a dataset argument) or as it is (images), and how shards are read: parquet
    columns are checked now, before the model loads, as `score` does."""
    plan: list[list[Shard] | str] = []
    for arg in args:
        if arg != "-" and is_dataset_arg(arg):
            refuse_shards(arg, files_only)
            plan.append(find_shards([arg]))
        else:
            plan.append(arg)
    shards = [s for p in plan if isinstance(p, list) for s in p]
    if any(s.kind == "parquet" for s in shards):
        require_pyarrow("reading parquet shards")
    return plan, Reading(options, prompt="", max_bytes=max_bytes,
                         layouts=check_layouts(shards, options, by_caption=False))


def named_samples(shard: Shard, reading: Reading) -> Iterator[NamedSample]:
    """A shard's samples in order, then, when it is damaged, one unusable sample named by the shard saying where."""
    damage: list[str] = []
    for s in shard_samples(shard, reading, damage):
        yield NamedSample(sample_name(shard.path, s.key, s.where), s)
    if damage:
        yield NamedSample(shard.path, Sample(None, "", error=damage[0]))


def shard_items(shard: Shard, reading: Reading) -> Iterator[Item]:
    """A shard's samples as the engine's items (an unusable one already says why)."""
    for n in named_samples(shard, reading):
        yield to_item(n.sample, n.name, need_caption=False)


def expand_inputs(args: Sequence[str], stdin: TextIO | None = None, max_bytes: int | None = None,
                  files_only: str | None = None, options: DatasetOptions = DatasetOptions()) -> Iterator[Input]:
    """The arguments' images and shard samples, in argument order (checked now; read lazily); `options` says where
    a sample's parts are."""
    plan, reading = dataset_shards(args, max_bytes, files_only, options)

    def inputs() -> Iterator[Input]:
        images: list[str] = []  # consecutive image arguments are expanded together: each image once
        for part in [*plan, []]:
            if isinstance(part, str):
                images.append(part)
                continue
            if images:
                yield from expand(images, stdin)
                images = []
            for shard in part:
                yield from named_samples(shard, reading)

    return inputs()


def expand_items(args: Sequence[str], stdin: TextIO | None = None, max_bytes: int | None = None,
                 files_only: str | None = None, options: DatasetOptions = DatasetOptions()) -> Iterator[Item]:
    """`expand_inputs` as the engine's items: image paths, and samples in memory."""
    return (x if isinstance(x, str) else to_item(x.sample, x.name, need_caption=False)
            for x in expand_inputs(args, stdin, max_bytes, files_only, options))
