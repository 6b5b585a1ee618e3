"""`pickrank doctor`: the checks a user runs before trusting their numbers, each a small function returning a `Check`.

Nothing here uses the network: a hub model is looked at in the local Hugging Face cache only (what `--offline`
would find). The known-answer self-test compares pickrank's own preprocessing with transformers' Pillow CLIP image
processor on generated images, and the score of a generated pair through the `Engine` with the reference math
(transformers' CLIPModel: `logit_scale.exp() * cosine`). torch and transformers are imported inside the checks that
need them, so that a broken install fails those checks instead of the command.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import struct
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from pickrank.devtools import LAION_PREPROCESSOR_CONFIG, PICKSCORE_ARCH
from pickrank.errors import PickrankError
from pickrank.inputs.decode import RESAMPLE_NAMES, ImageSpec
from pickrank.models.source import (
    _WEIGHT_SUFFIXES,
    ModelSource,
    check_is_clip,
    check_local_weights,
    hub_offline,
    load_processor_config,
    resolve_source,
)
from pickrank.options import CacheOptions, ModelOptions


class Status(str, Enum):
    """A check's outcome: ok, warn (worth knowing, the numbers still hold) or fail (they do not: exit 1)."""

    ok = "ok"
    warn = "warn"
    fail = "fail"


@dataclass(frozen=True)
class Check:
    """One check's record: its name, outcome and a one-line detail (what was found, or what to do)."""

    name: str
    status: Status
    detail: str


class ChecksFailed(PickrankError):
    """Some checks failed (exit 1): the message names them."""


# PickScore_v1's architecture, as (config section, key) -> value: CLIP ViT-H/14 with a 77-token text tower.
PICKSCORE_CONFIG: dict[tuple[str, str], int] = {
    **{("vision_config", k): v for k, v in PICKSCORE_ARCH["vision"].items()},
    **{("text_config", k): v for k, v in PICKSCORE_ARCH["text"].items()},
    ("", "projection_dim"): PICKSCORE_ARCH["projection_dim"],
}
# CLIP's BPE ids for a known phrase: another tokenizer (or version) with the same vocabulary size gives others.
KNOWN_TOKENS = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])
# How a detail starts when the check found nothing to look at: the checks that need it are not run.
NOT_CACHED = "not in the Hugging Face cache: "
NOT_CHECKED = "not checked: needs "
SELFTEST_PROMPT = "a red circle on a blue background"
SCORE_TOLERANCE = 1e-4  # the Engine against the reference math, both fp32 on the CPU
PIXEL_TOLERANCE = 1e-5  # normalised pixels: one grey level is 1/255/std, about 0.0146
DEVICE_TOLERANCE = 1e-2  # the run's device and precision against the fp32 reference: a difference a table shows
_SAMPLES = (((300, 200), "RGB"), ((201, 333), "L"), ((97, 603), "P"), ((20, 30), "RGB"))  # the last: below the crop
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


@dataclass(frozen=True)
class Subject:
    """What the checks look at, resolved once: the model source and the local folders it would load from."""

    source: ModelSource  # offline=True for hub ids: the doctor looks in the local cache only
    offline: bool  # whether a run may not download (--offline or HF_HUB_OFFLINE)
    model_dir: str | None  # the local folder, or the hub snapshot in the HF cache; None: not there
    processor_dir: str | None
    options: ModelOptions
    cache: CacheOptions

    @cached_property
    def spec(self) -> ImageSpec:
        """The preprocessing a run would use: the processor's config, with --alpha."""
        config = load_processor_config(self.processor_dir or self.source.processor, offline=True)
        return replace(ImageSpec.from_config(config), alpha=self.options.alpha.value)

    @cached_property
    def clip_config(self) -> object:
        """The model's CLIPConfig, with transformers' defaults filled in."""
        from transformers import CLIPConfig

        return CLIPConfig.from_pretrained(self.model_dir, local_files_only=True)

    @cached_property
    def pair(self) -> tuple[bytes, bytes]:
        """The self-test's two generated images (PNG)."""
        return picture((320, 240), seed=1), picture((240, 320), seed=2)

    @cached_property
    def reference_scores(self) -> list[float]:
        """The self-test pair's scores by the reference math (transformers, fp32, CPU)."""
        return reference_scores(self, SELFTEST_PROMPT, self.pair)


