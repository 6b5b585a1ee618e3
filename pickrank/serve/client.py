"""A client of `pickrank serve`: `RemoteScorer(url).score(prompts, images)` takes what `PickScorer.score` takes and
returns the same 1-D fp32 tensor, computed by the server (needs httpx: pip install 'pickrank[client]').

    from pickrank.serve.client import RemoteScorer

    scorer = RemoteScorer("http://gpu-box:8765", token=os.environ["PICKRANK_TOKEN"])
    rewards = scorer.score(prompts, images)          # or: await scorer.ascore(prompts, images)

Images travel as uint8 pixels in a safetensors body (no pickle, no PNG round trip): each image becomes a PIL image
through `api.to_pil` (float tensors in [0, 1] quantised exactly as the in-process exact path does) and then a
channels-last uint8 array (RGB, or RGBA where it has transparency, which the server treats as `--alpha` says).
Consecutive images of one size go in one tensor: `images.0` (N0, H0, W0, C), `images.1`, ... in request order;
the prompts are the metadata "prompt" (one for all) or "prompts" (a JSON list, one per image), with "scale".

Connection errors and 503s (loading, queue full; `Retry-After` honoured) are retried with exponential backoff until
`deadline` seconds have passed; any other error raises `pickrank.errors.RemoteError` with the server's message, and
so does a request that got no answer within `timeout` (it is not sent again: the server may still be scoring it).
Every answer is checked before it is used (JSON, its shape, one finite score per image): anything else is a
RemoteError naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pickrank.errors import RemoteError, UsageError
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.textfile import check_text, loads_json
from pickrank.options import Scale, as_enum
from pickrank.serve.server import check_token

_BACKOFF_START_S, _BACKOFF_MAX_S = 0.1, 2.0


def pixel_array(item: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image input (as PickScorer.score takes) -> uint8 (H, W, 3), or (H, W, 4) when it has transparency."""
    from pickrank.api import to_pil

    image = to_pil(item, max_pixels)
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        image = image.convert("RGBA" if has_alpha else "RGB")
    return np.asarray(image)


def encode_body(prompts: str | Sequence[str], arrays: list[np.ndarray], scale: str | None) -> bytes:
    """The safetensors request body: runs of equal-sized images as `images.0`, `images.1`, ...; prompts in the
    metadata (each checked as the server would: an InvalidText here rather than a 400 there)."""
    from safetensors.numpy import save

    if isinstance(prompts, str):
        meta = {"prompt": check_text(prompts, "prompt")}
    else:
        prompts = [check_text(p, f"prompts[{i}]") if isinstance(p, str) else p for i, p in enumerate(prompts)]
        if len(prompts) != len(arrays):
            raise UsageError(f"{len(prompts)} prompts for {len(arrays)} images: give one prompt, or one per image")
        meta = {"prompts": json.dumps(prompts, ensure_ascii=False)}
    if scale is not None:
        meta["scale"] = scale
    runs: list[list[np.ndarray]] = []
    for a in arrays:
        if runs and runs[-1][0].shape == a.shape:
            runs[-1].append(a)
        else:
            runs.append([a])
    return save({f"images.{i}": np.stack(run) for i, run in enumerate(runs)}, metadata=meta)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_scores(doc: dict, n: int) -> list[float]:
    """The scores of a /v1/score answer: a list of n finite numbers, or a ValueError saying what is wrong."""
    scores = doc.get("scores")
    if not isinstance(scores, list):
        raise ValueError(f"'scores' is {type(scores).__name__}, not a list")
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} images")
    bad = next((i for i, v in enumerate(scores) if not _finite(v)), None)
    if bad is not None:
        raise ValueError(f"scores[{bad}] is {scores[bad]!r}, not a finite number")
    return [float(v) for v in scores]


