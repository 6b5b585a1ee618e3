"""Loading the embedder in a background thread while the run reads and decodes images.

`load_in_background` checks the model first from its JSON files (`source.inspect_model`: a bad folder or hub id
fails at once, before torch is imported), then imports torch and transformers and loads the weights in a thread.
The `LoadingEmbedder` it returns is an `ImageTextEmbedder` (`protocol.py`) from the start: what the JSON files tell
(spec, fingerprint, source, revision) is there at once; everything else waits for the load, or raises its error.
"""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from pickrank.errors import UsageError
from pickrank.models.source import ModelInfo, ModelSource, inspect_model, resolve_source
from pickrank.options import ModelOptions
from pickrank.records import Progress

if TYPE_CHECKING:
    import torch

    from pickrank.models.hashing import HashStore
    from pickrank.models.torch_embedder import Embedder
    from pickrank.taste.head import Head


def in_thread(work: Callable[[], object], name: str) -> Future:
    """Run `work` in a daemon thread (it never holds up exit or Ctrl-C); its result or exception in a Future."""
    fut: Future = Future()

    def target() -> None:
        try:
            fut.set_result(work())
        except BaseException as e:  # raised again in whichever thread asks for the result
            fut.set_exception(e)

    threading.Thread(target=target, name=name, daemon=True).start()
    return fut


class LoadingEmbedder:
    """An `Embedder` loading in a thread: `ImageTextEmbedder` by explicit delegation to the loaded one."""

    def __init__(self, info: ModelInfo, future: Future) -> None:
        self.info = info
        self.spec, self.fingerprint, self.backend = info.spec, info.fingerprint, info.backend
        self.source, self.revision, self.head = info.source, info.revision, info.head
        self._future = future

    @property
    def ready(self) -> bool:
        """True once the load has finished (or failed: using the embedder then raises its error)."""
        return self._future.done()

    def result(self) -> "Embedder":
        """The loaded Embedder (waits for it)."""
        return self._future.result()

    def error(self) -> BaseException | None:
        """Why the load failed (waits for it); None when it succeeded."""
        return self._future.exception()

    # -- what only the loaded model knows: each waits for the load ------------------------------------------
    @property
    def scale(self) -> float:
        return self.result().scale

    @property
    def batch_size(self) -> int:
        return self.result().batch_size

    @property
    def device(self) -> "torch.device":
        return self.result().device

    @property
    def dtype(self) -> "torch.dtype | str":
        return self.result().dtype

    @property
    def image_gflops(self) -> float:
        return self.result().image_gflops

    def describe(self) -> dict:
        return self.result().describe()

    def embed_texts(self, texts: list[str]) -> tuple["torch.Tensor | np.ndarray", list[bool]]:
        return self.result().embed_texts(texts)

    def embed_images(self, pixels: np.ndarray) -> "torch.Tensor | np.ndarray":
        return self.result().embed_images(pixels)


def with_head(info: ModelInfo, head: Head | None) -> ModelInfo:
    """The run's ModelInfo with its preference head (--head), once the head is found to fit its embedding spec."""
    if head is None:
        return info
    head.check_model(info)
    return replace(info, head=head)


def check_head_base(info: ModelInfo, head: Head | None) -> None:
    """In the load thread, before the weights load: refuse a head fitted on other weights (hashed once, then
    remembered beside the embedding cache)."""
    if head is not None:
        head.check_base(info)


def load_in_background(source: ModelSource, device: str = "auto", dtype: str = "fp32",
                       batch_size: int | None = None,
                       on_loaded: Callable[["Embedder"], None] | None = None,
                       alpha: str = "white", decode: str = "exact",
                       on_progress: Callable[[Progress], None] | None = None,
                       head: Head | None = None) -> LoadingEmbedder:
    """Check the model now (a bad folder or id fails here), then import torch and transformers and load the
    weights in a thread, so that the caller's reading and decoding overlap them; `on_loaded` runs in that thread,
    and so does `on_progress` (a first download's bytes, then "loading"). `head`: the preference head every score
    goes through (checked against the model here and in the thread)."""
    info = with_head(inspect_model(source, dtype, alpha, decode), head)

    def load() -> "Embedder":
        from pickrank.models.torch_embedder import Embedder

        check_head_base(info, head)
        embedder = Embedder.load(source, device=device, dtype=dtype, batch_size=batch_size, info=info,
                                 on_progress=on_progress)
        if on_loaded is not None:
            on_loaded(embedder)
        return embedder

    return LoadingEmbedder(info, in_thread(load, "pickrank-load"))


