"""Small datasets for the tests, built in tmp_path with tarfile and pyarrow: webdataset shards of a few samples
(a JPEG or PNG, a caption, a json with a 128-bit uid), the same images as loose files, parquet with image bytes."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CAPTIONS = ("a red cat on a sofa", "a blue dog in the snow")


def image_bytes(seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG") -> bytes:
    """A deterministic picture, encoded."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        d.ellipse([x0, y0, x0 + size[0] // 2, y0 + size[1] // 2], fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def uid_of(shard: int, i: int) -> str:
    return f"{shard:08x}{'ab' * 4}{i:016x}"


@dataclass
class Built:
    """A dataset built for a test: its shard paths, and per key the image bytes, caption and uid."""

    shards: list[Path] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)
    members: dict[str, dict[str, bytes]] = field(default_factory=dict)  # key -> {member name: bytes}


def add_member(tar: tarfile.TarFile, name: str, data: bytes, **kind: object) -> None:
    """A member with these bytes (or, with `type=...` and `linkname=...`, a link or device with no data)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for k, v in kind.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def sample_members(key: str, shard: int, i: int, seed: int) -> dict[str, bytes]:
    """A webdataset sample's members: an image (PNG every third sample), its caption, its json with a uid."""
    ext, fmt = ("png", "PNG") if i % 3 == 2 else ("jpg", "JPEG")
    meta = {"uid": uid_of(shard, i), "key": key, "url": f"https://example.com/{key}.{ext}"}
    return {f"{key}.{ext}": image_bytes(seed, fmt=fmt), f"{key}.txt": CAPTIONS[i % 2].encode(),
            f"{key}.json": json.dumps(meta).encode()}


def build_shards(folder: Path, n_shards: int = 2, per_shard: int = 4, files: Path | None = None) -> Built:
    """n_shards webdataset shards 00000.tar, ... of per_shard samples each; with `files`, each image also written
    there as a loose file named by its key, in a subfolder per caption."""
    folder.mkdir(parents=True, exist_ok=True)
    built = Built()
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                members = sample_members(key, s, i, seed=100 * s + i)
                for name, data in members.items():
                    add_member(tar, name, data)
                image = next(v for k, v in members.items() if k.endswith(("jpg", "png")))
                built.images[key], built.captions[key] = image, CAPTIONS[i % 2]
                built.uids[key], built.members[key] = uid_of(s, i), members
                if files is not None:
                    ext = "png" if i % 3 == 2 else "jpg"
                    (files / str(i % 2)).mkdir(parents=True, exist_ok=True)
                    (files / str(i % 2) / f"{key}.{ext}").write_bytes(image)
        built.shards.append(path)
    return built


def write_tar(path: Path, entries: list[tuple]) -> Path:
    """A tar of (name, bytes) or (name, bytes, {TarInfo attributes}) entries, in order."""
    with tarfile.open(path, "w") as tar:
        for entry in entries:
            add_member(tar, entry[0], entry[1], **(entry[2] if len(entry) > 2 else {}))
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    """A parquet file of these columns (a list of dicts becomes a struct column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def read_records(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
