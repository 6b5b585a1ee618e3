#!/usr/bin/env python
"""The baseline: PickScore_v1's model-card snippet, as a user would run it (one script, all images at once).

    python benchmarks/reference.py --prompt "a red cat" MODEL_DIR IMG1.jpg IMG2.jpg ... [-o scores.jsonl]

Exactly the model card's recipe: AutoProcessor + CLIPModel.from_pretrained, open ALL images with PIL, ONE
processor call for the images and the prompt, one get_image_features and one get_text_features call under
torch.no_grad(), normalise, logit_scale.exp() * text @ image.T, softmax. With several --prompt options the
snippet is simply repeated per prompt inside this one process (the model is loaded once); the benchmark calls
this script once per prompt instead, as a user of the snippet would.

Prints one JSON line per image: {"prompt", "path", "score", "prob"} (score = the logit, prob = softmax).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel


def _features(out: object) -> torch.Tensor:
    # transformers 4 returns a tensor; transformers 5 returns a ModelOutput with pooler_output.
    pooled = getattr(out, "pooler_output", None)
    return out if pooled is None else pooled


def calc_probs(processor, model, prompt: str, images: list, device: str = "cpu") -> tuple[list[float], list[float]]:
    """The model card's calc_probs (one processor call for the prompt and all images; ModelOutput unwrapped)."""
    inputs = processor(text=[prompt], images=images, padding=True, truncation=True, max_length=77,
                       return_tensors="pt").to(device)
    with torch.no_grad():
        image_embs = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        probs = torch.softmax(scores, dim=-1)
    return scores.tolist(), probs.tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", "-p", action="append", required=True, help="prompt (repeat for several)")
    ap.add_argument("model", help="model folder (with processor files)")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("-o", "--output", help="write JSON lines here instead of stdout")
    ap.add_argument("--device", default="cpu", help="torch device, as the model card's `device` (default: cpu)")
    args = ap.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = CLIPModel.from_pretrained(args.model).eval().to(args.device)
    images = [Image.open(p) for p in args.images]

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for prompt in args.prompt:
            scores, probs = calc_probs(processor, model, prompt, images, args.device)
            for path, s, pr in zip(args.images, scores, probs):
                out.write(json.dumps({"prompt": prompt, "path": path, "score": s, "prob": pr}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
