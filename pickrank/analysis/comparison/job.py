"""`pickrank compare` from plan to written results: the outputs checked before the model loads, the images scored
through the one scoring core into memory, the statistics computed and written (each output kept only once it is
complete): `ComparisonRun`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

from pickrank.analysis.comparison.plan import Comparison
from pickrank.analysis.comparison.render import caveats, print_table, to_json, write_csv, write_per_prompt
from pickrank.analysis.comparison.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_SEED,
    MIN_BOOTSTRAP,
    MIN_PROMPTS,
    CompareResult,
    ScoreTable,
    check_bootstrap,
    collect_scores,
    compare_systems,
)
from pickrank.analysis.comparison.watch import SIGNAL_NAMES, Watch, monitor_scores, parse_thresholds, watch_signals
from pickrank.core.kept import Kept
from pickrank.errors import UsageError
from pickrank.options import CompareFormat, EngineName, Scale
from pickrank.output.guards import check_outputs, guard_inputs
from pickrank.output.sinks import Sink, SinkBase
from pickrank.output.targets import Output
from pickrank.output.writers import MetaWriter, format_for_path
from pickrank.records import Progress, Record

if TYPE_CHECKING:
    from pickrank.core.scoring import Scored, ScoringOptions
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


@dataclass(frozen=True)
class CompareOutputs:
    """Where a comparison goes: -o (None: stdout) in a format, and the optional per-prompt lines, page and meta."""

    output: str | None = None
    format: CompareFormat | None = None  # None: from -o's extension, else table
    per_prompt: str | None = None
    html: str | None = None
    meta: str | None = None


@dataclass(frozen=True)
class CompareSettings:
    """How the statistics are computed and told."""

    all_pairs: bool = False
    best_of_n: bool = False
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED
    verbose: bool = False  # name the prompts left out, per system
    # The signals (`watch`): image statistics and diversity beside the score; a series implies them.
    signals: bool = False
    series: bool = False
    monitor_model: str | None = None  # a held-out CLIP scorer, run on the same images (implies signals)
    flags: tuple[str, ...] = ()  # --flag NAME=PERCENT: thresholds other than `watch.DEFAULT_THRESHOLDS`

    @property
    def watching(self) -> bool:
        """Whether the signals are computed."""
        return self.signals or self.series or self.monitor_model is not None


class Gathered(SinkBase):
    """The sink compare's records go to: kept in memory for the statistics, with the run's provenance."""

    wants_meta = True

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.meta: dict = {}

    def write(self, records: tuple[Record, ...]) -> None:
        self.records.extend(records)

    def set_meta(self, meta: dict) -> None:
        self.meta = dict(meta)

    def describe(self) -> str:
        return "the comparison"

    def close(self) -> None:
        """Nothing to keep: the statistics are written to the other outputs."""

    def discard(self) -> None:
        """Nothing to give up."""

    def raw_per_unit(self) -> float:
        """What one unit of the gathered scores is in raw PickScore (`Scale.divisor`; 1 when no model ran)."""
        if not self.meta:
            return 1.0
        return Scale(self.meta["scale"]).divisor(self.meta["exp_logit_scale"])


class WrittenAtEnd(SinkBase):
    """An output that holds the comparison once it is complete: kept only then, so that a failed or interrupted
    run leaves an earlier file as it was (statistics over part of the images would mislead)."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.done = False

    def close(self) -> None:
        (self.out.close if self.done else self.out.discard)()

    def discard(self) -> None:
        self.out.discard()


def compare_format(fmt: CompareFormat | None, output: str | None) -> str:
    """-f; else what -o's extension names (.json, .csv); else table. A JSON Lines name is a usage error."""
    if fmt is not None:
        return fmt.value
    named = format_for_path(output)
    if named == "jsonl":
        raise UsageError(f"-o {output}: compare writes one summary (-f table, json or csv); per-prompt JSON Lines "
                         "go to --per-prompt FILE")
    return named if named in ("json", "csv") else "table"


