"""What every stage may ask of an embedder, loaded or still loading (no torch import here: the CLI's start-up and the
decode workers stay light).

Implemented by `torch_embedder.Embedder` (loaded), `onnx_embedder.OnnxEmbedder` (an ONNX export on ONNX Runtime:
numpy arrays where the torch embedder gives tensors) and `loading.LoadingEmbedder` (loading in a thread: what is
known before the weights load is there at once, the rest waits for the load, or raises its error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from pickrank.inputs.decode import ImageSpec
from pickrank.models.source import ModelSource

if TYPE_CHECKING:
    import torch

    from pickrank.core.scores import ScoreHead


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """PickScore's two towers behind one interface: normalised fp32 embeddings on the CPU, and the score's scale.

    The attributes, `ready` and `error()` answer before the weights have loaded; the rest waits for the load (and
    raises its error when it failed)."""

    spec: ImageSpec  # the preprocessing the image tower expects
    fingerprint: str  # the cache key's model part
    backend: str  # what runs the model: "torch" (embeddings are torch tensors) or "onnx" (numpy arrays, no torch)
    source: ModelSource  # where the model and processor come from
    revision: str | None  # the hub commit the weights came from; None for a local folder
    head: ScoreHead | None  # the preference head every score goes through (--head); None: PickScore itself

    @property
    def ready(self) -> bool:
        """True once the model is there (a loaded embedder always; a loading one once its load has ended)."""

    def error(self) -> BaseException | None:
        """Why the load failed (waits for it to end); None when the model loaded."""

    @property
    def scale(self) -> float:
        """exp(logit_scale): score = scale * cosine(text, image)."""

    @property
    def batch_size(self) -> int:
        """Images per model call."""

    @property
    def device(self) -> "torch.device":
        """Where the model runs (anything with `.type` "cpu"/"cuda"/"mps" and a str())."""

    @property
    def dtype(self) -> "torch.dtype | str":
        """The weights' dtype: a torch.dtype ("float32" for an ONNX export)."""

    @property
    def image_gflops(self) -> float:
        """Approximate GFLOPs of one image through the vision tower."""

    def describe(self) -> dict:
        """Model, revision, device and dtype, for logs and reports."""

    def embed_texts(self, texts: list[str]) -> tuple["torch.Tensor | np.ndarray", list[bool]]:
        """Normalised text embeddings (N, D) and, per text, whether it was truncated at 77 tokens."""

    def embed_images(self, pixels: np.ndarray) -> "torch.Tensor | np.ndarray":
        """Normalised image embeddings (N, D) of decoded uint8 images (N, 3, H, W)."""
