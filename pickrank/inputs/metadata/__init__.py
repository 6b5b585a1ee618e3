"""The prompt a generator stored in an image's metadata, and which generator's format it is in (no torch here).

Formats read (see FORMATS in the README), one module per family: Automatic1111 / Forge / SD.Next, Fooocus and
SwarmUI (`parameters`: the `parameters` text chunk in PNG, the EXIF UserComment in JPEG and WebP; Fooocus' and
SwarmUI's JSON there), ComfyUI (`comfyui`: the `prompt` API graph and/or the `workflow` UI graph, in PNG text
chunks or WebP EXIF), InvokeAI (`invokeai`: `invokeai_metadata`, `sd-metadata`, `Dream`), NovelAI (`novelai`:
`Description` / `Comment`), and a plain `prompt` or `Description` field (`text`). A JSON document is never a
prompt. A new generator's parser is a module with a `PARSER`, added to PARSERS below.
"""

from __future__ import annotations

from pickrank.errors import InvalidText
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.files import DEFAULT_MAX_BYTES, ReadError
from pickrank.inputs.metadata import comfyui, invokeai, novelai, parameters, text
from pickrank.inputs.metadata.comfyui import comfy_prompt
from pickrank.inputs.metadata.comfyui_workflow import workflow_graph
from pickrank.inputs.metadata.common import FoundPrompt, Parser, no_prompt
from pickrank.inputs.metadata.exif import (
    EXIF_PREFIX,
    EXIF_USER_COMMENT,
    decode_user_comment,
    text_fields,
    unreadable_fields,
)
from pickrank.inputs.metadata.parameters import a1111_prompt
from pickrank.inputs.metadata.reading import read_image_metadata
from pickrank.inputs.textfile import check_text

__all__ = ["EXIF_PREFIX", "EXIF_USER_COMMENT", "PARSERS", "SOURCES", "FoundPrompt", "Parser", "a1111_prompt",
           "comfy_prompt", "decode_user_comment", "prompt_from_image", "prompt_from_metadata_dict",
           "read_image_metadata", "workflow_graph"]

# The parsers in the order they are tried: the explicit formats before the generic text fields. A1111-style
# `parameters` come before the ComfyUI graph: save nodes that write both state the prompt there themselves.
PARSERS: tuple[Parser, ...] = (invokeai.PARSER, parameters.PARSER, comfyui.PARSER, novelai.PARSER, text.PARSER)
# Every source a FoundPrompt may name (`Query.prompt_source` of a run that reads prompts from metadata).
SOURCES: tuple[str, ...] = tuple(sorted({source for parser in PARSERS for source in parser.sources}))


def prompt_from_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      max_bytes: int | None = DEFAULT_MAX_BYTES) -> FoundPrompt:
    """The prompt stored in the image at path; never raises for a bad file (the reason says why there is none)."""
    try:
        info = read_image_metadata(path, max_pixels, max_bytes)
    except ReadError as e:
        return no_prompt(f"unreadable: {e}")
    except Exception as e:  # a Pillow bug on a crafted file: no prompt, not a crash
        return no_prompt(f"unreadable: {type(e).__name__}: {e}")
    return prompt_from_metadata_dict(info)


def prompt_from_metadata_dict(info: dict[str, str | bytes], fmt: str | None = None) -> FoundPrompt:
    """The prompt in an image's metadata fields (PNG text chunks, header fields, `exif:*` from read_image_metadata).

    fmt names one format of SOURCES to try alone; None tries them all in the order of PARSERS. Pure: reads no file.
    """
    fields = text_fields(info)
    first: FoundPrompt | None = None
    for parser in PARSERS:
        if fmt is not None and fmt not in parser.sources:
            continue
        found = parser.parse(fields)
        if found is None or (fmt is not None and found.source not in (fmt, None)):  # not this format
            continue
        if found.prompt is not None:
            try:
                check_text(found.prompt, f"its {found.source or 'metadata'} prompt")
                return found
            except InvalidText as e:  # JSON escapes can hold what no tokenizer takes: this image's own problem
                found = no_prompt(str(e), found.source, found.field)
        first = first or found  # this format, but no prompt: keep looking, report the first reason
    if first is not None:
        return first
    unreadable = unreadable_fields(info)
    if unreadable:
        return no_prompt("unreadable metadata: " + "; ".join(unreadable.values()))
    if fmt is not None:
        return no_prompt(f"no {fmt} metadata")
    return no_prompt("no generation metadata" if not fields else
                     f"no known generator's metadata (fields: {', '.join(sorted(fields)[:8])})")
