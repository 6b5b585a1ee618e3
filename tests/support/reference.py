"""The model card's reference scoring, written independently of pickrank."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel


def reference_scores(model_dir, prompt: str, paths: list[str]) -> list[float]:
    """The model card's snippet: one processor call, one model call, normalise, scale * cosine."""
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    pil_images = [Image.open(p) for p in paths]
    image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        text_embs = model.get_text_features(**text_inputs)
        # transformers 5 returns a ModelOutput whose pooler_output is the projection; 4 returns the tensor
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return scores.tolist()
