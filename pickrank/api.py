"""PickScore as a library: score prompt/image pairs (for example as an RL reward), rank files, embed.

    from pickrank import PickScorer

    scorer = PickScorer.from_pretrained()                 # same defaults and loading rules as the CLI
    scorer.score("a red cat on a sofa", ["a.png", "b.png"])  # 1-D tensor of raw PickScores
    scorer.rank("a red cat on a sofa", ["out/"])             # the CLI's records, best first

Three image paths:

* **exact** (the default): every image becomes a PIL image and goes through the exact preprocessing, the
  reference's Pillow resize and centre crop, so scores equal the CLI's and the model card's. Float tensors are
  quantised first: ``(x * 255).round().clamp(0, 255).to(torch.uint8)``, channels last, then PIL.
* **differentiable** (``differentiable=True``, float tensors only): resize, crop and normalise in torch
  (``interpolate(mode="bicubic", antialias=True)``, whose antialiased bicubic uses Pillow's kernel), with no
  uint8 rounding, so gradients flow from the score to the input pixels. The text side runs without gradients
  and the model's weights are frozen (``requires_grad_(False)``).

  Its distance from the exact path (0 for 224x224 images already on the uint8 grid) is measured in BENCHMARKS.md,
  "The tensor paths against the exact path".

* **on the device** (``preprocess="torch"``, image tensors only, uint8 or float): the differentiable path's torch
  preprocessing under ``inference_mode``, in one batched pass on the tensor's own device (a CUDA batch from a
  sampler never goes through Pillow or the CPU); the scores come back on that device. For RL rewards without
  gradients. Its distance from the exact path: BENCHMARKS.md, "The tensor paths against the exact path"
  (`benchmarks/tensor_path.py`).

  Use the exact path for evaluation and reporting, the differentiable one for gradients, the on-device one for
  rewards in a training loop where the last digits do not matter.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from pickrank.core.backend import Batcher
from pickrank.core.engine import encode_paired, encode_prompts
from pickrank.core.scores import paired_scores
from pickrank.errors import ArgumentTypeError, InputFailed, InvalidArgument, NonFiniteScores, UsageError
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS, Decoded, ImageSpec, check_geometry, preprocess, to_image
from pickrank.inputs.files import ReadError
from pickrank.inputs.textfile import check_text
from pickrank.models import loading
from pickrank.models.torch_embedder import Embedder, features
from pickrank.options import Alpha, DType, ModelOptions, Scale, as_enum

ImageInput = Any  # a path, a PIL image, a uint8 HWC numpy array, or a CHW tensor


def check_float_images(x: torch.Tensor, where: str = "images") -> None:
    """A float image tensor must be finite (InvalidArgument otherwise); values outside [0, 1] are warned about, on
    every path alike: the exact path clamps them when it quantises, the torch paths take them as they are."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    d = x.detach()
    if not bool(torch.isfinite(d).all()):
        raise InvalidArgument(f"{where}: the image tensor holds NaN or infinity")
    lo, hi = float(d.min()), float(d.max())
    if lo < 0 or hi > 1:
        warnings.warn(f"{where}: float image values lie in [{lo:.4g}, {hi:.4g}], outside [0, 1]: the exact path "
                      "clamps them to [0, 1], the torch paths take them as they are", UserWarning, stacklevel=4)


def tensor_to_pil(x: torch.Tensor, where: str = "images"):
    """One CHW image tensor -> PIL RGB. Floats are in [0, 1] and quantised as ``(x*255).round().clamp(0,255)``."""
    from PIL import Image

    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise UsageError(f"an image tensor must be shaped (3, H, W) (or (N, 3, H, W) for a batch), got "
                         f"{tuple(x.shape)}")
    check_float_images(x, where)
    x = x.detach()
    if x.is_floating_point():
        x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise UsageError(f"image tensors must be float in [0, 1] or uint8, got {x.dtype}")
    arr = np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy())
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)  # (H, W) -> L, (H, W, 3) -> RGB


def to_pil(item: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, where: str = "images"):
    """A path, PIL image, uint8 numpy array (HWC or HW) or CHW tensor -> PIL image; unreadable files raise
    InputFailed naming the file."""
    if isinstance(item, torch.Tensor):
        return tensor_to_pil(item, where)
    return to_image(item, max_pixels)


