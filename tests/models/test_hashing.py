"""The weight-hash memo: computed once per file, recomputed when the file changes, never writes a stranger's file."""

import hashlib
import json
import os

from pickrank.models.hashing import HashStore, sha256_file


def test_sha256_matches_hashlib(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(3 * (1 << 20) + 17))
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_hash_computed_once_and_reused_across_stores(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    store = tmp_path / "cache" / "weight-hashes.json"
    first = HashStore(store)
    assert first.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert first.sha256(f) == first.sha256(f) and first.computed == 1
    second = HashStore(store)  # another process: reads the store, computes nothing
    assert second.sha256(f) == first.sha256(f) and second.computed == 0


def test_changed_file_is_hashed_again(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    store = HashStore(tmp_path / "h.json")
    old = store.sha256(f)
    f.write_bytes(b"b" * 101)
    assert store.sha256(f) == hashlib.sha256(b"b" * 101).hexdigest() != old
    assert store.computed == 2


def test_a_json_file_that_is_not_ours_is_left_alone(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    store_path = tmp_path / "h.json"
    store_path.write_text(json.dumps({"someone": "else"}))
    before = store_path.read_bytes()
    assert HashStore(store_path).sha256(f) == hashlib.sha256(b"x").hexdigest()
    assert store_path.read_bytes() == before
