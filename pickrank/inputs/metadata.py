"""The prompt a generator stored in an image's metadata, and which generator's format it is in (no torch here).

Formats read (see FORMATS in the README): Automatic1111 / Forge / SD.Next (`parameters` in PNG, EXIF UserComment in
JPEG and WebP), ComfyUI (the `prompt` API graph and/or the `workflow` UI graph, in PNG text chunks or WebP EXIF),
InvokeAI (`invokeai_metadata`, `sd-metadata`, `Dream`), Fooocus (JSON in `parameters` or EXIF), NovelAI
(`Description` / `Comment`), SwarmUI (`sui_image_params` JSON in `parameters`). A JSON document is never a prompt.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from PIL import Image

from pickrank.inputs.decode import DEFAULT_MAX_PIXELS, check_pixels, pillow_open
from pickrank.inputs.files import DEFAULT_MAX_BYTES, ReadError, image_file, png_text

SOURCES = ("automatic1111", "comfyui", "fooocus", "invokeai", "novelai", "swarmui", "text")
# Keys under which prompt_from_metadata_dict finds the EXIF fields read_image_metadata adds (raw, undecoded).
EXIF_USER_COMMENT = "exif:UserComment"
EXIF_PREFIX = "exif:"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# ComfyUI's WebP: 0x0110 (Model) = "prompt:<json>", 0x010F (Make) = "workflow:<json>", further extra_pnginfo keys
# counting down from there (0x010E ImageDescription, ...).
_EXIF_TEXT_TAGS = {0x010D: "DocumentName", 0x010E: "ImageDescription", 0x010F: "Make", 0x0110: "Model",
                   0x0131: "Software", 0x927C: "MakerNote"}
# A graph walk stops after this many nodes: a crafted graph cannot make it run long.
_MAX_STEPS = 20_000


@dataclass(frozen=True)
class FoundPrompt:
    """The positive prompt found in an image's metadata, the format it came from, and why not when there is none."""

    prompt: str | None
    source: str | None  # one of SOURCES; None when no known format was found
    reason: str | None = None  # when prompt is None: why, in a few words
    field: str | None = None  # where in the file: 'parameters', 'EXIF UserComment', 'prompt graph', ...


def _none(reason: str, source: str | None = None, field: str | None = None) -> FoundPrompt:
    return FoundPrompt(None, source, reason, field)


# -- reading the file ----------------------------------------------------------------------------------------

def prompt_from_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      max_bytes: int | None = DEFAULT_MAX_BYTES) -> FoundPrompt:
    """The prompt stored in the image at path; never raises for a bad file (the reason says why there is none)."""
    try:
        info = read_image_metadata(path, max_pixels, max_bytes)
    except ReadError as e:
        return _none(f"unreadable: {e}")
    except Exception as e:  # a Pillow bug on a crafted file: no prompt, not a crash
        return _none(f"unreadable: {type(e).__name__}: {e}")
    return prompt_from_metadata_dict(info)


