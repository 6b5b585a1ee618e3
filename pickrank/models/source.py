"""Which model a run uses, and what is known before its weights load (`ModelInfo`), from its JSON files alone.

Nothing here imports torch or transformers (~2.5 s on a small CPU): the CLI checks the model folder or hub id and
reads its preprocessing and cache fingerprint, then `loading.load_in_background` loads the weights in a thread while
images are read and decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from pickrank.errors import ModelLoadError
from pickrank.inputs.decode import ImageSpec
from pickrank.options import DTYPE_NAMES, DType, as_enum  # noqa: F401 - DTYPE_NAMES: model.py imports it from here
from pickrank.records import Progress

log = logging.getLogger("pickrank")

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_TOKENS = 77  # CLIP's text length: longer prompts are cut there, as the reference does
# Checkpoint files that are pickles (unpickling can run code): never loaded, named when they are all there is.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PROCESSOR_FILES = ("preprocessor_config.json",)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# Every file a CLIP tokenizer may load from: what the provenance's tokenizer hash covers (those present).
TOKENIZER_FILES = ("added_tokens.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json")
WEIGHTS_INDEX = "model.safetensors.index.json"

if TYPE_CHECKING:
    from pickrank.core.scores import ScoreHead


@dataclass(frozen=True)
class ModelSource:
    """Where the model and processor come from, resolved from the command-line options."""

    model: str
    processor: str
    revision: str | None = None
    offline: bool = False

    @property
    def model_is_local(self) -> bool:
        return os.path.isdir(self.model)


def resolve_source(model: str | None = None, processor: str | None = None, revision: str | None = None,
                   offline: bool = False) -> ModelSource:
    """Apply the defaults: PICKRANK_MODEL, else PickScore_v1; the processor from the model folder if it has one."""
    model = model or os.environ.get("PICKRANK_MODEL") or DEFAULT_MODEL
    if processor is None:
        has_processor = os.path.isdir(model) and all(
            os.path.exists(os.path.join(model, f)) for f in _PROCESSOR_FILES
        ) and any(os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES)
        processor = model if has_processor else DEFAULT_PROCESSOR
    return ModelSource(model=model, processor=processor, revision=revision, offline=offline)


def load_error_text(what: str, e: Exception, offline: bool) -> str:
    """One line for a failed load of a folder or hub id (the libraries' own texts run to many lines)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if offline:
        return f"cannot load {what} offline (is it in the Hugging Face cache?): {text}"
    if not os.path.exists(what) and ("/" not in what or what.startswith((".", "/"))):
        return f"cannot load {what}: no such folder, and not a hub id"
    return f"cannot load {what}: {text}"


def hub_offline(offline: bool = False) -> bool:
    """Whether the hub must not be asked: --offline, or HF_HUB_OFFLINE as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return offline or bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def hub_file(repo: str, filename: str, revision: str | None, offline: bool, option: str) -> str:
    """The local path of one small file of a hub repo, downloaded if need be. Without a network this fails at once,
    in one line: hf_hub_download itself retries for ~25 s (minutes when packets are dropped), logging each try."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if not hub_offline(offline):
        try:
            cached = isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)
        except ValueError:  # not a valid repo id (a missing folder, say): hf_hub_download says so below
            cached = True
        if not cached:  # hf_hub_download would retry; with a cached copy it falls back to it at once
            check_hub_reachable(repo, filename, revision, option)
    try:  # a few kB: no progress bar (the weights' download is the one shown)
        return hf_hub_download(repo, filename, revision=revision, local_files_only=offline, tqdm_class=silent_tqdm())
    except Exception as e:  # huggingface_hub raises OSError/ValueError subclasses with long texts
        raise ModelLoadError(load_error_text(repo, e, offline)) from e


def hub_probe_timeout() -> float:
    """Seconds the reachability probe waits: $HF_HUB_ETAG_TIMEOUT when set (slow networks), else 5."""
    try:
        return max(0.1, float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5))
    except ValueError:
        return 5.0


