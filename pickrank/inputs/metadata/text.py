"""Plain text: a field named `prompt`, `Description` or `description` that no generator's format claimed."""

from __future__ import annotations

from pickrank.inputs.metadata.common import FoundPrompt, Parser, clean_text


def _from_text(fields: dict[str, str]) -> FoundPrompt | None:
    """A plain text field named `prompt`, `Description` or `description` (never one holding JSON)."""
    for key in ("prompt", "Description", "description"):
        prompt = clean_text(fields.get(key))
        if prompt:
            return FoundPrompt(prompt, "text", None, key)
    return None


PARSER = Parser(("text",), _from_text)
