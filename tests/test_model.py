"""Model loading rules and the embedder: sources, devices, dtypes, safetensors only, OOM back-off."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pickrank.errors import ModelLoadError, UsageError
from pickrank.model import (DEFAULT_MODEL, DEFAULT_PROCESSOR, Embedder, check_dtype, local_fingerprint, pick_device,
                            resolve_source)


def test_hub_defaults_resolve_to_pickscore_with_laion_processor(monkeypatch):
    src = resolve_source()
    assert (src.model, src.processor, src.revision, src.offline) == (DEFAULT_MODEL, DEFAULT_PROCESSOR, None, False)
    assert not src.model_is_local
    monkeypatch.setenv("PICKRANK_MODEL", "someone/other-clip")
    src = resolve_source(revision="abc123", offline=True)
    assert (src.model, src.processor, src.revision, src.offline) == ("someone/other-clip", DEFAULT_PROCESSOR,
                                                                     "abc123", True)
    assert resolve_source("a/b", processor="c/d").processor == "c/d"


def test_local_folder_with_processor_files_is_its_own_processor(model_dir, tmp_path):
    assert resolve_source(str(model_dir)).processor == str(model_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve_source(str(bare)).processor == DEFAULT_PROCESSOR


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


def test_pickle_only_folder_is_refused(model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        Embedder.load(resolve_source(str(folder), processor=str(model_dir)))


def test_fingerprint_changes_with_weights(model_dir, tmp_path):
    fp = local_fingerprint(str(model_dir))
    assert fp == local_fingerprint(str(model_dir))
    os.utime(model_dir / "model.safetensors", ns=(1, 1))
    assert local_fingerprint(str(model_dir)) != fp


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
