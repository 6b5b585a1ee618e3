"""`pickrank filter`: keep a scored dataset's best samples, from the scores `pickrank score` wrote for its shards."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import FILTER, OUTPUT, Arg, Opt, Opts, with_options
from pickrank.errors import EXIT_OK, EXIT_PARTIAL
from pickrank.options import CommandOptions, RunOptions

log = logging.getLogger("pickrank")


@with_options(CommandOptions, (RunOptions, "max_bytes"))
def filter_(
    scores: Annotated[list[str], Arg(metavar="SCORES", help="The dataset's scores: what `pickrank score SHARDS -o "
                                     "DIR/` wrote (the folder, its files, a quoted glob or brace range), or one -o "
                                     "x.parquet.")],
    min_score: Annotated[Optional[float], Opt(metavar="SCORE", panel=FILTER, help="Keep samples scoring at least "
                                              "this (in the scores' unit).")] = None,
    top_fraction: Annotated[Optional[float], Opt(metavar="F", panel=FILTER, help="Keep this fraction of the scored "
                                                 "samples, best first, over the whole dataset (samples tied at the "
                                                 "cut-off are all kept).")] = None,
    top_k: Annotated[Optional[int], Opt(min=1, metavar="K", panel=FILTER,
                                        help="Keep the best K samples of each prompt.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", metavar="FILE.parquet", panel=OUTPUT,
                                         help="Write the kept samples' key, uid, shard, prompt and score.")] = None,
    uids: Annotated[Optional[str], Opt(metavar="FILE.npy", panel=OUTPUT, help="Write the kept samples' 128-bit hex "
                                       "uids as DataComp's sorted u8,u8 array (for its resharder and training).")]
    = None,
    reshard: Annotated[Optional[str], Opt(metavar="FOLDER", panel=OUTPUT, help="Write new webdataset shards "
                                          "holding only the kept samples, every member byte for byte (an empty or "
                                          "new folder).")] = None,
    samples_per_shard: Annotated[int, Opt(min=1, metavar="N", panel=OUTPUT,
                                          help="Samples per new shard (--reshard).")] = 10_000,
    *, opts: Opts,
) -> None:
    """Keep a scored dataset's best samples: by --min-score, --top-fraction of all, or --top-k per prompt.

    Every cut-off given must hold. The scores are read twice, the images never; --reshard copies the kept samples.

    Examples:
      $ pickrank filter scores/ --top-fraction 0.3 -o kept.parquet --uids kept.npy --reshard filtered/
      $ pickrank filter scores/ --min-score 21.5 -o kept.parquet
      $ pickrank filter scores/ --top-k 1 --reshard best/
    """
    from pickrank.analysis.filtering import FilterJob, Selection, filter_dataset

    with Command(opts.command) as cmd:
        job = FilterJob(tuple(scores), Selection(min_score, top_fraction, top_k), output, uids, reshard,
                        samples_per_shard, opts.run.max_bytes)  # type: ignore[union-attr]
        done = filter_dataset(job, cmd.sinks)
        cut = f"; cut-off {done.threshold:.4f}" if done.threshold is not None else ""
        share = f" ({done.kept / done.scored:.1%} of the scored)" if done.scored else ""
        log.info("kept %d of %d sample(s)%s%s", done.kept, done.total, share, cut)
        cmd.code = EXIT_PARTIAL if done.failed else EXIT_OK