def read_image_metadata(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict[str, str | bytes]:
    """An image's text metadata, without decoding a pixel: a PNG's text chunks (tEXt, zTXt, iTXt, wherever they
    are), else the text fields Pillow reads from other formats' headers plus the EXIF fields generators write to
    (`exif:UserComment` raw, `exif:Make`, ...); ReadError otherwise.

    The file is opened as for scoring: regular files only, within max_bytes, declared size within max_pixels.
    """
    with image_file(path, max_bytes) as (f, _size), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" UserWarning (at open) would reach stderr
        try:
            with pillow_open(f) as image:  # reads the header only
                check_pixels(image, max_pixels)
                if image.format == "PNG":  # getexif() on a PNG may decode it all to reach an eXIf chunk
                    return dict(png_text(f))
                info: dict[str, str | bytes] = {k: v for k, v in image.info.items()
                                                if isinstance(k, str) and isinstance(v, str)}
                info.update(_exif_fields(image))
                return info
        except Image.UnidentifiedImageError:
            raise ReadError("not an image (unrecognised format)") from None
        except (SyntaxError, ValueError, EOFError, OSError, struct.error) as e:
            raise ReadError(f"cannot read: {e}") from None


def _exif_fields(image: Image.Image) -> dict[str, str | bytes]:
    """The EXIF fields generators use, from the header Pillow has already read (JPEG APP1, WebP EXIF chunk)."""
    try:
        return _exif_tags(image)
    except Exception:  # a broken EXIF block (Pillow raises many kinds): the image and its other fields still count
        return {}


def _exif_tags(image: Image.Image) -> dict[str, str | bytes]:
    exif = image.getexif()
    out: dict[str, str | bytes] = {}
    for tag, name in _EXIF_TEXT_TAGS.items():
        value = exif.get(tag)
        if isinstance(value, (str, bytes)):
            out[EXIF_PREFIX + name] = value
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if comment is None:
        comment = exif.get(_USER_COMMENT)  # Fooocus puts it in IFD0
    if isinstance(comment, (str, bytes)):
        out[EXIF_USER_COMMENT] = comment
    return out


def decode_user_comment(raw: bytes | str) -> str:
    """The text of an EXIF UserComment: an 8-byte charset header (`UNICODE\\0`: UTF-16, by its BOM or else by where
    the zero bytes are, big-endian as A1111 writes it through piexif; `ASCII`; `JIS`; zeros: undefined) or none."""
    if isinstance(raw, str):
        return raw.rstrip("\0")
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            text = body.decode(_utf16_order(body), errors="replace")
    elif head == b"ASCII\0\0\0":
        text = body.decode("utf-8", errors="replace")  # ASCII by the standard; some writers put UTF-8 there
    elif head == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="replace")
    elif head == b"\0" * 8:
        text = body.decode("utf-8", errors="replace")
    else:  # no header at all (written as a plain string)
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0")


def _utf16_order(body: bytes) -> str:
    """utf_16_le when the zero bytes of mostly-Latin text are at odd offsets, else utf_16_be (A1111, piexif)."""
    even = body[0::2].count(0)
    odd = body[1::2].count(0)
    return "utf_16_le" if odd > even else "utf_16_be"


