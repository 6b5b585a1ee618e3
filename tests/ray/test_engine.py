"""`--engine ray`: the three commands on a real local Ray give the local engine's records; errors are clear.

One local Ray (2 CPUs) serves the whole module; each run starts its own dataset and embedding actors on it.
Skipped where Ray is not installed (pip install 'pickrank[ray]'), except the missing-extra test, which runs
everywhere.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from pickrank.cli.app import app
from tests.support.commands import jsonl
from tests.support.images import draw_image, image_paths, mixed_batch_csv


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        yield ray
        return
    # The runtime env reaches every worker: no hub access, no tokenizer thread pools.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def run_both(runner, model_dir, *args: str, extra: tuple[str, ...] = ("--no-cache",), actors: int = 1):
    """The same command with --engine local and --engine ray (`actors` embedding actors: each is a process that
    imports torch and loads the model, so one where the test is not about sharing work): both results."""
    out = {}
    for engine in ("local", "ray"):
        eng = ["--engine", engine] + (["--ray-actors", str(actors)] if engine == "ray" else [])
        res = runner.invoke(app, [*args, "--model", str(model_dir), "-f", "jsonl", *extra, *eng])
        out[engine] = res
    return out["local"], out["ray"]


def assert_same_records(local: list[dict], ray: list[dict]) -> None:
    """Record by record: same order, paths, ranks, errors and fields; scores and probs within 1e-5."""
    assert len(ray) == len(local) and local
    for a, b in zip(local, ray):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("score", "prob") and a[k] is not None:
                assert b[k] == pytest.approx(a[k], abs=1e-5), (k, a, b)
            else:
                assert b[k] == a[k], (k, a, b)


@pytest.fixture
def mixed(images):
    """The six test images, a copy of one under another name, and an unreadable file."""
    shutil.copy(images / "img0.jpg", images / "copy_of_img0.jpg")
    (images / "broken.png").write_bytes(b"not a png at all")
    return images


def test_score_matches_local_with_an_unreadable_image(ray_cluster, runner, model_dir, mixed):
    local, ray = run_both(runner, model_dir, "score", "-p", "a red cat on a blue sofa", str(mixed), actors=2)
    assert local.exit_code == 3, local.output
    assert ray.exit_code == 3, ray.output
    recs = jsonl(ray.stdout)
    assert_same_records(jsonl(local.stdout), recs)
    bad = [r for r in recs if r["error"]]
    assert len(recs) == 8 and len(bad) == 1 and bad[0]["path"].endswith("broken.png")
    assert bad[0]["score"] is None and bad[0]["rank"] is None
    assert "broken.png" in ray.stderr
    copies = [r["score"] for r in recs if r["path"].endswith("img0.jpg")]
    assert len(copies) == 2 and copies[0] == copies[1]


def test_best_of_n_matches_local(ray_cluster, runner, model_dir, tmp_path):
    root = tmp_path / "out"
    for g, n in (("g1", 4), ("g2", 3), ("g3", 5)):
        for i in range(n):
            draw_image(root / g / f"{i}.png", (90 + 7 * i, 120), seed=hash((g, i)) % 1000)
        (root / g / "prompt.txt").write_text(f"prompt of {g}")
    (root / "g2" / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    local, ray = run_both(runner, model_dir, "best-of-n", str(root), "--top", "2", actors=2)
    assert local.exit_code == ray.exit_code == 3, ray.output
    recs = jsonl(ray.stdout)
    assert_same_records(jsonl(local.stdout), recs)
    assert [r["group"] for r in recs if not r["error"]] == ["g1", "g1", "g2", "g2", "g3", "g3"]


def test_batch_matches_local(ray_cluster, runner, model_dir, images, tmp_path):
    csv_path = mixed_batch_csv(images, tmp_path)
    local, ray = run_both(runner, model_dir, "batch", str(csv_path))
    assert local.exit_code == ray.exit_code == 3  # row d matches no image
    assert_same_records(jsonl(local.stdout), jsonl(ray.stdout))


@pytest.mark.parametrize("choice", [("--alpha", "drop"), ("--decode", "fast")])
def test_preprocessing_choices_reach_the_workers(ray_cluster, runner, model_dir, tmp_path, choice):
    """The actors embed with the driver's --alpha and --decode (their fingerprint must match the driver's)."""
    folder = tmp_path / "imgs"
    for i in range(3):  # transparent PNGs (alpha matters) and large JPEGs (fast decode scales them)
        draw_image(folder / f"t{i}.png", (300, 200), seed=i, mode="RGBA")
        draw_image(folder / f"j{i}.jpg", (1024, 800), seed=10 + i)
    local, ray = run_both(runner, model_dir, "score", "-p", "x", str(folder), *choice)
    assert local.exit_code == ray.exit_code == 0, ray.output
    assert_same_records(jsonl(local.stdout), jsonl(ray.stdout))


def test_ray_fills_the_cache_the_local_engine_reads(ray_cluster, runner, model_dir, images, tmp_path):
    cache = str(tmp_path / "emb.sqlite3")
    args = ["score", "-p", "x", str(images), "--model", str(model_dir), "-f", "jsonl", "--cache", cache]
    ray = runner.invoke(app, [*args, "--engine", "ray", "--ray-actors", "1"])
    assert ray.exit_code == 0, ray.output
    assert "6 embedded, 0 from cache" in ray.stderr
    local = runner.invoke(app, args)
    assert local.exit_code == 0
    assert "0 embedded, 6 from cache" in local.stderr
    assert_same_records(jsonl(local.stdout), jsonl(ray.stdout))


def test_on_error_fail_stops_the_ray_run(ray_cluster, runner, model_dir, mixed):
    res = runner.invoke(app, ["score", "-p", "x", str(mixed), "--model", str(model_dir), "--no-cache",
                              "--engine", "ray", "--ray-actors", "1", "--on-error", "fail"])
    assert res.exit_code == 1
    assert "broken.png" in res.stderr


def test_without_ray_installed_engine_ray_is_a_usage_error(runner, model_dir, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    res = runner.invoke(app, ["score", "-p", "x", str(images), "--model", str(model_dir), "--engine", "ray"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == \
        "pickrank: error: --engine ray needs Ray: pip install 'pickrank[ray]'"


def test_a_model_the_workers_cannot_load_is_a_clear_error(ray_cluster, model_dir, images):
    from dataclasses import replace

    from pickrank.errors import ModelLoadError
    from pickrank.inputs.sets import sets_for_score
    from pickrank.models.torch_embedder import Embedder, resolve_source
    from pickrank.options import RunOptions
    from pickrank.ray.engine import RayEngine

    embedder = Embedder.load(resolve_source(str(model_dir)), device="cpu")
    embedder.source = replace(embedder.source, model=str(model_dir / "missing"))  # as a worker without the folder
    engine = RayEngine(embedder, options=RunOptions(), actors=1)
    with pytest.raises(ModelLoadError, match="on a Ray worker: cannot load .*missing"):
        list(engine.rank(sets_for_score("x", image_paths(images))))


@pytest.mark.parametrize("resources, actors, expect", [
    ({"CPU": 64, "GPU": 8}, None, (8, 1, "cuda", 32)),   # one actor per GPU
    ({"CPU": 64, "GPU": 8}, 2, (2, 1, "cuda", 32)),
    ({"CPU": 2}, None, (2, 0, "cpu", 8)),                 # CPU actors share what decode tasks leave
    ({"CPU": 16}, 3, (3, 0, "cpu", 8)),
])
def test_actor_plan(resources, actors, expect):
    from pickrank.ray.engine import ActorPlan

    plan = ActorPlan(resources, actors, None)
    assert (plan.actors, plan.num_gpus, plan.device, plan.batch_size) == expect
    cpus_left = resources["CPU"] - plan.actors * plan.actor_cpus
    assert cpus_left >= 1  # room for at least one decode task, or the pipeline would stall


def test_dataset_shards_match_local(ray_cluster, runner, model_dir, tmp_path, monkeypatch):
    """Webdataset shards, each sample against its caption, with a shard cut short and one that is no tar among
    them: Ray's records are the local engine's, shard by shard, and the shards were read on Ray Data's tasks, not
    by the driver."""
    import pickrank.core.datasets
    from tests.support.shards import build_shards

    built = build_shards(tmp_path / "shards", n_shards=3, per_shard=3)
    cut = built.shards[2].read_bytes()
    built.shards[2].write_bytes(cut[:len(cut) // 2])  # its first sample(s) are scored, then a record of the damage
    (tmp_path / "shards" / "00003.tar").write_bytes(b"not a tar")
    read_here: list[str] = []
    local_reader = pickrank.core.datasets.shard_samples

    def counting(shard, reading, damage):
        read_here.append(shard.path)
        return local_reader(shard, reading, damage)

    monkeypatch.setattr(pickrank.core.datasets, "shard_samples", counting)
    local, ray = run_both(runner, model_dir, "score", str(tmp_path / "shards"), "--prompt-from", "caption")
    assert local.exit_code == 3, local.output
    assert ray.exit_code == 3, ray.output
    assert len(read_here) == 4  # the local run's four shards; the Ray run read none in this process
    recs = jsonl(ray.stdout)
    assert_same_records(jsonl(local.stdout), recs)
    assert "not a readable tar" in recs[-1]["error"]
    assert any("truncated" in (r["error"] or "") and "00002.tar" in (r["shard"] or "") for r in recs)
