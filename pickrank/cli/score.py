"""The scoring commands: score, best-of-n and batch. Each builds its candidate sets (`pickrank.inputs.sets`) and
hands them to `pickrank.core.scoring.score_job`."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Callable, Optional, Sequence

from pickrank.cli.lifecycle import Command, say_loaded
from pickrank.cli.progress import progress_bar
from pickrank.cli.shared import DATASETS, INPUT, OUTPUT, SCORING, Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from pickrank.options import DatasetOptions, PromptFrom
from pickrank.records import CandidateSet

if TYPE_CHECKING:
    from pickrank.core.datasets import DatasetJob


def _score_command(kind: str, opts: Opts, make_sets: Callable[[], list[CandidateSet]], copy_to: str | None = None,
                   inputs: Sequence[str] = (), dataset: Callable[[], DatasetJob | None] = lambda: None) -> None:
    """A scoring command inside the lifecycle: its sets built (inputs checked before the model loads), then scored
    into its outputs; when `dataset` gives a job (the PATHs are shards), that dataset is scored instead.

    inputs: the paths named on the command line (files, folders, a prompts CSV), which no output may overwrite.
    """
    from pickrank.core.datasets import score_dataset
    from pickrank.core.scoring import ScoringJob, score_job

    with Command(opts.command) as cmd:
        data = dataset()
        job = ScoringJob(kind, make_sets(), tuple(inputs), copy_to) if data is None else None
        with progress_bar(opts.command.quiet) as bar:
            if job is not None:
                scored = score_job(job, opts.scoring(), cmd.sinks, on_progress=bar,
                                   on_loaded=bar.on_loaded(say_loaded))
            else:
                scored = score_dataset(data, opts.scoring(), cmd.sinks, on_progress=bar,  # type: ignore[arg-type]
                                       on_loaded=bar.on_loaded(say_loaded))
        cmd.code = EXIT_PARTIAL if scored.failed else EXIT_OK


def _dataset_job(paths: list[str], prompt: str | None, prompt_from: PromptFrom | None, dataset: DatasetOptions,
                 overwrite: bool) -> DatasetJob | None:
    """The dataset job when the PATHs are shards (None: images); --prompt-from says where prompts come from."""
    from pickrank.core.datasets import DatasetJob
    from pickrank.inputs.datasets.paths import uses_datasets

    if not uses_datasets(paths):
        if prompt_from is PromptFrom.caption:
            raise UsageError("--prompt-from caption reads dataset shards (.tar, .parquet); images have metadata")
        return None
    if prompt_from is PromptFrom.metadata:
        raise UsageError("--prompt-from metadata reads images; a dataset's samples have captions: --prompt-from "
                         "caption")
    return DatasetJob(tuple(paths), prompt, dataset, overwrite)


def _files_only(opts: Opts) -> str | None:
    """The option of a run that needs image files, not dataset shards' samples (--html shows the files)."""
    return "--html" if opts.output.html else None


PATHS_HELP = "Image files, folders, quoted globs ('**' too), or - to read paths from stdin."
SHARDS_HELP = ("dataset shards: .tar (webdataset), .parquet, a folder of them, a quoted glob or brace range "
               "('shards/{00000..00099}.tar').")


@with_options(*SCORING)
def score(
    paths: Annotated[list[str], Arg(metavar="PATH", help=PATHS_HELP[:-1] + "; or " + SHARDS_HELP)],
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", metavar="TEXT", panel=INPUT, help="The prompt the "
                                         "images were generated for [default: each image's own metadata "
                                         "prompt; a dataset sample's caption].")] = None,
    prompt_from: Annotated[Optional[PromptFrom], Opt(
        "--prompt-from", panel=INPUT, help="metadata: score each image against the prompt in its own metadata "
                                           "(what leaving out --prompt does); caption: each dataset sample against "
                                           "its own caption. Images (samples of a shard) with the same prompt form "
                                           "one ranking.")] = None,
    top: Annotated[Optional[int], Opt(min=1, metavar="K", panel=OUTPUT, help="Show only the best K.")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", panel=DATASETS, help="-o DIR/: score again the shards whose "
                                   "output was made another way (model, prompt, scale, columns, or the shard "
                                   "changed) instead of refusing.")] = False,
    *, opts: Opts,
) -> None:
    """Score images against one prompt, or each against its own metadata prompt, and rank them.

    Also a dataset's samples (webdataset shards, parquet): with `-o DIR/` one parquet per shard, resumable.

    Examples:
      $ pickrank score -p "a red cat on a sofa" images/
      $ pickrank score comfyui_output/            # each image's own prompt
      $ pickrank score -p "a castle" 'out/**/*.png' --top 5 --html top.html
      $ find runs -name '*.png' | pickrank score -p "a castle" - -f jsonl
      $ pickrank score 'shards/{00000..00019}.tar' --prompt-from caption -o scores/
    """
    from pickrank.inputs.sets import sets_for_score

    run = replace(opts.run, top=top)
    dataset = opts.dataset or DatasetOptions()

    def sets() -> list[CandidateSet]:
        return sets_for_score(prompt, paths, sys.stdin, run.max_pixels, run.max_bytes)

    def data() -> DatasetJob | None:
        if prompt is not None and prompt_from is not None:
            raise UsageError(f"give --prompt or --prompt-from {prompt_from.value}, not both")
        return _dataset_job(paths, prompt, prompt_from, dataset, overwrite)

    _score_command("score", replace(opts, run=run), sets, inputs=paths, dataset=data)


