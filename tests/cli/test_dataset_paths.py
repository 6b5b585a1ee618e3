"""Dataset shards wherever image PATHs are taken, through the real CLI in process: `batch`, `best-of-n` and
`prompts` read webdataset shards and parquet as `score` does (the same reader, the same guards), a sample scores as
the same image as a file; what needs image files (--html, --copy-to) refuses shards, and so does `compare`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pickrank.cli.app import app
from tests.support.commands import cli, jsonl
from tests.support.shards import CAPTIONS, build_shards, write_parquet, write_tar

pq = pytest.importorskip("pyarrow.parquet")
PROMPT = "a red cat on a sofa"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards of four samples, the same images as files, a parquet of the first shard's images, a bad shard."""
    root = tmp_path_factory.mktemp("dataset_paths")
    built = build_shards(root / "shards", n_shards=2, per_shard=4, files=root / "files")
    keys = sorted(k for k in built.images if k.startswith("00000"))
    write_parquet(root / "table.parquet", {"key": keys, "jpg": [built.images[k] for k in keys],
                                           "caption": [built.captions[k] for k in keys]}, row_group_size=3)
    write_tar(root / "bad.tar", [("a.jpg", built.images[keys[0]]), ("a.txt", b"x"),
                                 ("b.jpg", b"not an image at all"), ("c.jpg", b"y", {"type": b"2", "linkname": "/etc"})])
    return root, built


@pytest.fixture(scope="module")
def file_scores(model_dir, data):
    """Every image scored as a loose file against PROMPT: key -> score."""
    root, _ = data
    res = cli(CliRunner(), model_dir, "score", "-p", PROMPT, str(root / "files"), "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return {r["path"].rsplit("/", 1)[1].split(".")[0]: r["score"] for r in jsonl(res.stdout)}


def key_of(path: str) -> str:
    return path.rsplit("#", 1)[1]


def test_batch_takes_shards_and_parquet_as_paths_and_cells(runner, model_dir, data, file_scores, tmp_path):
    root, built = data
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"id,prompt,images\nall,{PROMPT},\none,{PROMPT},{root / 'table.parquet'}\n")
    res = cli(runner, model_dir, "batch", str(csv), str(root / "shards/{00000..00001}.tar"), "-f", "jsonl")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    shared = [r for r in recs if r["id"] == "all"]
    assert len(shared) == 8 and sorted(r["rank"] for r in shared) == list(range(1, 9))
    assert all(r["path"].startswith(str(root / "shards")) and "#" in r["path"] for r in shared)
    cell = [r for r in recs if r["id"] == "one"]
    assert len(cell) == 4 and all(r["path"].startswith(str(root / "table.parquet") + "#") for r in cell)
    for r in shared + cell:
        assert r["error"] is None and r["score"] == pytest.approx(file_scores[key_of(r["path"])], abs=1e-5)


def test_batch_html_refuses_shards_before_the_model_loads(runner, model_dir, data, tmp_path):
    root, _ = data
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"prompt\n{PROMPT}\n")
    res = runner.invoke(app, ["batch", str(csv), str(root / "shards"), "--html", str(tmp_path / "p.html"),
                         "--model", str(tmp_path / "no-model"), "--no-cache"])
    assert res.exit_code == 2, res.output
    assert "--html needs image files" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p.html").exists()


def test_best_of_n_makes_a_group_of_each_shard(runner, model_dir, data, file_scores):
    root, _ = data
    res = cli(runner, model_dir, "best-of-n", str(root / "shards"), "-p", PROMPT, "--top", "2", "-f", "jsonl")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert [r["group"] for r in recs] == ["00000", "00000", "00001", "00001"]
    for group in ("00000", "00001"):
        mine = {k: v for k, v in file_scores.items() if k.startswith(group)}
        best = sorted(mine, key=mine.get, reverse=True)[:2]
        assert [key_of(r["path"]) for r in recs if r["group"] == group] == best


def test_best_of_n_takes_a_shards_first_caption_and_copy_to_refuses(runner, model_dir, data, tmp_path):
    root, _ = data
    res = cli(runner, model_dir, "best-of-n", str(root / "shards/00001.tar"), "-f", "jsonl")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert len(recs) == 1 and recs[0]["prompt"] == CAPTIONS[0] and recs[0]["prompt_source"] == "caption"
    res = cli(runner, model_dir, "best-of-n", str(root / "shards"), "-p", PROMPT, "--copy-to", str(tmp_path / "k"))
    assert res.exit_code == 2 and "--copy-to needs image files" in res.output, res.output
    assert not (tmp_path / "k").exists()


