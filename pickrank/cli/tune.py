"""`pickrank tune`: a preference head fitted on labels (`pickrank.taste.tune`)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from pickrank.cli.lifecycle import Command, load_embedder, progress
from pickrank.cli.shared import Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL
from pickrank.options import CacheOptions, CommandOptions, ModelOptions, RunOptions, SummaryFormat

_MODEL = ("model", "processor", "revision", "offline", "device", "dtype", "alpha", "backend", "decode", "batch_size")


@with_options((ModelOptions, *_MODEL), (RunOptions, "workers", "max_pixels", "max_bytes"), CacheOptions,
              CommandOptions)
def tune(
    labels: Annotated[list[str], Arg(metavar="LABELS.jsonl", help="Label files from `pickrank label` (or any "
                                     "JSON Lines with prompt, image_0, image_1, label 0/1/0.5; paths relative to "
                                     "the file).")],
    output: Annotated[str, Opt("--output", "-o", metavar="FILE", help="The head to write (safetensors).")],
    force: Annotated[bool, Opt("--force", help="Write the head even when it does not beat PickScore on held-out "
                               "pairs.")] = False,
    folds: Annotated[int, Opt(min=3, help="Cross-validation folds (prompts never split across folds).")] = 5,
    rank: Annotated[int, Opt(min=0, max=16, help="Prompt-image interaction terms (0: one taste whatever the "
                             "prompt).")] = 0,
    bootstrap: Annotated[int, Opt(min=0, help="Bootstrap resamples for the interval of the difference.")] = 1000,
    seed: Annotated[int, Opt(help="Seed of the folds and the bootstrap.")] = 0,
    format: Annotated[Optional[SummaryFormat], Opt("--format", "-f", help="table or json [default: table].")]
    = None,
    *, opts: Opts,
) -> None:
    """Fit a preference head on your labels: PickScore plus a correction, measured on held-out pairs.

    The head is written only when it beats PickScore on held-out pairs (the whole 95% interval of the difference
    above zero); otherwise the figures are printed and the exit code is 1 (--force writes it anyway). Use the head
    with --head on score, best-of-n, batch, compare, eval and serve.

    Example: pickrank tune labels.jsonl -o head.safetensors
    """
    with Command(opts.command) as cmd:
        from pickrank.taste.tune import TuneJob, TuneOptions, check_output, format_report, read_all, run_tune

        job = TuneJob(tuple(labels), TuneOptions(output, force, folds, rank, resamples=bootstrap, seed=seed),
                      opts.model, opts.run, opts.cache)  # type: ignore[arg-type]
        found = read_all(labels)  # bad label files fail here, before the model loads
        check_output(output, labels)
        embedder = load_embedder(opts.model)  # type: ignore[arg-type]
        with progress("img", opts.command.quiet) as bar:
            report = run_tune(job, embedder, found, on_progress=bar)
        as_json = format is SummaryFormat.json
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else format_report(report))
        cmd.code = EXIT_FATAL if report.written is None else EXIT_PARTIAL if report.skipped else EXIT_OK
