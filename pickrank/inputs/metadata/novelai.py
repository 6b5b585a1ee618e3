"""NovelAI: the prompt in `Description`, the settings (and the prompt again) in `Comment` JSON."""

from __future__ import annotations

from pickrank.inputs.metadata.common import FoundPrompt, Parser, clean_text, json_value, no_prompt


def _from_novelai(fields: dict[str, str]) -> FoundPrompt | None:
    """NovelAI: `Description` holds the prompt, `Comment` JSON the settings (and `prompt` again)."""
    comment = json_value(fields.get("Comment"))
    is_nai = fields.get("Software", "").strip() == "NovelAI" or (
        isinstance(comment, dict) and "uc" in comment and ("sampler" in comment or "prompt" in comment))
    if not is_nai:
        return None
    prompt = clean_text(fields.get("Description"))
    if prompt:
        return FoundPrompt(prompt, "novelai", None, "Description")
    prompt = clean_text(comment.get("prompt")) if isinstance(comment, dict) else None
    if prompt:
        return FoundPrompt(prompt, "novelai", None, "Comment")
    return no_prompt("NovelAI metadata has no prompt", "novelai")


PARSER = Parser(("novelai",), _from_novelai)
