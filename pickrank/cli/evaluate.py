"""`pickrank eval`: pairwise preference accuracy on labelled pairs (`pickrank.analysis.evaluate`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pickrank.cli.lifecycle import Command, load_embedder
from pickrank.cli.progress import progress_bar
from pickrank.cli.shared import INPUT, OUTPUT, STATS, Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from pickrank.options import CommandOptions, ModelOptions, OutputOptions, RunOptions, SummaryFormat
from pickrank.records import Progress

if TYPE_CHECKING:
    from pickrank.analysis.evaluate import Dataset, EvalResult
    from pickrank.output.writers import MetaWriter


@with_options(ModelOptions, (RunOptions, "max_pixels", "scale"), (OutputOptions, "with_meta", "meta"),
              CommandOptions)
def eval_(
    data: Annotated[str, Arg(metavar="DATA", help="Pick-a-Pic parquet (a file, a folder or a quoted glob of "
                             "shards; needs pip install 'pickrank[eval]'), or CSV/JSONL with prompt, image_0, "
                             "image_1, label (0, 1 or 0.5; paths relative to the file).")],
    validation: Annotated[Optional[str], Opt(
        "--validation", metavar="FILE", panel=INPUT,
        help="Choose the tie threshold from 0, 0.1, ..., 1 on this labelled file (max accuracy), then apply it.")]
    = None,
    tie_threshold: Annotated[Optional[float], Opt(
        "--tie-threshold", min=0.0, max=1.0, metavar="T", panel=STATS,
        help="Predict a tie when |p0 - p1| <= T [default: 0, or chosen with --validation].")] = None,
    bootstrap: Annotated[int, Opt("--bootstrap", min=0, metavar="N", panel=STATS,
                                  help="Bootstrap resamples for the 95% interval (0: none).")] = 1000,
    seed: Annotated[int, Opt(metavar="N", panel=STATS, help="Seed of the bootstrap.")] = 0,
    output: Annotated[Optional[str], Opt(
        "--output", "-o", metavar="FILE", panel=OUTPUT,
        help="Write per-pair results as JSON Lines (index, prompt, score_0, score_1, p_0, p_1, label, prediction, "
             "credit).")] = None,
    format: Annotated[Optional[SummaryFormat], Opt(
        "--format", "-f", panel=OUTPUT,
        help="How to print the summary: table (a text table) or json (one JSON object) [default: table].")] = None,
    json_summary: Annotated[bool, Opt("--json", panel=OUTPUT, help="The same as -f json.")] = False,
    *, opts: Opts,
) -> None:
    """Measure pairwise preference accuracy on labelled pairs, with the Pick-a-Pic paper's tie protocol.

    Examples:
      $ pickrank eval pairs.csv
      $ pickrank eval test.parquet --validation validation.parquet -o pairs.jsonl
      $ pickrank eval 'pickapic/test_unique-*.parquet' -f json
    """
    with Command(opts.command) as cmd:
        if tie_threshold is not None and validation is not None:
            raise UsageError("give --tie-threshold or --validation, not both")
        if json_summary and format is SummaryFormat.table:
            raise UsageError("--json is -f json: give one of -f table and --json")
        from pickrank.analysis.evaluate import Dataset, evaluate

        # Inputs and the output path are checked before the (slow) model load.
        dataset = Dataset(data)
        val = Dataset(validation) if validation is not None else None
        out, meta_out = _open_outputs(output, opts.output.meta, [data, *([validation] if validation else [])],
                                      cmd.sinks)
        with progress_bar(opts.command.quiet, unit="pairs", singular="pair") as bar:
            embedder = load_embedder(opts.model, bar)
            bar(Progress("loading"))
            result = evaluate(dataset, embedder, threshold=tie_threshold, validation=val, resamples=bootstrap,
                              seed=seed, out=out, max_pixels=opts.run.max_pixels,
                              on_progress=bar.counter("scoring", _pairs(dataset, val)), scale=opts.run.scale)
        summary = _with_meta(result, embedder, opts, meta_out)
        as_json = json_summary or format is SummaryFormat.json
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False) if as_json else summary)
        cmd.code = EXIT_PARTIAL if result.skipped else EXIT_OK


def _pairs(dataset: Dataset, val: Dataset | None) -> int | None:
    """How many pairs the run scores, when both files say (None: unknown, the bar counts up)."""
    if val is None:
        return dataset.count or None
    known = dataset.count is not None and val.count is not None
    return (dataset.count + val.count) or None if known else None  # type: ignore[operator]


def _open_outputs(output: str | None, meta: str | None, inputs: list[str], sinks: list):
    """-o and --meta checked against each other and the inputs, then opened into sinks."""
    from pickrank.output.guards import check_outputs
    from pickrank.output.targets import Output
    from pickrank.output.writers import MetaWriter

    check_outputs([("--meta", meta), *([("-o", output)] if output else [])], inputs)
    out = Output(output) if output else None
    if out is not None:
        sinks.append(out)
    meta_out = MetaWriter(Output(meta, label="--meta")) if meta else None
    if meta_out is not None:
        sinks.append(meta_out)
    return out, meta_out


def _with_meta(result: EvalResult, embedder: object, opts: Opts, meta_out: MetaWriter | None) -> str:
    """The provenance where eval's options ask for it (--meta FILE; --with-meta: the summary's "model" becomes the
    whole provenance, and the table gains its lines); returns the table. Without them the summary is as before."""
    from pickrank.analysis.evaluate import format_summary
    from pickrank.core.provenance import for_run, summary_lines

    wanted = opts.output.with_meta or meta_out is not None
    prov = for_run(embedder, opts.run.scale, None) if wanted else None  # type: ignore[arg-type]
    if meta_out is not None:
        meta_out.set_meta(prov)  # type: ignore[arg-type]
    if opts.output.with_meta:
        result.model = prov
    return "\n".join([format_summary(result), *(summary_lines(prov) if opts.output.with_meta else [])])
