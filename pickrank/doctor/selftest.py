"""The known-answer self-test: pickrank's preprocessing against transformers' Pillow CLIP processor on generated
images, and a generated pair's scores through the `Engine` against the reference math (on the CPU in fp32, then on
this run's device and precision)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from pickrank.doctor.reference import SELFTEST_PROMPT, picture, reference_image_processor
from pickrank.doctor.registry import Registered, Status, Subject, registrar
from pickrank.errors import PickrankError

CHECKS: list[Registered] = []  # the self-test's checks, in the order they run
check = registrar(CHECKS)

SCORE_TOLERANCE = 1e-4  # the Engine against the reference math, both fp32 on the CPU
PIXEL_TOLERANCE = 1e-5  # normalised pixels: one grey level is 1/255/std, about 0.0146
DEVICE_TOLERANCE = 1e-2  # the run's device and precision against the fp32 reference: a difference a table shows
_SAMPLES = (((300, 200), "RGB"), ((201, 333), "L"), ((97, 603), "P"), ((20, 30), "RGB"))  # the last: below the crop


@check("selftest_preprocessing", needs=("processor",))
def check_selftest_preprocessing(s: Subject) -> tuple[Status, str]:
    """pickrank's preprocessing against transformers' Pillow CLIP processor on generated images (pixel-exact)."""
    from pickrank.inputs.decode import decode_and_preprocess, normalize

    ref, spec, worst = reference_image_processor(s.processor_dir), s.spec, 0.0
    for i, (size, mode) in enumerate(_SAMPLES):
        data = picture(size, seed=10 + i, mode=mode)
        mine = normalize(decode_and_preprocess("doctor", data, spec).pixels[None], spec)[0]
        theirs = ref(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
        if mine.shape != theirs.shape:
            return Status.fail, f"a generated {size[0]}x{size[1]} {mode} image: pickrank makes {mine.shape}, " \
                                f"{type(ref).__name__} {theirs.shape}"
        worst = max(worst, float(np.abs(mine - theirs).max()))
    verdict = f"{len(_SAMPLES)} generated images (RGB, L, P, one smaller than the crop) against " \
              f"{type(ref).__name__}: max |difference| {worst:.1e}"
    if worst > PIXEL_TOLERANCE:
        return Status.fail, f"{verdict}, over {PIXEL_TOLERANCE:g} (one grey level is about 0.0146): pickrank's " \
                            "preprocessing is not the reference's here"
    return Status.ok, f"{verdict}: pixel-exact"


def engine_scores(s: Subject, prompt: str, images: tuple[bytes, ...], device: str, dtype: str) -> list[float]:
    """The images' scores for the prompt through the real path: a model loaded as a run loads it, the `Engine`."""
    from pickrank.core.cache import NullCache
    from pickrank.core.engine import Engine
    from pickrank.models.loading import load_export_in_background, load_in_background
    from pickrank.options import RunOptions
    from pickrank.records import CandidateSet, ImageBytes, Query

    if s.export is not None:  # an ONNX export loads as a run loads it, its files checked through the doctor's memo
        embedder = load_export_in_background(s.source, replace(s.options, device=device, dtype=dtype),
                                             store=s.hashes)
    else:
        embedder = load_in_background(s.source, device=device, dtype=dtype, alpha=s.options.alpha.value)
    names = [f"doctor-{i}.png" for i in range(len(images))]
    cset = CandidateSet(queries=(Query(prompt),), paths=tuple(ImageBytes(n, d) for n, d in zip(names, images)))
    records = {r.path: r for ranking in Engine(embedder, NullCache(), RunOptions(workers=0), warn=False).rank([cset])
               for r in ranking.records}
    embedder.result()
    for r in records.values():
        if r.error:
            raise PickrankError(f"{r.path}: {r.error}")
    return [records[n].score for n in names]


def _compare(mine: list[float], ref: list[float]) -> tuple[float, str]:
    """The largest difference, and both score lists in words."""
    diff = max(abs(a - b) for a, b in zip(mine, ref))
    return diff, f"{', '.join(f'{x:.4f}' for x in mine)} (reference: {', '.join(f'{x:.4f}' for x in ref)})"


@check("selftest_score", needs=("weights_complete", "tokenizer", "preprocessing"))
def check_selftest_score(s: Subject) -> tuple[Status, str]:
    """A generated pair's scores through the Engine (fp32, CPU) against the reference math, within 1e-4."""
    diff, said = _compare(engine_scores(s, SELFTEST_PROMPT, s.pair, "cpu", "fp32"), s.reference_scores)
    if diff > SCORE_TOLERANCE:
        return Status.fail, f"a generated pair through the Engine scores {said}: off by {diff:.1e}, over " \
                            f"{SCORE_TOLERANCE:g}"
    return Status.ok, f"a generated pair through the Engine (cpu, fp32) scores {said}: |difference| {diff:.1e}"


@check("selftest_device", needs=("selftest_score", "precision"))
def check_selftest_device(s: Subject) -> tuple[Status, str]:
    """The same pair on this run's --device and --dtype, against the fp32 reference (precision changes scores)."""
    from pickrank.models.torch_embedder import pick_device

    device, dtype = pick_device(s.options.device), s.options.dtype.value
    if device.type == "cpu" and dtype == "fp32":
        return Status.ok, "this run's device and precision are the reference's (cpu, fp32): checked above"
    diff, said = _compare(engine_scores(s, SELFTEST_PROMPT, s.pair, s.options.device, dtype), s.reference_scores)
    where = f"on {device}, {dtype}"
    if diff > DEVICE_TOLERANCE:
        return Status.warn, f"{where} the pair scores {said}: off by {diff:.3f}; close images may rank otherwise " \
                            "than in fp32 (--dtype fp32 is the reference)"
    return Status.ok, f"{where} the pair scores {said}: |difference| {diff:.1e}"
