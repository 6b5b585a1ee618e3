"""The PickScore embedder: loading (safetensors only), device, dtype, and batched image/text embedding."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from pickrank.errors import ModelLoadError, UsageError
from pickrank.inputs.decode import ImageSpec, normalize
from pickrank.models.source import (
    DEFAULT_MODEL,
    DEFAULT_PROCESSOR,
    DTYPE_NAMES,
    MAX_TOKENS,
    WEIGHTS_INDEX,
    ModelInfo,
    ModelSource,
    check_dtype_name,
    fetch_weights,
    inspect_model,
    load_error_text,
    local_fingerprint,
    model_file,
    resolve_source,
    vision_gflops,
    weight_files,
)

if TYPE_CHECKING:
    from pickrank.records import Progress

__all__ = ["DEFAULT_MODEL", "DEFAULT_PROCESSOR", "ModelSource", "resolve_source", "local_fingerprint", "Embedder",
           "PickScoreTowers", "features", "pick_device", "check_dtype", "cpu_has_bf16"]

log = logging.getLogger("pickrank")

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def pick_device(device: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU; an explicit device is checked to exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available on this machine")
    return dev


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for the name, refusing what this device cannot run well."""
    check_dtype_name(dtype)
    if device.type == "cpu" and dtype == "fp16":
        raise UsageError("--dtype fp16 is not supported on CPU: use bf16 (on CPUs with bf16 instructions) or fp32")
    if device.type == "cpu" and dtype == "bf16" and not cpu_has_bf16() and not os.environ.get("PICKRANK_FORCE_BF16"):
        raise UsageError("--dtype bf16 needs a CPU with bf16 instructions (AVX512-BF16/AMX), which this one lacks: "
                         "use fp32")
    return DTYPES[dtype]


