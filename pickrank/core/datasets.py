"""Scoring a dataset (webdataset shards, parquet files) through the one scoring core: the shards found and checked,
the outputs opened (the run's writers, or one parquet per shard under `-o DIR/`, skipping the shards already done),
then `scoring.score_into` over the shards' candidate sets, streamed (`Engine.rank_open`)."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from pickrank.core.scoring import Scored, ScoringOptions, open_outputs, score_into
from pickrank.errors import UsageError
from pickrank.inputs.datasets.parquet import require_pyarrow
from pickrank.inputs.datasets.paths import Shard, find_shards
from pickrank.inputs.datasets.sets import DatasetSets, Reading, SampleReader, check_layouts, shard_samples
from pickrank.inputs.sets import check_prompt
from pickrank.models.loading import model_info
from pickrank.options import DatasetOptions, EngineName, EngineOptions, OnError
from pickrank.output.datasets import (
    DatasetRecords,
    ShardFiles,
    ShardReceiver,
    Stamp,
    ToSinks,
    check_output_folder,
    is_output_folder,
    plan_shards,
)
from pickrank.output.sinks import Sink
from pickrank.output.targets import Output
from pickrank.output.writers import MetaWriter
from pickrank.records import RunSummary
from pickrank.taste.head import file_sha256

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


@dataclass(frozen=True)
class DatasetJob:
    """What `pickrank score` hands over for shards: the PATH arguments, the prompt (None: each sample's caption),
    where samples keep their parts, and whether per-shard outputs made another way may be replaced."""

    paths: tuple[str, ...]
    prompt: str | None = None
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    overwrite: bool = False


def _check_options(job: DatasetJob, options: ScoringOptions, shards: list[Shard]) -> None:
    """What a dataset run refuses, before the model loads."""
    if job.prompt is not None:
        check_prompt(job.prompt)
    if options.output.html:
        raise UsageError("--html shows image files; a dataset's samples are inside their shards")
    if options.run.top is not None:
        raise UsageError("--top keeps part of each ranking; a dataset's outputs keep every sample: choose them "
                         "afterwards with pickrank filter")
    if any(s.kind == "parquet" for s in shards):
        require_pyarrow("reading parquet shards")


def _stamp(job: DatasetJob, options: ScoringOptions) -> Stamp:
    """The run's stamp for per-shard outputs (the shard's own fields are filled per shard)."""
    fingerprint = model_info(options.model).fingerprint
    if options.model.head is not None:  # a head changes every score: a shard scored without it is not done
        fingerprint += f";head sha256:{file_sha256(options.model.head)}"
    return Stamp(fingerprint=fingerprint, prompt=job.prompt,
                 scale=options.run.scale.value, reading=json.dumps(asdict(job.dataset), sort_keys=True),
                 shard="", size=None, mtime_ns=None)


def _shard_outputs(job: DatasetJob, options: ScoringOptions, shards: list[Shard],
                   sinks: list[Sink]) -> tuple[list[ShardReceiver], list[Shard]]:
    """-o DIR/: the per-shard files and the shards still to score (those done are skipped, said on stderr)."""
    out = options.output
    fmt = out.format.value if out.format is not None else "parquet"
    if fmt != "parquet":
        raise UsageError(f"-o {out.output}: a folder takes one parquet per shard, not -f {fmt}")
    folder = out.output.rstrip("/") or "/"  # type: ignore[union-attr]
    require_pyarrow("-o FOLDER/ (one parquet per shard)")
    check_output_folder(folder, shards)
    files = ShardFiles(folder, _stamp(job, options))
    plan = plan_shards(files, shards, job.overwrite)
    if plan.skipped:
        log.info("%d of %d shard(s) already scored in %s: skipped", plan.skipped, len(shards), folder)
    if out.meta:
        sinks.append(MetaWriter(Output(out.meta, label="--meta")))
    return [files, ToSinks(sinks)], plan.todo


def score_dataset(job: DatasetJob, options: ScoringOptions, sinks: list[Sink], *,
                  on_progress: Callable[[int], None] | None = None,
                  on_loaded: Callable[[ImageTextEmbedder], None] | None = None) -> Scored:
    """Score a dataset's samples into its outputs: the run's writers (opened into `sinks`, which the caller closes
    or discards), or one parquet per shard under `-o DIR/`, each written when its shard is finished."""
    shards = find_shards(job.paths)
    _check_options(job, options, shards)
    by_caption = job.prompt is None
    reading = Reading(job.dataset, job.prompt, options.run.max_bytes, options.run.on_error is OnError.fail,
                      check_layouts(shards, job.dataset, by_caption))
    if is_output_folder(options.output.output):
        receivers, todo = _shard_outputs(job, options, shards, sinks)
        if not todo:
            return Scored(RunSummary(), 0)
    else:
        open_outputs("dataset", options.output, [s.path for s in shards], None, sinks)
        receivers, todo = [ToSinks(sinks)], shards
    with shard_reader(todo, reading, options.engine) as read:
        sets = DatasetSets(todo, reading, read)
        adapter = DatasetRecords(sets.parts, receivers, by_caption, options.run.scale)
        return score_into([adapter], sets, options, on_progress=on_progress, on_loaded=on_loaded, stream=True)


@contextlib.contextmanager
def shard_reader(shards: list[Shard], reading: Reading, engine: EngineOptions) -> Iterator[SampleReader]:
    """What reads the shards: this process, or with --engine ray, Ray Data's tasks (`ray.datasets.RayShards`)."""
    if engine.engine is not EngineName.ray:
        yield shard_samples
        return
    from pickrank.ray.datasets import RayShards

    ray_shards = RayShards(shards, reading, engine.ray_address)
    try:
        yield ray_shards.samples
    finally:
        ray_shards.close()