# -- the registry: each check a function of the Subject, run in order; `needs` names checks that must not fail ---

_CHECKS: list[tuple[str, tuple[str, ...], Callable[[Subject], Check]]] = []


def check(name: str, needs: tuple[str, ...] = ()) -> Callable:
    """Register a check: the function returns (status, detail); the registered one returns the `Check`."""

    def register(fn: Callable[[Subject], tuple[Status, str]]) -> Callable[[Subject], Check]:
        @functools.wraps(fn)
        def run(subject: Subject) -> Check:
            return Check(name, *fn(subject))

        _CHECKS.append((name, needs, run))
        return run

    return register


def run_checks(model: ModelOptions, cache: CacheOptions, debug: bool = False) -> list[Check]:
    """Every check in order; one that needs a failed check is not run (a warning saying which), one that crashes
    fails with the exception's text (with `debug`, raises it)."""
    _quiet_transformers()
    subject = make_subject(model, cache)
    done: dict[str, Check] = {}
    for name, needs, fn in _CHECKS:
        blocked = [n for n in needs if _blocks(done[n])]
        done[name] = (Check(name, Status.warn, f"{NOT_CHECKED}{', '.join(blocked)}") if blocked
                      else _guarded(name, fn, subject, debug))
    return list(done.values())


def _blocks(c: Check) -> bool:
    """Whether a check's outcome stops those that need it: a failure, or a warning that it found nothing to check."""
    return c.status is Status.fail or c.detail.startswith((NOT_CHECKED, NOT_CACHED))


def _guarded(name: str, fn: Callable[[Subject], Check], subject: Subject, debug: bool) -> Check:
    """fn(subject); an exception becomes a failed check (a broken install must be reported, not crash the doctor)."""
    try:
        return fn(subject)
    except Exception as e:  # whatever torch, transformers or a file raise: the text is what the user needs
        if debug:  # --debug: the traceback
            raise
        return Check(name, Status.fail, _one_line(e))


