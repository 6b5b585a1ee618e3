"""A preference head: PickScore plus a correction learnt from pairwise labels (`pickrank tune`), applied after the
embeddings (`core.scores`), so that the embedding cache stays valid.

    tuned = a * raw + phi(t) . (W x)        phi(t) = [1, U (t - mu)]

raw = exp(logit_scale) * cos(t, x) is PickScore, t and x the normalised text and image embeddings. W's first row is
a linear term on the image (a taste whatever the prompt); its other r rows are a low-rank prompt-image interaction
over r text directions U (the labelled prompts' principal directions, centred on their mean mu); `a` rescales
PickScore itself. With a = 1 and W = 0 (no labels, or a fit whose regularisation won) the head is PickScore.

The file is safetensors (never a pickle): tensors `a` (1,), `weight` (r+1, D), `text_basis` (r, D), `text_mean`
(D,), and string metadata: the format, the base model's weight hashes and embedding spec (alpha, decode), the
labels it was fitted on, the cross-validated figures, pickrank's version, and a SHA-256 over the tensors, checked
whenever the file is read. A head is refused on any other base model (`check_model`, `check_base`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pickrank import __version__
from pickrank.core.scores import Array, is_tensor
from pickrank.errors import PickrankError, UsageError
from pickrank.models.hashing import HashStore

if TYPE_CHECKING:
    from pickrank.inputs.decode import ImageSpec
    from pickrank.models.source import ModelInfo, ModelSource

FORMAT = "pickrank-head"
FORMAT_VERSION = "1"
TENSORS = ("a", "weight", "text_basis", "text_mean")
# A head holds (r+1) x D floats, a few KB to a few MB: anything far larger is not one (never read whole).
MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class HeadParams:
    """The numbers of a head: PickScore's factor `a`, `weight` (r+1, D), `text_basis` (r, D), `text_mean` (D,)."""

    a: float
    weight: np.ndarray
    text_basis: np.ndarray
    text_mean: np.ndarray

    @classmethod
    def identity(cls, dim: int, rank: int = 0) -> "HeadParams":
        """The head that is PickScore: a = 1, W = 0."""
        return cls(1.0, np.zeros((rank + 1, dim), np.float32), np.zeros((rank, dim), np.float32),
                   np.zeros(dim, np.float32))

    @property
    def rank(self) -> int:
        return int(self.text_basis.shape[0])

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors as the file stores them (float32, contiguous)."""
        values = {"a": np.asarray([self.a]), "weight": self.weight, "text_basis": self.text_basis,
                  "text_mean": self.text_mean}
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """One SHA-256 over the tensors' names, shapes and bytes (what the file's metadata vouches for)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], dtype=np.float32)
        digest.update(f"{name}:{list(t.shape)};".encode())
        digest.update(t.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Head:
    """A head read from its file (or just fitted): its numbers, its metadata, and where it came from."""

    params: HeadParams
    meta: dict[str, Any]
    path: str | None = None
    sha256: str | None = None  # of the file's bytes
    _converted: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.params.rank

    @property
    def dim(self) -> int:
        return int(self.params.weight.shape[1])

    def _on(self, like: Array) -> tuple:
        """(a, W, U, mu) as arrays of `like`'s kind (torch tensors on its device, or numpy), made once per kind."""
        if not is_tensor(like):
            p = self.params
            return np.float32(p.a), p.weight, p.text_basis, p.text_mean
        key = str(like.device)
        if key not in self._converted:
            import torch

            t = {k: torch.from_numpy(v).to(like.device) for k, v in self.params.tensors().items()}
            self._converted[key] = (t["a"][0], t["weight"], t["text_basis"], t["text_mean"])
        return self._converted[key]

    def tuned(self, raw: Array, text: Array, images: Array, paired: bool) -> Array:
        """The tuned scores (`core.scores.ScoreHead`): every prompt x image (P, N), or row against row (N,)."""
        a, w, u, mu = self._on(images)
        proj = images @ w.T  # (N, r+1): the image's linear term, then its side of each interaction
        phi = (text - mu) @ u.T  # (P, r): the prompt's side of each interaction
        if paired:
            correction = proj[:, 0] + (phi * proj[:, 1:]).sum(-1)
        else:
            correction = proj[:, 0][None, :] + phi @ proj[:, 1:].T
        return a * raw + correction

    def describe(self) -> dict[str, Any]:
        """What the provenance says of the head: its file and hash, form, labels and cross-validated figures."""
        m = self.meta
        return {"path": os.path.abspath(self.path) if self.path else None, "sha256": self.sha256,
                "form": m.get("form"), "labels": m.get("labels"), "labellers": m.get("labellers"),
                "heldout": (m.get("report") or {}).get("heldout"), "pickrank": m.get("pickrank")}

    def check_model(self, info: ModelInfo) -> None:
        """Refuse the head when the run's embedding spec is not the one it was fitted on (--alpha, --decode)."""
        for name in ("alpha", "decode"):
            want, got = self.meta.get(name), getattr(info.spec, name)
            if want != got:
                raise UsageError(f"--head {self.path}: fitted on embeddings made with --{name} {want}; this run "
                                 f"uses --{name} {got}")

    def check_base(self, info: ModelInfo, store: HashStore | None = None) -> None:
        """Refuse the head unless the run's model has the very weights it was fitted on (their SHA-256s)."""
        base = base_weights(info.backend, info.source, store)
        want = self.meta.get("base_weights") or {}
        if base != want:
            raise UsageError(f"--head {self.path}: fitted on another base model ({self.meta.get('base_model')}, "
                             f"weights {_short(want)}); this model's weights are {_short(base)}")


def _short(weights: dict[str, str]) -> str:
    return ", ".join(f"{name} sha256:{digest[:12]}" for name, digest in sorted(weights.items())) or "unknown"


def base_weights(backend: str, source: ModelSource, store: HashStore | None = None) -> dict[str, str]:
    """The SHA-256 of each weight file of the model; for an ONNX export (`backend` "onnx"), those of the weights it
    was exported from (its manifest says), so that a head fitted on a model serves on its export too."""
    if backend == "onnx":
        from pickrank.models.onnx_embedder import read_manifest

        return dict(read_manifest(source.model).get("source_weights_sha256") or {})
    from pickrank.models.source import weight_files

    store = store or HashStore()
    return {os.path.basename(p): store.sha256(p) for p in weight_files(source)}


def _metadata(raw: dict[str, str]) -> dict[str, Any]:
    """The file's string metadata with its JSON values decoded."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def read_head(path: str) -> Head:
    """A head file, checked: safetensors with pickrank's head format, its tensors as the metadata's SHA-256 says,
    shapes that fit together, finite numbers. A bad file is a one-line error."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UsageError(f"--head {path}: no such file")
    if os.path.getsize(path) > MAX_BYTES:
        raise UsageError(f"--head {path}: {os.path.getsize(path)} bytes is not a head file")
    try:
        with safe_open(path, framework="np") as f:
            meta = _metadata(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys() if k in TENSORS}
    except Exception as e:  # not safetensors, or a torn file: safetensors' own message names neither
        raise UsageError(f"--head {path}: not a safetensors head file ({e})") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"--head {path}: not a pickrank head (made by `pickrank tune`)")
    if sorted(tensors) != sorted(TENSORS) or meta.get("tensors_sha256") != tensors_sha256(tensors):
        raise PickrankError(f"--head {path}: its tensors do not match the SHA-256 in its metadata (a damaged or "
                            "edited file)")
    params = HeadParams(float(tensors["a"][0]), tensors["weight"], tensors["text_basis"], tensors["text_mean"])
    _check_shapes(params, path)
    return Head(params, meta, path=path, sha256=file_sha256(path))


