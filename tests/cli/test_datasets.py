"""`pickrank score` on datasets through the real CLI: webdataset shards and parquet score as the same images as files
do, `-o DIR/` writes one stamped parquet per shard and a rerun resumes, every bad input is an error record (exit 3)
or a usage error (exit 2), and a run stopped by SIGTERM keeps its finished shards and resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pickrank.cli.app import app
from tests.support.commands import invoke
from tests.support.shards import CAPTIONS, build_shards, image_bytes, read_records, write_parquet, write_tar

pq = pytest.importorskip("pyarrow.parquet")
PROMPT = "a red cat on a sofa"


def run(runner, model_dir, *args: str, cache: bool = False):
    extra = [] if cache else ["--no-cache"]
    return runner.invoke(app, [*args, "--model", str(model_dir), "--workers", "0", *extra])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def file_scores(runner, model_dir, folder: Path, prompt: str) -> dict[str, float]:
    """The same images scored as loose files: key (the file's stem) -> score."""
    res = run(runner, model_dir, "score", "-p", prompt, str(folder), "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return {Path(r["path"]).stem: r["score"] for r in jsonl(res.stdout)}


def out_records(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: read_records(p) for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture
def dataset(tmp_path):
    return build_shards(tmp_path / "shards", n_shards=2, per_shard=4, files=tmp_path / "files")


# -- scores equal the files' ---------------------------------------------------------------------------------------

def test_shards_with_a_prompt_score_as_the_same_files(runner, model_dir, dataset, tmp_path):
    res = run(runner, model_dir, "score", str(tmp_path / "shards/{00000..00001}.tar"), "-p", PROMPT,
              "-o", str(tmp_path / "out") + "/")
    assert res.exit_code == 0, res.output
    outs = out_records(tmp_path / "out")
    assert list(outs) == ["00000", "00001"]
    files = {**file_scores(runner, model_dir, tmp_path / "files/0", PROMPT),
             **file_scores(runner, model_dir, tmp_path / "files/1", PROMPT)}
    for stem, recs in outs.items():
        assert len(recs) == 4 and [r["rank"] for r in recs] == [1, 2, 3, 4]  # one ranking per shard, best first
        assert sum(r["prob"] for r in recs) == pytest.approx(1, abs=1e-5)
        for r in recs:
            assert r["score"] == pytest.approx(files[r["key"]], abs=1e-5)
            assert r["uid"] == dataset.uids[r["key"]] and r["prompt_source"] == "option" and r["error"] is None
            assert r["shard"] == str((tmp_path / "shards" / f"{stem}.tar").resolve())


def test_captions_score_each_sample_and_rank_shared_captions_together(runner, model_dir, dataset, tmp_path):
    res = run(runner, model_dir, "score", str(tmp_path / "shards/{00000..00001}.tar"), "--prompt-from", "caption",
              "-o", f"{tmp_path / 'scores'}/")
    assert res.exit_code == 0, res.output
    outs = out_records(tmp_path / "scores")
    assert list(outs) == ["00000", "00001"]
    recs = [r for shard in outs.values() for r in shard]
    assert len(recs) == 8
    expected = {}
    for i, caption in enumerate(CAPTIONS):
        expected.update(file_scores(runner, model_dir, tmp_path / "files" / str(i), caption))
    for r in recs:
        assert r["prompt"] == dataset.captions[r["key"]] and r["prompt_source"] == "caption"
        assert r["score"] == pytest.approx(expected[r["key"]], abs=1e-5)
    for shard in {r["shard"] for r in recs}:  # within a shard, the samples of one caption are one ranking
        for caption in CAPTIONS:
            group = [r for r in recs if r["shard"] == shard and r["prompt"] == caption]
            raw = np.array([r["score"] for r in group])
            probs = np.exp(raw - raw.max()) / np.exp(raw - raw.max()).sum()
            assert [r["prob"] for r in group] == pytest.approx(list(probs), abs=1e-5)
            assert sorted(r["rank"] for r in group) == list(range(1, len(group) + 1))
            assert [r["rank"] for r in sorted(group, key=lambda r: -r["score"])] == list(range(1, len(group) + 1))


@pytest.mark.parametrize("layout", ["binary", "struct"])
def test_parquet_with_image_bytes_scores_as_the_same_files(layout, runner, model_dir, dataset, tmp_path):
    keys = list(dataset.images)
    images = [dataset.images[k] for k in keys]
    column = images if layout == "binary" else [{"bytes": b, "path": f"{k}.jpg"} for k, b in zip(keys, images)]
    path = write_parquet(tmp_path / "data.parquet", {"key": keys, ("jpg" if layout == "binary" else "image"): column,
                                                     "caption": [dataset.captions[k] for k in keys]},
                         row_group_size=3)
    res = run(runner, model_dir, "score", str(path), "-p", PROMPT, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    files = {**file_scores(runner, model_dir, tmp_path / "files/0", PROMPT),
             **file_scores(runner, model_dir, tmp_path / "files/1", PROMPT)}
    assert sorted(r["key"] for r in recs) == sorted(keys)
    for r in recs:
        assert r["score"] == pytest.approx(files[r["key"]], abs=1e-5) and r["uid"] is None


def test_a_sample_embedded_from_a_folder_is_not_embedded_again(runner, model_dir, dataset, tmp_path, count_embeds):
    res = run(runner, model_dir, "score", "-p", PROMPT, str(tmp_path / "files"), "-f", "jsonl", cache=True)
    assert res.exit_code == 0, res.output
    before = sum(count_embeds)
    assert before == 8
    res = run(runner, model_dir, "score", str(tmp_path / "shards"), "-p", PROMPT, "-f", "jsonl", cache=True)
    assert res.exit_code == 0, res.output
    assert sum(count_embeds) == before and "8 from cache" in res.stderr


# -- parquet outputs -------------------------------------------------------------------------------------------------

def test_one_parquet_file_has_typed_columns_and_the_provenance(runner, model_dir, dataset, tmp_path):
    out = tmp_path / "scores.parquet"
    res = run(runner, model_dir, "score", str(tmp_path / "shards"), "-p", PROMPT, "-o", str(out))
    assert res.exit_code == 0, res.output
    schema = pq.read_schema(out)
    assert schema.names == ["key", "uid", "shard", "prompt", "prompt_source", "score", "prob", "rank", "truncated",
                            "error"]
    assert [str(schema.field(n).type) for n in ("score", "prob", "rank", "truncated", "key")] == \
        ["double", "double", "int64", "bool", "string"]
    meta = json.loads(pq.read_metadata(out).metadata[b"pickrank.provenance"])
    assert meta["scale"] == "raw" and meta["model"] == str(model_dir)
    assert len(read_records(out)) == 8


def test_f_parquet_for_images_too(runner, model_dir, images, tmp_path):
    out = tmp_path / "x.parquet"
    res = run(runner, model_dir, "score", "-p", PROMPT, str(images), "-o", str(out))
    assert res.exit_code == 0, res.output
    recs = read_records(out)
    assert len(recs) == 6 and {r["rank"] for r in recs} == set(range(1, 7)) and "path" in recs[0]
    assert b"pickrank.provenance" in pq.read_metadata(out).metadata


@pytest.mark.parametrize("args,message", [
    (["-o", "{tmp}/x.out"], "does not know the extension .out"),
    (["-f", "parquet"], "-f parquet writes a file"),
])
def test_unknown_extension_and_parquet_to_stdout_are_usage_errors(args, message, runner, model_dir, images, tmp_path):
    res = run(runner, model_dir, "score", "-p", PROMPT, str(images), *[a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not (tmp_path / "x.out").exists() and res.stdout == ""


# -- resume --------------------------------------------------------------------------------------------------------

def test_a_rerun_skips_finished_shards_and_refuses_a_changed_option(runner, model_dir, dataset, tmp_path,
                                                                     count_embeds):
    out = str(tmp_path / "out") + "/"
    shards = str(tmp_path / "shards")
    assert run(runner, model_dir, "score", shards, "-o", out).exit_code == 0
    first = out_records(tmp_path / "out")
    embedded = sum(count_embeds)
    (tmp_path / "out" / "00001.parquet").unlink()  # as if the run had stopped during the second shard
    res = run(runner, model_dir, "score", shards, "-o", out)
    assert res.exit_code == 0, res.output
    assert "1 of 2 shard(s) already scored" in res.stderr and "4 image(s)" in res.stderr
    assert sum(count_embeds) == embedded + 4  # only the missing shard (no cache here)
    assert out_records(tmp_path / "out") == first
    res = run(runner, model_dir, "score", shards, "-o", out, "--scale", "cosine")
    assert res.exit_code == 2 and "--scale changed" in res.stderr and "--overwrite" in res.stderr
    res = run(runner, model_dir, "score", shards, "-o", out, "-p", PROMPT)
    assert res.exit_code == 2 and "the prompt changed" in res.stderr
    res = run(runner, model_dir, "score", shards, "-o", out, "--scale", "cosine", "--overwrite")
    assert res.exit_code == 0, res.output
    rescored = out_records(tmp_path / "out")["00000"]
    assert rescored[0]["score"] == pytest.approx(first["00000"][0]["score"] / 100, rel=0.5)  # cosine, not raw


def test_a_file_pickrank_did_not_write_is_never_overwritten(runner, model_dir, dataset, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.parquet").write_text("someone else's")
    res = run(runner, model_dir, "score", str(tmp_path / "shards"), "-o", str(tmp_path / "out"), "--overwrite")
    assert res.exit_code == 2 and "did not write" in res.stderr
    assert (tmp_path / "out" / "00000.parquet").read_text() == "someone else's"


# -- bad input: error records, the run goes on (exit 3) --------------------------------------------------------------

@pytest.fixture
def bad(tmp_path):
    """A folder of shards, each with some damage, and one good one."""
    folder = tmp_path / "bad"
    good = build_shards(folder, n_shards=1, per_shard=3)
    jpg, big = image_bytes(7), image_bytes(8, size=(600, 600), fmt="PNG")
    write_tar(folder / "10-members.tar", [
        ("ok.jpg", jpg), ("ok.txt", b"a cat"),
        ("text.jpg", b"this is not an image, whatever its name"), ("text.txt", b"a cat"),
        ("noimage.txt", b"a caption alone"),
        ("nocaption.jpg", jpg),
        ("link.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}), ("link.txt", b"a cat"),
        ("hard.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "ok.jpg"}),
        ("dev.jpg", b"", {"type": tarfile.CHRTYPE}),
        ("../escape.jpg", jpg), ("/abs.jpg", jpg),
        ("huge.png", big), ("huge.txt", b"a cat"),
        ("ok.json", b"{}"),  # ok again, later: a duplicate key
    ])
    trunc = write_tar(folder / "20-truncated.tar", [(f"t{i}.{e}", d) for i in range(3)
                                                    for e, d in (("jpg", image_bytes(20 + i)), ("txt", b"a cat"))])
    data = trunc.read_bytes()
    with tarfile.open(trunc) as tar:
        cut = [m for m in tar.getmembers() if m.name == "t2.jpg"][0].offset_data + 100
    trunc.write_bytes(data[:cut])
    return folder, good, len(big)


def test_every_bad_input_is_an_error_record_and_the_rest_is_scored(runner, model_dir, bad, tmp_path):
    folder, good, big = bad
    (folder / "30-notparquet.parquet").write_bytes(b"PAR1 definitely not")
    out = tmp_path / "out"
    res = run(runner, model_dir, "score", str(folder / "*.tar"), str(folder / "30-notparquet.parquet"),
              "--prompt-from", "caption", "--max-bytes", str(big - 1), "-o", str(out) + "/")
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    outs = out_records(out)
    assert sorted(outs) == ["00000", "10-members", "20-truncated", "30-notparquet"]
    assert all(r["error"] is None for r in outs["00000"]) and len(outs["00000"]) == 3
    errors = {r["key"]: r["error"] for r in outs["10-members"] if r["error"]}
    assert [r["key"] for r in outs["10-members"] if r["error"] is None] == ["ok"]
    assert errors["text"] == "not an image (unrecognised format)"
    assert errors["noimage"] == "no image in this sample"
    assert errors["nocaption"].startswith("no caption")
    assert "symlink" in errors["link"] and "hard link" in errors["hard"] and "device" in errors["dev"]
    assert "outside the shard" in errors["../escape.jpg"] and "outside the shard" in errors["/abs.jpg"]
    assert "too large" in errors["huge"] and "--max-bytes" in errors["huge"]
    assert errors["ok"].startswith("duplicate key")
    assert all(r["shard"] == str((folder / "10-members.tar").resolve()) for r in outs["10-members"])
    trunc = outs["20-truncated"]
    assert sorted(r["key"] for r in trunc if r["error"] is None) == ["t0", "t1"]  # the samples before the damage
    damage = [r for r in trunc if r["key"] is None]
    assert len(damage) == 1 and "truncated or corrupt at offset" in damage[0]["error"]
    assert "not a readable parquet" in outs["30-notparquet"][0]["error"]
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs.jpg").exists()  # nothing extracted
    # a rerun scores again only the shards that could not be read to their end
    res = run(runner, model_dir, "score", str(folder / "*.tar"), str(folder / "30-notparquet.parquet"),
              "--prompt-from", "caption", "--max-bytes", str(big - 1), "-o", str(out) + "/")
    assert res.exit_code == 3 and "2 of 4 shard(s) already scored" in res.stderr, res.output


def test_bad_samples_under_one_prompt_are_error_records_of_its_ranking(runner, model_dir, bad):
    folder, good, big = bad
    res = run(runner, model_dir, "score", str(folder / "10-members.tar"), "-p", PROMPT, "--max-bytes",
              str(big - 1), "-f", "jsonl")
    assert res.exit_code == 3, res.output
    recs = jsonl(res.stdout)
    scored = [r for r in recs if r["error"] is None]
    assert [r["key"] for r in scored] == ["ok", "nocaption"] or [r["key"] for r in scored] == ["nocaption", "ok"]
    assert {r["rank"] for r in scored} == {1, 2}
    assert "10-members.tar#text: not an image" in res.stderr


def test_a_corrupt_header_and_a_row_group_that_fails_are_error_records(runner, model_dir, tmp_path):
    """A tar header whose checksum is wrong mid-shard, a parquet row group whose page cannot be decoded: the samples
    before (and, in parquet, after) the damage are scored, one record names the shard and where, exit 3."""
    folder = tmp_path / "data"
    built = build_shards(folder, n_shards=1, per_shard=3)
    shard = built.shards[0]
    with tarfile.open(shard) as tar:
        second = [m for m in tar.getmembers() if m.name.startswith("000000001.")][0]
    data = bytearray(shard.read_bytes())
    data[second.offset + 148:second.offset + 156] = b"garbage!"  # its header's checksum field
    shard.write_bytes(bytes(data))
    path = write_parquet(folder / "rg.parquet", {"key": ["a", "b", "c", "d"], "jpg": [image_bytes(i) for i in range(4)],
                                                 "caption": ["a cat"] * 4}, row_group_size=2)
    at = pq.read_metadata(path).row_group(0).column(1).data_page_offset  # the jpg column's first page, row group 0
    data = bytearray(path.read_bytes())
    data[at:at + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    res = run(runner, model_dir, "score", str(shard), str(path), "--prompt-from", "caption", "-o", f"{out}/")
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    outs = out_records(out)
    tar_recs, pq_recs = outs["00000"], outs["rg"]
    assert [r["key"] for r in tar_recs if r["error"] is None] == ["000000000"]
    (damage,) = [r for r in tar_recs if r["error"] is not None]
    assert "corrupt header" in damage["error"] and f"offset {second.offset}" in damage["error"]
    assert damage["shard"] == str(shard.resolve())
    assert sorted(r["key"] for r in pq_recs if r["error"] is None) == ["c", "d"]  # the next row group is read
    (failed,) = [r for r in pq_recs if r["error"] is not None]
    assert "row group 0" in failed["error"] and failed["shard"] == str(path.resolve())


@pytest.mark.parametrize("args,message", [
    (["--prompt-from", "metadata"], "--prompt-from metadata reads images"),
    (["--top", "1", "-p", PROMPT], "--top keeps part"),
    (["-p", PROMPT, "--html", "{tmp}/p.html"], "--html shows image files"),
    (["-p", PROMPT, "-o", "{tmp}/out/", "-f", "csv"], "one parquet per shard, not -f csv"),
])
def test_what_a_dataset_run_refuses(args, message, runner, model_dir, dataset, tmp_path):
    res = run(runner, model_dir, "score", str(tmp_path / "shards"), *[a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_caption_needs_datasets_and_a_missing_column_fails_before_the_model_loads(runner, images, tmp_path):
    res = runner.invoke(app, ["score", str(images), "--prompt-from", "caption", "--model", str(tmp_path / "none")])
    assert res.exit_code == 2 and "--prompt-from caption reads dataset shards" in res.stderr
    path = write_parquet(tmp_path / "meta.parquet", {"uid": ["a"], "jpg": [image_bytes(1)]})
    res = runner.invoke(app, ["score", str(path), "--model", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no caption column" in res.stderr, res.output  # not the missing model


# -- stopped mid-run -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_keeps_finished_shards_and_the_rerun_resumes(sig, code, model_dir, tmp_path):
    built = build_shards(tmp_path / "shards", n_shards=16, per_shard=3)
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite3"
    cmd = [sys.executable, "-m", "pickrank", "score", str(tmp_path / "shards/{00000..00015}.tar"), "-o", f"{out}/",
           "--model", str(model_dir), "--cache", str(cache), "--workers", "0", "--batch-size", "1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and not (out.exists() and any(out.glob("*.parquet"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err.decode()
    assert "Traceback" not in err.decode()
    done = sorted(p.name for p in out.iterdir())
    assert all(n.endswith(".parquet") and not n.startswith(".") for n in done)  # no temp file left behind
    assert 1 <= len(done) < 16, "the run was not stopped mid-way"
    for name in done:  # every output there is whole
        assert len(read_records(out / name)) == 3
    rerun = invoke(*[c for c in cmd[3:] if c != "-q"])
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} of 16 shard(s) already scored" in rerun.stderr
    left = 3 * (16 - len(done))
    summary = [line for line in rerun.stderr.splitlines() if "embedded" in line][-1]
    embedded = int(summary.split("image(s), ")[1].split(" embedded")[0])
    assert f"{left} image(s)" in summary and embedded <= left  # the shard cut short comes from the cache
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.parquet" for i in range(16)]
    assert sum(len(read_records(p)) for p in out.iterdir()) == len(built.images)


def test_cached_samples_queued_behind_a_miss_are_let_out_in_bounds(runner, model_dir, tmp_path, monkeypatch):
    """Engine.rank_open's memos are bounded: with room for 8 prompts, 12 cached samples (each its own caption)
    waiting behind one that must be embedded are drained before their prompts could be forgotten."""
    from pickrank.core.engine import Engine

    monkeypatch.setattr(Engine, "OPEN_MEMO", 8)
    samples = [(f"s{i:02d}", image_bytes(300 + i), f"caption number {i}".encode()) for i in range(13)]
    entries = lambda rows: [e for k, img, cap in rows for e in ((f"{k}.jpg", img), (f"{k}.txt", cap))]  # noqa: E731
    warm = write_tar(tmp_path / "warm.tar", entries(samples[1:]))
    res = run(runner, model_dir, "score", str(warm), "--prompt-from", "caption", "-f", "jsonl", cache=True)
    assert res.exit_code == 0, res.output
    first = {r["key"]: r["score"] for r in jsonl(res.stdout)}
    cold = write_tar(tmp_path / "cold.tar", entries(samples))
    res = run(runner, model_dir, "score", str(cold), "--prompt-from", "caption", "-f", "jsonl", "--batch-size", "1",
              cache=True)
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert [r["key"] for r in recs] == [k for k, _, _ in samples] and "12 from cache" in res.stderr
    assert [r["score"] for r in recs[1:]] == pytest.approx([first[r["key"]] for r in recs[1:]], abs=1e-5)
