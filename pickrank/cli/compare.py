"""`pickrank compare`: text-to-image systems compared on the same prompts
(`pickrank.analysis.comparison.job.compare_job`)."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

from pickrank.cli.lifecycle import Command, say_loaded
from pickrank.cli.progress import progress_bar
from pickrank.cli.shared import INPUT, OUTPUT, RUN, STATS, Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_OK, EXIT_PARTIAL
from pickrank.options import (
    CacheOptions,
    CommandOptions,
    CompareFormat,
    EngineOptions,
    ModelOptions,
    OutputOptions,
    RunOptions,
)

log = logging.getLogger("pickrank")


# compare's own options (their help is what --help shows).
Systems = Annotated[Optional[list[str]], Arg(metavar="SYSTEM_FOLDER", help="One folder of images per system (or "
                                         "one manifest file).")]
PromptsCsv = Annotated[Optional[str], Opt("--prompts", metavar="CSV", panel=INPUT, help="Prompts CSV (id,prompt; "
                       "id defaults to the row number): a system's images for id are id.<ext> or the files in id/.")]
Manifest = Annotated[Optional[str], Opt("--manifest", metavar="FILE", panel=INPUT, help="CSV or JSONL with "
                     "system,prompt,image[,id] (image paths relative to the file), instead of folders.")]
Names = Annotated[Optional[str], Opt("--names", metavar="A,B,...", panel=INPUT, help="System names, "
                  "comma-separated [default: the folder names, or the manifest's system column].")]
Baseline = Annotated[Optional[str], Opt("--baseline", metavar="NAME", panel=STATS, help="The reference for win "
                     "rates [default: the first system].")]
AllPairs = Annotated[bool, Opt("--all-pairs", panel=STATS, help="Every pair of systems (a win-rate matrix), not "
                               "only each against the baseline.")]
BestOfN = Annotated[bool, Opt("--best-of-n", panel=STATS, help="For systems with n >= 2 samples per prompt: the win "
                              "rate of their best of k (k = 1..n) against one sample of the other.")]
Bootstrap = Annotated[int, Opt("--bootstrap", min=0, metavar="N", panel=STATS, help="Bootstrap resamples (of "
                               "prompts) for the 95% intervals (0: none).")]
Seed = Annotated[int, Opt("--seed", metavar="N", panel=STATS, help="Seed of the bootstrap.")]
PerPrompt = Annotated[Optional[str], Opt("--per-prompt", metavar="FILE", panel=OUTPUT, help="Also write one JSON "
                      "line per prompt: id, prompt, each system's score and samples, winner.")]
Html = Annotated[Optional[str], Opt("--html", metavar="FILE", panel=OUTPUT, help="Also write a self-contained HTML "
                 "page: the summary, charts, and each prompt's images side by side.")]
Fmt = Annotated[Optional[CompareFormat], Opt("--format", "-f", panel=OUTPUT, help="table, json (one object: "
                "settings, systems, pairs, model) or csv [default: from -o's extension (.json, .csv), else "
                "table].")]
Verbose = Annotated[bool, Opt("--verbose", "-v", panel=RUN, help="Name the prompts left out, per system.")]


@with_options(ModelOptions, RunOptions, CacheOptions, (OutputOptions, "output", "meta"), EngineOptions,
              CommandOptions)
def compare(systems: Systems = None, *, prompts: PromptsCsv = None, manifest: Manifest = None, names: Names = None,
            baseline: Baseline = None, all_pairs: AllPairs = False, best_of_n: BestOfN = False,
            bootstrap: Bootstrap = 10_000, seed: Seed = 0, per_prompt: PerPrompt = None, html: Html = None,
            format: Fmt = None, verbose: Verbose = False, opts: Opts) -> None:
    """Compare text-to-image systems on the same prompts: mean PickScore, win rate, 95% intervals, sign test.

    Per system: the mean over prompts (a prompt's score is the mean of its
    samples), with a bootstrap interval. Per pair: the win rate (a tie counts
    0.5), the mean difference, the preference probability, a sign test. Each
    distinct image is embedded once, through the cache. Exit 3 when an image
    failed (counted per system).

    Layouts, detected from the arguments (stderr names the one used):
      prompts-csv     SYSTEM_FOLDER... --prompts CSV: a system's images for
                      id are id.<ext> (00042.png is id 42) or the files in id/
      paired-folders  SYSTEM_FOLDER... alone: images paired by relative path,
                      prompts from prompt.txt or the images' metadata
      manifest        --manifest FILE (or one file argument): CSV or JSONL
                      rows of system,prompt,image and an optional id

    Examples:
      $ pickrank compare base/ dpo/ --prompts prompts.csv
      $ pickrank compare base/ dpo/ grpo/ --all-pairs --html compare.html
      $ pickrank compare --manifest runs.jsonl --best-of-n -f json
    """
    with Command(opts.command) as cmd:
        from pickrank.analysis.comparison import LAYOUTS, plan_comparison
        from pickrank.analysis.comparison.job import CompareOutputs, CompareSettings, ComparisonRun

        # The layout and the outputs are checked before the (slow) model load.
        run = opts.run
        plan = plan_comparison(systems or (), prompts_csv=prompts, manifest=manifest,
                               names=names.split(",") if names is not None else None, baseline=baseline,
                               max_pixels=run.max_pixels, max_bytes=run.max_bytes)
        log.info("layout: %s (%s); %d systems, %d prompts, %d distinct image paths; baseline %s", plan.layout,
                 LAYOUTS[plan.layout], len(plan.systems), len(plan.slots), len(plan.image_paths()), plan.baseline)
        comparison = ComparisonRun(plan, CompareOutputs(output=opts.output.output, format=format,
                                                        per_prompt=per_prompt, html=html, meta=opts.output.meta))
        settings = CompareSettings(all_pairs=all_pairs, best_of_n=best_of_n, bootstrap=bootstrap, seed=seed,
                                   verbose=verbose)
        comparison.open([*(systems or ()), *(p for p in (prompts, manifest) if p)], cmd.sinks, settings)
        with progress_bar(opts.command.quiet) as bar:
            scored = comparison.score(opts.scoring(), on_progress=bar, on_loaded=bar.on_loaded(say_loaded))
        comparison.write(settings, workers=opts.run.workers)
        cmd.code = EXIT_PARTIAL if scored.failed else EXIT_OK
