"""Running an export made by `pickrank export onnx` on ONNX Runtime: numpy in, numpy out, no torch or transformers.

An export folder holds the two towers as ONNX graphs (each with its weights in an external data file beside it),
the tokenizer and preprocessor files, and `manifest.json` (which model it came from, hashes, the score's scale, the
parity measured at export time). `OnnxEmbedder` is an `ImageTextEmbedder` (`protocol.py`) over it: the graphs return
the L2-normalised embeddings themselves, so the engine, the cache and the writers get what `model.Embedder` gives,
as numpy arrays (`backend = "onnx"`).

ONNX Runtime loads each graph from its path in the export folder; it refuses external data outside that folder
(absolute paths, `..`), so a crafted graph cannot read other files. Before a run loads them, every file the
manifest lists is checked against its SHA-256 there (`verify_files`, through the hash store: read once per file
version), so a changed or swapped graph or data file is refused, named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pickrank.errors import ModelLoadError, UsageError
from pickrank.inputs.decode import ImageSpec, normalize
from pickrank.models.hashing import HashStore
from pickrank.models.source import (
    MAX_TOKENS,
    ModelInfo,
    ModelSource,
    load_processor_config,
    run_fingerprint,
    vision_gflops,
    with_run_choices,
)

log = logging.getLogger("pickrank")

MANIFEST = "manifest.json"
FORMAT = "pickrank-onnx"  # the manifest's "format": what tells an export folder from a transformers one
FORMAT_VERSION = 1
VISION_GRAPH, TEXT_GRAPH = "vision.onnx", "text.onnx"
# The vision tower's sizes the manifest gives (`torch_embedder.vision_dims`): what `vision_gflops` reads.
VISION_KEYS = ("hidden_size", "patch_size", "num_hidden_layers", "image_size", "intermediate_size", "num_channels")
# The files a run reads besides the graphs' data files: each must have its SHA-256 in the manifest.
READ_FILES = (VISION_GRAPH, TEXT_GRAPH, "tokenizer.json", "preprocessor_config.json")


def is_export(folder: str | None) -> bool:
    """Whether `folder` is a folder with a pickrank ONNX manifest (checked by its "format")."""
    if not folder or not os.path.isfile(os.path.join(folder, MANIFEST)):
        return False
    try:
        return read_manifest(folder).get("format") == FORMAT
    except ModelLoadError:
        return False


def read_manifest(folder: str) -> dict:
    """The export's manifest.json, or a one-line ModelLoadError."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: not a pickrank ONNX manifest")
    return manifest