def features(out: object) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or a ModelOutput with pooler_output (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[1] if isinstance(out, tuple) else None
    if pooled is None:
        raise TypeError(f"unexpected model output {type(out).__name__}")
    return pooled


def _weights_file_for(source: ModelSource, tensor: str) -> str:
    """The local path of the safetensors file holding `tensor` (downloaded from the hub if needed)."""
    files = weight_files(source)
    if len(files) == 1:
        return files[0]
    with open(model_file(source, WEIGHTS_INDEX), encoding="utf-8") as f:
        return model_file(source, json.load(f)["weight_map"][tensor])


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report (every vision weight a text tower leaves unused) and its "Loading weights" bars
    off for the block, and the host's settings back after it: its log level, its progress-bar switch and
    huggingface_hub's (which that switch turns off too). Process-wide while the block runs, as these settings are."""
    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (its package exports the class)

    logger = logging.getLogger("transformers")
    level, bars, hub_bars = logger.level, hf_logging.is_progress_bar_enabled(), dict(hub_tqdm.progress_bar_states)
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_bars)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """Load weights straight into the run's dtype (less memory and time than fp32 then cast)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class PickScoreTowers(torch.nn.Module):
    """CLIP's two towers loaded separately: the text tower at once, the vision tower only when an image needs it.

    With every image answered by the embedding cache, a run loads a third of the weights. The towers hold exactly
    CLIPModel's weights, and get_*_features compute what CLIPModel's do.
    """

    def __init__(self, source: ModelSource, config: object, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        from safetensors import safe_open

        self.source, self.config, self.device_, self.dtype_ = source, config, device, dtype
        try:
            with safe_open(_weights_file_for(source, "logit_scale"), framework="pt") as f:
                self.logit_scale = torch.nn.Parameter(f.get_tensor("logit_scale").float(), requires_grad=False)
        except Exception as e:  # a truncated or foreign file: safetensors' own error names neither model nor file
            raise ModelLoadError(load_error_text(source.model, e, source.offline)) from e
        self.text = self._load("text")
        self._vision: torch.nn.Module | None = None

    def _load(self, tower: str) -> torch.nn.Module:
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        cls = CLIPTextModelWithProjection if tower == "text" else CLIPVisionModelWithProjection
        sub = copy.deepcopy(getattr(self.config, f"{tower}_config"))
        sub.projection_dim = self.config.projection_dim  # CLIPConfig keeps it at the top level
        try:
            with quiet_transformers():
                model = cls.from_pretrained(self.source.model, config=sub, revision=self.source.revision,
                                            use_safetensors=True, local_files_only=self.source.offline,
                                            trust_remote_code=False, attn_implementation="sdpa",
                                            **_dtype_kwarg(self.dtype_))
        except Exception as e:
            raise ModelLoadError(load_error_text(self.source.model, e, self.source.offline)) from e
        return model.eval().to(device=self.device_, dtype=self.dtype_)

    @property
    def vision(self) -> torch.nn.Module:
        if self._vision is None:
            self._vision = self._load("vision")
        return self._vision

    def get_text_features(self, **enc: torch.Tensor) -> torch.Tensor:
        return self.text(**enc).text_embeds

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixel_values).image_embeds


def vision_dims(v: object) -> dict:
    """What `source.vision_gflops` needs of a CLIP vision config (also written into an ONNX export's manifest)."""
    names = ("hidden_size", "patch_size", "num_hidden_layers", "image_size", "intermediate_size", "num_channels")
    return {n: int(getattr(v, n)) for n in names}


class Embedder:
    """PickScore's two towers on one device and dtype; embeddings come back L2-normalised, fp32, on the CPU."""

    ready = True  # as `loading.LoadingEmbedder.ready`: an Embedder is loaded
    backend = "torch"  # what runs the model (the provenance says it); embeddings are torch tensors (ONNX: numpy)
    head = None  # the preference head (`ModelInfo.head`, set by `load`); None: PickScore itself

    def __init__(self, model: torch.nn.Module, tokenizer: object, spec: ImageSpec, device: torch.device,
                 dtype: torch.dtype, fingerprint: str, source: ModelSource,
                 batch_size: int = 8, revision: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.source = source
        self.batch_size = batch_size
        # exp(logit_scale) in fp32 from the checkpoint, so the score's scale never depends on --dtype.
        self.scale = float(model.logit_scale.detach().float().exp().item())
        self.revision = revision
        self._oom_warned = False

    @classmethod
    def load(cls, source: ModelSource, device: str = "auto", dtype: str = "fp32", batch_size: int | None = None,
             info: ModelInfo | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> "Embedder":
        """Load the text tower, tokenizer and preprocessing config (the vision tower on first use); `info` is
        `source.inspect_model`'s answer when the caller already has it. A hub model's weights are downloaded first,
        visibly (`source.fetch_weights`: "downloading" events to `on_progress`, else huggingface_hub's bar)."""
        from transformers import AutoTokenizer, CLIPConfig

        dev = pick_device(device)
        tdtype = check_dtype(dtype, dev)
        info = info or inspect_model(source, dtype)
        fetch_weights(source, on_progress)
        try:
            with quiet_transformers():
                config = CLIPConfig.from_pretrained(source.model, revision=source.revision,
                                                    local_files_only=source.offline)
        except Exception as e:
            raise ModelLoadError(load_error_text(source.model, e, source.offline)) from e
        towers = PickScoreTowers(source, config, dev, tdtype)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(source.processor, local_files_only=source.offline,
                                                          trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(load_error_text(source.processor, e, source.offline)) from e
        # embed_texts counts tokens untruncated to report truncation itself; this tokenizer's own "longer than the
        # maximum" warning would say the opposite of what happens (the text is cut at 77 tokens)
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        embedder = cls(towers, tokenizer, info.spec, dev, tdtype, info.fingerprint, source,
                       batch_size or (32 if dev.type != "cpu" else 8), revision=info.revision)
        embedder.head = info.head
        return embedder

    def to(self, device: str | torch.device) -> "Embedder":
        """Move the model to `device` (checked as --device is); the dtype must run there."""
        dev = pick_device(str(device))
        check_dtype({v: k for k, v in DTYPES.items()}[self.dtype], dev)
        self.model.to(dev)
        if isinstance(self.model, PickScoreTowers):
            self.model.device_ = dev  # where a vision tower not loaded yet will go
        self.device = dev
        return self

    def error(self) -> None:
        """Why the load failed: an Embedder has loaded (as `loading.LoadingEmbedder.error`)."""
        return None

    @property
    def image_gflops(self) -> float:
        """Approximate GFLOPs of one image through the vision tower (patch embedding, attention, MLPs)."""
        return vision_gflops(vision_dims(self.model.config.vision_config))

    def describe(self) -> dict:
        """Model, revision, device and dtype, for logs and reports."""
        return {"model": self.source.model, "revision": self.revision,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Normalised text embeddings (padded to the batch's longest, cut at 77 tokens) and truncation flags."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        truncated = [n > MAX_TOKENS for n in lengths]
        out = []
        for i in range(0, len(texts), max(self.batch_size, 32)):
            enc = self.tokenizer(texts[i:i + max(self.batch_size, 32)], padding=True, truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            feats = features(self.model.get_text_features(**enc)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
        return torch.cat(out), truncated

    def pixel_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised model input on the device, in the model's dtype."""
        return torch.from_numpy(normalize(pixels, self.spec)).to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings for model-ready pixel values (float, N x 3 x H x W)."""
        feats = features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def embed_images(self, pixels: np.ndarray) -> torch.Tensor:
        """Embed a batch of decoded uint8 images; on CUDA out-of-memory, halve the batch and retry."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(pixels):
            n = min(self.batch_size, len(pixels) - i)
            try:
                out.append(self.embed_pixels(self.pixel_tensor(pixels[i:i + n])))
                i += n
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                self.batch_size = max(1, n // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if not self._oom_warned:
                    log.warning("out of GPU memory: batch size lowered to %d", self.batch_size)
                    self._oom_warned = True
        return torch.cat(out) if out else torch.empty(0, 0)