def _one_line(e: Exception) -> str:
    """pickrank's own message (one line for users already), else the exception's type and first line."""
    if isinstance(e, PickrankError):
        return str(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def failed(checks: list[Check]) -> list[str]:
    """The names of the failed checks."""
    return [c.name for c in checks if c.status is Status.fail]


def _quiet_transformers() -> None:
    """transformers' load reports and progress bars would mix into the doctor's output."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # a broken transformers: the checks that need it say so
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# -- where the model and processor are ------------------------------------------------------------------------

def make_subject(model: ModelOptions, cache: CacheOptions) -> Subject:
    """Resolve the options as a run does, and find the local folders (never the network)."""
    source = resolve_source(model.model, model.processor, model.revision, model.offline)
    offline = hub_offline(source.offline)
    model_dir = source.model if source.model_is_local else cached_dir(source.model, "config.json", source.revision)
    processor_dir = source.processor if os.path.isdir(source.processor) else \
        cached_dir(source.processor, "preprocessor_config.json", None)
    return Subject(replace(source, offline=True), offline, model_dir, processor_dir, model, cache)


def cached_dir(repo: str, filename: str, revision: str | None) -> str | None:
    """The snapshot folder holding the repo's file in the local Hugging Face cache, or None (no network asked)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


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
    """Which model would load, from where, and whether it is a CLIP model (hub commit included)."""
    status, where = _where(s.source.model, s.model_dir, s.offline, "--model")
    if status is not Status.ok:
        return status, where
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
    from pickrank.errors import ModelLoadError

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
    pickles = sorted(n for n in os.listdir(s.model_dir) if n.endswith(_WEIGHT_SUFFIXES[1:]))
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
            return _tensors_problem(json.loads(f.read(n)), size - 8 - n)
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
    """Each weight file is readable and complete: its header's tensors fill exactly its size."""
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
    from pickrank.models.hashing import HashStore

    store, said = HashStore.beside(s.cache.cache), []
    unknown = "no reference: a local folder" if s.source.model_is_local else "no reference: its blob is not named by it"
    for path in weight_files(s.model_dir):
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
    """The architecture against PickScore_v1's (ViT-H/14); another CLIP is said plainly not to be PickScore_v1."""
    config = s.clip_config
    diffs = []
    for (section, key), want in PICKSCORE_CONFIG.items():
        have = getattr(getattr(config, section) if section else config, key, None)
        if have != want:
            diffs.append(f"{section.replace('_config', '') + ' ' if section else ''}{key} {have} (PickScore_v1: "
                         f"{want})")
    if diffs:
        more = f", and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        return Status.warn, f"a CLIP model, but NOT PickScore_v1's architecture: {', '.join(diffs[:4])}{more}; " \
                            "its scores are not PickScores"
    return Status.ok, "PickScore_v1's (CLIP ViT-H/14): vision 1280 wide, 32 layers, 16 heads, patch 14, 224 px; " \
                      "text 1024 wide, 24 layers, vocabulary 49408, 77 positions; projection 1024"


@check("tokenizer", needs=("model", "processor"))
def check_tokenizer(s: Subject) -> tuple[Status, str]:
    """The tokenizer fits the model, and is PickScore_v1's (CLIP's BPE: 49408 tokens, known ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s.processor_dir, local_files_only=True, trust_remote_code=False)
    size, room = len(tok), s.clip_config.text_config.vocab_size
    what = f"{type(tok).__name__}, {size} tokens"
    if size > room:
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
    spec, side = s.spec, s.clip_config.vision_config.image_size
    out = spec.crop_hw or spec.resize_hw
    if out != (side, side):
        size = f"{out[0]}x{out[1]}" if out else "no fixed size"
        return Status.fail, f"a processor with a different crop size: {size}, but the model takes {side}x{side} " \
                            "images (give the model's own processor with --processor)"
    laion = ImageSpec.from_config(LAION_PREPROCESSOR_CONFIG)
    if replace(spec, alpha=laion.alpha) != laion:
        return Status.warn, f"{_describe_spec(spec)}: NOT PickScore_v1's preprocessing (LAION CLIP-ViT-H-14's)"
    return Status.ok, f"{_describe_spec(spec)}, LAION's mean and std: PickScore_v1's; alpha {spec.alpha}"


# -- the environment ----------------------------------------------------------------------------------------------

def reference_image_processor(folder: str) -> object:
    """transformers' Pillow CLIP image processor for the folder: the reference (transformers 5 names the backend;
    4 calls it the slow one)."""
    from transformers import AutoImageProcessor

    kw = {"backend": "pil"} if _backends() else {"use_fast": False}
    return AutoImageProcessor.from_pretrained(folder, local_files_only=True, **kw)


def _backends() -> tuple[type, type] | None:
    """transformers 5's (Pillow, torchvision) image-processor base classes; None before 5."""
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError:
        return None
    return PilBackend, TorchvisionBackend


def backend_of(processor: object) -> str:
    """Which library an image processor resizes with: Pillow (the reference) or torchvision."""
    bases = _backends()
    if bases is None:
        return "torchvision" if type(processor).__name__.endswith("Fast") else "Pillow"
    return "Pillow" if isinstance(processor, bases[0]) else \
        "torchvision" if isinstance(processor, bases[1]) else type(processor).__name__


