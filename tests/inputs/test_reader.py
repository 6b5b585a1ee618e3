"""Preprocessing equals the CLIP image processor pixel for pixel; bad bytes become short reasons."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from pickrank.inputs.decode import ImageSpec, decode_and_preprocess, normalize, open_image, preprocess
from pickrank.inputs.files import ReadError, content_key, read_bytes


def make(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        im = im.convert("RGB").quantize(16)
        im.info["transparency"] = 3
        return im
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (size[1], size[0])).astype(np.uint16))
    return im.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16"])
@pytest.mark.parametrize("size", [(300, 200), (201, 333), (224, 224), (1, 1), (1000, 50), (225, 223)])
def test_preprocess_matches_clip_image_processor(model_dir, mode, size):
    processor = AutoProcessor.from_pretrained(str(model_dir))
    spec = ImageSpec.from_config(json.loads((model_dir / "preprocessor_config.json").read_text()))
    buf = io.BytesIO()
    make(mode, size, seed=hash((mode, size)) % 1000).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    ref = processor(images=Image.open(io.BytesIO(buf.getvalue())), return_tensors="np")["pixel_values"][0]
    mine = normalize(preprocess(open_image(buf.getvalue()), spec)[None], spec)[0]
    assert mine.shape == ref.shape == (3, 224, 224)
    assert np.abs(mine - ref).max() < 1e-5


def test_spec_from_old_and_new_config_forms():
    old = ImageSpec.from_config({"size": 224, "crop_size": 224, "resample": 3})
    new = ImageSpec.from_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                 "resample": 3})
    assert old == new and old.shortest_edge == 224 and old.crop_hw == (224, 224)
    assert ImageSpec.from_config({"size": {"height": 256, "width": 128}}).resize_hw == (256, 128)
    assert old.fingerprint() != ImageSpec.from_config({"size": 336}).fingerprint()


def test_read_errors_are_short_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ReadError, match="empty file"):
        read_bytes(str(tmp_path / "empty.png"))
    with pytest.raises(ReadError, match="no such file"):
        read_bytes(str(tmp_path / "missing.png"))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ReadError, match="is a directory"):
        read_bytes(str(tmp_path / "dir.png"))
    with pytest.raises(ReadError, match="not an image"):
        open_image(b"hello world, not an image")


def test_content_key_is_sha256_of_bytes():
    assert content_key(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_bomb_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    with pytest.raises(ReadError, match="too large"):
        decode_and_preprocess("k", buf.getvalue(), ImageSpec(), max_pixels=100_000_000)
    assert decode_and_preprocess("k", buf.getvalue(), ImageSpec(), max_pixels=200_000_000).pixels.shape == \
        (3, 224, 224)


def test_a_worker_answers_each_image_with_its_pixels_or_a_typed_read_error(tmp_path):
    """decode_many through a real worker process: pixels, or the reason as a ReadError (TooLarge over the limits,
    which the server answers with 413), its message as the reader words it."""
    from pickrank.inputs.files import TooLarge
    from pickrank.inputs.workers import close_pool, decode_many, worker_pool

    bomb, small = io.BytesIO(), io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")
    make("RGB", (30, 20), seed=1).save(small, format="PNG")
    data = small.getvalue()
    jobs = [("bomb", bomb.getvalue()), ("cut", data[:len(data) // 2]), ("ok", data)]
    pool = worker_pool(1)
    try:
        big, cut, ok = pool.submit(decode_many, jobs, ImageSpec(), 100_000_000).result(timeout=120)
    finally:
        close_pool(pool)
    assert isinstance(big, TooLarge) and str(big).startswith("too large to decode safely: 12000x12000 = ")
    assert isinstance(cut, ReadError) and not isinstance(cut, TooLarge) and str(cut) == "truncated image"
    assert ok.key == "ok" and ok.pixels.shape == (3, 224, 224)
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(TooLarge, match=r"^too large: .* bytes, limit 10 \(raise it with --max-bytes\)$"):
        read_bytes(str(tmp_path / "a.png"), max_bytes=10)


def test_signals_inside_the_deferred_block_take_effect_as_it_ends():
    import signal

    from pickrank.signals import signals_deferred

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the signal")  # a worker's start is not cut halfway
    assert reached == ["after the signal"] and signal.getsignal(signal.SIGINT) is before


def test_signals_deferred_is_a_no_op_outside_the_main_thread():
    import threading

    from pickrank.signals import signals_deferred

    errors: list[BaseException] = []

    def run() -> None:
        try:
            with signals_deferred():
                pass
        except BaseException as e:  # signal.signal would raise ValueError here
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []


@pytest.mark.parametrize("exc,stderr", [("FileNotFoundError('gone')", ""),
                                        ("ImportError('no module x')",
                                         "pickrank: a decode worker failed to start: ImportError: no module x")])
def test_worker_start_failures_are_quiet_or_one_line(exc, stderr):
    import subprocess
    import sys

    # The fork server imports pickrank.inputs.forkserver; its workers report an uncaught start-up error with this hook.
    res = subprocess.run([sys.executable, "-c", f"import pickrank.inputs.forkserver; raise {exc}"], capture_output=True,
                         text=True)
    assert res.returncode == 1 and res.stderr.strip() == stderr


def test_one_resize_and_crop_geometry_for_both_paths():
    from pickrank.inputs.decode import Geometry, resize_crop_geometry

    spec = ImageSpec()  # shortest side 224, centre crop 224
    assert resize_crop_geometry(448, 300, spec) == Geometry((334, 224), None, (0, 55, 224, 224))
    assert resize_crop_geometry(224, 224, spec) == Geometry(None, None, (0, 0, 224, 224))
    # a fixed size smaller than the crop: zero padding around it, then the crop
    small = ImageSpec(shortest_edge=None, resize_hw=(100, 50))
    assert resize_crop_geometry(640, 480, small) == Geometry((50, 100), (62, 62, 87, 87), (0, 0, 224, 224))
    assert resize_crop_geometry(60, 100, ImageSpec(shortest_edge=None, crop_hw=None)) == Geometry(None, None, None)
