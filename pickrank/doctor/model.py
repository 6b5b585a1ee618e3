"""The checks of the model itself: where the model and processor load from, the weights (safetensors, complete,
hashes), the architecture and tokenizer against PickScore_v1's, and the preprocessing its processor asks for."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import replace

import numpy as np

from pickrank.devtools import LAION_PREPROCESSOR_CONFIG, PICKSCORE_ARCH
from pickrank.doctor.registry import NOT_CACHED, Registered, Status, Subject, registrar
from pickrank.errors import ModelLoadError
from pickrank.inputs.decode import RESAMPLE_NAMES, ImageSpec
from pickrank.inputs.textfile import loads_json
from pickrank.models.source import PICKLE_SUFFIXES, check_is_clip, check_local_weights

CHECKS: list[Registered] = []  # the checks of the model's files, in the order they run
check = registrar(CHECKS)

# PickScore_v1's architecture, as (config section, key) -> value: CLIP ViT-H/14 with a 77-token text tower.
PICKSCORE_CONFIG: dict[tuple[str, str], int] = {
    **{("vision_config", k): v for k, v in PICKSCORE_ARCH["vision"].items()},
    **{("text_config", k): v for k, v in PICKSCORE_ARCH["text"].items()},
    ("", "projection_dim"): PICKSCORE_ARCH["projection_dim"],
}
# CLIP's BPE ids for a known phrase: another tokenizer (or version) with the same vocabulary size gives others.
KNOWN_TOKENS = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _where(name: str, folder: str | None, offline: bool, option: str) -> tuple[Status, str]:
    """Where a model or processor loads from; a hub id that is not cached is a warning, or offline a failure."""
    if os.path.isdir(name):
        return Status.ok, f"{name} (a local folder)"
    if os.path.exists(name):
        return Status.fail, f"{name}: not a folder"
    if folder is not None:
        return Status.ok, f"{name} (in the Hugging Face cache: {folder})"
    if "/" not in name or name.startswith((".", "/")):
        return Status.fail, f"{name}: no such folder, and not a hub id"
    fix = f"hf download {name}, or give {option} FOLDER"
    if offline:
        return Status.fail, f"{NOT_CACHED}{name}, and the network is off (--offline or HF_HUB_OFFLINE): " \
                            f"download it first ({fix})"
    return Status.warn, f"{NOT_CACHED}{name}; a run downloads it first (for --offline: {fix})"


@check("model")
def check_model(s: Subject) -> tuple[Status, str]:
    """Which model would load, from where, and whether it is a CLIP model (hub commit included) or an ONNX export
    made by `pickrank export onnx` (its manifest checked)."""
    status, where = _where(s.source.model, s.model_dir, s.offline, "--model")
    if status is not Status.ok:
        return status, where
    if s.export is not None:
        from pickrank.models.onnx_embedder import check_manifest

        check_manifest(s.model_dir, s.export)
        made = s.export.get("source", {})
        parity = s.export.get("parity", {}).get("max_score_diff")
        return Status.ok, f"{where}: an ONNX export (pickrank export onnx) of {made.get('model', 'an unnamed model')}" \
                          + (f"; its scores matched torch's within {parity:.1e} when exported" if parity else "")
    revision = check_is_clip(replace(s.source, model=s.model_dir))
    revision = revision or _snapshot_commit(s.model_dir)
    return Status.ok, f"{where}: a CLIP model" + (f", revision {revision}" if revision else "")


def _snapshot_commit(folder: str) -> str | None:
    """The hub commit a snapshot folder of the HF cache holds (None for any other folder)."""
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})$", os.path.abspath(folder))
    return m.group(1) if m else None


@check("processor")
def check_processor(s: Subject) -> tuple[Status, str]:
    """Which processor would load, from where, and the preprocessing its config asks for."""
    status, where = _where(s.source.processor, s.processor_dir, s.offline, "--processor")
    if status is not Status.ok:
        return status, where
    return Status.ok, f"{where}: {_describe_spec(s.spec)}"


def _describe_spec(spec: ImageSpec) -> str:
    """The preprocessing in words: resize, resample, crop."""
    resize = f"shortest edge to {spec.shortest_edge}" if spec.shortest_edge else f"to {spec.resize_hw}"
    crop = f"centre crop {spec.crop_hw[0]}x{spec.crop_hw[1]}" if spec.crop_hw else "no crop"
    return f"resize {resize} ({RESAMPLE_NAMES.get(spec.resample, spec.resample)}), {crop}"


# -- the weights ------------------------------------------------------------------------------------------------


def weight_files(folder: str) -> list[str]:
    """The safetensors files a load reads: model.safetensors, else the shards its index names."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single) or not os.path.exists(index):
        return [single] if os.path.exists(single) else \
            sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    with open(index, encoding="utf-8") as f:
        return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]


