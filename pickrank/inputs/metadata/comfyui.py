"""ComfyUI: the `prompt` API graph (what ran) or the `workflow` UI graph, in PNG text chunks, WebP EXIF or a JSON
UserComment; the positive prompt found by walking the graph from the output node back to the text encoders."""

from __future__ import annotations

import collections
from typing import Any, Iterator

from pickrank.inputs.metadata.comfyui_workflow import Graph, workflow_graph
from pickrank.inputs.metadata.common import FoundPrompt, Parser, is_json, join_texts, json_value, no_prompt
from pickrank.inputs.metadata.exif import EXIF_PREFIX, EXIF_USER_COMMENT

# A graph walk stops after this many nodes: a crafted graph cannot make it run long.
_MAX_STEPS = 20_000
# All the walks over one image's graph visit at most this many node inputs together, and a string built from string
# nodes (concatenations) holds at most this many characters: past either, the graph is not read.
_MAX_WORK = 1_000_000
_MAX_TEXT = 100_000
# String nodes linked to string nodes: followed this deep at most.
_MAX_STRING_DEPTH = 50


class GraphTooComplex(Exception):
    """A graph whose reading would take more than its budget (`_MAX_WORK`, `_MAX_TEXT`)."""


class Budget:
    """The work left for one image's graph: every node visited spends its inputs' count."""

    def __init__(self, work: int = _MAX_WORK) -> None:
        self.left = work

    def spend(self, n: int) -> None:
        self.left -= max(1, n)
        if self.left < 0:
            raise GraphTooComplex(f"ComfyUI graph too complex to read (over {_MAX_WORK:,} steps)")


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
    return no_prompt(reason or "ComfyUI graph has no prompt", "comfyui")


def _comfy_graphs(fields: dict[str, str]) -> tuple[dict | None, dict | None]:
    """The API graph and the UI graph, each a dict, or None where absent or not JSON."""
    api = json_value(fields.get("prompt"))
    workflow = json_value(fields.get("workflow"))
    for key, value in fields.items():
        if not key.startswith(EXIF_PREFIX) or key == EXIF_USER_COMMENT:
            continue
        name, sep, rest = value.partition(":")
        if sep and name == "prompt" and api is None:
            api = json_value(rest)
        elif sep and name == "workflow" and workflow is None:
            workflow = json_value(rest)
    comment = json_value(fields.get(EXIF_USER_COMMENT))
    if isinstance(comment, dict):  # save nodes that write {"prompt": {...}, "workflow": {...}} there
        api = api if api is not None else comment.get("prompt")
        workflow = workflow if workflow is not None else comment.get("workflow")
    api = api if isinstance(api, dict) and _looks_like_api_graph(api) else None
    workflow = workflow if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) else None
    return api, workflow


def _looks_like_api_graph(graph: dict) -> bool:
    """Whether a JSON object is an API graph: nodes with a class_type."""
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


def _link(graph: Graph, value: Any) -> tuple[str, int] | None:
    """(node id, output slot) when value is a link [id, slot] to a node of the graph."""
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and str(value[0]) in graph):
        return str(value[0]), value[1]
    return None


def _inputs(node: Any) -> dict[str, Any]:
    """A node's inputs ({} for anything malformed)."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _class(node: Any) -> str:
    """A node's class_type ('' for anything malformed)."""
    ct = node.get("class_type") if isinstance(node, dict) else None
    return ct if isinstance(ct, str) else ""


def _is_sampler(node: Any) -> bool:
    """Whether a node samples: known by name, or by a positive (or guider) input and a latent one."""
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
    strings = Strings(graph, Budget())
    try:
        samplers = _final_samplers(graph, strings.budget)
        if not samplers:
            return None, "ComfyUI graph has no sampler upstream of its output"
        texts: list[str] = []
        for sid in samplers:
            positive = _positive_input(graph, sid)
            if positive is not None:
                texts.extend(_texts_from(graph, positive, strings))
    except GraphTooComplex as e:
        return None, str(e)
    prompt = join_texts(texts)
    if prompt:
        return prompt, None
    if strings.unresolved:
        return None, f"ComfyUI prompt text comes from a node whose output is not stored ({strings.unresolved[0]})"
    return None, "ComfyUI graph has no text encoder reachable from the sampler's positive input"


def _final_samplers(graph: Graph, budget: Budget) -> list[str]:
    """The samplers nearest upstream of the chosen output node (see comfy_prompt), or the lowest-id sampler when
    no output node has one upstream."""
    outputs = _output_nodes(graph)
    best: tuple[int, list[str]] | None = None
    for oid in outputs:
        nearest, passes = _upstream_samplers(graph, oid, budget)
        if nearest and (best is None or passes > best[0]):
            best = (passes, nearest)
    if best is not None:
        return best[1]
    return [nid for nid in _sorted_ids(graph) if _is_sampler(graph[nid])][:1]


