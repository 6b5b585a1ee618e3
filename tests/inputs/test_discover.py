"""Path discovery: folders (recursive, sorted), globs, stdin, explicit files, each path once, no symlink loops."""

from __future__ import annotations

import io
import os

from pickrank.inputs.discover import expand, is_image_name, walk_images


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_extensions_case_insensitive():
    for name in ["a.png", "a.JPG", "a.jpeg", "a.webp", "a.bmp", "a.gif", "a.tif", "a.TIFF"]:
        assert is_image_name(name)
    assert not is_image_name("a.txt") and not is_image_name("png")


def test_walk_is_recursive_sorted_and_skips_other_files(tmp_path):
    for rel in ["b.png", "a.jpg", "notes.txt", "sub/c.webp", "sub/deeper/d.gif", "z/readme.md"]:
        touch(tmp_path / rel)
    got = [os.path.relpath(p, tmp_path) for p in walk_images(str(tmp_path))]
    assert got == ["a.jpg", "b.png", os.path.join("sub", "c.webp"), os.path.join("sub", "deeper", "d.gif")]


def test_symlink_loop_is_walked_once(tmp_path):
    touch(tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert [os.path.basename(p) for p in walk_images(str(tmp_path))] == ["x.png"]


def test_expand_folder_glob_stdin_and_dedupe(tmp_path):
    a = touch(tmp_path / "a.png")
    b = touch(tmp_path / "sub" / "b.jpg")
    stdin = io.StringIO(f"{a}\n\n{b}\n")
    got = list(expand([str(tmp_path), str(tmp_path / "**" / "*.jpg"), "-", str(a)], stdin))
    assert got == [str(a), str(b)]
    assert list(expand([str(tmp_path / "*.png")])) == [str(a)]
    assert list(expand([str(tmp_path / "**" / "*")])) == [str(a), str(b)]  # recursive glob, non-images skipped


def test_explicit_files_pass_whatever_they_are(tmp_path):
    txt = touch(tmp_path / "notes.txt")
    missing = tmp_path / "missing.png"
    # an explicit non-image or missing file is yielded, so it is reported as an error rather than dropped
    assert list(expand([str(txt), str(missing)])) == [str(txt), str(missing)]


def test_expand_is_lazy(tmp_path):
    for i in range(3):
        touch(tmp_path / f"{i}.png")
    it = expand([str(tmp_path)])
    assert next(it).endswith("0.png")
