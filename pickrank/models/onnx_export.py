"""`pickrank export onnx`: the two towers of a CLIP model as ONNX graphs that `onnx_backend` runs without torch.

Exporter: torch.onnx's TorchScript exporter (`dynamo=False`). It traces the towers exactly as `model.Embedder` runs
them (the same modules, sdpa attention) with dynamic batch and text-length axes, and needs nothing beyond torch and
onnx (the dynamo exporter needs onnxscript; optimum is a separate exporter stack around the same tracing). Each graph
ends in the L2 normalisation, so it returns what the engine and the cache keep; its weights always go to an external
data file beside it (`vision.onnx.data`: PickScore's 2.5 GB vision tower is over protobuf's 2 GB limit).

The export is written to a temporary folder beside OUT_DIR, checked there (ONNX Runtime against torch on generated
inputs: any score further than the tolerance refuses the export), and only then renamed to OUT_DIR.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch

from pickrank import __version__
from pickrank.errors import PickrankError, UsageError
from pickrank.models.hashing import HashStore, sha256_file
from pickrank.models.onnx_embedder import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TEXT_GRAPH,
    VISION_GRAPH,
    OnnxEmbedder,
    inspect_export,
    is_export,
)
from pickrank.models.source import MAX_TOKENS, ModelSource, inspect_model, resolve_source, weight_files
from pickrank.models.torch_embedder import Embedder, vision_dims
from pickrank.options import ModelOptions

log = logging.getLogger("pickrank")

OPSET = 17
TOLERANCE = 1e-4  # the largest score difference (fp32) an export may show against torch
# Generated prompts for the parity check: short, padded, and one over 77 tokens (truncated on both sides).
PARITY_PROMPTS = ("a cat", "a photo of a red cat sitting on a blue sofa in the sun",
                  "an astronaut riding a horse on the moon, digital art, " * 12, "x")
PARITY_IMAGES = 4


class ExportError(PickrankError):
    """An export that cannot be made or that failed its check (nothing is left in OUT_DIR)."""


class VisionGraph(torch.nn.Module):
    """The vision tower with the L2 normalisation: pixel_values (N, 3, H, W) -> image_embeds (N, D)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.tower(pixel_values=pixel_values).image_embeds, dim=-1)