def check_manifest(folder: str, manifest: dict) -> None:
    """The fields a run reads from an export's manifest (format, scale, the vision tower's sizes), checked: a
    one-line ModelLoadError naming the first that is wrong."""
    path = os.path.join(folder, MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{folder}: not a pickrank ONNX export of format version {FORMAT_VERSION}")
    scale = manifest.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ModelLoadError(f'{path}: "scale" must be a positive number (exp(logit_scale)), not {scale!r}')
    vision = manifest.get("vision")
    if not isinstance(vision, dict) or not all(type(vision.get(k)) is int and vision[k] > 0 for k in VISION_KEYS):
        raise ModelLoadError(f'{path}: "vision" must give the vision tower\'s sizes as positive integers '
                             f"({', '.join(VISION_KEYS)})")


def verify_files(folder: str, manifest: dict, store: HashStore) -> int:
    """Every file the manifest lists against its SHA-256 there (the graphs, their data, the tokenizer and
    preprocessor files must all be listed); how many were checked. A ModelLoadError names the first file that is
    missing, unlisted or changed since the export."""
    path = os.path.join(folder, MANIFEST)
    files = manifest.get("files_sha256")
    if not isinstance(files, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                                              for v in files.values()):
        raise ModelLoadError(f'{path}: "files_sha256" must give each file\'s SHA-256 (export the model again)')
    bad = [n for n in files if n in ("", ".", "..") or os.path.basename(n) != n]
    if bad:
        raise ModelLoadError(f"{path}: {bad[0]!r} is not a file name of the export folder")
    read = {*READ_FILES, *(os.path.basename(p) for p in graph_files(folder))}
    unlisted = sorted(read - set(files))
    if unlisted:
        raise ModelLoadError(f"{path}: no SHA-256 for {unlisted[0]}, which a run reads (export the model again)")
    for name, want in sorted(files.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ModelLoadError(f"{file}: missing from the export (the manifest lists it)")
        got = store.sha256(file)
        if got != want:
            raise ModelLoadError(f"{file}: SHA-256 {got}, but the manifest says {want}: changed since it was "
                                 "exported; export the model again")
    return len(files)


def wants_onnx(backend: str | None, source: ModelSource, given_processor: bool) -> bool:
    """Whether this run uses ONNX Runtime: --backend onnx, or (no --backend) a --model that is an export folder;
    the combinations that cannot work are usage errors."""
    export = source.model_is_local and is_export(source.model)
    if backend == "torch" and export:
        raise UsageError(f"{source.model} is an ONNX export (pickrank export onnx): run it with --backend onnx, "
                         "or leave --backend out")
    if backend == "onnx" and not export:
        raise UsageError(f"--backend onnx needs --model to be a folder made by `pickrank export onnx`; "
                         f"{source.model} is not one")
    if export and (given_processor or source.revision):
        raise UsageError("--processor and --revision do not apply to an ONNX export: it carries its own "
                         "tokenizer and preprocessor")
    return export


def graph_files(folder: str) -> list[str]:
    """The export's graphs and their external data files: its weights."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith((".onnx", ".data"))]


def export_fingerprint(folder: str) -> str:
    """The export's identity for cache keys: its manifest (which names every file's SHA-256) and the graphs' and
    data files' names, sizes and mtimes (a file replaced after the export changes it)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, MANIFEST), "rb") as f:
        h.update(f.read())
    for path in graph_files(folder):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def inspect_export(source: ModelSource, dtype: str = "fp32", alpha: str = "white",
                   decode: str = "exact") -> ModelInfo:
    """What a run knows of an export before its graphs load: preprocessing and cache fingerprint (its own: never
    the torch model's, whose numbers may differ in the last bits)."""
    if dtype != "fp32":
        raise UsageError(f"--dtype {dtype}: an ONNX export runs in fp32 only")
    manifest = read_manifest(source.model)
    check_manifest(source.model, manifest)
    spec = with_run_choices(ImageSpec.from_config(load_processor_config(source.model)), alpha, decode)
    ident = f"onnx:{os.path.abspath(source.model)}@{export_fingerprint(source.model)}"
    return ModelInfo(source, spec, run_fingerprint(ident, dtype, spec), manifest.get("source", {}).get("revision"),
                     dtype, backend="onnx")


@dataclass(frozen=True)
class OnnxDevice:
    """Where ONNX Runtime runs, with what the CLI asks of a torch.device (`.type`, str())."""

    type: str  # "cpu" or "cuda"
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def pick_providers(device: str) -> tuple[OnnxDevice, list]:
    """ONNX Runtime's execution providers for --device: auto is CUDA when onnxruntime-gpu has it, else the CPU."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cpu":
        return OnnxDevice("cpu"), ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError(f"--device {device}: an ONNX export runs on auto, cpu, cuda or cuda:N")
    if not cuda:
        raise UsageError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                         "(pip install onnxruntime-gpu)")
    dev = OnnxDevice("cuda", int(index) if index else None)
    return dev, [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


def open_session(path: str, providers: list) -> Any:
    """An ONNX Runtime session on one graph of the export, or a one-line ModelLoadError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its warnings (unused initialisers, ...) would mix into our stderr
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types, with multi-line texts
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load the ONNX graph: {text}") from None


class ExportTokenizer:
    """The export's tokenizer.json through the `tokenizers` library, padded and truncated as transformers' fast
    CLIP tokenizer does with padding=True, truncation=True, max_length=77."""

    def __init__(self, folder: str) -> None:
        from tokenizers import Tokenizer

        try:
            self.tk = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError(f"{folder}: cannot read tokenizer.json ({e})") from None
        self.tk.no_padding()
        self.tk.no_truncation()
        pad = _special_token(folder, "pad_token") or _special_token(folder, "eos_token")
        self.pad_id = self.tk.token_to_id(pad) if pad else None
        if self.pad_id is None:
            raise ModelLoadError(f"{folder}: the tokenizer names no padding token it knows")
        self.pad = pad

    def lengths(self, texts: list[str]) -> list[int]:
        """Token counts without truncation (bos and eos included)."""
        return [len(e.ids) for e in self.tk.encode_batch(texts)]

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (int64), cut at 77 tokens, padded to the longest."""
        self.tk.enable_truncation(MAX_TOKENS)
        self.tk.enable_padding(pad_id=self.pad_id, pad_token=self.pad)
        try:
            enc = self.tk.encode_batch(texts)
        finally:
            self.tk.no_padding()
            self.tk.no_truncation()
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def _special_token(folder: str, name: str) -> str | None:
    """A special token's text from tokenizer_config.json or special_tokens_map.json (a string or {"content": ...})."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                value = json.load(f).get(name)
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


class OnnxEmbedder:
    """The export's two towers on ONNX Runtime; embeddings come back L2-normalised, fp32, as numpy arrays. The
    vision graph loads on first use (a run answered by the cache never loads it), as the torch embedder's tower."""

    ready = True  # as `loading.LoadingEmbedder.ready`: an OnnxEmbedder is loaded
    backend = "onnx"
    dtype = "float32"

    def __init__(self, info: ModelInfo, manifest: dict, device: OnnxDevice, providers: list,
                 batch_size: int) -> None:
        self.info, self.manifest, self.device, self.providers = info, manifest, device, providers
        self.spec, self.fingerprint = info.spec, info.fingerprint
        self.source, self.revision, self.folder = info.source, info.revision, info.source.model
        self.head = info.head
        self.batch_size = batch_size
        self.scale = float(manifest["scale"])  # exp(logit_scale) as the torch embedder computed it at export
        self.tokenizer = ExportTokenizer(self.folder)
        self.text = open_session(os.path.join(self.folder, TEXT_GRAPH), providers)
        self._vision: Any = None

    @classmethod
    def load(cls, info: ModelInfo, device: str = "auto", batch_size: int | None = None) -> "OnnxEmbedder":
        """Open the export described by `info` (`inspect_export`'s answer) on --device."""
        dev, providers = pick_providers(device)
        return cls(info, read_manifest(info.source.model), dev, providers,
                   batch_size or (32 if dev.type != "cpu" else 8))

    @property
    def vision(self) -> Any:
        if self._vision is None:
            self._vision = open_session(os.path.join(self.folder, VISION_GRAPH), self.providers)
        return self._vision

    def error(self) -> None:
        """Why the load failed: an OnnxEmbedder has loaded (as `loading.LoadingEmbedder.error`)."""
        return None

    @property
    def image_gflops(self) -> float:
        """Approximate GFLOPs of one image through the vision tower (from the manifest)."""
        return vision_gflops(self.manifest["vision"])

    def describe(self) -> dict:
        """Model, revision, device and dtype, for logs and reports (and that ONNX Runtime ran it)."""
        return {"model": self.folder, "revision": self.revision, "device": str(self.device), "dtype": self.dtype,
                "backend": "onnx"}

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Normalised text embeddings (padded to the longest of each chunk of 32, as the torch embedder, cut at 77
        tokens) and truncation flags."""
        truncated = [n > MAX_TOKENS for n in self.tokenizer.lengths(texts)]
        step = max(self.batch_size, 32)
        out = [self.text.run(None, self.tokenizer(texts[i:i + step]))[0] for i in range(0, len(texts), step)]
        return (np.concatenate(out).astype(np.float32, copy=False) if out else np.empty((0, 0), np.float32)), truncated

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised image embeddings (N, D) of decoded uint8 images (N, 3, H, W), batch_size at a time."""
        out = [self.vision.run(None, {"pixel_values": normalize(pixels[i:i + self.batch_size], self.spec)})[0]
               for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.empty((0, 0), np.float32)
