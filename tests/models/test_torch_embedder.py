"""The embedder: devices, dtypes, normalised embeddings, OOM back-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pickrank.errors import UsageError
from pickrank.models.torch_embedder import Embedder, check_dtype, pick_device, resolve_source


def test_devices_and_dtypes():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError):
        pick_device("tpu")
    assert check_dtype("fp32", torch.device("cpu")) is torch.float32
    with pytest.raises(UsageError, match="fp16"):
        check_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UsageError):
        check_dtype("int8", torch.device("cpu"))


def test_embeddings_are_normalised_fp32(model_dir):
    emb = Embedder.load(resolve_source(str(model_dir)), device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    out = emb.embed_images(pixels)
    assert out.dtype == torch.float32 and out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    text, truncated = emb.embed_texts(["a cat", "word " * 100])
    assert truncated == [False, True] and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_out_of_memory_halves_the_batch_and_retries(model_dir, caplog):
    emb = Embedder.load(resolve_source(str(model_dir)), device="cpu", batch_size=8)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 224, 224), dtype=np.uint8)
    expected = emb.embed_images(pixels)
    real = Embedder.embed_pixels

    def limited(self, x):  # fault injection: a device that only fits 2 images at a time
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    Embedder.embed_pixels = limited
    try:
        with caplog.at_level("WARNING", logger="pickrank"):
            got = emb.embed_images(pixels)
    finally:
        Embedder.embed_pixels = real
    assert emb.batch_size == 2
    assert torch.allclose(got, expected, atol=1e-5)
    assert sum("batch size lowered" in r.message for r in caplog.records) == 1  # said once
