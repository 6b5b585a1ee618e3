"""Where a run's numbers come from: one `Provenance`, computed once per run after the model has loaded.

It names the model (hub id and resolved commit, or folder), the SHA-256 of each weight file (through
`hashing.HashStore`: read once per file, then remembered beside the embedding cache), the processor and a hash of
its tokenizer files, dtype, device (and GPU), backend, the preprocessing, the score's unit, and the versions of the
libraries that shape the numbers. `as_dict()` is what every output that carries it writes.

No torch import at module level: the GPU name is asked of torch only when the model runs on CUDA.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

from pickrank import __version__
from pickrank.inputs.decode import ImageSpec
from pickrank.models.hashing import HashStore
from pickrank.models.source import TOKENIZER_FILES, ModelSource, weight_files
from pickrank.options import Decode, Scale

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

# The distributions whose versions can change a score (Pillow: pickrank's own resize and decode).
_DISTRIBUTIONS = ("torch", "transformers", "Pillow")


@dataclass(frozen=True)
class Provenance:
    """Everything needed to reproduce, or explain, a run's scores (JSON-ready through `as_dict`)."""

    model: str  # hub id, or the folder's absolute path
    revision: str | None  # the hub commit the weights came from; None for a local folder
    weights: dict[str, str]  # weight file name -> SHA-256
    processor: str
    tokenizer_sha256: str | None  # `sha256sum FILES | sha256sum` over `tokenizer_files`, in that order
    tokenizer_files: tuple[str, ...]
    dtype: str
    device: str
    gpu: str | None
    backend: str
    preprocessing: dict[str, object]
    scale: str  # the unit scores are reported in (options.Scale)
    exp_logit_scale: float  # raw = exp_logit_scale * cosine: what converts between the units
    versions: dict[str, str | None] = field(default_factory=dict)
    head: dict | None = None  # the preference head scores go through (--head: its file and SHA-256); None: none

    def as_dict(self) -> dict:
        """A plain, JSON-ready dict (a copy)."""
        d = asdict(self)
        d["tokenizer_files"] = list(self.tokenizer_files)
        return d


def compute(embedder: "ImageTextEmbedder", scale: Scale | str = Scale.raw,
            store: HashStore | None = None) -> Provenance:
    """The provenance of a loaded embedder's run (waits for the load); weight hashes come from `store`; the decode
    mode from the embedder's preprocessing spec (--decode is part of it)."""
    store = store or HashStore()
    source: ModelSource = embedder.source
    described = embedder.describe()
    tok_files = tokenizer_paths(source)
    return Provenance(
        model=os.path.abspath(source.model) if source.model_is_local else source.model,
        revision=embedder.revision,
        weights={os.path.basename(p): store.sha256(p) for p in model_weight_files(embedder.backend, source)},
        processor=os.path.abspath(source.processor) if os.path.isdir(source.processor) else source.processor,
        tokenizer_sha256=files_sha256(tok_files, store) if tok_files else None,
        tokenizer_files=tuple(os.path.basename(p) for p in tok_files),
        dtype=str(described.get("dtype")), device=str(described.get("device")),
        gpu=gpu_name(str(described.get("device"))), backend=embedder.backend,
        preprocessing=preprocessing(embedder.spec, Decode(embedder.spec.decode)),
        scale=Scale(scale).value, exp_logit_scale=float(embedder.scale), versions=versions(),
        head=embedder.head.describe() if embedder.head is not None else None)


def for_run(embedder: "ImageTextEmbedder", scale: Scale | str, cache: str | None) -> dict:
    """A command run's provenance as a dict (waits for the model), weight hashes remembered beside the embedding
    cache (`cache`: --cache; None: the default one)."""
    return compute(embedder, scale, store=HashStore.beside(cache)).as_dict()


def model_weight_files(backend: str, source: ModelSource) -> list[str]:
    """The files the model's weights are in: safetensors for torch, an export's graphs and data files for ONNX."""
    if backend == "onnx":
        from pickrank.models.onnx_embedder import graph_files

        return graph_files(source.model)
    return weight_files(source)


def tokenizer_paths(source: ModelSource) -> list[str]:
    """The tokenizer files of the processor that exist locally (a folder's, or the hub cache's), sorted by name."""
    if os.path.isdir(source.processor):
        found = [os.path.join(source.processor, n) for n in TOKENIZER_FILES]
        return [p for p in found if os.path.isfile(p)]
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(source.processor, n) for n in TOKENIZER_FILES]
    return [p for p in cached if isinstance(p, str)]  # what AutoTokenizer loaded is cached by now


def files_sha256(paths: list[str], store: HashStore) -> str:
    """One SHA-256 over several files: that of `sha256sum` lines ("HASH  NAME\\n"), so a shell can check it."""
    lines = "".join(f"{store.sha256(p)}  {os.path.basename(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def preprocessing(spec: ImageSpec, decode: Decode) -> dict[str, object]:
    """The image preprocessing choices that change pixels: resize, crop, resample, normalisation, alpha, decode."""
    from PIL import Image

    return {"resize_shortest_edge": spec.shortest_edge,
            "resize": list(spec.resize_hw) if spec.resize_hw else None,
            "crop": list(spec.crop_hw) if spec.crop_hw else None,
            "resample": Image.Resampling(spec.resample).name.lower(),
            "rescale_factor": spec.rescale_factor,
            "image_mean": list(spec.image_mean) if spec.image_mean else None,
            "image_std": list(spec.image_std) if spec.image_std else None,
            "convert_rgb": spec.convert_rgb, "alpha": spec.alpha, "decode": decode.value}


def gpu_name(device: str) -> str | None:
    """The CUDA device's name (None elsewhere)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def versions() -> dict[str, str | None]:
    """pickrank's, the libraries' (None when not installed) and Python's versions."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"pickrank": __version__, **{name.lower(): version(name) for name in _DISTRIBUTIONS},
            "python": platform.python_version()}


def summary_lines(p: dict) -> list[str]:
    """The provenance as the labelled lines of a text summary (`pickrank eval`'s table)."""
    weights = ", ".join(f"{name} sha256:{digest}" for name, digest in p["weights"].items())
    where = f"{p['device']} ({p['gpu']})" if p.get("gpu") else p["device"]
    libs = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v is not None)
    head = p.get("head")
    return [f"revision    {p['revision'] or 'local folder'}",
            f"weights     {weights}",
            f"tokenizer   {p['processor']} sha256:{p['tokenizer_sha256']}",
            f"backend     {p['backend']} on {where}, {p['dtype']}",
            f"scale       {p['scale']} (exp(logit_scale) = {p['exp_logit_scale']:.4f})",
            f"versions    {libs}",
            *([f"head        {head['path']} sha256:{head['sha256']}"] if head else [])]