@check("image_processor", needs=("processor",))
def check_image_processor(s: Subject) -> tuple[Status, str]:
    """transformers' version, and which image-processor backend AutoImageProcessor picks in this environment."""
    import transformers
    from transformers import AutoImageProcessor

    picked = AutoImageProcessor.from_pretrained(s.processor_dir, local_files_only=True)
    what = f"transformers {transformers.__version__}: AutoImageProcessor picks {type(picked).__name__}"
    if backend_of(picked) != "Pillow":
        return Status.warn, f"{what} ({backend_of(picked)}), not the Pillow reference: the model card's code gives " \
                            "other scores here (up to 0.014); pickrank's own preprocessing is Pillow's either way"
    return Status.ok, f"{what} (Pillow: the reference, as pickrank's own preprocessing)"


def _devices() -> list[str]:
    """The device types torch can use here: cpu, and cuda or mps where available."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else []),
            *(["mps"] if mps is not None and mps.is_available() else [])]


@check("torch")
def check_torch(s: Subject) -> tuple[Status, str]:
    """torch's version, and the devices it sees (GPU names)."""
    import torch

    from pickrank.models.torch_embedder import pick_device

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cuda = f"CUDA {torch.version.cuda}: {names}"
    else:
        cuda = "CUDA: none" + ("" if torch.version.cuda else " (a CPU-only build)")
    mps = "MPS: yes" if "mps" in _devices() else "MPS: no"
    return Status.ok, f"torch {torch.__version__}; {cuda}; {mps}; --device auto picks {pick_device('auto')}"


def _runs(device: str, dtype: str) -> bool:
    """Whether pickrank runs this dtype on this device type (its own refusals: `model.check_dtype`)."""
    import torch

    from pickrank.errors import UsageError
    from pickrank.models.torch_embedder import check_dtype

    try:
        check_dtype(dtype, torch.device(device))
    except UsageError:
        return False
    return not (device == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported())


@check("precision")
def check_precision(s: Subject) -> tuple[Status, str]:
    """Which of fp16/bf16 each device runs, and whether this run's --device and --dtype can run."""
    from pickrank.errors import UsageError
    from pickrank.models.torch_embedder import check_dtype, pick_device

    support = "; ".join(f"{d}: fp32 yes, " + ", ".join(f"{t} {'yes' if _runs(d, t) else 'no'}"
                                                      for t in ("fp16", "bf16")) for d in _devices())
    try:
        device = pick_device(s.options.device)
        check_dtype(s.options.dtype.value, device)
    except UsageError as e:
        return Status.fail, f"{support}; this run cannot: {e}"
    return Status.ok, f"{support}; this run: {device}, {s.options.dtype.value}"


@check("cache")
def check_cache(s: Subject) -> tuple[Status, str]:
    """The embedding cache's health and size, looked at read-only (nothing is made, moved or written)."""
    from pickrank.core.cache import EmbeddingCache, default_cache_path

    if s.cache.no_cache:
        return Status.ok, "not used (--no-cache)"
    path = Path(s.cache.cache) if s.cache.cache else default_cache_path()
    if not os.path.lexists(path):
        return Status.ok, f"{path}: none yet (the first run makes it)"
    c = EmbeddingCache(path, warn=False, peek=True)
    try:
        if c.not_ours:
            return Status.warn, f"{c.problem}: runs go on without a cache"
        if c.problem is not None:
            return Status.fail, f"{c.problem}; unreadable: a run moves it aside (.corrupt-*) and starts a new one"
        if path.stat().st_size == 0:
            return Status.ok, f"{path}: empty (the first run makes the cache in it)"
        info = c.info()
    finally:
        c.close()
    said = f"{path}: {info.entries} entries, {info.size_bytes / 1e6:.1f} MB, {len(info.models)} model(s)"
    if info.read_only:
        return Status.warn, f"{said}; read-only: runs use its entries but save no new ones"
    return Status.ok, said