def test_bad_samples_are_error_records_in_batch(runner, model_dir, data, tmp_path):
    root, _ = data
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"prompt\n{PROMPT}\n")
    res = cli(runner, model_dir, "batch", str(csv), str(root / "bad.tar"), "-f", "jsonl")
    assert res.exit_code == 3, res.output
    recs = {key_of(r["path"]): r for r in jsonl(res.stdout)}
    assert recs["a"]["error"] is None and recs["a"]["rank"] == 1
    assert "not an image" in recs["b"]["error"]
    assert "symlink" in recs["c"]["error"] and "not followed" in recs["c"]["error"]


def test_prompts_lists_each_samples_caption(runner, data, tmp_path):
    root, built = data
    res = runner.invoke(app, ["prompts", str(root / "shards/00000.tar"), str(root / "bad.tar"), "-f", "jsonl"])
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in jsonl(res.stdout)}
    for key in (k for k in built.captions if k.startswith("00000")):
        row = rows[f"{root / 'shards/00000.tar'}#{key}"]
        assert (row["prompt"], row["source"], row["reason"]) == (built.captions[key], "caption", None)
    assert rows[f"{root / 'bad.tar'}#b"]["reason"] == "no caption"
    assert "not followed" in rows[f"{root / 'bad.tar'}#c"]["reason"]


def test_compare_refuses_shards(runner, data):
    root, _ = data
    res = runner.invoke(app, ["compare", str(root / "shards/00000.tar"), str(root / "shards/00001.tar")])
    assert res.exit_code == 2 and "reads no dataset shards" in res.output, res.output
    assert "Traceback" not in res.output


def test_an_output_over_a_shard_that_a_glob_names_is_refused(runner, model_dir, data, tmp_path):
    root, _ = data
    shard = tmp_path / "t.parquet"
    shard.write_bytes((root / "table.parquet").read_bytes())
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"prompt\n{PROMPT}\n")
    res = cli(runner, model_dir, "batch", str(csv), str(tmp_path / "*.parquet"), "-o", str(shard))
    assert res.exit_code == 2 and "is also an input" in res.output, res.output
    assert shard.read_bytes() == (root / "table.parquet").read_bytes()


def test_where_a_samples_parts_are_is_settable_on_every_command_that_reads_shards(runner, model_dir, data,
                                                                                 file_scores, tmp_path):
    """--image-key, --caption-key and the --*-column options work on batch, best-of-n and prompts as on score: a
    webdataset whose images are `.pic` members with `.desc` captions, and a parquet of unusual column names."""
    root, built = data
    keys = sorted(k for k in built.images if k.startswith("00000"))
    odd_tar = write_tar(tmp_path / "odd.tar", [e for k in keys for e in ((f"{k}.pic", built.images[k]),
                                                                         (f"{k}.desc", built.captions[k].encode()))])
    odd_pq = write_parquet(tmp_path / "odd.parquet", {"name": keys, "pixels": [built.images[k] for k in keys],
                                                      "words": [built.captions[k] for k in keys]})
    keyed = ["--image-key", "pic", "--caption-key", "desc"]
    columns = ["--image-column", "pixels", "--caption-column", "words", "--key-column", "name"]
    best = cli(runner, model_dir, "best-of-n", str(odd_tar), *keyed, "--top", "4", "-f", "jsonl")
    assert best.exit_code == 0, best.output
    assert {r["prompt"] for r in jsonl(best.stdout)} == {built.captions[keys[0]]}  # the first caption, from .desc
    csv = tmp_path / "prompts.csv"
    csv.write_text(f"prompt\n{PROMPT}\n")
    for path, extra in ((odd_tar, keyed), (odd_pq, columns)):
        res = cli(runner, model_dir, "batch", str(csv), str(path), *extra, "-f", "jsonl")
        assert res.exit_code == 0, res.output
        recs = jsonl(res.stdout)
        assert sorted(key_of(r["path"]) for r in recs) == keys
        assert all(r["score"] == pytest.approx(file_scores[key_of(r["path"])], abs=1e-5) for r in recs)
        rows = jsonl(runner.invoke(app, ["prompts", str(path), *extra, "-f", "jsonl"]).stdout)
        assert {key_of(r["path"]): r["prompt"] for r in rows} == {k: built.captions[k] for k in keys}
    res = cli(runner, model_dir, "batch", str(csv), str(odd_pq), "--image-column", "nope", "-f", "jsonl")
    assert res.exit_code == 2 and "nope" in res.output, res.output  # a missing column: before the model loads
