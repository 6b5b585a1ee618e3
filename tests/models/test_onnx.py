"""ONNX export and the ONNX Runtime backend: parity with torch, the manifest, refusals, the cache's
separate fingerprint, and a whole `pickrank score` in a process where torch and transformers cannot be imported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.commands import Completed, invoke, jsonl, no_traceback, pickrank_cmd
from tests.support.images import draw_image

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4

# Put first on sys.path of a child process (PYTHONPATH): from then on `import torch` and `import transformers`
# fail there, in the process itself and in its decode workers.
BLOCKER = '''
import sys

class _Blocked:
    """Refuses torch and transformers, as an environment without them would."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test (no torch here)")
        return None

sys.meta_path.insert(0, _Blocked())
'''


def run(*args: str, env: dict | None = None, timeout: int = 180) -> Completed | subprocess.CompletedProcess:
    """The real CLI: in this process, or in a child process (this checkout's code) where `env` sets what is read
    at start-up (PYTHONPATH, XDG_CACHE_HOME)."""
    if not set(env or {}) - {"PICKRANK_CACHE", "HF_HUB_OFFLINE"}:
        return invoke(*args, env=env)
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(pickrank_cmd(*args), capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=timeout)


@pytest.fixture
def jpegs(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    for i, size in enumerate([(300, 200), (201, 333), (224, 224), (640, 480)]):
        draw_image(folder / f"img{i}.{'jpg' if i % 2 else 'png'}", size, seed=i)
    return folder


def scores(stdout: str) -> dict[tuple[str, str], float]:
    return {(r["prompt"], os.path.basename(r["path"])): r["score"] for r in jsonl(stdout)}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= TOL, worst


def score_args(model: Path, images: Path, *extra: str) -> list[str]:
    return ["score", "-p", "a red cat on a sofa", str(images), "--model", str(model), "--no-cache", "-f", "jsonl",
            *extra]


# -- export -------------------------------------------------------------------------------------------------------

def test_export_writes_graphs_with_external_data_tokenizer_and_manifest(export_dir: Path, model_dir: Path) -> None:
    names = set(os.listdir(export_dir))
    assert {"vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "tokenizer.json",
            "preprocessor_config.json", "manifest.json"} <= names
    assert not [n for n in os.listdir(export_dir.parent) if n.startswith(".")], "a temporary folder was left"
    m = json.loads((export_dir / "manifest.json").read_text())
    assert m["format"] == "pickrank-onnx" and m["opset"] == 17 and m["pickrank_version"]
    assert m["source"]["model"] == str(model_dir) and m["source"]["revision"] is None
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert m["source_weights_sha256"] == {"model.safetensors": weights}
    for name, digest in m["files_sha256"].items():
        assert hashlib.sha256((export_dir / name).read_bytes()).hexdigest() == digest, name
    assert set(m["files_sha256"]) == names - {"manifest.json"}
    p = m["parity"]
    assert p["tolerance"] == TOL and p["truncation_agrees"] and 0 <= p["max_score_diff"] <= TOL
    assert m["scale"] == pytest.approx(2.718281828 ** m["logit_scale"], rel=1e-6)


def test_dynamic_batch_and_text_length(export_dir: Path, model_dir: Path) -> None:
    """Batches and prompt lengths other than those traced give torch's embeddings."""
    import numpy as np

    from pickrank.models.loading import load_embedder
    from pickrank.options import ModelOptions

    onnx = load_embedder(ModelOptions(model=str(export_dir), device="cpu")).result()
    torch_ = load_embedder(ModelOptions(model=str(model_dir), device="cpu")).result()
    assert onnx.backend == "onnx" and torch_.backend == "torch"
    texts = ["x", "a dog", "one two three four five six seven eight nine ten eleven twelve", "word " * 100]
    for n in (1, 3, 4):
        a, cut_a = onnx.embed_texts(texts[:n])
        b, cut_b = torch_.embed_texts(texts[:n])
        assert cut_a == cut_b and np.abs(a - b.numpy()).max() < 1e-5
    pixels = np.random.default_rng(1).integers(0, 256, size=(11, 3, 224, 224), dtype=np.uint8)
    assert np.abs(onnx.embed_images(pixels) - torch_.embed_images(pixels).numpy()).max() < 1e-5


def test_the_export_embedder_has_every_member_of_the_protocol(export_dir: Path) -> None:
    """An ONNX export, loading and loaded, answers what the server asks of any embedder (`error()`, `source`, ...)."""
    from pickrank.models.loading import load_embedder
    from pickrank.models.protocol import ImageTextEmbedder
    from pickrank.options import ModelOptions

    loading = load_embedder(ModelOptions(model=str(export_dir), device="cpu"))
    onnx = loading.result()
    for embedder in (loading, onnx):
        assert isinstance(embedder, ImageTextEmbedder)
        assert embedder.ready and embedder.error() is None and embedder.source.model == str(export_dir)
        assert embedder.backend == "onnx" and embedder.dtype == "float32"


def test_export_refused_when_the_graph_does_not_reproduce_torch(model_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, runner) -> None:
    """A vision graph that really computes something else (traced from a perturbed tower, run by ONNX Runtime)
    fails the parity check: exit 1, one line, nothing left in OUT_DIR or beside it."""
    import torch

    from pickrank.cli.app import app
    from pickrank.models import onnx_export

    real = onnx_export.VisionGraph.forward

    def perturbed(self, pixel_values):
        return torch.nn.functional.normalize(real(self, pixel_values) + 0.05, dim=-1)

    monkeypatch.setattr(onnx_export.VisionGraph, "forward", perturbed)
    out = tmp_path / "parent" / "exp"
    out.parent.mkdir()
    r = runner.invoke(app, ["export", "onnx", str(out), "--model", str(model_dir)])
    assert r.exit_code == 1, r.output
    assert "do not reproduce torch's scores" in r.output and "export refused" in r.output
    assert os.listdir(out.parent) == []


def test_export_never_overwrites_a_folder_that_is_not_an_export(model_dir: Path, tmp_path: Path,
                                                                export_dir: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    r = run("export", "onnx", str(theirs), "--model", str(model_dir))
    assert r.returncode == 2 and "not a pickrank ONNX export" in r.stderr
    no_traceback(r.stderr)
    assert os.listdir(theirs) == ["notes.txt"] and (theirs / "notes.txt").read_text() == "keep me"
    # an earlier export is replaced
    ours = tmp_path / "ours"
    shutil.copytree(export_dir, ours)
    (ours / "stale.onnx").write_text("old")
    r = run("export", "onnx", str(ours), "--model", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert not (ours / "stale.onnx").exists() and (ours / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["ours", "theirs"]
    r = run("export", "onnx", str(tmp_path / "no" / "such" / "x"), "--model", str(model_dir))
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- running it -------------------------------------------------------------------------------------------------

def test_scores_match_torch_and_the_export_is_detected(export_dir: Path, model_dir: Path, jpegs: Path) -> None:
    """--model EXPORT (no --backend) runs on ONNX Runtime and gives torch's scores within 1e-4."""
    t = run(*score_args(model_dir, jpegs))
    o = run(*score_args(export_dir, jpegs))
    assert t.returncode == o.returncode == 0, o.stderr
    assert "float32" in o.stderr
    assert_close(scores(t.stdout), scores(o.stdout))
    assert [r["path"] for r in jsonl(t.stdout)] == [r["path"] for r in jsonl(o.stdout)]


def test_compare_matches_torch(export_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red cat\n2,a blue dog\n3,a green bird\n")
    for s, seed in (("a", 1), ("b", 2)):
        for i in range(1, 4):
            draw_image(tmp_path / s / f"{i}.png", (64, 48), seed=seed * 10 + i)
    means = []
    for model in (model_dir, export_dir):
        r = run("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--prompts", str(tmp_path / "p.csv"), "-f",
                "json", "--bootstrap", "0", "--no-cache", "--model", str(model))
        assert r.returncode == 0, r.stderr
        means.append([s["mean"] for s in json.loads(r.stdout)["systems"]])
    assert max(abs(a - b) for a, b in zip(*means)) <= TOL


@pytest.mark.parametrize("command", ["best-of-n", "batch", "eval"])
def test_other_commands_match_torch(command: str, export_dir: Path, model_dir: Path, jpegs: Path,
                                    tmp_path: Path) -> None:
    if command == "best-of-n":
        args = ["best-of-n", str(jpegs), "-p", "a cat", "--top", "4", "-f", "jsonl", "--no-cache"]
    elif command == "batch":
        csv = tmp_path / "p.csv"
        csv.write_text(f"prompt,images\na cat,{jpegs}\n{'long prompt ' * 60},{jpegs}\n")
        args = ["batch", str(csv), "-f", "jsonl", "--no-cache"]
    else:
        csv = tmp_path / "pairs.csv"
        csv.write_text("prompt,image_0,image_1,label\n" + "".join(
            f"p{i},imgs/img{i}.{'jpg' if i % 2 else 'png'},imgs/img{(i + 1) % 4}."
            f"{'jpg' if (i + 1) % 2 else 'png'},1\n" for i in range(4)))
        args = ["eval", str(csv), "--bootstrap", "0", "-o", "PAIRS"]
    outs = []
    for model in (model_dir, export_dir):
        a = [str(tmp_path / f"{model.name}.jsonl") if x == "PAIRS" else x for x in args]
        r = run(*a, "--model", str(model))
        assert r.returncode == 0, r.stderr
        outs.append(jsonl(Path(a[-1]).read_text()) if command == "eval" else jsonl(r.stdout))
        if command == "batch":
            assert "truncated" in r.stderr  # the same warning on both backends
    if command == "eval":
        for t, o in zip(*outs):
            assert abs(t["score_0"] - o["score_0"]) <= TOL and abs(t["score_1"] - o["score_1"]) <= TOL
    else:
        key = [(r["prompt"], r["path"]) for r in outs[0]]
        assert key == [(r["prompt"], r["path"]) for r in outs[1]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(*outs)) <= TOL


def test_score_runs_with_torch_unimportable(export_dir: Path, model_dir: Path, jpegs: Path,
                                            tmp_path: Path) -> None:
    """A whole `score --backend onnx` (decode workers too) where `import torch` / `import transformers` fail."""
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    o = run(*score_args(export_dir, jpegs, "--backend", "onnx", "--workers", "1"), env=env)
    assert o.returncode == 0, o.stderr
    t = run(*score_args(model_dir, jpegs))
    assert_close(scores(t.stdout), scores(o.stdout))
    # the blocker works: torch cannot be imported there, and the torch path says what is missing
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={**os.environ, **env})
    assert probe.returncode == 1 and "blocked in this test" in probe.stderr
    blocked = run(*score_args(model_dir, jpegs, "--workers", "0"), env=env)
    assert blocked.returncode == 2 and "needs torch" in blocked.stderr
    no_traceback(blocked.stderr)


def test_provenance_of_an_export_run_without_torch(export_dir: Path, jpegs: Path, tmp_path: Path) -> None:
    """--meta on the ONNX path: backend onnx, the graphs' and data files' hashes, the decode mode; torch blocked."""
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "PICKRANK_CACHE": str(tmp_path / "c.db")}
    meta = tmp_path / "meta.json"
    o = run(*score_args(export_dir, jpegs, "--workers", "0", "--decode", "fast", "--meta", str(meta)), env=env)
    assert o.returncode == 0, o.stderr
    prov = json.loads(meta.read_text())
    files = sorted(n for n in os.listdir(export_dir) if n.endswith((".onnx", ".data")))
    assert sorted(prov["weights"]) == files and len(files) == 4
    assert all(prov["weights"][n] == hashlib.sha256((export_dir / n).read_bytes()).hexdigest() for n in files)
    assert (prov["backend"], prov["preprocessing"]["decode"], prov["dtype"]) == ("onnx", "fast", "float32")


def test_the_export_has_its_own_cache_entries(export_dir: Path, model_dir: Path, jpegs: Path,
                                              tmp_path: Path) -> None:
    from pickrank.models.onnx_embedder import inspect_export
    from pickrank.models.source import inspect_model, resolve_source

    assert inspect_export(resolve_source(str(export_dir))).fingerprint != \
        inspect_model(resolve_source(str(model_dir))).fingerprint
    env = {"PICKRANK_CACHE": str(tmp_path / "c.sqlite3")}
    args = ["score", "-p", "a cat", str(jpegs), "-f", "jsonl", "--workers", "0", "--model"]
    first = run(*args, str(model_dir), env=env)
    second = run(*args, str(export_dir), env=env)
    third = run(*args, str(export_dir), env=env)
    assert "4 embedded, 0 from cache" in first.stderr
    assert "4 embedded, 0 from cache" in second.stderr, "torch's entries were served to the ONNX run"
    assert "0 embedded, 4 from cache" in third.stderr


def test_backend_and_model_must_agree(export_dir: Path, model_dir: Path, jpegs: Path) -> None:
    r = run(*score_args(export_dir, jpegs, "--backend", "torch"))
    assert r.returncode == 2 and "is an ONNX export" in r.stderr
    r = run(*score_args(model_dir, jpegs, "--backend", "onnx"))
    assert r.returncode == 2 and "--backend onnx needs --model" in r.stderr
    r = run(*score_args(export_dir, jpegs, "--dtype", "bf16"))
    assert r.returncode == 2 and "fp32 only" in r.stderr
    for res in (r,):
        no_traceback(res.stderr)


def test_external_data_outside_the_export_is_refused(export_dir: Path, jpegs: Path, tmp_path: Path) -> None:
    """A graph whose weights point outside its folder (../, an absolute path) is not loaded: one line, exit 1."""
    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    shutil.copy(bad / "vision.onnx.data", tmp_path / "elsewhere.data")
    graph = onnx.load(str(bad / "vision.onnx"), load_external_data=False)
    for t in graph.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../elsewhere.data"
    onnx.save_model(graph, str(bad / "vision.onnx"))
    # a crafted export states its own files' hashes: the graph reaches ONNX Runtime, which refuses the path
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files_sha256"]["vision.onnx"] = hashlib.sha256((bad / "vision.onnx").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = run(*score_args(bad, jpegs, "--workers", "0"))
    assert r.returncode == 1 and "cannot load the ONNX graph" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    no_traceback(r.stderr)


def test_serve_runs_an_export_without_torch(export_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    """`pickrank serve` on the ONNX export, torch blocked: JSON and safetensors bodies score as the torch model."""
    import base64

    import httpx
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save

    from tests.support.server import running_server

    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    files = [draw_image(tmp_path / f"s{i}.png", (96 + 32 * i, 80), seed=i) for i in range(3)]
    prompts = ["a red cat", "a blue dog", "a red cat"]
    t = run("batch", str(write_pairs(tmp_path, prompts, files)), "--model", str(model_dir), "--no-cache", "-f", "jsonl")
    assert t.returncode == 0, t.stderr
    want = {os.path.basename(r["path"]): r["score"] for r in jsonl(t.stdout)}
    with running_server(export_dir, env=env) as s:
        s.wait_ready()
        body = {"prompts": prompts, "images": [base64.b64encode(f.read_bytes()).decode() for f in files]}
        got = httpx.post(s.url + "/v1/score?meta=1", json=body, timeout=60)  # ?meta=1: the whole provenance
        assert got.status_code == 200, got.text
        assert got.json()["model"]["backend"] == "onnx"
        assert max(abs(a - want[f.name]) for a, f in zip(got.json()["scores"], files)) <= TOL
        arrays = {f"images.{i}": np.asarray(Image.open(f).convert("RGB"))[None] for i, f in enumerate(files)}
        st = httpx.post(s.url + "/v1/rank", content=save(arrays, metadata={"prompt": "a red cat"}),
                        headers={"content-type": "application/x-safetensors"}, timeout=60)
        assert st.status_code == 200, st.text
        ranking = st.json()["ranking"]
        assert abs(sum(r["prob"] for r in ranking) - 1) < 1e-5
        assert abs(ranking[[r["index"] for r in ranking].index(0)]["score"] - want[files[0].name]) <= TOL


def write_pairs(folder: Path, prompts: list[str], files: list[Path]) -> Path:
    """A batch CSV: one row per (prompt, image)."""
    csv = folder / "pairs.csv"
    csv.write_text("id,prompt,images\n" + "".join(f"{i},{p},{f}\n" for i, (p, f) in enumerate(zip(prompts, files))))
    return csv


# -- a tampered export, a broken manifest, an empty OUT_DIR, the doctor on an export -------------------------------

def tampered(export_dir: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the export with vision.onnx.data zero-filled or swapped for the text tower's bytes (cut or padded
    to the same size), its manifest untouched."""
    bad = Path(shutil.copytree(export_dir, tmp_path / f"tampered-{how}"))
    data = bad / "vision.onnx.data"
    size = data.stat().st_size
    other = (bad / "text.onnx.data").read_bytes()
    data.write_bytes(bytes(size) if how == "zeros" else (other * (size // len(other) + 1))[:size])
    return bad


@pytest.mark.parametrize("how", ["zeros", "swapped"])
def test_a_tampered_export_is_refused_naming_the_file(export_dir: Path, jpegs: Path, tmp_path: Path,
                                                      how: str) -> None:
    bad = tampered(export_dir, tmp_path, how)
    r = run(*score_args(bad, jpegs, "--workers", "0"), env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert f"{bad / 'vision.onnx.data'}: SHA-256 " in r.stderr and "changed since it was exported" in r.stderr
    no_traceback(r.stderr)


def test_the_export_hashes_are_read_once_per_file_version(export_dir: Path, tmp_path: Path) -> None:
    from pickrank.models.hashing import HashStore
    from pickrank.models.onnx_embedder import read_manifest, verify_files

    folder = Path(shutil.copytree(export_dir, tmp_path / "copy"))
    manifest = read_manifest(str(folder))
    store = HashStore(tmp_path / "weight-hashes.json")
    n = verify_files(str(folder), manifest, store)
    assert n == len(manifest["files_sha256"]) and store.computed == n
    again = HashStore(tmp_path / "weight-hashes.json")  # another run: the memo on disk
    assert verify_files(str(folder), manifest, again) == n and again.computed == 0
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")  # a new version
    with pytest.raises(Exception, match="tokenizer.json: SHA-256"):
        verify_files(str(folder), manifest, again)
    assert again.computed == 1


@pytest.mark.parametrize("scale", ["abc", -1, None])
def test_a_manifest_with_a_bad_scale_is_a_load_error(export_dir: Path, jpegs: Path, tmp_path: Path, scale) -> None:
    bad = Path(shutil.copytree(export_dir, tmp_path / "bad-scale"))
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "scale": scale}))
    r = run(*score_args(bad, jpegs, "--workers", "0"))
    assert r.returncode == 1 and '"scale" must be a positive number' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    no_traceback(r.stderr)


def test_export_to_an_empty_name_is_a_usage_error_before_the_model_loads(tmp_path: Path) -> None:
    r = run("export", "onnx", "", "--model", str(tmp_path / "no-such-model"))
    assert r.returncode == 2 and "OUT_DIR is empty" in r.stderr, r.stderr
    no_traceback(r.stderr)


def test_the_doctor_checks_an_export(export_dir: Path, tmp_path: Path) -> None:
    from tests.doctor.test_doctor import doctor

    proc, out = doctor("--model", str(export_dir))
    checks = out["by_name"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "an ONNX export" in checks["model"]["detail"] and "unreadable" not in proc.stdout
    assert "as the manifest's SHA-256 says" in checks["weights_complete"]["detail"]
    assert checks["selftest_score"]["status"] == "ok", checks["selftest_score"]
    bad = tampered(export_dir, tmp_path, "zeros")
    proc, out = doctor("--model", str(bad))
    assert proc.returncode == 1 and out["failed"] == ["weights_complete"], out["failed"]
    assert "vision.onnx.data: SHA-256" in out["by_name"]["weights_complete"]["detail"]
    assert not os.path.exists(tmp_path / "weight-hashes.json")