def picture(size: tuple[int, int], seed: int, mode: str = "RGB") -> bytes:
    """A deterministic generated picture as PNG bytes: a gradient with a few ellipses (differs per seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
    base = (ramp + np.linspace(0, 255, h, dtype=np.float32)[:, None, None] * rng.random(3, dtype=np.float32)) / 2
    im = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x, y, x + int(rng.integers(1, w + 1)), y + int(rng.integers(1, h + 1))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    (im if mode == "RGB" else im.convert(mode)).save(buf, format="PNG")
    return buf.getvalue()


def _spec(s: Subject) -> ImageSpec:
    """The run's preprocessing, or the default one when the model's files cannot tell it."""
    try:
        return s.spec
    except (PickrankError, OSError, ValueError):
        return ImageSpec()


@check("decode_workers")
def check_decode_workers(s: Subject) -> tuple[Status, str]:
    """The decode worker pool starts, decodes one generated image and shuts down (timed)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
    from pickrank.inputs.files import ReadError
    from pickrank.inputs.workers import close_pool, decode_job, worker_pool
    from pickrank.signals import signals_deferred

    start = time.perf_counter()
    pool = worker_pool(1)
    try:
        with signals_deferred():
            job = pool.submit(decode_job, "doctor", picture((640, 480), seed=0), _spec(s), DEFAULT_MAX_PIXELS)
        out = job.result(timeout=120)
    except FutureTimeout:
        pool.shutdown(wait=False, cancel_futures=True)
        return Status.fail, "a decode worker gave no answer within 120 s"
    close_pool(pool)
    if isinstance(out, ReadError):
        return Status.fail, f"a decode worker could not decode a generated PNG: {out}"
    took = time.perf_counter() - start
    return Status.ok, f"a worker process started, decoded a generated 640x480 PNG to {out.pixels.shape} and shut " \
                      f"down in {took:.2f} s"


# -- the known-answer self-test -----------------------------------------------------------------------------------

