"""The known answers: generated pictures, and transformers' own Pillow CLIP processor and CLIPModel math (torch and
transformers are imported inside, so that a broken install fails the checks that need them, not the doctor)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SELFTEST_PROMPT = "a red circle on a blue background"

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


def export_reference_scores(folder: str, prompt: str, images: tuple[bytes, ...]) -> list[float]:
    """The same math over an ONNX export's own graphs (no CLIPModel to compare with): transformers' tokenizer and
    Pillow processor, the graphs' embeddings, the manifest's scale * cosine (fp32)."""
    from transformers import AutoTokenizer

    from pickrank.models.onnx_embedder import TEXT_GRAPH, VISION_GRAPH, open_session, read_manifest

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    pixels = reference_image_processor(folder)(
        images=[Image.open(io.BytesIO(d)) for d in images], return_tensors="np")["pixel_values"]
    text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="np")
    providers = ["CPUExecutionProvider"]
    img = open_session(f"{folder}/{VISION_GRAPH}", providers).run(None, {"pixel_values": pixels.astype(np.float32)})[0]
    txt = open_session(f"{folder}/{TEXT_GRAPH}", providers).run(
        None, {"input_ids": text["input_ids"].astype(np.int64),
               "attention_mask": text["attention_mask"].astype(np.int64)})[0]
    return (float(read_manifest(folder)["scale"]) * (txt @ img.T))[0].tolist()


def reference_scores(model_dir: str, processor_dir: str, prompt: str,
                     images: tuple[bytes, ...]) -> list[float]:
    """The model card's math in transformers: CLIPModel, the Pillow processor, logit_scale.exp() * cosine (fp32)."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from pickrank.models.torch_embedder import features

    model = CLIPModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(processor_dir, local_files_only=True, trust_remote_code=False)
    pixels = reference_image_processor(processor_dir)(
        images=[Image.open(io.BytesIO(d)) for d in images], return_tensors="pt")["pixel_values"]
    text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=pixels))
        txt = features(model.get_text_features(**text))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (txt @ img.T))[0].tolist()
