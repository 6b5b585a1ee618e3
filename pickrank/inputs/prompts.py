"""The prompt each image carries in its metadata, one row per image (`pickrank prompts`; no model, no torch)."""

from __future__ import annotations

from typing import Iterator, TextIO

from pickrank.errors import NoImages
from pickrank.inputs.discover import expand
from pickrank.inputs.metadata import prompt_from_image


def prompt_rows(args: list[str], stdin: TextIO | None = None, max_pixels: int | None = None,
                max_bytes: int | None = None) -> Iterator[dict]:
    """One row per image the arguments name (expanded as `score` does): path, prompt, source, reason."""
    found_any = False
    for path in expand(args, stdin):
        found_any = True
        found = prompt_from_image(path, max_pixels, max_bytes)
        yield {"path": path, "prompt": found.prompt, "source": found.source, "reason": found.reason}
    if not found_any:
        raise NoImages(f"no images found in {' '.join(args) or 'stdin'}")
