"""ComfyUI's UI graph (`workflow`) turned into an API graph (`Graph`), so that one walk reads both."""

from __future__ import annotations

from typing import Any

# A ComfyUI API graph: node id -> {"class_type": ..., "inputs": {name: value, or a link [node id, output slot]}}.
Graph = dict[str, dict[str, Any]]

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
