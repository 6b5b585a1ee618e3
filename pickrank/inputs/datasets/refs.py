"""Dataset samples named from outside a run, as records and messages name them (`samples.sample_name`:
`SHARD#KEY`): a label file's images that live inside shards, read back as image bytes (each shard read once, only
the samples asked for kept); and the captioned samples of shards, for `pickrank label`."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from pickrank.inputs.datasets.paths import dataset_kind, find_shards
from pickrank.inputs.datasets.sets import DatasetSets, Reading, check_layouts
from pickrank.options import DatasetOptions
from pickrank.records import ImageBytes


def split_ref(path: str) -> tuple[str, str] | None:
    """(shard, key) of a sample reference `SHARD#KEY` whose shard is a .tar or .parquet file that exists; else
    None (a file name may hold '#' too: a file that exists is never a reference)."""
    shard, sep, key = path.rpartition("#")
    if not sep or not key or dataset_kind(shard) is None or not os.path.isfile(shard) or os.path.exists(path):
        return None
    return shard, key


def captioned_samples(paths: Iterable[str], max_bytes: int | None) -> Iterator[tuple[str, str, bytes]]:
    """(name, caption, image bytes) of each usable captioned sample of the shards the arguments name, named by the
    shard's absolute path; samples without an image or a caption are said on stderr and left out."""
    shards = find_shards([os.path.abspath(p) for p in paths])
    options = DatasetOptions()
    reading = Reading(options, None, max_bytes, False, check_layouts(shards, options, True))
    for cset in DatasetSets(shards, reading):
        if cset.error is None and cset.queries and cset.paths and isinstance(cset.paths[0], ImageBytes):
            yield cset.paths[0].name, cset.queries[0].prompt, cset.paths[0].data


def _ref_key(path: str) -> tuple[str, str] | None:
    found = split_ref(path)
    return (os.path.realpath(found[0]), found[1]) if found else None


def sample_bytes(refs: Iterable[str], max_bytes: int | None) -> dict[str, bytes]:
    """The image bytes of each sample reference found in its shard (a reference not found is left out)."""
    wanted: dict[str, dict[tuple[str, str], list[str]]] = {}
    for ref in refs:
        key = _ref_key(ref)
        if key is not None:
            wanted.setdefault(key[0], {}).setdefault(key, []).append(ref)
    out: dict[str, bytes] = {}
    for shard, names in wanted.items():
        for name, _, data in captioned_samples([shard], max_bytes):
            for ref in names.get(_ref_key(name) or ("", ""), []):
                out[ref] = data
    return out


__all__ = ["split_ref", "captioned_samples", "sample_bytes"]