@check("weights_format", needs=("model",))
def check_weights_format(s: Subject) -> tuple[Status, str]:
    """The weights are safetensors (a pickle-only folder fails, named: unpickling can run code)."""
    if s.export is not None:
        return Status.ok, "ONNX graphs (vision.onnx, text.onnx), their weights in data files beside them: no pickle"
    if not s.source.model_is_local and not weight_files(s.model_dir):  # a run downloads only the safetensors
        repo = s.source.model
        if s.offline:
            return Status.fail, f"{NOT_CACHED}{repo}'s weights, and the network is off " \
                                f"(--offline or HF_HUB_OFFLINE): download them first (hf download {repo})"
        return Status.warn, f"{NOT_CACHED}{repo}'s weights; a run downloads them first"
    try:
        check_local_weights(s.model_dir)
    except ModelLoadError as e:
        return Status.fail, str(e)
    pickles = sorted(n for n in os.listdir(s.model_dir) if n.endswith(PICKLE_SUFFIXES))
    names = ", ".join(os.path.basename(p) for p in weight_files(s.model_dir))
    ignored = f" ({', '.join(pickles)} beside it: never loaded)" if pickles else ""
    return Status.ok, f"safetensors: {names}{ignored}"


def safetensors_problem(path: str) -> str | None:
    """Why a safetensors file is unreadable or incomplete (its header against its size), or None; no tensor is
    loaded."""
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            return f"truncated: {size} bytes, shorter than its header"
        try:
            return _tensors_problem(loads_json(f.read(n)), size - 8 - n)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"an unreadable header ({type(e).__name__}: {e})"


def _tensors_problem(header: dict, data_size: int) -> str | None:
    """Whether each tensor's bytes match its dtype and shape, and the data section is exactly as long as they."""
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, stop = t["data_offsets"]
        need = int(np.prod(t["shape"], dtype=np.int64)) * _DTYPE_SIZES.get(t["dtype"], 0)
        if stop - begin != need:
            return f"tensor {name}: {stop - begin} bytes for {t['dtype']} {t['shape']}"
        end = max(end, stop)
    if end != data_size:
        return f"truncated: {data_size} bytes of tensor data, the header says {end}" if end > data_size else \
            f"{data_size - end} bytes past the last tensor"
    return None


@check("weights_complete", needs=("weights_format",))
def check_weights_complete(s: Subject) -> tuple[Status, str]:
    """Each weight file is readable and complete: its header's tensors fill exactly its size (an ONNX export: every
    file it lists matches its SHA-256 in the manifest, as a run checks before loading)."""
    if s.export is not None:
        from pickrank.models.onnx_embedder import verify_files

        n = verify_files(s.model_dir, s.export, s.hashes)
        return Status.ok, f"{n} file(s), each as the manifest's SHA-256 says"
    files = weight_files(s.model_dir)
    for path in files:
        problem = safetensors_problem(path)
        if problem:
            return Status.fail, f"{path}: {problem}; download or save it again"
    total = sum(os.path.getsize(p) for p in files)
    return Status.ok, f"{len(files)} file(s), {total / 1e6:.1f} MB: every tensor's bytes are there"