def check_hub_reachable(repo: str, filename: str, revision: str | None, option: str) -> None:
    """One HEAD request, no retry: a ModelLoadError saying how to do without the network when there is none. Any
    answer from the hub (a 404, a gated repo, a 503) passes: hf_hub_download reports or retries that itself."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    timeout = hub_probe_timeout()
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=timeout)
    except (HfHubHTTPError, ValueError):  # the hub answered, or the arguments are wrong: not a network problem
        return
    except Exception as e:  # connection refused, DNS, proxy, TLS, timeout: whatever the HTTP library names them
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "timeout" in type(e).__name__.lower() or "timed out" in text.lower():
            text = f"no answer within {timeout:g} s (a slow network: raise HF_HUB_ETAG_TIMEOUT)"
        raise ModelLoadError(f"cannot reach the Hugging Face hub to fetch {repo}: {text}; give {option} FOLDER, "
                             f"download it first ({download_command(repo, option)}), or set HF_HUB_OFFLINE=1 to "
                             "use the local cache") from None


def download_command(repo: str, option: str) -> str:
    """The `hf download` line for only the files pickrank reads of a model (--model) or a processor (--processor)
    repo: the whole repo can hold other weights (the LAION processor repo holds gigabytes of OpenCLIP's)."""
    files = "config.json model.safetensors" if option == "--model" else \
        "preprocessor_config.json 'tokenizer*' vocab.json merges.txt special_tokens_map.json"
    return f"hf download {repo} --include {files}"


def check_local_weights(folder: str) -> None:
    """Refuse folders whose only checkpoint is a pickle (it can run code when loaded)."""
    names = os.listdir(folder)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ModelLoadError(f"{folder}: no config.json, so not a transformers model folder")
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ModelLoadError(
            f"{folder}: only a pickle checkpoint ({', '.join(sorted(pickles))}); pickrank loads safetensors only, "
            "since unpickling can run arbitrary code. Convert it with model.save_pretrained(dir, "
            "safe_serialization=True) in a trusted environment.")
    raise ModelLoadError(f"{folder}: no model weights (*.safetensors) found")


def check_is_clip(source: ModelSource) -> str | None:
    """Read the model's config.json, refuse anything but CLIP, and return the hub commit it came from (None for a
    local folder)."""
    if source.model_is_local:
        path, revision = os.path.join(source.model, "config.json"), None
    else:
        path = hub_file(source.model, "config.json", source.revision, source.offline, "--model")
        # The hub cache keeps a commit's files under snapshots/<commit>/ (transformers reads the commit there too).
        m = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", path)
        revision = m.group(1) if m else None
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{source.model}: unreadable config.json ({e})") from e
    if model_type != "clip":
        raise ModelLoadError(f"{source.model} is a {model_type or 'unknown'!r} model, not CLIP: "
                             "pickrank needs a CLIP model such as yuvalkirstain/PickScore_v1")
    return revision


def model_file(source: ModelSource, name: str, tqdm_class: Any = None) -> str:
    """The local path of one file of the model: in its folder, or in the hub cache (downloaded if need be, its
    progress shown by `tqdm_class`, else by huggingface_hub's own bar)."""
    if source.model_is_local:
        return os.path.join(source.model, name)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source.model, name, revision=source.revision, local_files_only=source.offline,
                           tqdm_class=tqdm_class)


