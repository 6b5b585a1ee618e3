"""The checks of this install and machine: the image-processor backend transformers picks, torch and its devices,
the precisions each runs, the embedding cache, and the decode worker pool."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pickrank.doctor.reference import backend_of, picture
from pickrank.doctor.registry import Registered, Status, Subject, registrar
from pickrank.errors import PickrankError
from pickrank.inputs.decode import ImageSpec

CHECKS: list[Registered] = []  # the checks of this install and machine, in the order they run
check = registrar(CHECKS)


@check("image_processor", needs=("processor",))
def check_image_processor(s: Subject) -> tuple[Status, str]:
    """transformers' version, and which image-processor backend AutoImageProcessor picks in this environment."""
    import transformers
    from transformers import AutoImageProcessor

    picked = AutoImageProcessor.from_pretrained(s.processor_dir, local_files_only=True)
    what = f"transformers {transformers.__version__}: AutoImageProcessor picks {type(picked).__name__}"
    if backend_of(picked) != "Pillow":
        return Status.warn, f"{what} ({backend_of(picked)}), not the Pillow reference: the model card's code gives " \
                            "other scores here (up to 0.014); pickrank's own preprocessing is Pillow's either way"
    return Status.ok, f"{what} (Pillow: the reference, as pickrank's own preprocessing)"


def _devices() -> list[str]:
    """The device types torch can use here: cpu, and cuda or mps where available."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else []),
            *(["mps"] if mps is not None and mps.is_available() else [])]


@check("torch")
def check_torch(s: Subject) -> tuple[Status, str]:
    """torch's version, and the devices it sees (GPU names)."""
    import torch

    from pickrank.models.torch_embedder import pick_device

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cuda = f"CUDA {torch.version.cuda}: {names}"
    else:
        cuda = "CUDA: none" + ("" if torch.version.cuda else " (a CPU-only build)")
    mps = "MPS: yes" if "mps" in _devices() else "MPS: no"
    return Status.ok, f"torch {torch.__version__}; {cuda}; {mps}; --device auto picks {pick_device('auto')}"


def _runs(device: str, dtype: str) -> bool:
    """Whether pickrank runs this dtype on this device type (its own refusals: `model.check_dtype`)."""
    import torch

    from pickrank.errors import UsageError
    from pickrank.models.torch_embedder import check_dtype

    try:
        check_dtype(dtype, torch.device(device))
    except UsageError:
        return False
    return not (device == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported())


@check("precision")
def check_precision(s: Subject) -> tuple[Status, str]:
    """Which of fp16/bf16 each device runs, and whether this run's --device and --dtype can run."""
    from pickrank.errors import UsageError
    from pickrank.models.torch_embedder import check_dtype, pick_device

    support = "; ".join(f"{d}: fp32 yes, " + ", ".join(f"{t} {'yes' if _runs(d, t) else 'no'}"
                                                      for t in ("fp16", "bf16")) for d in _devices())
    try:
        device = pick_device(s.options.device)
        check_dtype(s.options.dtype.value, device)
    except UsageError as e:
        return Status.fail, f"{support}; this run cannot: {e}"
    return Status.ok, f"{support}; this run: {device}, {s.options.dtype.value}"


@check("cache")
def check_cache(s: Subject) -> tuple[Status, str]:
    """The embedding cache's health and size, looked at read-only (nothing is made, moved or written)."""
    from pickrank.core.cache import EmbeddingCache, default_cache_path

    if s.cache.no_cache:
        return Status.ok, "not used (--no-cache)"
    path = Path(s.cache.cache) if s.cache.cache else default_cache_path()
    if not os.path.lexists(path):
        return Status.ok, f"{path}: none yet (the first run makes it)"
    c = EmbeddingCache(path, warn=False, peek=True)
    try:
        if c.not_ours:
            return Status.warn, f"{c.problem}: runs go on without a cache"
        if c.problem is not None:
            return Status.fail, f"{c.problem}; unreadable: a run moves it aside (.corrupt-*) and starts a new one"
        if path.stat().st_size == 0:
            return Status.ok, f"{path}: empty (the first run makes the cache in it)"
        info = c.info()
    finally:
        c.close()
    said = f"{path}: {info.entries} entries, {info.size_bytes / 1e6:.1f} MB, {len(info.models)} model(s)"
    if info.read_only:
        return Status.warn, f"{said}; read-only: runs use its entries but save no new ones"
    return Status.ok, said


def _spec(s: Subject) -> ImageSpec:
    """The run's preprocessing, or the default one when the model's files cannot tell it."""
    try:
        return s.spec
    except (PickrankError, OSError, ValueError):
        return ImageSpec()


@check("decode_workers")
def check_decode_workers(s: Subject) -> tuple[Status, str]:
    """The decode worker pool starts, decodes one generated image and shuts down (timed)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
    from pickrank.inputs.files import ReadError
    from pickrank.inputs.workers import close_pool, decode_job, worker_pool
    from pickrank.signals import signals_deferred

    start = time.perf_counter()
    pool = worker_pool(1)
    try:
        with signals_deferred():
            job = pool.submit(decode_job, "doctor", picture((640, 480), seed=0), _spec(s), DEFAULT_MAX_PIXELS)
        out = job.result(timeout=120)
    except FutureTimeout:
        pool.shutdown(wait=False, cancel_futures=True)
        return Status.fail, "a decode worker gave no answer within 120 s"
    close_pool(pool)
    if isinstance(out, ReadError):
        return Status.fail, f"a decode worker could not decode a generated PNG: {out}"
    took = time.perf_counter() - start
    return Status.ok, f"a worker process started, decoded a generated 640x480 PNG to {out.pixels.shape} and shut " \
                      f"down in {took:.2f} s"
