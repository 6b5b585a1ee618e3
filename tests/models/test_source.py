"""What is known before the weights load (sources, checks, spec, fingerprint) and loading in the background."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from pickrank.errors import ModelLoadError, UsageError
from pickrank.inputs.decode import ImageSpec
from pickrank.models.loading import LoadingEmbedder, load_in_background
from pickrank.models.source import (
    DEFAULT_MODEL,
    DEFAULT_PROCESSOR,
    ModelSource,
    inspect_model,
    local_fingerprint,
    resolve_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


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


def test_pickle_only_folder_is_refused(model_dir, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        inspect_model(resolve_source(str(folder), processor=str(model_dir)))


def test_fingerprint_changes_with_weights(model_dir, tmp_path):
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    fp = local_fingerprint(str(copy))
    assert fp == local_fingerprint(str(copy))
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert local_fingerprint(str(copy)) != fp


def test_inspect_reads_spec_and_fingerprint_from_json_alone(model_dir):
    src = resolve_source(str(model_dir))
    info = inspect_model(src, "fp32")
    cfg = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert info.spec == ImageSpec.from_config(cfg)
    assert info.revision is None and info.source == src
    assert info.fingerprint.startswith(f"{os.path.abspath(model_dir)}@{local_fingerprint(str(model_dir))}|fp32|")
    assert inspect_model(src, "bf16").fingerprint != info.fingerprint  # dtype is part of the cache key
    with pytest.raises(UsageError, match="unknown dtype"):
        inspect_model(src, "int8")


def _hub_cache(root: Path, repo: str, model_type: str, model_dir: Path) -> None:
    """A Hugging Face cache holding one commit of `repo` (config and preprocessor only), as a download leaves it."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text(json.dumps({"model_type": model_type}))
    shutil.copy(model_dir / "preprocessor_config.json", snap / "preprocessor_config.json")


def test_hub_model_fingerprint_names_the_resolved_commit(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _hub_cache(tmp_path, "someone/clip", "clip", model_dir)
    _hub_cache(tmp_path, "someone/bert", "bert", model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    info = inspect_model(ModelSource("someone/clip", "someone/clip", offline=True), "fp32")
    assert info.revision == COMMIT
    assert info.fingerprint.startswith(f"someone/clip@{COMMIT}|fp32|")
    with pytest.raises(ModelLoadError, match="'bert' model, not CLIP"):
        inspect_model(ModelSource("someone/bert", "someone/bert", offline=True))
    with pytest.raises(ModelLoadError, match="offline"):
        inspect_model(ModelSource("someone/absent", "someone/absent", offline=True))


def test_the_read_and_decode_stages_import_no_torch():
    # What the CLI runs while the model loads in a thread must not wait for torch's import.
    code = ("import sys; import pickrank.cli.app, pickrank.models.source, pickrank.core.engine, pickrank.core.cache, pickrank.inputs.sets, "
            "pickrank.output.writers; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_background_load_gives_the_same_embedder(model_dir):
    from pickrank.models.torch_embedder import Embedder

    src = resolve_source(str(model_dir))
    seen: list[object] = []
    loading = load_in_background(src, device="cpu", on_loaded=seen.append)
    assert loading.spec == inspect_model(src).spec  # known before the load
    emb = loading.result()
    assert loading.ready and loading.error() is None and seen == [emb]
    ref = Embedder.load(src, device="cpu")
    assert loading.fingerprint == ref.fingerprint == emb.fingerprint
    assert loading.scale == ref.scale  # anything else comes from the loaded embedder
    a, _ = loading.embed_texts(["a red cat", "the sea"])
    b, _ = ref.embed_texts(["a red cat", "the sea"])
    assert (a == b).all()


def test_the_loading_and_the_loaded_embedder_have_every_member_of_the_protocol(model_dir):
    """What the server asks of either (`error()`, `source`, `revision`, `ready`) is declared, and each has it."""
    from pickrank.models.protocol import ImageTextEmbedder

    loading = load_in_background(resolve_source(str(model_dir)), device="cpu")
    loaded = loading.result()
    for embedder in (loading, loaded):
        assert isinstance(embedder, ImageTextEmbedder)
        assert embedder.ready and embedder.error() is None and embedder.source.model == str(model_dir)
        assert embedder.revision is None and embedder.dtype == loaded.dtype


def test_a_failed_background_load_raises_where_the_model_is_used(model_dir, tmp_path):
    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated: passes the JSON checks
    loading = load_in_background(resolve_source(str(broken)), device="cpu")
    assert isinstance(loading.error(), ModelLoadError)
    with pytest.raises(ModelLoadError, match="cannot load"):
        loading.embed_texts(["a red cat"])


def test_loading_embedder_is_ready_only_when_its_future_is_done(model_dir):
    fut: Future = Future()
    loading = LoadingEmbedder(inspect_model(resolve_source(str(model_dir))), fut)
    assert not loading.ready
    fut.set_exception(ModelLoadError("gone"))
    assert loading.ready
    with pytest.raises(ModelLoadError, match="gone"):
        loading.batch_size