def weight_files(source: ModelSource, tqdm_class: Any = None) -> list[str]:
    """The safetensors files the weights load from: model.safetensors, else the shards its index names."""
    try:
        single = model_file(source, "model.safetensors", tqdm_class)
        if os.path.exists(single):
            return [single]
    except Exception:  # a sharded checkpoint has no model.safetensors (the hub says so with its own errors)
        pass
    with open(model_file(source, WEIGHTS_INDEX), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [model_file(source, name, tqdm_class) for name in shards]


def silent_tqdm() -> type:
    """A tqdm class for huggingface_hub's downloads that shows nothing."""
    from tqdm import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


def reporting_tqdm(on_progress: Callable[[Progress], None]) -> type:
    """A tqdm class for huggingface_hub's downloads that draws nothing and reports each file's bytes to
    `on_progress` as "downloading" events (the CLI draws them in its one bar)."""
    from tqdm import tqdm

    class Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            self.done, self.size = int(kwargs.get("initial") or 0), kwargs.get("total")
            self.file = str(kwargs.get("desc") or "").rsplit("/", 1)[-1]  # the hub's desc may be a cut URL
            super().__init__(*args, **{**kwargs, "disable": True})
            self.report()

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            self.report()
            return None

        def report(self) -> None:
            on_progress(Progress("downloading", self.done, self.size, detail=self.file))

    return Reporting


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps downloaded models ($HF_HUB_CACHE, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_weights(source: ModelSource, on_progress: Callable[[Progress], None] | None = None) -> None:
    """A hub model's weights into the local Hugging Face cache, visibly, before anything loads them: where they go
    is said on the "pickrank" logger, and the bytes as they arrive go to `on_progress` ("downloading" events)
    or, without it, to huggingface_hub's own progress bar. A model already cached costs one lookup."""
    if source.model_is_local or hub_offline(source.offline):
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(source.model, "model.safetensors", revision=source.revision), str):
            return
    except ValueError:  # not a repo id: the load reports it
        return
    log.info("downloading the weights of %s into %s (once: later runs use that copy)", source.model,
             hub_cache_dir())
    try:
        weight_files(source, reporting_tqdm(on_progress) if on_progress is not None else None)
    except Exception as e:  # huggingface_hub's texts run to many lines
        raise ModelLoadError(load_error_text(source.model, e, source.offline)) from e


def local_fingerprint(folder: str) -> str:
    """A hash of a local model folder's weight and config files' names, sizes and mtimes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_processor_config(processor: str, offline: bool = False) -> dict:
    """The raw preprocessor_config.json of a folder or hub repo."""
    if os.path.isdir(processor):
        path = os.path.join(processor, "preprocessor_config.json")
        if not os.path.exists(path):
            raise ModelLoadError(f"{processor}: no preprocessor_config.json")
    else:
        path = hub_file(processor, "preprocessor_config.json", None, offline, "--processor")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_dtype_name(dtype: str) -> None:
    """Refuse a dtype name pickrank does not know (whether the device can run it is `model.check_dtype`'s)."""
    as_enum(DType, dtype, "dtype")


@dataclass(frozen=True)
class ModelInfo:
    """What a run knows before the weights load: enough to decode images and look them up in the cache."""

    source: ModelSource
    spec: ImageSpec
    fingerprint: str  # the cache key's model part: weights (or hub commit), dtype, preprocessing
    revision: str | None  # the hub commit, None for a local folder
    dtype: str
    backend: str = "torch"  # what runs the model: "torch", or "onnx" (an export folder; numpy arrays, no torch)
    head: ScoreHead | None = None  # the preference head applied after the embeddings (--head); None: PickScore


def run_fingerprint(ident: str, dtype: str, spec: ImageSpec) -> str:
    """The cache key's model part: which weights (`ident`), the dtype, and a hash of the preprocessing."""
    return f"{ident}|{dtype}|{hashlib.sha256(spec.fingerprint().encode()).hexdigest()[:16]}"


def vision_gflops(v: dict) -> float:
    """Approximate GFLOPs of one image through a CLIP vision tower of this config (patch embedding, attention,
    MLPs); `v` holds hidden_size, patch_size, num_hidden_layers, image_size, intermediate_size, num_channels."""
    h, p, layers = v["hidden_size"], v["patch_size"], v["num_hidden_layers"]
    tokens = (v["image_size"] // p) ** 2 + 1
    per_layer = tokens * (4 * h * h + 2 * h * v["intermediate_size"]) + 2 * tokens * tokens * h
    return 2 * (tokens * v["num_channels"] * p * p * h + layers * per_layer) / 1e9


def with_run_choices(spec: ImageSpec, alpha: str, decode: str) -> ImageSpec:
    """The spec with the run's --alpha and --decode (both part of the preprocessing, hence of the fingerprint)."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', not {alpha!r}")
    if decode not in ("exact", "fast"):
        raise ValueError(f"decode must be 'exact' or 'fast', not {decode!r}")
    return replace(spec, alpha=alpha, decode=decode)


def inspect_model(source: ModelSource, dtype: str = "fp32", alpha: str = "white",
                  decode: str = "exact") -> ModelInfo:
    """Check the model is a safetensors CLIP, and read its preprocessing and cache fingerprint (JSON files only);
    alpha ("white" or "drop": what becomes of transparency) and decode ("exact" or "fast") are part of both."""
    check_dtype_name(dtype)
    if source.model_is_local:
        check_local_weights(source.model)
    elif os.path.exists(source.model):
        raise ModelLoadError(f"{source.model}: not a folder")
    revision = check_is_clip(source)
    spec = with_run_choices(ImageSpec.from_config(load_processor_config(source.processor, source.offline)),
                            alpha, decode)
    ident = f"{os.path.abspath(source.model)}@{local_fingerprint(source.model)}" if source.model_is_local \
        else f"{source.model}@{revision or source.revision or 'main'}"
    return ModelInfo(source, spec, run_fingerprint(ident, dtype, spec), revision, dtype)