def _exif_text(value: str | bytes) -> str:
    """An EXIF string tag as text: Pillow gives ASCII tags as Latin-1; UTF-8 written there is recovered."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").rstrip("\0")
    try:
        return value.encode("latin-1").decode("utf-8").rstrip("\0")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value.rstrip("\0")


# -- dispatch ------------------------------------------------------------------------------------------------

def prompt_from_metadata_dict(info: dict[str, str | bytes], fmt: str | None = None) -> FoundPrompt:
    """The prompt in an image's metadata fields (PNG text chunks, header fields, `exif:*` from read_image_metadata).

    fmt names one format of SOURCES to try alone; None tries them all in the order of _PARSERS. Pure: reads no file.
    """
    fields = _normalised(info)
    first: FoundPrompt | None = None
    for sources, parse in _PARSERS:
        if fmt is not None and fmt not in sources:
            continue
        found = parse(fields)
        if found is None or (fmt is not None and found.source not in (fmt, None)):  # not this format
            continue
        if found.prompt is not None:
            return found
        first = first or found  # this format, but no prompt: keep looking, report the first reason
    if first is not None:
        return first
    if fmt is not None:
        return _none(f"no {fmt} metadata")
    return _none("no generation metadata" if not fields else
                 f"no known generator's metadata (fields: {', '.join(sorted(fields)[:8])})")


def _normalised(info: dict[str, str | bytes]) -> dict[str, str]:
    """The fields as text: the UserComment decoded by its charset header, EXIF strings as UTF-8, bytes dropped."""
    out: dict[str, str] = {}
    for key, value in info.items():
        if key == EXIF_USER_COMMENT and isinstance(value, (str, bytes)):
            out[key] = decode_user_comment(value)
        elif key.startswith(EXIF_PREFIX) and isinstance(value, (str, bytes)):
            out[key] = _exif_text(value)
        elif isinstance(value, str):
            out[key] = value
    return out


_TOO_DEEP = object()  # what _json gives for a document nested too deep to parse: JSON, though unreadable


def _json(text: str | None) -> Any:
    """The JSON value text holds, _TOO_DEEP when it is nested too deep to parse, None when it is not JSON."""
    if not text or text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return json.loads(text)
    except RecursionError:
        return _TOO_DEEP
    except ValueError:
        return None


def _is_json(text: str) -> bool:
    return _json(text) is not None


def _clean(text: object) -> str | None:
    """text stripped, or None when it is not a non-empty string or is a JSON document."""
    if not isinstance(text, str) or not text.strip() or _is_json(text):
        return None
    return text.strip()


# -- Automatic1111 / Forge / SD.Next, Fooocus, SwarmUI (`parameters`, EXIF UserComment) ----------------------

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
    doc = _json(text)
    if doc is not None:
        return _from_parameters_json(doc, fields, where)
    fooocus = "fooocus_scheme" in fields or _fooocus_software(fields)
    prompt, has_params = a1111_prompt(text)
    source = "fooocus" if fooocus else "automatic1111"
    if where == "EXIF UserComment" and not has_params and not fooocus:
        source = "text"  # a plain comment (a camera's, a user's): not the A1111 format
    if not prompt:
        return _none(f"{where} has an empty prompt", source, where)
    return FoundPrompt(prompt, source, None, where)


def _fooocus_software(fields: dict[str, str]) -> bool:
    return "fooocus" in fields.get(EXIF_PREFIX + "Software", "").lower()


def _from_parameters_json(doc: Any, fields: dict[str, str], where: str) -> FoundPrompt | None:
    """The prompt field of a known JSON document in `parameters` / UserComment, never the document."""
    if not isinstance(doc, dict):
        return _none(f"{where} holds a JSON document of an unknown format", None, where)
    if isinstance(doc.get("sui_image_params"), dict):
        prompt = _clean(doc["sui_image_params"].get("prompt"))
        return FoundPrompt(prompt, "swarmui", None if prompt else "SwarmUI metadata has no prompt", where)
    fooocus = ("fooocus_scheme" in fields or _fooocus_software(fields) or doc.get("metadata_scheme") == "fooocus"
               or str(doc.get("version", "")).lower().startswith("fooocus")
               or "fooocus" in str(doc.get("software", "")).lower())
    if fooocus:
        prompt = _clean(doc.get("prompt", doc.get("Prompt")))
        return FoundPrompt(prompt, "fooocus", None if prompt else "Fooocus metadata has no prompt", where)
    if where == "EXIF UserComment" and ("prompt" in doc or "workflow" in doc):
        return None  # ComfyUI graphs some WebP/JPEG save nodes put there: _from_comfyui reads them
    return _none(f"{where} holds a JSON document of an unknown format", None, where)


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


# -- InvokeAI ------------------------------------------------------------------------------------------------

def _from_invokeai(fields: dict[str, str]) -> FoundPrompt | None:
    """InvokeAI 3+ `invokeai_metadata`, InvokeAI 2 `sd-metadata`, InvokeAI 1 `Dream`, in this order."""
    if "invokeai_metadata" in fields:
        doc = _json(fields["invokeai_metadata"])
        prompt = _clean(doc.get("positive_prompt")) if isinstance(doc, dict) else None
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "invokeai_metadata")
        first = _none("invokeai_metadata has no positive_prompt", "invokeai", "invokeai_metadata")
    else:
        first = None
    if "sd-metadata" in fields:
        prompt = _sd_metadata_prompt(_json(fields["sd-metadata"]))
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "sd-metadata")
        first = first or _none("sd-metadata has no prompt", "invokeai", "sd-metadata")
    if "Dream" in fields:
        match = re.match(r'^\s*"(.*?)"(?:\s+-|\s*$)', fields["Dream"], re.S)
        prompt = _without_invoke_negatives(match.group(1)) if match else None
        if prompt:
            return FoundPrompt(prompt, "invokeai", None, "Dream")
        first = first or _none("Dream has no quoted prompt", "invokeai", "Dream")
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
    return _join([t for t in texts if t])


def _without_invoke_negatives(text: object) -> str | None:
    """An InvokeAI 1/2 prompt without its `[negative]` parts."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s*\[[^\[\]]*\]\s*", " ", text)
    return _clean(re.sub(r"\s+,", ",", text).strip(" ,"))