def check_ranking(doc: dict, n: int) -> list[dict]:
    """The ranking of a /v1/rank answer: n dicts, each image's index once, finite score and prob, an int rank."""
    ranking = doc.get("ranking")
    if not isinstance(ranking, list) or len(ranking) != n:
        raise ValueError(f"'ranking' must be a list of {n} entries, got {type(ranking).__name__}"
                         + (f" of {len(ranking)}" if isinstance(ranking, list) else ""))
    for i, r in enumerate(ranking):
        if not isinstance(r, dict) or not all(_finite(r.get(k)) for k in ("score", "prob")):
            raise ValueError(f"ranking[{i}] must hold a finite 'score' and 'prob', got {r!r:.80}")
        if not all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) for k in ("index", "rank")):
            raise ValueError(f"ranking[{i}] must hold an integer 'index' and 'rank', got {r!r:.80}")
    if sorted(r["index"] for r in ranking) != list(range(n)):
        raise ValueError(f"the ranking's indices are not each of the {n} images once")
    return ranking


@dataclass
class _Attempt:
    """What one HTTP answer means: a JSON result, or a wait before trying again."""

    result: dict | None = None
    retry_after: float | None = None


class RemoteScorer:
    """PickScore computed by a `pickrank serve` server: `score`, `ascore` (asyncio) and `rank`.

    `timeout`: seconds for one HTTP request; `deadline`: seconds a call keeps retrying connection errors and 503s;
    `scale`: the unit of the scores (raw, unit26, cosine) [default: the server's --scale].
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, deadline: float = 300.0,
                 scale: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        try:
            import httpx
        except ImportError:
            raise UsageError("RemoteScorer needs httpx: pip install 'pickrank[client]'") from None


        self.url = url.rstrip("/")
        self.timeout, self.deadline, self.max_pixels = timeout, deadline, max_pixels
        self.scale = as_enum(Scale, scale, "scale").value if scale is not None else None
        self.headers = {"content-type": "application/x-safetensors"}
        if token:
            check_token(token, "token")
            self.headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what is sent and what comes back ------------------------------------------------------------------------
    def _body(self, prompts: str | Sequence[str], images: Any, scale: Scale | str | None = None) -> tuple[bytes, int]:
        from pickrank.api import as_image_list

        unit = as_enum(Scale, scale, "scale").value if scale is not None else self.scale
        arrays = [pixel_array(it, self.max_pixels) for it in as_image_list(images)]
        if not isinstance(prompts, (str, list, tuple)):
            prompts = list(prompts)
        return (encode_body(prompts, arrays, unit) if arrays else b""), len(arrays)

    def _document(self, response: Any, path: str) -> Any:
        """The answer's JSON (nesting bounded); a RemoteError when it is not JSON."""
        try:
            return loads_json(response.content)
        except ValueError as e:
            raise RemoteError(f"{self.url}{path}: HTTP {response.status_code}, but the answer is not JSON ({e}): "
                              f"{response.text[:100]!r}", response.status_code) from None

    def _judge(self, response: Any, path: str) -> _Attempt:
        """A 2xx is the result (a JSON object); a 503 is a wait (its Retry-After); any other status raises
        RemoteError with the server's message."""
        if response.status_code < 300:
            doc = self._document(response, path)
            if not isinstance(doc, dict):
                raise RemoteError(f"{self.url}{path}: the answer is a JSON {type(doc).__name__}, not an object",
                                  response.status_code)
            return _Attempt(result=doc)
        try:
            doc = loads_json(response.content)
            message = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else response.text[:200]
        except ValueError:
            message = response.text[:200]
        if response.status_code == 503:
            after = response.headers.get("retry-after", "")
            return _Attempt(retry_after=float(after) if after.replace(".", "", 1).isdigit() else None)
        raise RemoteError(f"{self.url}{path}: HTTP {response.status_code}: {message}", response.status_code,
                          message)

    def _wait(self, attempt: int, retry_after: float | None, started: float, why: str) -> float:
        """Seconds to sleep before the next try; RemoteError once the deadline would pass."""
        delay = min(_BACKOFF_MAX_S, _BACKOFF_START_S * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if time.monotonic() + delay - started > self.deadline:
            raise RemoteError(f"{self.url}: {why} for {self.deadline:g} s (the deadline)",
                              503 if why.startswith("unavailable") else None)
        return delay

    def _unreachable(self, e: Exception, path: str) -> str:
        """Why a try failed, to retry; a request that was sent and timed out waiting for its answer is not sent
        again (the server may still be scoring it: a retry would only add load) but raises RemoteError."""
        import httpx

        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            raise RemoteError(f"{self.url}{path}: no answer within {self.timeout:g} s (timeout=)") from None
        return f"cannot reach the server ({type(e).__name__}: {e})"

    def _post(self, path: str, body: bytes) -> dict:
        import httpx

        started, attempt = time.monotonic(), 0
        while True:
            try:
                outcome = self._judge(self._client.post(self.url + path, content=body, headers=self.headers), path)
                why = "unavailable (503)"
            except httpx.TransportError as e:
                outcome, why = _Attempt(), self._unreachable(e, path)
            if outcome.result is not None:
                return outcome.result
            time.sleep(self._wait(attempt, outcome.retry_after, started, why))
            attempt += 1

    async def _apost(self, path: str, body: bytes) -> dict:
        import httpx

        started, attempt = time.monotonic(), 0
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while True:
                try:
                    outcome = self._judge(await client.post(self.url + path, content=body, headers=self.headers),
                                          path)
                    why = "unavailable (503)"
                except httpx.TransportError as e:
                    outcome, why = _Attempt(), self._unreachable(e, path)
                if outcome.result is not None:
                    return outcome.result
                await asyncio.sleep(self._wait(attempt, outcome.retry_after, started, why))
                attempt += 1

    # -- the calls ------------------------------------------------------------------------------------------------
    def score(self, prompts: str | Sequence[str], images: Any, scale: Scale | str | None = None) -> Any:
        """Scores, one per image, as PickScorer.score returns them: a 1-D fp32 CPU tensor, in `scale`'s unit
        [default: the one given to the constructor, else the server's]."""
        import torch

        body, n = self._body(prompts, images, scale)
        if n == 0:
            return torch.empty(0)
        return torch.tensor(self._checked(check_scores, self._post("/v1/score", body), n, "/v1/score"),
                            dtype=torch.float32)

    def _checked(self, check: Any, doc: dict, n: int, path: str) -> Any:
        """`check(doc, n)`'s value; what it finds wrong is a RemoteError naming it."""
        try:
            return check(doc, n)
        except ValueError as e:
            raise RemoteError(f"{self.url}{path}: unexpected answer: {e}", 200) from None

    async def ascore(self, prompts: str | Sequence[str], images: Any, scale: Scale | str | None = None) -> Any:
        """`score` for asyncio code (the images are converted in a thread, the request awaited)."""
        import torch

        body, n = await asyncio.to_thread(self._body, prompts, images, scale)
        if n == 0:
            return torch.empty(0)
        return torch.tensor(self._checked(check_scores, await self._apost("/v1/score", body), n, "/v1/score"),
                            dtype=torch.float32)

    def rank(self, prompt: str, images: Any) -> list[dict]:
        """The images ranked for one prompt, best first: dicts with index (into `images`), score, prob, rank."""
        if not isinstance(prompt, str):
            raise UsageError(f"the prompt must be a string, got {type(prompt).__name__}")
        body, n = self._body(prompt, images)
        return self._checked(check_ranking, self._post("/v1/rank", body), n, "/v1/rank") if n else []

    def info(self) -> dict:
        """The server's GET /v1/info: model, versions, limits, scale."""
        response = self._client.get(self.url + "/v1/info", headers=self.headers)
        outcome = self._judge(response, "/v1/info")
        if outcome.result is None:
            raise RemoteError(f"{self.url}/v1/info: unavailable (503)", 503)
        return outcome.result