def lfs_sha256(path: str) -> str | None:
    """The SHA-256 the hub gives a file, where the HF cache tells it: its blob is named by it (None elsewhere)."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if real != os.path.abspath(path) and os.path.basename(os.path.dirname(real)) == "blobs" \
            and re.fullmatch(r"[0-9a-f]{64}", name):
        return name
    return None


@check("weights_hashes", needs=("weights_complete",))
def check_weight_hashes(s: Subject) -> tuple[Status, str]:
    """The weight files' SHA-256, compared with the hub revision's where the HF cache knows it."""
    store, said = s.hashes, []  # the doctor writes nothing
    unknown = "no reference: a local folder" if s.source.model_is_local else "no reference: its blob is not named by it"
    if s.export is not None:
        from pickrank.models.onnx_embedder import graph_files

        unknown = "matches the export's manifest"
    for path in graph_files(s.model_dir) if s.export is not None else weight_files(s.model_dir):
        digest, ref = store.sha256(path), lfs_sha256(path)
        if ref is not None and digest != ref:
            return Status.fail, f"{path}: sha256 {digest}, but the hub's is {ref}: a corrupt download; delete " \
                                f"{os.path.realpath(path)} and download it again"
        said.append(f"{os.path.basename(path)} sha256 {digest} "
                    f"({'matches the hub revision' if ref else unknown})")
    return Status.ok, "; ".join(said)


# -- what the model is ------------------------------------------------------------------------------------------


@check("architecture", needs=("model",))
def check_architecture(s: Subject) -> tuple[Status, str]:
    """The architecture against PickScore_v1's (ViT-H/14); another CLIP is said plainly not to be PickScore_v1 (an
    ONNX export: its vision tower, which its manifest records)."""
    diffs = []
    for (section, key), want in PICKSCORE_CONFIG.items():
        have = _config_value(s, section, key)
        if have is None and s.export is not None:  # not recorded in the export's manifest
            continue
        if have != want:
            diffs.append(f"{section.replace('_config', '') + ' ' if section else ''}{key} {have} (PickScore_v1: "
                         f"{want})")
    if diffs:
        more = f", and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        return Status.warn, f"a CLIP model, but NOT PickScore_v1's architecture: {', '.join(diffs[:4])}{more}; " \
                            "its scores are not PickScores"
    if s.export is not None:
        return Status.ok, "PickScore_v1's vision tower (CLIP ViT-H/14: 1280 wide, 32 layers, patch 14, 224 px), as " \
                          "its manifest records it (an export records no more of its architecture)"
    return Status.ok, "PickScore_v1's (CLIP ViT-H/14): vision 1280 wide, 32 layers, 16 heads, patch 14, 224 px; " \
                      "text 1024 wide, 24 layers, vocabulary 49408, 77 positions; projection 1024"


def _config_value(s: Subject, section: str, key: str) -> object:
    """One value of the model's config (an ONNX export: of the vision sizes its manifest records, else None)."""
    if s.export is not None:
        return s.export["vision"].get(key) if section == "vision_config" else None
    config = s.clip_config
    return getattr(getattr(config, section) if section else config, key, None)


@check("tokenizer", needs=("model", "processor"))
def check_tokenizer(s: Subject) -> tuple[Status, str]:
    """The tokenizer fits the model, and is PickScore_v1's (CLIP's BPE: 49408 tokens, known ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s.processor_dir, local_files_only=True, trust_remote_code=False)
    size, room = len(tok), None if s.export is not None else s.clip_config.text_config.vocab_size
    what = f"{type(tok).__name__}, {size} tokens"
    if room is not None and size > room:
        return Status.fail, f"{what}, but the model's text tower has {room}: a tokenizer for another model " \
                            "(give the model's own with --processor)"
    if size != PICKSCORE_CONFIG[("text_config", "vocab_size")]:
        return Status.warn, f"{what}: NOT PickScore_v1's tokenizer (CLIP's BPE, 49408 tokens)"
    text, ids = KNOWN_TOKENS
    got = tok(text)["input_ids"]
    if got != ids:
        return Status.warn, f"{what}, but {text!r} tokenizes as {got}, not CLIP's {ids}: a tokenizer version " \
                            "mismatch changes scores"
    return Status.ok, f"{what}: CLIP's BPE ({text!r} -> {ids})"


@check("preprocessing", needs=("model", "processor"))
def check_preprocessing(s: Subject) -> tuple[Status, str]:
    """The processor's output size is the model's input size; other than PickScore_v1's preprocessing: a warning."""
    spec, side = s.spec, _config_value(s, "vision_config", "image_size")
    out = spec.crop_hw or spec.resize_hw
    if out != (side, side):
        size = f"{out[0]}x{out[1]}" if out else "no fixed size"
        return Status.fail, f"a processor with a different crop size: {size}, but the model takes {side}x{side} " \
                            "images (give the model's own processor with --processor)"
    laion = ImageSpec.from_config(LAION_PREPROCESSOR_CONFIG)
    if replace(spec, alpha=laion.alpha) != laion:
        return Status.warn, f"{_describe_spec(spec)}: NOT PickScore_v1's preprocessing (LAION CLIP-ViT-H-14's)"
    return Status.ok, f"{_describe_spec(spec)}, LAION's mean and std: PickScore_v1's; alpha {spec.alpha}"