def _join(texts: list[str]) -> str | None:
    """Several prompt texts as one: distinct texts in order, joined with ', ' (trailing commas dropped)."""
    out: list[str] = []
    for text in texts:
        text = text.strip().rstrip(",").strip()
        if text and text not in out:
            out.append(text)
    return ", ".join(out) if out else None


# -- NovelAI, plain text fields ------------------------------------------------------------------------------

def _from_novelai(fields: dict[str, str]) -> FoundPrompt | None:
    """NovelAI: `Description` holds the prompt, `Comment` JSON the settings (and `prompt` again)."""
    comment = _json(fields.get("Comment"))
    is_nai = fields.get("Software", "").strip() == "NovelAI" or (
        isinstance(comment, dict) and "uc" in comment and ("sampler" in comment or "prompt" in comment))
    if not is_nai:
        return None
    prompt = _clean(fields.get("Description"))
    if prompt:
        return FoundPrompt(prompt, "novelai", None, "Description")
    prompt = _clean(comment.get("prompt")) if isinstance(comment, dict) else None
    if prompt:
        return FoundPrompt(prompt, "novelai", None, "Comment")
    return _none("NovelAI metadata has no prompt", "novelai")


def _from_text(fields: dict[str, str]) -> FoundPrompt | None:
    """A plain text field named `prompt`, `Description` or `description` (never one holding JSON)."""
    for key in ("prompt", "Description", "description"):
        prompt = _clean(fields.get(key))
        if prompt:
            return FoundPrompt(prompt, "text", None, key)
    return None


# -- ComfyUI -------------------------------------------------------------------------------------------------

def _from_comfyui(fields: dict[str, str]) -> FoundPrompt | None:
    """ComfyUI's `prompt` (API graph: what ran) first, then its `workflow` (UI graph), from PNG text chunks, WebP
    EXIF (`prompt:` / `workflow:` prefixes) or a JSON UserComment; None when neither graph is there."""
    api, workflow = _comfy_graphs(fields)
    if api is None and workflow is None:
        return None
    reason = None
    if api is not None:
        prompt, reason = comfy_prompt(api)
        if prompt:
            return FoundPrompt(prompt, "comfyui", None, "prompt graph")
    if workflow is not None:
        graph = workflow_graph(workflow)
        if graph is None:
            reason = reason or "ComfyUI workflow graph has an unknown layout"
        else:
            prompt, wf_reason = comfy_prompt(graph)
            if prompt:
                return FoundPrompt(prompt, "comfyui", None, "workflow graph")
            reason = reason or wf_reason
    return _none(reason or "ComfyUI graph has no prompt", "comfyui")


def _comfy_graphs(fields: dict[str, str]) -> tuple[dict | None, dict | None]:
    """The API graph and the UI graph, each a dict, or None where absent or not JSON."""
    api = _json(fields.get("prompt"))
    workflow = _json(fields.get("workflow"))
    for key, value in fields.items():
        if not key.startswith(EXIF_PREFIX) or key == EXIF_USER_COMMENT:
            continue
        name, sep, rest = value.partition(":")
        if sep and name == "prompt" and api is None:
            api = _json(rest)
        elif sep and name == "workflow" and workflow is None:
            workflow = _json(rest)
    comment = _json(fields.get(EXIF_USER_COMMENT))
    if isinstance(comment, dict):  # save nodes that write {"prompt": {...}, "workflow": {...}} there
        api = api if api is not None else comment.get("prompt")
        workflow = workflow if workflow is not None else comment.get("workflow")
    api = api if isinstance(api, dict) and _looks_like_api_graph(api) else None
    workflow = workflow if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) else None
    return api, workflow


