"""Reading datasets without a model: shard discovery (globs, brace ranges, folders), webdataset shards streamed and
guarded (damage, unsafe members, --max-bytes before reading), parquet columns found and row groups read one by one."""

from __future__ import annotations

import gzip
import os
import tarfile

import pytest

from pickrank.errors import NoImages, UsageError
from pickrank.inputs.datasets.parquet import layout, open_parquet, parquet_samples
from pickrank.inputs.datasets.paths import expand_braces, find_shards, uses_datasets
from pickrank.inputs.datasets.samples import ShardError, uid_halves
from pickrank.inputs.datasets.webdataset import raw_samples, tar_samples
from pickrank.options import DatasetOptions
from tests.support.shards import build_shards, image_bytes, write_parquet, write_tar

JPG = image_bytes(1)


def read_all(path, max_bytes=None, options=DatasetOptions()):
    """(samples, the ShardError's message or None)."""
    got = []
    try:
        for s in tar_samples(str(path), options, max_bytes):
            got.append(s)
    except ShardError as e:
        return got, str(e)
    return got, None


# -- discovery ---------------------------------------------------------------------------------------------------

def test_brace_ranges_keep_their_padding_and_lists_expand():
    assert list(expand_braces("s/{00008..00011}.tar")) == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert list(expand_braces("{a,b}/{0..1}.tar")) == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert list(expand_braces("plain{}.tar")) == ["plain{}.tar"]


def test_find_shards_from_folders_globs_and_ranges(tmp_path):
    build_shards(tmp_path / "d", n_shards=3, per_shard=1)
    (tmp_path / "d" / "00000.parquet").write_bytes(b"metadata beside a tar, as img2dataset writes")
    names = lambda shards: [os.path.basename(s.path) for s in shards]  # noqa: E731
    assert names(find_shards([str(tmp_path / "d")])) == ["00000.tar", "00001.tar", "00002.tar"]  # tars, not parquet
    assert names(find_shards([str(tmp_path / "d/*.tar")])) == ["00000.tar", "00001.tar", "00002.tar"]
    ranged = find_shards([str(tmp_path / "d/{00001..00003}.tar")])
    assert names(ranged) == ["00001.tar", "00002.tar", "00003.tar"]  # 00003 is missing: its error record comes later
    with pytest.raises(NoImages):
        find_shards([str(tmp_path / "d/*.nothing.tar")])


def test_a_run_is_images_or_datasets_not_both(tmp_path, images):
    build_shards(tmp_path / "d", n_shards=1, per_shard=1)
    assert uses_datasets([str(tmp_path / "d")]) and not uses_datasets([str(images)])
    assert uses_datasets(["missing.tar"]) and uses_datasets(["x/{0..3}.parquet"])
    with pytest.raises(UsageError, match="not both"):
        uses_datasets([str(images), str(tmp_path / "d" / "00000.tar")])


# -- webdataset ----------------------------------------------------------------------------------------------------

def test_samples_group_members_by_key_with_caption_and_uid(tmp_path):
    built = build_shards(tmp_path, n_shards=1, per_shard=3)
    got, damage = read_all(built.shards[0])
    assert damage is None
    assert [s.key for s in got] == list(built.images)
    for s in got:
        assert s.image == built.images[s.key] and s.caption == built.captions[s.key]
        assert s.uid == built.uids[s.key] and s.error is None and s.where.startswith("offset ")
    assert uid_halves(got[0].uid) == (int(got[0].uid[:16], 16), int(got[0].uid[16:], 16))


def test_gzip_shards_and_folders_in_keys(tmp_path):
    path = write_tar(tmp_path / "a.tar", [("sub/dir/", b"", {"type": tarfile.DIRTYPE}), ("sub/dir/k1.jpg", JPG),
                                          ("sub/dir/k1.txt", b" hi \n"), ("README", b"no extension: no sample")])
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    got, damage = read_all(gz)
    assert damage is None and [(s.key, s.caption) for s in got] == [("sub/dir/k1", "hi")]