class TextGraph(torch.nn.Module):
    """The text tower with the L2 normalisation: input_ids, attention_mask (N, L) -> text_embeds (N, D)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.tower(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        return torch.nn.functional.normalize(out, dim=-1)


def check_out_dir(out_dir: str) -> None:
    """OUT_DIR may be missing, an empty folder, or an earlier export (replaced); anything else is refused."""
    if not out_dir.strip():
        raise UsageError("OUT_DIR is empty: give a new (or empty) folder for the export")
    if not os.path.lexists(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        if not os.path.isdir(parent):
            raise UsageError(f"{out_dir}: its folder {parent} does not exist")
        return
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: exists and is not a folder; give a new folder for the export")
    if os.listdir(out_dir) and not is_export(out_dir):
        raise UsageError(f"{out_dir}: a folder that is not empty and not a pickrank ONNX export; it is left as it "
                         "is: give a new or empty folder")


def export_graph(module: torch.nn.Module, args: tuple, names: dict[str, dict[int, str]], output: str,
                 folder: str, name: str) -> None:
    """Trace `module` to folder/name, its weights in folder/name.data (dynamic axes as `names` says)."""
    import onnx

    scratch = tempfile.mkdtemp(dir=folder, prefix=".trace-")
    try:
        raw = os.path.join(scratch, name)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python conditionals: checked by the parity run
            torch.onnx.export(module, args, raw, dynamo=False, opset_version=OPSET, input_names=list(names),
                              output_names=[output], dynamic_axes={**names, output: {0: "batch"}},
                              do_constant_folding=True)
        graph = onnx.load(raw)  # a graph over 2 GB comes out as one file per tensor: gathered into one below
        onnx.save_model(graph, os.path.join(folder, name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=0)
        del graph
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_towers(embedder: Embedder, folder: str) -> None:
    """Both towers as graphs in `folder` (dynamic batch; dynamic text length)."""
    h, w = embedder.spec.crop_hw or (224, 224)
    pixels = torch.zeros(1, 3, h, w)
    export_graph(VisionGraph(embedder.model.vision).eval(), (pixels,), {"pixel_values": {0: "batch"}},
                 "image_embeds", folder, VISION_GRAPH)
    enc = embedder.tokenizer(list(PARITY_PROMPTS[:2]), padding=True, return_tensors="pt")
    text_axes = {0: "batch", 1: "sequence"}
    export_graph(TextGraph(embedder.model.text).eval(), (enc["input_ids"], enc["attention_mask"]),
                 {"input_ids": text_axes, "attention_mask": text_axes}, "text_embeds", folder, TEXT_GRAPH)


def copy_processor_files(embedder: Embedder, folder: str) -> None:
    """The tokenizer (tokenizer.json and its configs, as transformers saves them) and preprocessor_config.json."""
    from pickrank.models.source import load_processor_config

    embedder.tokenizer.save_pretrained(folder)
    cfg = load_processor_config(embedder.source.processor, embedder.source.offline)
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def source_weight_hashes(source: ModelSource) -> dict[str, str]:
    """SHA-256 of each weight file of the source model (remembered beside the cache: the provenance's too)."""
    store = HashStore()
    return {os.path.basename(p): store.sha256(p) for p in weight_files(source)}


def parity(embedder: Embedder, export: OnnxEmbedder, seed: int = 0) -> dict:
    """Both backends on generated inputs (random images, PARITY_PROMPTS): the largest differences."""
    rng = np.random.default_rng(seed)
    h, w = embedder.spec.crop_hw or (224, 224)
    pixels = rng.integers(0, 256, size=(PARITY_IMAGES, 3, h, w), dtype=np.uint8)
    texts = list(PARITY_PROMPTS)
    t_text, t_cut = embedder.embed_texts(texts)
    o_text, o_cut = export.embed_texts(texts)
    t_img, o_img = embedder.embed_images(pixels).numpy(), export.embed_images(pixels)
    t_scores = embedder.scale * (t_text.numpy() @ t_img.T)
    o_scores = export.scale * (o_text @ o_img.T)
    return {"images": PARITY_IMAGES, "prompts": len(texts), "tolerance": TOLERANCE,
            "truncation_agrees": t_cut == o_cut,
            "max_score_diff": float(np.abs(t_scores - o_scores).max()),
            "max_text_embedding_diff": float(np.abs(t_text.numpy() - o_text).max()),
            "max_image_embedding_diff": float(np.abs(t_img - o_img).max())}


def check_parity(figures: dict) -> None:
    """ExportError unless ONNX Runtime gave torch's scores within the tolerance (and the same truncation)."""
    if not figures["truncation_agrees"] or not figures["max_score_diff"] <= figures["tolerance"]:
        raise ExportError(f"the ONNX graphs do not reproduce torch's scores: max score difference "
                          f"{figures['max_score_diff']:.3g} (tolerance {figures['tolerance']:g}), truncation "
                          f"{'agrees' if figures['truncation_agrees'] else 'differs'}; export refused")


def manifest_for(embedder: Embedder, folder: str, figures: dict) -> dict:
    """What the export is: source, hashes of the source weights and of every file written, versions, parity."""
    src = embedder.source
    files = {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n != MANIFEST}
    return {**runtime_fields(embedder), "pickrank_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": src.model if not src.model_is_local else os.path.abspath(src.model),
                       "processor": src.processor, "revision": embedder.revision, "fingerprint": embedder.fingerprint},
            "source_weights_sha256": source_weight_hashes(src), "files_sha256": files,
            "exporter": f"torch.onnx TorchScript exporter, torch {torch.__version__}", "opset": OPSET,
            "outputs": "L2-normalised fp32 embeddings (image_embeds, text_embeds); score = scale * text . image",
            "logit_scale": float(embedder.model.logit_scale.detach().float().item()), "max_tokens": MAX_TOKENS,
            "parity": figures}


def runtime_fields(embedder: Embedder) -> dict:
    """What `OnnxEmbedder` reads from the manifest: its format, the score's scale, the vision tower's size."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "scale": embedder.scale,
            "vision": vision_dims(embedder.model.config.vision_config)}


def write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def build_export(embedder: Embedder, folder: str) -> dict:
    """Write and check a whole export in `folder`; its manifest."""
    export_towers(embedder, folder)
    copy_processor_files(embedder, folder)
    write_manifest(folder, runtime_fields(embedder))  # enough for the ONNX embedder to open the folder for the check
    onnx_embedder = OnnxEmbedder.load(inspect_export(resolve_source(folder)), device="cpu")
    figures = parity(embedder, onnx_embedder)
    log.info("parity with torch: max score difference %.3g, embeddings %.3g (text) / %.3g (image)",
             figures["max_score_diff"], figures["max_text_embedding_diff"], figures["max_image_embedding_diff"])
    check_parity(figures)
    os.remove(os.path.join(folder, MANIFEST))
    manifest = manifest_for(embedder, folder, figures)
    write_manifest(folder, manifest)
    return manifest


def share_as_umask_allows(folder: str) -> None:
    """The modes a plain mkdir and open would give (mkdtemp and onnx's data files are private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def put_in_place(tmp: str, out_dir: str) -> None:
    """Rename the finished export to out_dir, replacing an empty folder or an earlier export."""
    share_as_umask_allows(tmp)
    check_out_dir(out_dir)  # again: it may have changed during the export
    old = None
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(tmp), prefix=".pickrank-old-export-")
        os.rename(out_dir, os.path.join(old, "x"))
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx(options: ModelOptions, out_dir: str) -> dict:
    """Export the model of `options` (fp32, on the CPU) to out_dir; its manifest. Nothing is left behind on
    failure or interrupt."""
    check_out_dir(out_dir)
    source = resolve_source(options.model, options.processor, options.revision, options.offline)
    embedder = Embedder.load(source, device="cpu", dtype="fp32", info=inspect_model(source, "fp32"))
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.exporting-")
    try:
        manifest = build_export(embedder, tmp)
        put_in_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