@with_options(*SCORING)
def best_of_n(
    folder: Annotated[str, Arg(metavar="FOLDER", help="Folder of candidates; each subfolder with images is a "
                                                      "group (the images directly in FOLDER are one too); or "
                                                      "dataset shards, each shard a group: .tar (webdataset), "
                                                      ".parquet, a folder of them, a quoted glob or brace range.")],
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", metavar="TEXT", panel=INPUT, help="Prompt for every "
                                         "group [default: prompt.txt in the group, else the first image's "
                                         "metadata prompt; a shard's first caption].")] = None,
    top: Annotated[int, Opt(min=1, metavar="K", panel=OUTPUT, help="Keep the best K of each group.")] = 1,
    copy_to: Annotated[Optional[str], Opt(metavar="DIR", panel=OUTPUT, help="Copy the winners into DIR/GROUP/ "
                                          "(never overwrites: NAME-1.png when NAME.png is taken).")] = None,
    *, opts: Opts,
) -> None:
    """Keep the best of N candidates in each group of a folder (or in each dataset shard).

    Examples:
      $ pickrank best-of-n out/                     # the best of each group
      $ pickrank best-of-n out/ --top 2 --copy-to keep/
      $ pickrank best-of-n out/ -p "a castle at dawn" --html best.html
      $ pickrank best-of-n out/ -f paths -0 | xargs -0 ls -l
      $ pickrank best-of-n 'shards/{00000..00009}.tar' -p "a castle"   # a group per shard
    """
    from pickrank.inputs.sets import sets_for_best_of_n

    run = replace(opts.run, top=top)
    files_only = "--copy-to" if copy_to else _files_only(opts)
    _score_command("best-of-n", replace(opts, run=run),
                   lambda: sets_for_best_of_n(folder, prompt, run.max_pixels, run.max_bytes, files_only,
                                              opts.dataset or DatasetOptions()),
                   copy_to=copy_to, inputs=[folder])


@with_options(*SCORING)
def batch(
    prompts_csv: Annotated[str, Arg(metavar="PROMPTS.csv", help="CSV with a 'prompt' column; optional 'id' and "
                                    "'images' (folder, glob or paths separated by ';').")],
    paths: Annotated[Optional[list[str]], Arg(metavar="PATH", help="Images for rows without an 'images' "
                                              "cell; or " + SHARDS_HELP)] = None,
    top: Annotated[Optional[int], Opt(min=1, metavar="K", panel=OUTPUT, help="Show only the best K of each "
                                      "row.")] = None,
    *, opts: Opts,
) -> None:
    """Rank images for every prompt of a CSV; each image is embedded once, each prompt encoded once.

    Examples:
      $ pickrank batch prompts.csv generations/ -f csv -o scores.csv
      $ pickrank batch prompts.csv --top 1 --html best.html   # rows name images
      $ pickrank batch prompts.csv 'shards/{00000..00009}.tar' -f parquet -o scores.parquet
    """
    from pickrank.inputs.sets import sets_for_batch

    _score_command("batch", replace(opts, run=replace(opts.run, top=top)),
                   lambda: sets_for_batch(prompts_csv, paths or [], sys.stdin, opts.run.max_bytes, _files_only(opts),
                                          opts.dataset or DatasetOptions()),
                   inputs=[prompts_csv, *(paths or [])])
