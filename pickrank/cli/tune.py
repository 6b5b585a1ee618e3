"""`pickrank tune`: a preference head fitted on labels (`pickrank.taste.tune`)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from pickrank.cli.lifecycle import Command, load_embedder
from pickrank.cli.progress import progress_bar
from pickrank.cli.shared import OUTPUT, STATS, Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL
from pickrank.options import CacheOptions, CommandOptions, ModelOptions, RunOptions, SummaryFormat
from pickrank.records import Progress

_MODEL = ("model", "processor", "revision", "offline", "device", "dtype", "alpha", "backend", "decode", "batch_size")


@with_options((ModelOptions, *_MODEL), (RunOptions, "workers", "max_pixels", "max_bytes"), CacheOptions,
              CommandOptions)
def tune(
    labels: Annotated[list[str], Arg(metavar="LABELS.jsonl", help="Label files from `pickrank label` (or any "
                                     "JSON Lines with prompt, image_0, image_1, label 0/1/0.5; paths relative to "
                                     "the file).")],
    output: Annotated[str, Opt("--output", "-o", metavar="FILE", panel=OUTPUT,
                               help="The head to write (safetensors).")],
    force: Annotated[bool, Opt("--force", panel=OUTPUT, help="Write the head even when it does not beat PickScore "
                               "on held-out pairs.")] = False,
    folds: Annotated[int, Opt(min=3, metavar="K", panel=STATS,
                              help="Cross-validation folds (prompts never split across folds).")] = 5,
    rank: Annotated[int, Opt(min=0, max=16, metavar="R", panel=STATS,
                             help="Prompt-image interaction terms (0: one taste whatever the prompt).")] = 0,
    bootstrap: Annotated[int, Opt(min=0, metavar="N", panel=STATS,
                                  help="Bootstrap resamples for the interval of the difference.")] = 1000,
    seed: Annotated[int, Opt(metavar="N", panel=STATS, help="Seed of the folds and the bootstrap.")] = 0,
    format: Annotated[Optional[SummaryFormat], Opt("--format", "-f", metavar="table|json", panel=OUTPUT,
                                                   help="How to print the report [default: table].")] = None,
    *, opts: Opts,
) -> None:
    """Fit a preference head on your labels: PickScore plus a correction, measured on held-out pairs.

    The head is written only when it beats PickScore on held-out pairs (the whole 95% interval of the difference
    above zero); otherwise the figures are printed and the exit code is 1 (--force writes it anyway). Use the head
    with --head on score, best-of-n, batch, compare, eval and serve.

    Examples:
      $ pickrank tune labels.jsonl -o head.safetensors
      $ pickrank tune ann.jsonl bob.jsonl -o head.safetensors -f json
      $ pickrank best-of-n out/ --head head.safetensors
    """
    with Command(opts.command) as cmd:
        from pickrank.taste.tune import TuneJob, TuneOptions, check_output, format_report, read_all, run_tune

        job = TuneJob(tuple(labels), TuneOptions(output, force, folds, rank, resamples=bootstrap, seed=seed),
                      opts.model, opts.run, opts.cache)  # type: ignore[arg-type]
        found = read_all(labels)  # bad label files fail here, before the model loads
        check_output(output, labels)
        with progress_bar(opts.command.quiet) as bar:
            embedder = load_embedder(opts.model, bar)  # type: ignore[arg-type]
            bar(Progress("loading"))
            report = run_tune(job, embedder, found, on_progress=bar.counter("embedding", _images(found)))
        as_json = format is SummaryFormat.json
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else format_report(report))
        cmd.code = EXIT_FATAL if report.written is None else EXIT_PARTIAL if report.skipped else EXIT_OK


def _images(labels: list) -> int:
    """How many distinct image files the labels show (what the bar counts to)."""
    return len({p for lab in labels for p in (lab.image_0, lab.image_1)})