def _looks_like_api_graph(graph: dict) -> bool:
    return any(isinstance(n, dict) and "class_type" in n for n in graph.values())


# Samplers known by name; others are found by their inputs (a `positive` or `guider` and a latent).
_SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "KSampler (Efficient)",
             "KSampler Adv. (Efficient)", "KSampler SDXL (Eff.)", "WanVideoSampler", "FaceDetailer"}
_LATENT_INPUTS = ("latent_image", "latent", "samples", "latents", "image_embeds")
# Where a sampler's positive conditioning comes in: directly, through a guider (SamplerCustomAdvanced: CFGGuider
# `positive`, BasicGuider `conditioning`, DualCFGGuider `cond1`), or text embeds (WanVideoSampler).
_POSITIVE_INPUTS = ("positive", "guider", "conditioning", "cond1", "text_embeds", "base_positive")
# A text encoder's text inputs, by priority: one encoder gives one text, its first non-empty one (SDXL `text_g`
# before `text_l`, Flux `t5xxl` before `clip_l`: the other fields encode the same prompt for the other encoder).
_TEXT_INPUTS = ("text", "prompt", "positive_prompt", "text_g", "t5xxl", "clip_g", "clip_l", "text_l",
                "user_prompt", "mt5xl", "bert", "wildcard_text", "populated_text")
# Inputs of conditioning nodes that never lead to the positive prompt (models, images, masks, negatives).
_SKIP_INPUTS = {"clip", "model", "vae", "image", "images", "pixels", "mask", "control_net", "clip_vision",
                "clip_vision_output", "style_model", "latent", "latent_image", "samples", "upscale_model",
                "negative", "base_negative", "refiner_negative", "noise", "sampler", "sigmas"}
# Output slots of nodes that take and give both conditionings: which input a slot passes on.
_SLOT_INPUTS: dict[str, dict[int, str]] = {"Efficient Loader": {1: "positive", 2: "negative"},
                                           "Eff. Loader SDXL": {1: "positive", 2: "negative"}}
# String nodes: where their text is (PrimitiveNode is the UI's, the others run).
_STRING_INPUTS = ("value", "text", "string", "prompt", "Text", "STRING", "text_a", "string_a")
_SAVE_HINTS = ("save", "videocombine")
_PREVIEW_HINTS = ("preview",)


Graph = dict[str, dict[str, Any]]


def _link(graph: Graph, value: Any) -> tuple[str, int] | None:
    """(node id, output slot) when value is a link [id, slot] to a node of the graph."""
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and str(value[0]) in graph):
        return str(value[0]), value[1]
    return None


def _inputs(node: Any) -> dict[str, Any]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _class(node: Any) -> str:
    ct = node.get("class_type") if isinstance(node, dict) else None
    return ct if isinstance(ct, str) else ""


def _is_sampler(node: Any) -> bool:
    inputs = _inputs(node)
    return _class(node) in _SAMPLERS or (
        ("positive" in inputs or "guider" in inputs) and any(k in inputs for k in _LATENT_INPUTS))