def _check_shapes(p: HeadParams, path: str) -> None:
    w, u, mu = p.weight, p.text_basis, p.text_mean
    ok = w.ndim == 2 and u.ndim == 2 and mu.ndim == 1 and w.shape[0] == u.shape[0] + 1 \
        and w.shape[1] == u.shape[1] == mu.shape[0]
    if not ok:
        raise PickrankError(f"--head {path}: tensors of shapes that do not fit together")
    if not all(np.isfinite(t).all() for t in p.tensors().values()):
        raise PickrankError(f"--head {path}: holds non-finite numbers")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_head_file(path: str) -> bool:
    """Whether `path` is a pickrank head (what `write_head` may replace)."""
    try:
        return read_head(path) is not None
    except PickrankError:
        return False


def head_metadata(model: str, spec: ImageSpec, base: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a head fitted on embeddings of `model` (whose weights hash to `base`) made with `spec`."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": model, "base_weights": base,
            "alpha": spec.alpha, "decode": spec.decode, "pickrank": __version__, **extra}


def write_head(path: str, params: HeadParams, meta: dict[str, Any]) -> Head:
    """Write the head atomically (a temp file beside it, renamed); an existing file is replaced only when it is a
    pickrank head."""
    from safetensors.numpy import save_file

    if os.path.lexists(path) and not is_head_file(path):
        raise UsageError(f"-o {path}: exists and is not a pickrank head; give another name")
    tensors = params.tensors()
    meta = {**meta, "tensors_sha256": tensors_sha256(tensors)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".head-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return read_head(path)


__all__ = ["FORMAT", "HeadParams", "Head", "tensors_sha256", "base_weights", "read_head", "file_sha256",
           "is_head_file", "head_metadata", "write_head"]
