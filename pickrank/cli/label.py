"""`pickrank label`: pairwise labels in a browser (`pickrank.taste.label`)."""

from __future__ import annotations

import getpass
import logging
import sys
import webbrowser
from typing import Annotated, Optional

from pickrank.cli.lifecycle import Command, load_embedder
from pickrank.cli.shared import INPUT, OUTPUT, RUN, SERVER, Arg, Opt, Opts, with_options
from pickrank.options import CacheOptions, CommandOptions, ModelOptions, RunOptions

log = logging.getLogger("pickrank")


def _default_labeler() -> str:
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no user name in this environment
        return "unknown"


@with_options(ModelOptions, (RunOptions, "workers", "max_pixels", "max_bytes"), CacheOptions, CommandOptions)
def label(
    source: Annotated[Optional[list[str]], Arg(metavar="SOURCE", help="A best-of-n folder (its groups), a prompts "
                                               "CSV with images, two or more system folders (a compare layout: "
                                               "pairs across systems), or dataset shards (samples grouped by "
                                               "caption).")] = None,
    *,
    labels: Annotated[str, Opt("--labels", metavar="FILE", panel=OUTPUT,
                               help="The label file (JSON Lines, as eval reads): appended to, one line per label; a "
                                    "restart resumes.")] = "labels.jsonl",
    labeler: Annotated[Optional[str], Opt(metavar="NAME", panel=OUTPUT,
                                          help="Who labels (several labellers may share one file) [default: your "
                                               "user name].")] = None,
    order: Annotated[str, Opt(metavar="uncertain|random", panel=RUN,
                              help="uncertain: the pairs the scorer (PickScore, tuned when a head is given) is "
                                   "least sure about, one in four random; random: a plain random sample (no model "
                                   "needed).")] = "uncertain",
    prompts: Annotated[Optional[str], Opt("--prompts", metavar="CSV", panel=INPUT,
                                          help="A compare layout's prompts CSV (id,prompt).")] = None,
    manifest: Annotated[Optional[str], Opt("--manifest", metavar="FILE", panel=INPUT,
                                           help="A compare manifest (system,prompt,image), not folders.")] = None,
    prompt: Annotated[Optional[str], Opt("--prompt", "-p", metavar="TEXT", panel=INPUT,
                                         help="The prompt of every best-of-n group [default: prompt.txt, else the "
                                              "images' metadata].")] = None,
    host: Annotated[str, Opt(metavar="ADDRESS", panel=SERVER,
                             help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, metavar="PORT", panel=SERVER, help="Port (0: a free one).")] = 8766,
    token: Annotated[Optional[str], Opt(envvar="PICKRANK_TOKEN", metavar="TOKEN", panel=SERVER,
                                        help="Token the page must be opened with (printed in its URL) [default: "
                                             "$PICKRANK_TOKEN].")] = None,
    open_browser: Annotated[bool, Opt("--open", panel=SERVER, help="Open the page in the browser.")] = False,
    seed: Annotated[int, Opt(metavar="N", panel=RUN, help="Seed of the pair order.")] = 0,
    opts: Opts,
) -> None:
    """Label pairs in a browser: which of two candidates is better for the prompt.

    Keys: left/right or 1/2, down or 0 a tie, space skip, u or backspace undo. Every label is on disk at once;
    Ctrl-C ends the session, and a restart resumes. Then fit a head on the labels with pickrank tune.

    Examples:
      $ pickrank label out/ --labels labels.jsonl --open
      $ pickrank label runs/base runs/dpo --prompts prompts.csv --labeler ann
      $ pickrank label out/ --order random --labeler bob
    """
    with Command(opts.command):
        from pickrank.taste.label import LabelJob, Source, plan, run_label

        job = LabelJob(Source(tuple(source or ()), prompts, manifest, prompt), labels, labeler or _default_labeler(),
                       order, seed, host, port, token or None, opts.run, opts.cache)  # type: ignore[arg-type]
        pool = plan(job)
        embedder = load_embedder(opts.model) if order == "uncertain" else None  # type: ignore[arg-type]

        def listening(url: str) -> None:
            address = url + ("/?token=" + job.token if job.token else "/")
            print(f"pickrank: labelling {len(pool.candidates)} candidates over {len(pool.slots)} prompt(s) at "
                  f"{address} (labels go to {labels}; Ctrl-C to stop)", file=sys.stderr, flush=True)
            if open_browser:
                webbrowser.open(address)

        made = run_label(job, pool, embedder, listening)
        log.info("stopped: %d label(s) made in this session, in %s", made, labels)