def shard_of(tmp_path, n=4):
    return write_tar(tmp_path / "s.tar", [e for i in range(n) for e in ((f"k{i}.jpg", image_bytes(i)),
                                                                        (f"k{i}.txt", b"cap"))])


def test_truncated_inside_a_member(tmp_path):
    path = shard_of(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    got, damage = read_all(path)
    assert damage is not None and "at offset" in damage
    assert [s.error for s in got[:-1]] == [None] * (len(got) - 1) and got[0].key == "k0"
    assert got[-1].error is not None or got[-1].image is not None  # the sample at the damage: cut short or whole


def test_the_sample_a_truncation_cuts_is_not_scored_as_whole(tmp_path):
    path = shard_of(tmp_path, n=2)
    with tarfile.open(path) as tar:
        caption = [m for m in tar.getmembers() if m.name == "k1.txt"][0]
    path.write_bytes(path.read_bytes()[:caption.offset_data + 1])  # k1's image whole, its caption cut
    got, damage = read_all(path)
    assert [(s.key, s.error) for s in got][0] == ("k0", None)
    assert got[1].key == "k1" and got[1].error.startswith("cut short by damage") and "at offset" in damage


def test_truncated_between_members_without_end_blocks(tmp_path):
    path = shard_of(tmp_path, n=2)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[-1]
    path.write_bytes(path.read_bytes()[:last.offset_data + 512])  # the last member whole, then nothing
    got, damage = read_all(path)
    assert [s.key for s in got] == ["k0", "k1"] and all(s.error is None for s in got)
    assert damage is not None and "end-of-archive" in damage


def test_a_corrupt_header_mid_shard_is_damage_not_a_quiet_end(tmp_path):
    path = shard_of(tmp_path, n=3)
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name == "k1.jpg"][0]
    data = bytearray(path.read_bytes())
    data[third.offset + 148:third.offset + 156] = b"garbage!"  # its checksum field
    path.write_bytes(bytes(data))
    got, damage = read_all(path)
    assert [s.key for s in got] == ["k0"] and "corrupt header" in damage and f"offset {third.offset}" in damage


def test_an_oversized_extended_header_is_refused(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(JPG)
        tar.addfile(info, __import__("io").BytesIO(JPG))
        info = tarfile.TarInfo("k1.jpg")
        info.size = len(JPG)
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info, __import__("io").BytesIO(JPG))
    got, damage = read_all(path)
    assert [s.key for s in got] == ["k0"] and "extended header" in damage


