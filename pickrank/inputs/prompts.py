"""The prompt each image carries in its metadata, one row per image (`pickrank prompts`; no model, no torch)."""

from __future__ import annotations

import os
from typing import Iterator, TextIO

from pickrank.errors import NoImages
from pickrank.inputs.datasets.items import NamedSample, expand_inputs
from pickrank.inputs.metadata import prompt_from_image
from pickrank.inputs.sets import prompt_txt
from pickrank.options import DatasetOptions


def prompt_rows(args: list[str], stdin: TextIO | None = None, max_pixels: int | None = None,
                max_bytes: int | None = None, options: DatasetOptions = DatasetOptions()) -> Iterator[dict]:
    """One row per image the arguments name (expanded as `score` does): path, prompt, source, reason. An image
    without one whose folder has a prompt.txt says so: best-of-n scores that folder's group with it. A dataset
    shard's samples are rows too, each with its caption (`caption_row`), its parts where `options` says."""
    found_any = False
    with_txt: dict[str, bool] = {}  # folder -> whether it has a usable prompt.txt
    for path in expand_inputs(args, stdin, max_bytes, options=options):
        found_any = True
        if isinstance(path, NamedSample):
            yield caption_row(path)
            continue
        found = prompt_from_image(path, max_pixels, max_bytes)
        reason = found.reason
        if found.prompt is None and not (reason or "").startswith("unreadable"):
            folder = os.path.dirname(path) or "."
            if with_txt.setdefault(folder, prompt_txt(folder) is not None):
                txt = os.path.join(folder, "prompt.txt")
                reason = f"{reason or 'no generation metadata'}; best-of-n would use {txt}"
        yield {"path": path, "prompt": found.prompt, "source": found.source, "reason": reason}
    if not found_any:
        raise NoImages(f"no images found in {' '.join(args) or 'stdin'}")


def caption_row(named: NamedSample) -> dict:
    """A shard's sample as a row: SHARD#KEY, its caption as its prompt, or why it has none."""
    caption = named.sample.caption
    reason = None if caption else named.sample.error or "no caption"
    return {"path": named.name, "prompt": caption or None, "source": "caption" if caption else None,
            "reason": reason}