def require_torch(what: str) -> None:
    """A usage error, before any work, when torch or transformers is not installed (an ONNX-only environment)."""
    try:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    except ImportError:  # a finder that refuses the name: as good as missing
        missing = ["torch"]
    if missing:
        raise UsageError(f"{what} needs {' and '.join(missing)}, which this environment lacks (an ONNX-only "
                         "install): pip install pickrank for the torch backend, or give --model a folder made by "
                         "`pickrank export onnx`")


def load_export_in_background(source: ModelSource, options: ModelOptions,
                              on_loaded: Callable[[object], None] | None = None,
                              store: HashStore | None = None, head: Head | None = None) -> LoadingEmbedder:
    """`load_in_background` for an ONNX export: checked now from its JSON files, its files against the manifest's
    SHA-256 (through `store`, default the default one) and opened on ONNX Runtime in a thread (no torch, no
    transformers)."""
    from pickrank.models.hashing import HashStore
    from pickrank.models.onnx_embedder import OnnxEmbedder, inspect_export, read_manifest, verify_files

    info = with_head(inspect_export(source, options.dtype.value, options.alpha.value, options.decode.value), head)

    def load() -> OnnxEmbedder:
        check_head_base(info, head)
        verify_files(source.model, read_manifest(source.model), store or HashStore())
        embedder = OnnxEmbedder.load(info, device=options.device, batch_size=options.batch_size)
        if on_loaded is not None:
            on_loaded(embedder)
        return embedder

    return LoadingEmbedder(info, in_thread(load, "pickrank-load"))


def model_info(options: ModelOptions) -> ModelInfo:
    """What the model's JSON files say (its cache fingerprint among it), checked as `load_embedder` checks them,
    without loading a weight: enough to tell whether earlier outputs were made with the same model."""
    from pickrank.models.onnx_embedder import inspect_export, wants_onnx

    source = resolve_source(options.model, options.processor, options.revision, options.offline)
    backend = options.backend.value if options.backend is not None else None
    choices = (options.dtype.value, options.alpha.value, options.decode.value)
    if wants_onnx(backend, source, options.processor is not None):
        return inspect_export(source, *choices)
    return inspect_model(source, *choices)


def load_embedder(options: ModelOptions, on_loaded: Callable[["Embedder"], None] | None = None,
                  on_progress: Callable[[Progress], None] | None = None) -> LoadingEmbedder:
    """Check the model now (a bad folder or id fails here) and load it in a thread; the CLI and
    `PickScorer.from_pretrained` both load through this (the latter waits for `.result()`). An ONNX export folder
    (or --backend onnx) loads on ONNX Runtime. `on_progress` hears of a first download and of the load (in the
    loading thread). A preference head (--head) is read and checked here, and every score of the embedder goes
    through it."""
    from pickrank.models.onnx_embedder import wants_onnx

    source = resolve_source(options.model, options.processor, options.revision, options.offline)
    backend = options.backend.value if options.backend is not None else None
    head = None
    if options.head is not None:
        from pickrank.taste.head import read_head

        head = read_head(options.head)
    if wants_onnx(backend, source, options.processor is not None):
        return load_export_in_background(source, options, on_loaded, head=head)
    require_torch(f"the torch backend (--model {source.model})")
    return load_in_background(source, device=options.device, dtype=options.dtype.value,
                              batch_size=options.batch_size, on_loaded=on_loaded, alpha=options.alpha.value,
                              decode=options.decode.value, on_progress=on_progress, head=head)