def test_unsafe_members_are_errors_never_followed(tmp_path):
    entries = [("ok.jpg", JPG),
               ("link.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
               ("hard.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "ok.jpg"}),
               ("dev.jpg", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
               ("fifo.jpg", b"", {"type": tarfile.FIFOTYPE}),
               ("../up.jpg", JPG), ("/abs.jpg", JPG), ("a/../../b.jpg", JPG)]
    got, damage = read_all(write_tar(tmp_path / "u.tar", entries))
    assert damage is None
    errors = {s.key: s.error for s in got}
    assert errors["ok"] is None
    assert "symlink" in errors["link"] and "hard link" in errors["hard"] and "device" in errors["dev"]
    assert "FIFO" in errors["fifo"]
    for name in ("../up.jpg", "/abs.jpg", "a/../../b.jpg"):
        assert "outside the shard" in errors[name]
    assert all(s.image is None for s in got if s.error)


def test_duplicate_keys_and_repeated_members(tmp_path):
    entries = [("a.jpg", JPG), ("b.jpg", JPG), ("a.jpg", JPG), ("c.jpg", JPG), ("c.jpg", JPG)]
    got, damage = read_all(write_tar(tmp_path / "d.tar", entries))
    assert [(s.key, s.error) for s in got][:2] == [("a", None), ("b", None)]
    assert "duplicate key (first at offset 0)" in got[2].error
    assert "appears twice" in got[3].error


def test_a_member_over_max_bytes_is_not_read(tmp_path, monkeypatch):
    """A thin counting wrapper around tarfile's extractfile: the big member's bytes are never asked for."""
    big = image_bytes(3, size=(800, 800), fmt="PNG")
    path = write_tar(tmp_path / "m.tar", [("big.png", big), ("big.txt", b"c"), ("small.jpg", JPG)])
    extracted = []
    real = tarfile.TarFile.extractfile

    def counting(self, member):
        extracted.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    got, damage = read_all(path, max_bytes=len(big) - 1)
    assert damage is None and "too large" in got[0].error and got[1].error is None
    assert "big.png" not in extracted and "small.jpg" in extracted


def test_members_not_wanted_are_skipped_unread(tmp_path):
    path = write_tar(tmp_path / "w.tar", [("k.jpg", JPG), ("k.npy", b"\0" * 5000), ("k.txt", b"c")])
    (raw,) = list(raw_samples(str(path), None, {"jpg", "txt"}.__contains__))
    assert [(m.ext, m.data is None) for m in raw.members] == [("jpg", False), ("npy", True), ("txt", False)]
    (everything,) = list(raw_samples(str(path), None))
    assert everything.member("npy").data == b"\0" * 5000


def test_not_a_tar_and_not_a_file(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar archive at all" * 100)
    assert "not a readable tar" in read_all(tmp_path / "x.tar")[1]
    assert read_all(tmp_path / "missing.tar")[1] == "no such file"
    os.mkfifo(tmp_path / "f.tar")
    assert "FIFO" in read_all(tmp_path / "f.tar")[1]


# -- parquet -------------------------------------------------------------------------------------------------------

def test_parquet_columns_found_from_the_usual_names(tmp_path):
    pa = pytest.importorskip("pyarrow")
    hf = write_parquet(tmp_path / "hf.parquet", {"image": [{"bytes": JPG, "path": "a.jpg"}], "text": ["cap"]})
    with open_parquet(str(hf)) as pf:
        lay = layout(pf.schema_arrow, DatasetOptions(), True, "hf")
        assert (lay.image, lay.caption, lay.key) == ("image", "text", None)
        (s,) = list(parquet_samples(pf, lay, None))
    assert (s.key, s.image, s.caption) == ("0", JPG, "cap")
    pick = write_parquet(tmp_path / "pick.parquet", {"jpg_0": [JPG], "jpg_1": [JPG], "caption": ["c"]})
    with open_parquet(str(pick)) as pf:
        with pytest.raises(UsageError, match="several columns hold bytes.*--image-column"):
            layout(pf.schema_arrow, DatasetOptions(), False, "pick")
        assert layout(pf.schema_arrow, DatasetOptions(image_column="jpg_1"), True, "pick").image == "jpg_1"
        with pytest.raises(UsageError, match="not image bytes"):
            layout(pf.schema_arrow, DatasetOptions(image_column="caption"), False, "pick")
    meta = write_parquet(tmp_path / "meta.parquet", {"uid": ["x"], "url": ["u"], "jpg": pa.array([JPG])})
    with open_parquet(str(meta)) as pf:
        with pytest.raises(UsageError, match="no caption column"):
            layout(pf.schema_arrow, DatasetOptions(), True, "meta")
        assert layout(pf.schema_arrow, DatasetOptions(), False, "meta").key == "uid"


def test_a_row_group_that_fails_is_one_error_and_the_next_is_read(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = write_parquet(tmp_path / "rg.parquet", {"key": ["a", "b", "c", "d"], "jpg": [JPG] * 4},
                         row_group_size=2)
    meta = pq.read_metadata(path)
    first = meta.row_group(0).column(1)  # the jpg column of the first row group
    data = bytearray(path.read_bytes())
    at = first.data_page_offset
    data[at:at + 16] = b"\xff" * 16  # its page header
    path.write_bytes(bytes(data))
    with open_parquet(str(path)) as pf:
        got = list(parquet_samples(pf, layout(pf.schema_arrow, DatasetOptions(), False, "rg"), None))
    assert got[0].key is None and "row group 0" in got[0].error and "rows 0-1" in got[0].where
    assert [(s.key, s.image) for s in got[1:]] == [("c", JPG), ("d", JPG)]


def test_not_a_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ShardError, match="not a readable parquet"):
        with open_parquet(str(tmp_path / "x.parquet")):
            pass