def _sorted_ids(ids: Any) -> list[str]:
    """Node ids in numeric order (ComfyUI's), ids that are not numbers after them."""
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def _output_nodes(graph: Graph) -> list[str]:
    """The graph's output nodes: its save nodes, else its preview nodes, else the nodes nothing consumes."""
    consumed = {link[0] for node in graph.values() for v in _inputs(node).values() if (link := _link(graph, v))}
    ids = _sorted_ids(graph)
    for hints in (_SAVE_HINTS, _PREVIEW_HINTS):
        found = [i for i in ids if any(h in _class(graph[i]).lower() for h in hints)]
        if found:
            return found
    return [i for i in ids if i not in consumed]


def _upstream_samplers(graph: Graph, start: str, budget: Budget) -> tuple[list[str], int]:
    """The samplers nearest upstream of node start (the walk stops at them), and how many samplers lie upstream
    in all (the number of passes)."""
    nearest: list[str] = []
    seen = {start}
    frontier = collections.deque([start])
    steps = 0
    while frontier and steps < _MAX_STEPS:
        nid = frontier.popleft()
        steps += 1
        inputs = _inputs(graph[nid])
        budget.spend(len(inputs))
        for value in inputs.values():
            link = _link(graph, value)
            if link is None or link[0] in seen:
                continue
            seen.add(link[0])
            if _is_sampler(graph[link[0]]):
                nearest.append(link[0])
            else:
                frontier.append(link[0])
    passes = len([n for n in _closure(graph, nearest, budget) if _is_sampler(graph[n])]) if nearest else 0
    return nearest, passes


def _closure(graph: Graph, starts: list[str], budget: Budget) -> set[str]:
    """Every node upstream of starts, starts included."""
    seen = set(starts)
    stack = list(starts)
    while stack and len(seen) < _MAX_STEPS:
        inputs = _inputs(graph[stack.pop()])
        budget.spend(len(inputs))
        for value in inputs.values():
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


def _texts_from(graph: Graph, start: Any, strings: Strings) -> Iterator[str]:
    """The encoder texts upstream of a conditioning input value, depth first in input order."""
    stack: list[Any] = [start]
    seen: set[tuple[str, int]] = set()
    steps = 0
    while stack and steps < _MAX_STEPS:
        steps += 1
        strings.budget.spend(1)
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
        text = _encoder_text(node, strings)
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


def _encoder_text(node: Any, strings: Strings) -> str | None:
    """The text of a text-encoder node ('' when empty), or None when the node is not a text encoder."""
    inputs = _inputs(node)
    keys = [k for k in _TEXT_INPUTS if k in inputs]
    if not keys and _is_encoder_class(_class(node)):
        keys = [k for k in inputs if k.startswith("widget_")]  # an unknown encoder of a UI graph
    if not keys:
        return None
    for key in keys:
        text = strings.value(inputs[key])
        if text and text.strip():
            return text.strip()
    return ""


def _is_encoder_class(ct: str) -> bool:
    """Whether a class_type names a text encoder."""
    return "TextEncode" in ct or "CLIPText" in ct


class Strings:
    """The text of string inputs: the value itself, or the text of the string node it is linked to (primitive,
    string, concatenate nodes), each node's worked out once; a node that feeds itself is no text, and the work and
    the length of what is built are bounded (GraphTooComplex past them)."""

    def __init__(self, graph: Graph, budget: Budget) -> None:
        self.graph, self.budget = graph, budget
        self.memo: dict[str, str | None] = {}
        self.active: set[str] = set()  # the nodes being worked out: met again, they are a cycle
        self.unresolved: list[str] = []  # nodes that compute their text when the graph runs (not stored)

    def value(self, value: Any, depth: int = 0) -> str | None:
        """A string input's text; None when not known."""
        if isinstance(value, str):
            return None if is_json(value) else value
        link = _link(self.graph, value)
        if link is None or depth > _MAX_STRING_DEPTH or link[0] in self.active:
            return None
        nid = link[0]
        if nid not in self.memo:
            self.active.add(nid)
            try:
                self.memo[nid] = self._node_text(nid, depth)
            finally:
                self.active.discard(nid)
        return self.memo[nid]

    def _node_text(self, nid: str, depth: int) -> str | None:
        """The text a string node gives (None when it is not one pickrank can read)."""
        node = self.graph[nid]
        inputs = _inputs(node)
        self.budget.spend(len(inputs))
        ct = _class(node)
        if "concat" in ct.lower():
            delimiter = inputs.get("delimiter", "")
            parts = [self.value(v, depth + 1) for k, v in sorted(inputs.items())
                     if k != "delimiter" and (isinstance(v, str) or _link(self.graph, v))]
            parts = [p for p in parts if p]
            delimiter = delimiter if isinstance(delimiter, str) else ""
            if sum(len(p) + len(delimiter) for p in parts) > _MAX_TEXT:  # before it is built: it may double per level
                raise GraphTooComplex(f"ComfyUI graph builds a prompt of over {_MAX_TEXT:,} characters")
            return delimiter.join(parts) if parts else None
        for key in _STRING_INPUTS + tuple(k for k in inputs if k.startswith("widget_")):
            if key in inputs:
                text = self.value(inputs[key], depth + 1)
                if text is not None:
                    return text
        self.unresolved.append(f"node {nid}: {ct or 'unknown'}")
        return None


PARSER = Parser(("comfyui",), _from_comfyui)