def exact_pixels(item: ImageInput, spec: ImageSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 where: str = "images") -> np.ndarray:
    """One image by the exact path: to_pil, then the reference's Pillow preprocessing -> uint8 (3, H, W). An image
    that cannot be preprocessed (no pixels, a resize over max_pixels) is InputFailed naming a file, else an
    InvalidArgument naming `where`."""
    image = to_pil(item, max_pixels, where)
    try:
        return preprocess(image, spec, max_pixels)
    except ReadError as e:
        if isinstance(item, (str, os.PathLike)):
            raise InputFailed(f"{os.fspath(item)}: {e}") from None
        raise InvalidArgument(f"{where}: {e}") from None


def prompt_list(prompts: Any, n: int | None, name: str = "prompts") -> list[str]:
    """The prompts as a list: a string is one prompt for each of n images (one, when n is None), else a sequence of
    strings (n of them, unless n is None); each checked as every prompt is (`textfile.check_text`).
    ArgumentTypeError for anything but text (None, a number, bytes), InvalidArgument for text no tokenizer takes or
    a count that does not match; `name` is the argument's, in the messages."""
    if isinstance(prompts, str):
        return [check_text(prompts, name)] * (1 if n is None else n)
    if isinstance(prompts, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"{name}: bytes are not text: decode them first (for example data.decode('utf-8'))")
    try:
        items = list(prompts)
    except TypeError:
        raise ArgumentTypeError(f"{name}: a string or a list of strings, got {type(prompts).__name__}") from None
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise ArgumentTypeError(f"{name}[{i}]: a string, got {type(p).__name__}")
        check_text(p, f"{name}[{i}]")
    if n is not None and len(items) != n:
        raise InvalidArgument(f"{len(items)} prompts for {n} images: give one prompt, or one per image")
    return items