def comfy_prompt(graph: Graph) -> tuple[str | None, str | None]:
    """The positive prompt of a ComfyUI API graph, or (None, why).

    Rule: the output node is a save node (else a preview node, else any node nothing consumes); of several, the one
    with the most sampler passes upstream (the final image of a multi-pass run; ComfyUI writes the same graph into
    every image a run saves, so which output a file came from is not recorded), the lowest node id on a tie. The
    sampler(s) nearest upstream of it made the image; their `positive` input is followed back through
    conditioning nodes (combine, area, ControlNet, reroutes, guiders) to the text encoders. Each encoder gives one
    text (see _TEXT_INPUTS); several distinct texts are joined with ', ' in input order (conditioning_1 first).
    """
    graph = {str(k): v for k, v in graph.items() if isinstance(v, dict)}
    samplers = _final_samplers(graph)
    if not samplers:
        return None, "ComfyUI graph has no sampler upstream of its output"
    texts: list[str] = []
    unresolved: list[str] = []
    for sid in samplers:
        positive = _positive_input(graph, sid)
        if positive is None:
            continue
        for text in _texts_from(graph, positive, unresolved):
            texts.append(text)
    prompt = _join(texts)
    if prompt:
        return prompt, None
    if unresolved:
        return None, f"ComfyUI prompt text comes from a node whose output is not stored ({unresolved[0]})"
    return None, "ComfyUI graph has no text encoder reachable from the sampler's positive input"


def _final_samplers(graph: Graph) -> list[str]:
    """The samplers nearest upstream of the chosen output node (see comfy_prompt), or the lowest-id sampler when
    no output node has one upstream."""
    outputs = _output_nodes(graph)
    best: tuple[int, list[str]] | None = None
    for oid in outputs:
        nearest, passes = _upstream_samplers(graph, oid)
        if nearest and (best is None or passes > best[0]):
            best = (passes, nearest)
    if best is not None:
        return best[1]
    return [nid for nid in _sorted_ids(graph) if _is_sampler(graph[nid])][:1]


def _sorted_ids(ids: Any) -> list[str]:
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def _output_nodes(graph: Graph) -> list[str]:
    consumed = {link[0] for node in graph.values() for v in _inputs(node).values() if (link := _link(graph, v))}
    ids = _sorted_ids(graph)
    for hints in (_SAVE_HINTS, _PREVIEW_HINTS):
        found = [i for i in ids if any(h in _class(graph[i]).lower() for h in hints)]
        if found:
            return found
    return [i for i in ids if i not in consumed]


def _upstream_samplers(graph: Graph, start: str) -> tuple[list[str], int]:
    """The samplers nearest upstream of node start (the walk stops at them), and how many samplers lie upstream
    in all (the number of passes)."""
    nearest: list[str] = []
    seen = {start}
    frontier = [start]
    steps = 0
    while frontier and steps < _MAX_STEPS:
        nid = frontier.pop(0)
        steps += 1
        for value in _inputs(graph[nid]).values():
            link = _link(graph, value)
            if link is None or link[0] in seen:
                continue
            seen.add(link[0])
            if _is_sampler(graph[link[0]]):
                nearest.append(link[0])
            else:
                frontier.append(link[0])
    passes = len([n for n in _closure(graph, nearest) if _is_sampler(graph[n])]) if nearest else 0
    return nearest, passes


def _closure(graph: Graph, starts: list[str]) -> set[str]:
    """Every node upstream of starts, starts included."""
    seen = set(starts)
    stack = list(starts)
    while stack and len(seen) < _MAX_STEPS:
        for value in _inputs(graph[stack.pop()]).values():
            link = _link(graph, value)
            if link and link[0] not in seen:
                seen.add(link[0])
                stack.append(link[0])
    return seen


def _positive_input(graph: Graph, sid: str) -> Any:
    """The value of a sampler's positive conditioning input (a link), through a guider node if it has one."""
    inputs = _inputs(graph[sid])
    for name in _POSITIVE_INPUTS:
        if name not in inputs:
            continue
        if name == "guider":
            link = _link(graph, inputs[name])
            if link is None:
                continue
            guider = _inputs(graph[link[0]])
            for gname in ("positive", "conditioning", "cond1"):
                if gname in guider:
                    return guider[gname]
            continue
        return inputs[name]
    return None


