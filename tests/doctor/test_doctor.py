"""`pickrank doctor` through the real CLI (a subprocess, -f json parsed) on the tiny real CLIP model, and
on broken copies of it made in tmp_path: a truncated weight file, a processor with another crop size, a pickle-only
folder, a corrupt hub download, a model that is not cached offline, a cache that is not ours or is corrupt."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pickrank.cli.app import app
from pickrank.core.cache import EmbeddingCache
from pickrank.doctor import CHECKS
from tests.support.commands import Completed, invoke, no_traceback, pickrank_cmd
from tests.support.databases import foreign_database

NAMES = [name for name, _, _ in CHECKS]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def doctor(*args: str, env: dict | None = None, fmt: str = "json") -> tuple[Completed, dict]:
    """`pickrank doctor -f FMT ARGS`; with json, its output parsed (checks by name). In this process, or in a
    subprocess with `env` (huggingface_hub reads its cache's place once, when imported)."""
    if env is None:
        proc = invoke("doctor", "-f", fmt, *args)
    else:
        proc = subprocess.run(pickrank_cmd("doctor", "-f", fmt, *args), capture_output=True, text=True, timeout=600,
                              env={**os.environ, **env})
    no_traceback(proc.stderr)
    if fmt != "json":
        return proc, {}
    out = json.loads(proc.stdout)
    assert [c["name"] for c in out["checks"]] == NAMES, "every check is listed, in order"
    assert all(set(c) == {"name", "status", "detail"} and c["status"] in ("ok", "warn", "fail")
               for c in out["checks"])
    assert out["failed"] == [c["name"] for c in out["checks"] if c["status"] == "fail"]
    assert out["ok"] is (not out["failed"])
    return proc, {**out, "by_name": {c["name"]: c for c in out["checks"]}}


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may break."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def assert_fails_with(proc: Completed | subprocess.CompletedProcess, out: dict, name: str, *words: str) -> None:
    """Exit 1, the check failed and named on stderr in one line, its detail saying what and why."""
    assert proc.returncode == 1, proc.stderr
    assert out["failed"] == [name], out["failed"]
    assert proc.stderr.strip().splitlines()[-1] == f"pickrank: error: doctor: 1 check(s) failed: {name}"
    for w in words:
        assert w in out["by_name"][name]["detail"], out["by_name"][name]


def test_the_tiny_model_passes_and_is_said_not_to_be_pickscore(model_dir, tmp_path):
    proc, out = doctor("--model", str(model_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {n: (c["status"], c["detail"]) for n, c in out["by_name"].items()}
    assert {n for n, (status, _) in got.items() if status == "warn"} == {"architecture", "tokenizer"}
    assert "NOT PickScore_v1" in got["architecture"][1] and "NOT PickScore_v1" in got["tokenizer"][1]
    assert "safetensors: model.safetensors" in got["weights_format"][1]
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"sha256 {digest} (no reference: a local folder)" in got["weights_hashes"][1]
    assert "CLIPImageProcessorPil" in got["selftest_preprocessing"][1] and "pixel-exact" in \
        got["selftest_preprocessing"][1]
    assert "through the Engine (cpu, fp32)" in got["selftest_score"][1]
    assert "(3, 224, 224)" in got["decode_workers"][1]
    table, _ = doctor("--model", str(model_dir), fmt="table")
    assert table.returncode == 0 and table.stdout.startswith(f"pickrank doctor: {len(NAMES)} checks, 0 failed")
    assert [line.split()[1] for line in table.stdout.splitlines()[1:]] == NAMES


def test_a_truncated_weight_file_fails(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    proc, out = doctor("--model", str(folder))
    assert_fails_with(proc, out, "weights_complete", str(weights), "truncated")
    assert out["by_name"]["selftest_score"]["detail"] == "not checked: needs weights_complete"


def test_a_processor_with_a_different_crop_size_fails(model_dir, tmp_path):
    processor = tmp_path / "processor-336"
    processor.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(model_dir / name, processor)
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    (processor / "preprocessor_config.json").write_text(json.dumps({**config, "size": 336, "crop_size": 336}))
    proc, out = doctor("--model", str(model_dir), "--processor", str(processor))
    assert_fails_with(proc, out, "preprocessing", "a processor with a different crop size: 336x336",
                      "the model takes 224x224")


def test_a_pickle_only_folder_fails_named(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"never": "loaded"}))
    proc, out = doctor("--model", str(folder))
    assert_fails_with(proc, out, "weights_format", "only a pickle checkpoint (pytorch_model.bin)")


def hub_cache(model_dir: Path, root: Path, repo: str) -> Path:
    """The model as huggingface_hub caches a download: blobs named by their hash (SHA-256 for LFS files), a
    snapshot of symlinks, refs/main. Returns the weights' blob."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    for sub in (snapshot, repo_dir / "blobs", repo_dir / "refs"):
        sub.mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for f in model_dir.iterdir():
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    return Path(os.path.realpath(snapshot / "model.safetensors"))


def test_a_hub_model_in_the_cache_is_checked_against_its_blob_hashes(model_dir, tmp_path):
    blob = hub_cache(model_dir, tmp_path / "hub", "acme/tiny-clip")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ("--model", "acme/tiny-clip", "--processor", "acme/tiny-clip", "--offline")
    proc, out = doctor(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"revision {COMMIT}" in out["by_name"]["model"]["detail"]
    assert f"sha256 {blob.name} (matches the hub revision)" in out["by_name"]["weights_hashes"]["detail"]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: complete, but not the file the hub has
    blob.write_bytes(bytes(data))
    proc, out = doctor(*args, env=env)
    assert_fails_with(proc, out, "weights_hashes", f"the hub's is {blob.name}: a corrupt download")


def test_a_model_not_cached_offline_fails_with_the_fix(model_dir, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    proc, out = doctor("--model", "acme/not-here", "--processor", str(model_dir), "--offline", env=env)
    assert_fails_with(proc, out, "model", "not in the Hugging Face cache: acme/not-here",
                      "hf download acme/not-here")
    assert out["by_name"]["weights_format"]["detail"] == "not checked: needs model"


def _corrupt_cache(path: Path) -> None:
    """A stamped pickrank cache whose pages past the header are garbage."""
    EmbeddingCache(path).close()
    head = path.read_bytes()[:100]
    path.write_bytes(head + b"\x17" * 8092)


@pytest.mark.parametrize("kind", ["not ours", "corrupt"])
def test_the_cache_is_only_looked_at(model_dir, tmp_path, kind):
    path = tmp_path / "emb.sqlite3"
    if kind == "not ours":
        foreign_database(path)
    else:
        _corrupt_cache(path)
    before = path.read_bytes()
    proc, out = doctor("--model", str(model_dir), "--cache", str(path))
    cache = out["by_name"]["cache"]
    assert str(path) in cache["detail"]
    if kind == "not ours":
        assert proc.returncode == 0 and cache["status"] == "warn" and "not a pickrank cache" in cache["detail"]
    else:
        assert_fails_with(proc, out, "cache")
    # nothing written beside it: not even the weight-hash memo (the doctor writes nothing)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["emb.sqlite3"]


def test_help_lists_the_model_and_cache_options_once(runner, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapped lines
    res = runner.invoke(app, ["doctor", "--help"])
    assert res.exit_code == 0, res.output
    table = "\n".join(line for line in res.stdout.splitlines() if line.lstrip("│ ").startswith("--"))
    for flag in ("--model", "--processor", "--revision", "--offline", "--device", "--dtype", "--alpha", "--cache",
                 "--no-cache", "--format", "--quiet", "--debug"):
        assert len(re.findall(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", table)) == 1, (flag, res.stdout)
    assert "--batch-size" not in res.stdout and "--workers" not in res.stdout