def as_image_list(images: Any) -> list:
    """The images as a list of single images (a 4-D tensor or array is a batch)."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, bytes, torch.Tensor, np.ndarray)) or hasattr(images, "getbands"):
        return [images]
    return list(images)


def torch_preprocess(x: torch.Tensor, spec: ImageSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Differentiable preprocessing of float images (N, 3, H, W) in [0, 1] -> model input, as the spec says.

    Bicubic resize with antialias of the shortest side (or to the fixed size), centre crop (zero padding when the
    image is smaller than the crop, as transformers does), rescale and normalise with the processor's mean/std.
    Unlike the exact path nothing is rounded to uint8 in between. Images without pixels, or whose resize has more
    than max_pixels pixels, are an InvalidArgument (as on the exact path).
    """
    import torch.nn.functional as F

    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise UsageError(f"differentiable scoring needs a float tensor shaped (N, 3, H, W) in [0, 1], got "
                         f"{x.dtype} {tuple(x.shape)}")
    x = x.float()
    try:
        geo = check_geometry(x.shape[-1], x.shape[-2], spec, max_pixels)
    except ReadError as e:
        raise InvalidArgument(f"images: {e}") from None
    if geo.resize is not None:
        # Pillow clamps the resized pixels to the valid range; so do we (gradients vanish only on overshoot).
        w, h = geo.resize
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if geo.pad is not None:
        top, bottom, left, right = geo.pad
        x = F.pad(x, (left, right, top, bottom))
    if geo.crop is not None:
        top, left, ch, cw = geo.crop
        x = x[:, :, top:top + ch, left:left + cw]
    x = x * (255.0 * spec.rescale_factor if spec.rescale_factor is not None else 255.0)
    if spec.image_mean is not None and spec.image_std is not None:
        mean = torch.tensor(spec.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def _check_preprocess(name: str) -> str:
    """"exact" (Pillow, the reference) or "torch" (the batched on-device path); anything else is a usage error."""
    if name not in ("exact", "torch"):
        raise UsageError(f'unknown preprocess {name!r}: use "exact" or "torch"')
    return name


class RankedRecords(list):
    """`PickScorer.rank`'s records: a plain list of dicts that a notebook shows as a small HTML table."""

    def _repr_html_(self) -> str:
        from pickrank.report.page import esc, number

        rows = "".join(
            f"<tr><td>{esc(r.get('rank') or '-')}</td><td>{number(r.get('score'))}</td><td>{number(r.get('prob'))}"
            f"</td><td>{esc(r.get('path') or '')}{esc(' (error: ' + r['error'] + ')') if r.get('error') else ''}"
            "</td></tr>" for r in self)
        caption = esc(self[0].get("prompt") or "") if self else "no images"
        return (f"<table><caption>{caption}</caption><thead><tr><th>rank</th><th>score</th><th>prob</th>"
                f"<th>path</th></tr></thead><tbody>{rows}</tbody></table>")


class PickScorer:
    """PickScore_v1 for Python code: scores, rankings and embeddings, on one device and dtype.

    Build it with `PickScorer.from_pretrained`; `embedder` is the underlying `pickrank.models.torch_embedder.Embedder`.
    """

    def __init__(self, embedder: Embedder, differentiable: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, preprocess: str = "exact",
                 score_scale: Scale | str = Scale.raw) -> None:
        self.embedder = embedder
        self.differentiable = differentiable
        self.max_pixels = max_pixels
        self.preprocess = _check_preprocess(preprocess)
        self.score_scale = as_enum(Scale, score_scale, "scale")  # the unit of score() and rank() (not `.scale`)
        self._provenance: dict | None = None

    @classmethod
    def from_pretrained(cls, model: str | None = None, processor: str | None = None, device: str = "auto",
                        dtype: DType | str | torch.dtype = "fp32", revision: str | None = None, offline: bool = False,
                        batch_size: int | None = None, differentiable: bool = False,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS, *, alpha: Alpha | str = "white",
                        preprocess: str = "exact", scale: Scale | str = "raw",
                        options: ModelOptions | None = None, head: str | os.PathLike | None = None) -> "PickScorer":
        """Load as the CLI does: model (default $PICKRANK_MODEL, else yuvalkirstain/PickScore_v1), processor (default
        the model folder when it has processor files, else the LAION CLIP-ViT-H-14 one), safetensors only.

        The model arguments build a `pickrank.options.ModelOptions`, the object `pickrank score --dtype ...` builds,
        and load through the same function; or give `options` (a ModelOptions) instead of them. `dtype`: "fp32" (the
        reference), "fp16" or "bf16", or a torch dtype (torch.bfloat16) or its name ("bfloat16", "float16", "half").
        `alpha`: "white" (transparency composited onto white) or "drop" (the alpha channel discarded), as --alpha.
        `differentiable=True` makes `score` take the differentiable path for float tensors by default;
        `preprocess="torch"` makes it take the batched on-device path for image tensors (see the module docstring).
        `scale`: the unit of `score` and `rank` ("raw", "cosine" or "unit26", as --scale); kept in `score_scale`.
        `head`: a preference head file made by `pickrank tune` (as --head): every score, prob and rank is then
        PickScore tuned to those labels (refused on another base model).
        """
        given = ModelOptions.from_values(model=model, processor=processor, revision=revision, offline=offline,
                                         device=device, dtype=dtype, batch_size=batch_size, alpha=alpha,
                                         head=os.fspath(head) if head is not None else None)
        if options is not None and given != ModelOptions():
            raise UsageError("give the model options either as arguments or as options=ModelOptions(...), not both")
        loading_embedder = loading.load_embedder(options or given)
        if loading_embedder.backend != "torch":  # its tensors, devices and differentiable path are torch's
            raise UsageError("PickScorer runs the torch model; an ONNX export runs through the CLI "
                             "(pickrank score --model EXPORT_FOLDER)")
        embedder = loading_embedder.result()
        return cls(embedder, differentiable=differentiable, max_pixels=max_pixels, preprocess=preprocess,
                   score_scale=scale)

    def __call__(self, prompts: str | Sequence[str], images: Any, **kwargs: Any) -> torch.Tensor:
        """`scorer(prompts, images)` is `scorer.score(prompts, images)` (same keyword arguments)."""
        return self.score(prompts, images, **kwargs)

    def to(self, device: str | torch.device) -> "PickScorer":
        """Move the model to `device` ("cuda", "cuda:1", "cpu", "mps", a torch.device); returns the scorer. The
        dtype stays, and must run there (fp16 is refused on the CPU)."""
        self.embedder.to(device)
        return self

    # -- properties -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedder.device

    @property
    def scale(self) -> float:
        """exp(logit_scale): score = scale * cosine(text, image)."""
        return self.embedder.scale

    @property
    def spec(self) -> ImageSpec:
        return self.embedder.spec

    @property
    def provenance(self) -> dict:
        """Where this scorer's numbers come from (`pickrank.core.provenance.Provenance.as_dict()`): computed on first
        use (the weights are hashed once, then remembered beside the embedding cache), the same dict after."""
        if self._provenance is None:
            from pickrank.core.provenance import compute

            self._provenance = compute(self.embedder, self.score_scale).as_dict()
        return self._provenance

    # -- embeddings -------------------------------------------------------------------------------------
    def embed_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), fp32 on the CPU; prompts over 77 tokens are truncated (a warning)."""
        texts = prompt_list(texts, None, "texts")
        if not texts:
            return torch.empty(0, 0)
        return encode_prompts(self.embedder, texts)[0]

    def pixels(self, images: Any) -> np.ndarray:
        """Images -> preprocessed uint8 pixels (N, 3, 224, 224), exactly as the reference processor."""
        items = as_image_list(images)
        if not items:
            return np.empty((0, 3, 0, 0), dtype=np.uint8)
        return np.stack([exact_pixels(it, self.spec, self.max_pixels, f"images[{i}]") for i, it in enumerate(items)])

    def embed_images(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), fp32 on the CPU, by the exact path.

        `images`: a list of paths, PIL images, uint8 HWC numpy arrays or CHW tensors, or an (N, 3, H, W) tensor
        (floats in [0, 1] are quantised to uint8 first). Converted and embedded batch by batch.
        """
        batcher, out = Batcher(self.embedder), []
        step = max(1, self.embedder.batch_size)
        for i, item in enumerate(as_image_list(images)):
            batcher.add(Decoded(str(i), exact_pixels(item, self.spec, self.max_pixels, f"images[{i}]")))
            if len(batcher) >= step:
                out.append(batcher.embed(step).embeddings)
        if batcher:
            out.append(batcher.embed(step).embeddings)
        return torch.cat(out) if out else torch.empty(0, 0)

    def embed_images_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) in fp32 on the model's device, with gradients to `images`
        (float (N, 3, H, W) in [0, 1]); see the module docstring for how far they are from the exact path."""
        return self._embed_in_torch(images)

    def embed_images_on_device(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) in fp32 on the model's device, preprocessed in torch on the images'
        device under inference mode (no Pillow, no copy to the CPU): the batched tensor path for rewards.

        `images`: (N, 3, H, W), float in [0, 1] or uint8. Not the exact path: see the module docstring."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise UsageError("the on-device path needs the images as one tensor (N, 3, H, W), float in [0, 1] or "
                             "uint8")
        with torch.inference_mode():
            return self._embed_in_torch(images.float() / 255 if images.dtype == torch.uint8 else images)

    def _embed_in_torch(self, images: torch.Tensor) -> torch.Tensor:
        """The torch preprocessing and the vision tower, batch by batch (autograd as the caller's mode says)."""
        model = self.embedder.model
        if hasattr(model, "vision"):
            model.vision  # noqa: B018 - PickScoreTowers loads the vision tower on first use
        model.requires_grad_(False)  # a reward model: gradients go to the pixels, never to its weights
        check_float_images(images)
        out = []
        step = max(1, self.embedder.batch_size)
        for i in range(0, images.shape[0], step):
            x = torch_preprocess(images[i:i + step].to(self.device), self.spec, self.max_pixels).to(self.embedder.dtype)
            feats = features(model.get_image_features(pixel_values=x)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out)

    # -- scores -----------------------------------------------------------------------------------------
    def score(self, prompts: str | Sequence[str], images: Any, differentiable: bool | None = None,
              preprocess: str | None = None, scale: Scale | str | None = None) -> torch.Tensor:
        """PickScores, one per image: 1-D fp32 tensor (CPU; on the images' device when differentiable or
        preprocessed on the device), in the unit `scale` names (default: `score_scale`, raw unless
        `from_pretrained(scale=...)` said otherwise).

        `prompts`: one prompt for every image, or a list with one prompt per image. `images`: see
        `embed_images`. `differentiable` (default: as given to `from_pretrained`) uses the torch preprocessing
        for float tensors so that ``score.sum().backward()`` reaches the pixels; other inputs have no gradient
        to carry and always use the exact path (asking for differentiable on them explicitly is an error).
        `preprocess="torch"` (default: as given to `from_pretrained`) scores an image tensor (N, 3, H, W) in one
        batched pass on its own device, without gradients; other inputs take the exact path (an error when asked
        for explicitly).
        """
        want = self.differentiable if differentiable is None else differentiable
        on_device = self.preprocess == "torch" if preprocess is None else _check_preprocess(preprocess) == "torch"
        is_float_batch = isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4
        is_batch = isinstance(images, torch.Tensor) and images.ndim == 4 and (is_float_batch
                                                                             or images.dtype == torch.uint8)
        if want and not is_float_batch and differentiable:
            raise UsageError("differentiable=True needs the images as a float tensor (N, 3, H, W) in [0, 1]")
        if on_device and not is_batch and preprocess is not None:
            raise UsageError('preprocess="torch" needs the images as one tensor (N, 3, H, W), float in [0, 1] or uint8')
        if not is_batch:
            images = as_image_list(images)  # once: `images` may be a generator
        n = images.shape[0] if is_batch else len(images)
        divisor = (self.score_scale if scale is None else as_enum(Scale, scale, "scale")).divisor(self.scale)
        text = self._paired_texts(prompts, n)
        if n == 0:
            return torch.empty(0)
        if is_batch and ((want and is_float_batch) or on_device):
            image = self.embed_images_differentiable(images) if want and is_float_batch \
                else self.embed_images_on_device(images)
            # clone(): text embeddings come from inference mode, which autograd cannot save for backward
            scores = paired_scores(text.clone().to(image.device), image, self.scale, self.embedder.head)
            return self._finite(scores / divisor).to(images.device)  # a division by a constant: gradients flow
        scores = paired_scores(text, self.embed_images(images), self.scale, self.embedder.head)
        return self._finite(scores / divisor)

    def _finite(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores, or NonFiniteScores naming the model and the images: a NaN reward is an error, never a
        number a trainer adds up."""
        bad = (~torch.isfinite(scores.detach())).nonzero().flatten().tolist()
        if bad:
            model = self.embedder.describe().get("model", "the model")
            raise NonFiniteScores(f"{model}: the model gave NaN or infinity for {len(bad)} of {len(scores)} "
                                  f"image(s) (indices {bad[:8]}{' ...' if len(bad) > 8 else ''})")
        return scores

    def _paired_texts(self, prompts: str | Sequence[str], n: int) -> torch.Tensor:
        """One text embedding per image (N, D): one prompt for all, or one per image, each distinct one encoded once."""
        prompts = prompt_list(prompts, n)
        if n == 0:
            return torch.empty(0, 0)
        return encode_paired(self.embedder, prompts)[0]

    def rank(self, prompt: str, paths: Iterable[str | os.PathLike], top: int | None = None,
             workers: int | None = None, processes: bool = False) -> list[dict]:
        """Rank image files for one prompt: the CLI's records (prompt, prompt_source, path, score, prob, rank,
        truncated, error), best first, then the files that failed (with `error`). Folders and globs expand as on the
        command line; the embedding cache is not used. Scores are identical to `pickrank score --no-cache`'s with the
        same batch size (batches of another size change the last float digits, in the CLI as well).

        Images are decoded in `workers` threads (default: one per CPU, at most 8; 0: in this thread), which works
        in a script, a notebook or a REPL as it is. `processes=True` decodes in worker processes instead, as the
        CLI does (more throughput on many cores); like any process pool it needs the script's code under
        `if __name__ == "__main__":`, since each worker re-imports the script."""
        from pickrank.core.scoring import make_engine, rankings
        from pickrank.errors import NoImages
        from pickrank.inputs.sets import sets_for_score
        from pickrank.options import RunOptions
        from pickrank.output.writers import record_fields

        if not isinstance(prompt, str):
            raise ArgumentTypeError(f"prompt: a string, got {type(prompt).__name__}")
        check_text(prompt, "prompt")
        args = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        run = RunOptions(top=top, workers=workers, max_pixels=self.max_pixels, scale=self.score_scale,
                         threads=not processes)
        try:
            sets = sets_for_score(prompt, [os.fspath(p) for p in args], max_pixels=run.max_pixels,
                                  max_bytes=run.max_bytes)
        except NoImages:
            return []
        fields = record_fields("score")
        return RankedRecords(r.to_dict(fields) for ranking in rankings(make_engine(self.embedder, run), sets)
                             for r in ranking.records)
