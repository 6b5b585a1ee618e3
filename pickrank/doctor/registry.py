"""What a check is and what it looks at: `Status`, `Check`, the `Subject` (the model and folders a run would use,
resolved once by `make_subject`), and `registrar`, which makes a check module's `@check` decorator."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property
from typing import Callable

from pickrank.doctor.reference import SELFTEST_PROMPT, export_reference_scores, picture, reference_scores
from pickrank.inputs.decode import ImageSpec
from pickrank.models.hashing import HashStore
from pickrank.models.source import ModelSource, hub_offline, load_processor_config, resolve_source
from pickrank.options import CacheOptions, ModelOptions


class Status(str, Enum):
    """A check's outcome: ok, warn (worth knowing, the numbers still hold) or fail (they do not: exit 1)."""

    ok = "ok"
    warn = "warn"
    fail = "fail"


@dataclass(frozen=True)
class Check:
    """One check's record: its name, outcome and a one-line detail (what was found, or what to do)."""

    name: str
    status: Status
    detail: str


# How a detail starts when the check found nothing to look at: the checks that need it are not run.
NOT_CACHED = "not in the Hugging Face cache: "
NOT_CHECKED = "not checked: needs "


@dataclass(frozen=True)
class Subject:
    """What the checks look at, resolved once: the model source and the local folders it would load from."""

    source: ModelSource  # offline=True for hub ids: the doctor looks in the local cache only
    offline: bool  # whether a run may not download (--offline or HF_HUB_OFFLINE)
    model_dir: str | None  # the local folder, or the hub snapshot in the HF cache; None: not there
    processor_dir: str | None
    options: ModelOptions
    cache: CacheOptions

    @cached_property
    def spec(self) -> ImageSpec:
        """The preprocessing a run would use: the processor's config, with --alpha."""
        config = load_processor_config(self.processor_dir or self.source.processor, offline=True)
        return replace(ImageSpec.from_config(config), alpha=self.options.alpha.value)

    @cached_property
    def hashes(self) -> HashStore:
        """The weight-hash memo of --cache, read but never written (the doctor writes nothing); what it hashes it
        remembers for the other checks."""
        return HashStore.beside(self.cache.cache, write=False)

    @cached_property
    def export(self) -> dict | None:
        """The manifest, when the model folder is a pickrank ONNX export (None otherwise)."""
        from pickrank.models.onnx_embedder import is_export, read_manifest

        return read_manifest(self.model_dir) if self.model_dir and is_export(self.model_dir) else None

    @cached_property
    def clip_config(self) -> object:
        """The model's CLIPConfig, with transformers' defaults filled in."""
        from transformers import CLIPConfig

        return CLIPConfig.from_pretrained(self.model_dir, local_files_only=True)

    @cached_property
    def pair(self) -> tuple[bytes, bytes]:
        """The self-test's two generated images (PNG)."""
        return picture((320, 240), seed=1), picture((240, 320), seed=2)

    @cached_property
    def reference_scores(self) -> list[float]:
        """The self-test pair's scores by the reference math (transformers, fp32, CPU; an ONNX export: over its own
        graphs)."""
        if self.export is not None:
            return export_reference_scores(self.model_dir, SELFTEST_PROMPT, self.pair)
        return reference_scores(self.model_dir, self.processor_dir, SELFTEST_PROMPT, self.pair)


# A registered check: its name, the checks it needs (none of them failed), and the function giving its `Check`.
Registered = tuple[str, tuple[str, ...], Callable[[Subject], Check]]


def registrar(checks: list[Registered]) -> Callable[..., Callable]:
    """The `@check(name, needs=...)` decorator of a check module, registering into `checks` in order: the decorated
    function returns (status, detail); the registered one returns the `Check`."""

    def check(name: str, needs: tuple[str, ...] = ()) -> Callable:
        def register(fn: Callable[[Subject], tuple[Status, str]]) -> Callable[[Subject], Check]:
            @functools.wraps(fn)
            def run(subject: Subject) -> Check:
                return Check(name, *fn(subject))

            checks.append((name, needs, run))
            return run

        return register

    return check


def make_subject(model: ModelOptions, cache: CacheOptions) -> Subject:
    """Resolve the options as a run does, and find the local folders (never the network)."""
    source = resolve_source(model.model, model.processor, model.revision, model.offline)
    offline = hub_offline(source.offline)
    model_dir = source.model if source.model_is_local else cached_dir(source.model, "config.json", source.revision)
    processor_dir = source.processor if os.path.isdir(source.processor) else \
        cached_dir(source.processor, "preprocessor_config.json", None)
    return Subject(replace(source, offline=True), offline, model_dir, processor_dir, model, cache)


def cached_dir(repo: str, filename: str, revision: str | None) -> str | None:
    """The snapshot folder holding the repo's file in the local Hugging Face cache, or None (no network asked)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(path) if isinstance(path, str) else None