def _texts_from(graph: Graph, start: Any, unresolved: list[str]) -> Iterator[str]:
    """The encoder texts upstream of a conditioning input value, depth first in input order."""
    stack: list[Any] = [start]
    seen: set[tuple[str, int]] = set()
    steps = 0
    while stack and steps < _MAX_STEPS:
        steps += 1
        value = stack.pop()
        if isinstance(value, str):  # a node that takes the prompt as a string input (Efficient Loader)
            if value.strip():
                yield value
            continue
        link = _link(graph, value)
        if link is None or link in seen:
            continue
        seen.add(link)
        node = graph[link[0]]
        if _is_sampler(node):
            continue
        text = _encoder_text(graph, node, unresolved)
        if text is not None:
            if text:
                yield text
            continue
        stack.extend(reversed(_conditioning_inputs(node, link[1])))


def _conditioning_inputs(node: Any, slot: int) -> list[Any]:
    """The inputs to follow from a conditioning node reached through output slot `slot`."""
    inputs = _inputs(node)
    by_slot = _SLOT_INPUTS.get(_class(node))
    if by_slot is not None:
        name = by_slot.get(slot)
        return [inputs[name]] if name in inputs else []
    if "positive" in inputs and "negative" in inputs:  # ControlNetApplyAdvanced & co: (positive, negative) out
        return [inputs["negative" if slot == 1 else "positive"]]
    return [v for k, v in inputs.items() if k not in _SKIP_INPUTS and "negative" not in k.lower()]


def _encoder_text(graph: Graph, node: Any, unresolved: list[str]) -> str | None:
    """The text of a text-encoder node ('' when empty), or None when the node is not a text encoder."""
    inputs = _inputs(node)
    keys = [k for k in _TEXT_INPUTS if k in inputs]
    if not keys and _is_encoder_class(_class(node)):
        keys = [k for k in inputs if k.startswith("widget_")]  # an unknown encoder of a UI graph
    if not keys:
        return None
    for key in keys:
        text = _string_value(graph, inputs[key], unresolved)
        if text and text.strip():
            return text.strip()
    return ""


def _is_encoder_class(ct: str) -> bool:
    return "TextEncode" in ct or "CLIPText" in ct


def _string_value(graph: Graph, value: Any, unresolved: list[str], depth: int = 0) -> str | None:
    """A string input's text: the value itself, or the text of the string node it is linked to (primitive,
    string, concatenate nodes); None when not known (the output of a node that computes it)."""
    if isinstance(value, str):
        return None if _is_json(value) else value
    link = _link(graph, value)
    if link is None or depth > 50:
        return None
    node = graph[link[0]]
    inputs = _inputs(node)
    ct = _class(node)
    if "concat" in ct.lower():
        delimiter = inputs.get("delimiter", "")
        parts = [_string_value(graph, v, unresolved, depth + 1) for k, v in sorted(inputs.items())
                 if k != "delimiter" and (isinstance(v, str) or _link(graph, v))]
        parts = [p for p in parts if p]
        return (delimiter if isinstance(delimiter, str) else "").join(parts) if parts else None
    for key in _STRING_INPUTS + tuple(k for k in inputs if k.startswith("widget_")):
        if key in inputs:
            text = _string_value(graph, inputs[key], unresolved, depth + 1)
            if text is not None:
                return text
    unresolved.append(f"node {link[0]}: {ct or 'unknown'}")
    return None


# -- ComfyUI UI graph (`workflow`) to an API graph -----------------------------------------------------------

# The widget names, in widgets_values order, of the nodes whose widget values are read from a UI graph.
_WIDGETS: dict[str, tuple[str, ...]] = {
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeSDXL": ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g",
                           "text_l"),
    "CLIPTextEncodeSDXLRefiner": ("ascore", "width", "height", "text"),
    "CLIPTextEncodeFlux": ("clip_l", "t5xxl", "guidance"),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl", "empty_padding"),
    "PrimitiveNode": ("value",),
    "PrimitiveString": ("value",),
    "PrimitiveStringMultiline": ("value",),
    "StringConcatenate": ("string_a", "string_b", "delimiter"),
}
_MUTED = 2  # a UI node's mode: 0 always, 2 never (muted), 4 bypassed
_BYPASSED = 4