@check("selftest_preprocessing", needs=("processor",))
def check_selftest_preprocessing(s: Subject) -> tuple[Status, str]:
    """pickrank's preprocessing against transformers' Pillow CLIP processor on generated images (pixel-exact)."""
    from pickrank.inputs.decode import decode_and_preprocess, normalize

    ref, spec, worst = reference_image_processor(s.processor_dir), s.spec, 0.0
    for i, (size, mode) in enumerate(_SAMPLES):
        data = picture(size, seed=10 + i, mode=mode)
        mine = normalize(decode_and_preprocess("doctor", data, spec).pixels[None], spec)[0]
        theirs = ref(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
        if mine.shape != theirs.shape:
            return Status.fail, f"a generated {size[0]}x{size[1]} {mode} image: pickrank makes {mine.shape}, " \
                                f"{type(ref).__name__} {theirs.shape}"
        worst = max(worst, float(np.abs(mine - theirs).max()))
    verdict = f"{len(_SAMPLES)} generated images (RGB, L, P, one smaller than the crop) against " \
              f"{type(ref).__name__}: max |difference| {worst:.1e}"
    if worst > PIXEL_TOLERANCE:
        return Status.fail, f"{verdict}, over {PIXEL_TOLERANCE:g} (one grey level is about 0.0146): pickrank's " \
                            "preprocessing is not the reference's here"
    return Status.ok, f"{verdict}: pixel-exact"


def engine_scores(s: Subject, prompt: str, images: tuple[bytes, ...], device: str, dtype: str) -> list[float]:
    """The images' scores for the prompt through the real path: a model loaded as a run loads it, the `Engine`."""
    from pickrank.core.cache import NullCache
    from pickrank.core.engine import Engine
    from pickrank.models.loading import load_in_background
    from pickrank.options import RunOptions
    from pickrank.records import CandidateSet, ImageBytes, Query

    embedder = load_in_background(s.source, device=device, dtype=dtype, alpha=s.options.alpha.value)
    names = [f"doctor-{i}.png" for i in range(len(images))]
    cset = CandidateSet(queries=(Query(prompt),), paths=tuple(ImageBytes(n, d) for n, d in zip(names, images)))
    records = {r.path: r for ranking in Engine(embedder, NullCache(), RunOptions(workers=0), warn=False).rank([cset])
               for r in ranking.records}
    embedder.result()
    for r in records.values():
        if r.error:
            raise PickrankError(f"{r.path}: {r.error}")
    return [records[n].score for n in names]


def reference_scores(s: Subject, prompt: str, images: tuple[bytes, ...]) -> list[float]:
    """The model card's math in transformers: CLIPModel, the Pillow processor, logit_scale.exp() * cosine (fp32)."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from pickrank.models.torch_embedder import features

    model = CLIPModel.from_pretrained(s.model_dir, local_files_only=True, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(s.processor_dir, local_files_only=True, trust_remote_code=False)
    pixels = reference_image_processor(s.processor_dir)(
        images=[Image.open(io.BytesIO(d)) for d in images], return_tensors="pt")["pixel_values"]
    text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=pixels))
        txt = features(model.get_text_features(**text))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (txt @ img.T))[0].tolist()


def _compare(mine: list[float], ref: list[float]) -> tuple[float, str]:
    """The largest difference, and both score lists in words."""
    diff = max(abs(a - b) for a, b in zip(mine, ref))
    return diff, f"{', '.join(f'{x:.4f}' for x in mine)} (reference: {', '.join(f'{x:.4f}' for x in ref)})"


@check("selftest_score", needs=("weights_complete", "tokenizer", "preprocessing"))
def check_selftest_score(s: Subject) -> tuple[Status, str]:
    """A generated pair's scores through the Engine (fp32, CPU) against the reference math, within 1e-4."""
    diff, said = _compare(engine_scores(s, SELFTEST_PROMPT, s.pair, "cpu", "fp32"), s.reference_scores)
    if diff > SCORE_TOLERANCE:
        return Status.fail, f"a generated pair through the Engine scores {said}: off by {diff:.1e}, over " \
                            f"{SCORE_TOLERANCE:g}"
    return Status.ok, f"a generated pair through the Engine (cpu, fp32) scores {said}: |difference| {diff:.1e}"


@check("selftest_device", needs=("selftest_score", "precision"))
def check_selftest_device(s: Subject) -> tuple[Status, str]:
    """The same pair on this run's --device and --dtype, against the fp32 reference (precision changes scores)."""
    from pickrank.models.torch_embedder import pick_device

    device, dtype = pick_device(s.options.device), s.options.dtype.value
    if device.type == "cpu" and dtype == "fp32":
        return Status.ok, "this run's device and precision are the reference's (cpu, fp32): checked above"
    diff, said = _compare(engine_scores(s, SELFTEST_PROMPT, s.pair, s.options.device, dtype), s.reference_scores)
    where = f"on {device}, {dtype}"
    if diff > DEVICE_TOLERANCE:
        return Status.warn, f"{where} the pair scores {said}: off by {diff:.3f}; close images may rank otherwise " \
                            "than in fp32 (--dtype fp32 is the reference)"
    return Status.ok, f"{where} the pair scores {said}: |difference| {diff:.1e}"


# -- output -------------------------------------------------------------------------------------------------------

def render(checks: list[Check], fmt: str) -> str:
    """The checks as a text table (a summary line first) or one JSON object {ok, failed, checks}."""
    bad = failed(checks)
    if fmt == "json":
        rows = [{**asdict(c), "status": c.status.value} for c in checks]
        return json.dumps({"ok": not bad, "failed": bad, "checks": rows}, ensure_ascii=False, indent=2)
    from pickrank.output.terminal import terminal_safe

    warned = sum(c.status is Status.warn for c in checks)
    width = max(len(c.name) for c in checks)
    lines = [f"pickrank doctor: {len(checks)} checks, {len(bad)} failed, {warned} warning(s)"]
    lines += [f"{c.status.value:<4}  {c.name:<{width}}  {terminal_safe(c.detail)}" for c in checks]
    return "\n".join(lines)