class ComparisonRun:
    """One `pickrank compare`: `open` checks and opens the outputs (before the model loads), `score` scores the
    plan's images into memory, `write` computes the statistics and writes them (each output kept once complete)."""

    def __init__(self, plan: Comparison, outputs: CompareOutputs) -> None:
        self.plan, self.outputs = plan, outputs
        self.gathered = Gathered()
        self.taking: list[Sink] = [self.gathered]  # what score_into hands the records and provenance to
        self.fmt = "table"
        self.files: dict[tuple[int, int], str] = {}
        self.main_out: WrittenAtEnd | None = None
        self.rows_out: WrittenAtEnd | None = None
        self.settings = CompareSettings()
        self.kept: Kept | None = None  # each image's embedding and statistics, with the signals
        self.monitor = Gathered()  # the held-out scorer's records

    def open(self, inputs: Sequence[str], sinks: list, settings: CompareSettings | None = None) -> None:
        """Check the outputs against each other and the inputs (and that the settings' bootstrap fits in memory),
        then open them into `sinks` (for the caller to close or discard whatever happens)."""
        from pickrank.report.page import check_html

        if settings is not None:
            check_bootstrap(settings.bootstrap, statistic_columns(self.plan, settings))
            parse_thresholds(settings.flags)  # a bad --flag is a usage error before the model loads
            self.settings = settings
        o = self.outputs
        self.fmt = compare_format(o.format, o.output)
        self.files = check_outputs([("-o", o.output), ("--per-prompt", o.per_prompt), ("--html", o.html),
                                    ("--meta", o.meta)], inputs)
        if o.html:
            check_html(o.html)
        self.main_out = WrittenAtEnd(Output(o.output))
        sinks.append(self.main_out)
        if o.per_prompt:
            self.rows_out = WrittenAtEnd(Output(o.per_prompt, label="--per-prompt"))
            sinks.append(self.rows_out)
        if o.meta:
            meta_out = MetaWriter(Output(o.meta, label="--meta"))
            sinks.append(meta_out)
            self.taking.append(meta_out)

    def score(self, options: ScoringOptions, *, on_progress: Callable[[Progress], None] | None = None,
              on_loaded: Callable[[ImageTextEmbedder], None] | None = None) -> Scored:
        """Score every image of the plan through the one scoring core (with the signals: their statistics and
        embeddings kept, then the held-out scorer on the same images); what the scoring did."""
        from pickrank.core.scoring import score_into

        settings = self.settings
        if settings.watching:
            if options.engine.engine is EngineName.ray:  # before the model loads
                raise UsageError("--signals, --series and --monitor-model are computed by the local engine only: "
                                 "leave out --engine ray")
            options = replace(options, run=replace(options.run, signals=True))
        scored = score_into(self.taking, guard_inputs(self.plan.candidate_sets(), self.files), options,
                            on_progress=on_progress, on_loaded=on_loaded)
        self.kept = scored.kept
        if settings.monitor_model is not None:
            log.info("held-out scorer: %s", settings.monitor_model)
            # the held-out scorer is plain CLIP: no processor or preference head of the reward's
            held_out = replace(options, model=replace(options.model, model=settings.monitor_model, processor=None,
                                                      head=None),
                               run=replace(options.run, signals=False, scale=Scale.cosine))
            also = score_into([self.monitor], guard_inputs(self.plan.candidate_sets(), self.files), held_out,
                              on_progress=on_progress)
            scored = replace(scored, failed=scored.failed + also.failed)
        return scored

    def write(self, settings: CompareSettings, workers: int | None = None) -> CompareResult:
        """The statistics over the scores, written to the outputs (each then marked complete)."""
        assert self.main_out is not None, "open() first"
        gathered, plan = self.gathered, self.plan
        table = collect_scores(plan, gathered.records)
        result = compare_systems(table, baseline=plan.baseline, all_pairs=settings.all_pairs,
                                 best_of_n=settings.best_of_n, bootstrap=settings.bootstrap, seed=settings.seed,
                                 raw_per_unit=gathered.raw_per_unit(), series=settings.series)
        say_left_out(result, settings.verbose)
        say_unreliable(result)
        watch = self.watch(table, result)
        self.write_main(result, watch)
        if self.rows_out is not None:
            write_per_prompt(table, self.rows_out.out.stream)
            self.rows_out.done = True
        if self.outputs.html:
            from pickrank.report.comparison import write_html

            write_html(self.outputs.html, table, result, meta=gathered.meta, workers=workers, watch=watch)
        return result

    def watch(self, table: ScoreTable, result: CompareResult) -> Watch | None:
        """The signals of the scored comparison (None when not asked for), its flags said on the logger."""
        if not self.settings.watching or self.kept is None:
            return None
        s = self.settings
        monitor = monitor_scores(self.monitor.records) if s.monitor_model is not None else None
        watch = watch_signals(table, result, self.kept, monitor=monitor, monitor_model=s.monitor_model,
                              thresholds=parse_thresholds(s.flags), series=s.series)
        if self.fmt != "table":  # the table says them itself
            for flag in watch.flags:
                log.warning("flag: %s", flag.text)
        return watch

    def write_main(self, result: CompareResult, watch: Watch | None) -> None:
        """The statistics (and signals) to -o in its format, then marked complete."""
        from pickrank.analysis.comparison.watch_render import print_watch, watch_json

        assert self.main_out is not None, "open() first"
        out = self.main_out.out
        if self.fmt == "json":
            doc = to_json(result, model=self.gathered.meta)
            if watch is not None:
                doc["signals"] = watch_json(watch)
                doc["signals"]["monitor"] = dict(self.monitor.meta) or None
            out.stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            write_csv(result, out.stream, watch)
        else:
            print_table(result, out.stream, is_terminal=out.is_terminal)
            if watch is not None:
                print_watch(watch, result, out.stream, is_terminal=out.is_terminal)
        self.main_out.done = True


def statistic_columns(plan: Comparison, settings: CompareSettings) -> int:
    """At most how many statistics the bootstrap estimates for this plan: a mean per system, four per pair, and
    with --best-of-n a win rate per k on both sides of each pair."""
    n = len(plan.systems)
    pairs = n * (n - 1) // 2 if settings.all_pairs else (n - 1) + (max(0, n - 2) if settings.series else 0)
    k = max((len(imgs) for slot in plan.slots for imgs in slot.images), default=0) if settings.best_of_n else 0
    signals = (len(SIGNAL_NAMES) + 2) * n if settings.watching else 0
    return n + 4 * pairs + 2 * pairs * k + signals


def say_unreliable(result: CompareResult) -> None:
    """Warn (on the "pickrank" logger) when some intervals are unreliable: too few prompts or resamples."""
    why = caveats(result)
    if why:
        log.warning("unreliable intervals (marked *): %s; an interval needs at least %d prompts and %d resamples",
                    " / ".join(why), MIN_PROMPTS, MIN_BOOTSTRAP)


def say_left_out(result: CompareResult, verbose: bool) -> None:
    """Count (on the "pickrank" logger), per system, the prompts without a scored image (left out of its pairs);
    verbose names them."""
    for s in result.systems:
        if s.missing:
            names = f": {', '.join(s.missing)}" if verbose else " (-v names them)"
            log.info("%s: %d prompt(s) without a scored image, left out of its pairs%s", s.name, len(s.missing),
                     names)