def workflow_graph(workflow: dict) -> Graph | None:
    """A ComfyUI UI graph (`workflow`) as an API graph: links as [node id, slot] inputs, the widget values of
    text encoders and string nodes by name; muted nodes left out, bypassed nodes and reroutes pass their inputs
    on; None when its layout is unknown."""
    links = _workflow_links(workflow.get("links"))
    nodes = workflow.get("nodes")
    if links is None or not isinstance(nodes, list):
        return None
    graph: Graph = {}
    for node in nodes:
        if not isinstance(node, dict) or "id" not in node or node.get("mode") == _MUTED:
            continue
        ct = str(node.get("type", ""))
        inputs: dict[str, Any] = {}
        for i, inp in enumerate(node.get("inputs") or []):
            if isinstance(inp, dict) and inp.get("link") in links:
                inputs[str(inp.get("name") or f"input_{i}")] = list(links[inp["link"]])
        _add_widgets(inputs, ct, node.get("widgets_values"))
        if node.get("mode") == _BYPASSED or ct == "Reroute":
            inputs = {f"through_{k}": v for k, v in inputs.items() if isinstance(v, list)}
            ct = "Reroute"
        graph[str(node["id"])] = {"class_type": ct, "inputs": inputs}
    _link_get_set_nodes(graph, nodes)
    return graph


def _workflow_links(raw: Any) -> dict[int, tuple[str, int]] | None:
    """link id -> (source node id, source slot), from [id, src, slot, dst, dst_slot, type] lists or objects."""
    if not isinstance(raw, list):
        return None
    links: dict[int, tuple[str, int]] = {}
    for link in raw:
        try:
            if isinstance(link, dict):
                links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))
            else:
                links[link[0]] = (str(link[1]), int(link[2]))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return links


def _add_widgets(inputs: dict[str, Any], ct: str, values: Any) -> None:
    """The node's widget values as named inputs (a linked input keeps its link: its widget value is stale)."""
    if isinstance(values, dict):
        for k, v in values.items():
            inputs.setdefault(str(k), v)
    elif isinstance(values, list):
        names = _WIDGETS.get(ct) or tuple(f"widget_{i}" for i in range(len(values)))
        for name, v in zip(names, values):
            inputs.setdefault(name, v)


def _link_get_set_nodes(graph: Graph, nodes: list) -> None:
    """KJNodes' GetNode/SetNode pairs (links by name, not drawn): a GetNode passes on its SetNode's input."""
    setters: dict[str, Any] = {}
    for node in nodes:
        if isinstance(node, dict) and node.get("type") == "SetNode" and str(node.get("id")) in graph:
            name = (node.get("widgets_values") or [None])[0]
            ins = [v for v in graph[str(node["id"])]["inputs"].values() if isinstance(v, list)]
            if isinstance(name, str) and ins:
                setters[name] = ins[0]
    for node in nodes:
        if isinstance(node, dict) and node.get("type") == "GetNode" and str(node.get("id")) in graph:
            name = (node.get("widgets_values") or [None])[0]
            if isinstance(name, str) and name in setters:
                graph[str(node["id"])] = {"class_type": "Reroute", "inputs": {"through": setters[name]}}


# The parsers in the order they are tried: the explicit formats before the generic text fields. A1111-style
# `parameters` come before the ComfyUI graph: save nodes that write both state the prompt there themselves.
_PARSERS: tuple[tuple[tuple[str, ...], Callable[[dict[str, str]], FoundPrompt | None]], ...] = (
    (("invokeai",), _from_invokeai),
    (("automatic1111", "fooocus", "swarmui", "text"), _from_parameters),
    (("comfyui",), _from_comfyui),
    (("novelai",), _from_novelai),
    (("text",), _from_text),
)
