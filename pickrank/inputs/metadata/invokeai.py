"""InvokeAI: `invokeai_metadata` (3+), `sd-metadata` (2) and `Dream` (1)."""

from __future__ import annotations

import re
from typing import Any

from pickrank.inputs.metadata.common import FoundPrompt, Parser, clean_text, join_texts, json_value, no_prompt


def _from_invokeai(fields: dict[str, str]) -> FoundPrompt | None:
    """InvokeAI 3+ `invokeai_metadata`, InvokeAI 2 `sd-metadata`, InvokeAI 1 `Dream`, in this order."""
    if "invokeai_metadata" in fields:
        doc = json_value(fields["invokeai_metadata"])
        prompt = clean_text(doc.get("positive_prompt")) if isinstance(doc, dict) else None
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "invokeai_metadata")
        first = no_prompt("invokeai_metadata has no positive_prompt", "invokeai", "invokeai_metadata")
    else:
        first = None
    if "sd-metadata" in fields:
        prompt = _sd_metadata_prompt(json_value(fields["sd-metadata"]))
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "sd-metadata")
        first = first or no_prompt("sd-metadata has no prompt", "invokeai", "sd-metadata")
    if "Dream" in fields:
        match = re.match(r'^\s*"(.*?)"(?:\s+-|\s*$)', fields["Dream"], re.S)
        prompt = _without_invoke_negatives(match.group(1)) if match else None
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "Dream")
        first = first or no_prompt("Dream has no quoted prompt", "invokeai", "Dream")
    return first


def _sd_metadata_prompt(doc: Any) -> str | None:
    """The prompt of InvokeAI 2's sd-metadata: image.prompt, a string or a list of {prompt, weight} (a blend:
    the texts joined with ', '), negative `[...]` parts removed."""
    image = doc.get("image") if isinstance(doc, dict) else None
    prompts = image.get("prompt") if isinstance(image, dict) else None
    if isinstance(prompts, str):
        prompts = [{"prompt": prompts}]
    if not isinstance(prompts, list):
        return None
    texts = [_without_invoke_negatives(p.get("prompt")) for p in prompts if isinstance(p, dict)]
    return join_texts([t for t in texts if t])


def _without_invoke_negatives(text: object) -> str | None:
    """An InvokeAI 1/2 prompt without its `[negative]` parts."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s*\[[^\[\]]*\]\s*", " ", text)
    return clean_text(re.sub(r"\s+,", ",", text).strip(" ,"))


PARSER = Parser(("invokeai",), _from_invokeai)
