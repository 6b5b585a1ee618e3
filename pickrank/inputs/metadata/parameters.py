"""Automatic1111 / Forge / SD.Next, Fooocus and SwarmUI: the `parameters` text chunk (PNG) or the EXIF UserComment
(JPEG, WebP), as A1111's text or as Fooocus' or SwarmUI's JSON."""

from __future__ import annotations

import re
from typing import Any

from pickrank.inputs.metadata.common import FoundPrompt, Parser, clean_text, json_value, no_prompt
from pickrank.inputs.metadata.exif import EXIF_PREFIX, EXIF_USER_COMMENT

# A1111's own pattern for one `Key: value` of the parameters line (modules/infotext_utils.py).
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _parameters_text(fields: dict[str, str]) -> tuple[str, str] | None:
    """The A1111-style parameters text and where it is: the PNG `parameters` chunk, else the EXIF UserComment."""
    for key, where in (("parameters", "parameters"), (EXIF_USER_COMMENT, "EXIF UserComment")):
        value = fields.get(key)
        if value and value.strip():
            return value, where
    return None


def _from_parameters(fields: dict[str, str]) -> FoundPrompt | None:
    """SwarmUI or Fooocus JSON, or A1111 text, in `parameters` / UserComment; None when neither field is there."""
    found = _parameters_text(fields)
    if found is None:
        return None
    text, where = found
    doc = json_value(text)
    if doc is not None:
        return _from_parameters_json(doc, fields, where)
    fooocus = "fooocus_scheme" in fields or _fooocus_software(fields)
    prompt, has_params = a1111_prompt(text)
    source = "fooocus" if fooocus else "automatic1111"
    if where == "EXIF UserComment" and not has_params and not fooocus:
        source = "text"  # a plain comment (a camera's, a user's): not the A1111 format
    if not prompt:
        return no_prompt(f"{where} has an empty prompt", source, where)
    return FoundPrompt(prompt, source, None, where)


def _fooocus_software(fields: dict[str, str]) -> bool:
    """Whether the EXIF Software tag names Fooocus."""
    return "fooocus" in fields.get(EXIF_PREFIX + "Software", "").lower()


def _from_parameters_json(doc: Any, fields: dict[str, str], where: str) -> FoundPrompt | None:
    """The prompt field of a known JSON document in `parameters` / UserComment, never the document."""
    if not isinstance(doc, dict):
        return no_prompt(f"{where} holds a JSON document of an unknown format", None, where)
    if isinstance(doc.get("sui_image_params"), dict):
        prompt = clean_text(doc["sui_image_params"].get("prompt"))
        return FoundPrompt(prompt, "swarmui", None if prompt else "SwarmUI metadata has no prompt", where)
    fooocus = ("fooocus_scheme" in fields or _fooocus_software(fields) or doc.get("metadata_scheme") == "fooocus"
               or str(doc.get("version", "")).lower().startswith("fooocus")
               or "fooocus" in str(doc.get("software", "")).lower())
    if fooocus:
        prompt = clean_text(doc.get("prompt", doc.get("Prompt")))
        return FoundPrompt(prompt, "fooocus", None if prompt else "Fooocus metadata has no prompt", where)
    if where == "EXIF UserComment" and ("prompt" in doc or "workflow" in doc):
        return None  # ComfyUI graphs some WebP/JPEG save nodes put there: the comfyui parser reads them
    return no_prompt(f"{where} holds a JSON document of an unknown format", None, where)


def a1111_prompt(text: str) -> tuple[str, bool]:
    """The positive prompt of A1111 `parameters` text, and whether it had a parameters line.

    As A1111 parses it: the last line holds the parameters when it has 3 or more `Key: value` pairs (or starts
    with `Steps:`, which A1111 always writes first); the prompt is every line before the one that starts with
    `Negative prompt:`.
    """
    lines = text.strip().split("\n")
    last = lines[-1].strip()
    has_params = last.startswith("Steps:") or (len(lines) > 1 and len(_RE_PARAM.findall(last)) >= 3)
    if has_params:
        lines = lines[:-1]
    prompt: list[str] = []
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt.append(line)
    return "\n".join(prompt).strip(), has_params


PARSER = Parser(("automatic1111", "fooocus", "swarmui", "text"), _from_parameters)
