"""`pickrank doctor`: the model, the install and this machine checked (`pickrank.doctor`)."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import OUTPUT, Opt, Opts, with_options
from pickrank.options import CacheOptions, CommandOptions, ModelOptions, SummaryFormat

log = logging.getLogger("pickrank")


@with_options((ModelOptions, "model", "processor", "revision", "offline", "device", "dtype", "alpha"), CacheOptions,
              CommandOptions)
def doctor(
    format: Annotated[Optional[SummaryFormat], Opt("--format", "-f", panel=OUTPUT, help="table (one line per check) "
                      "or json (one object: ok, failed, checks with name, status, detail) [default: table].")] = None,
    *, opts: Opts,
) -> None:
    """Check the model, the install and this machine before trusting the numbers (paste it into a bug report).

    Which model and processor would load (cached for --offline?), the weights
    (safetensors, complete, hashes), PickScore_v1's architecture and tokenizer,
    the image-processor backend, devices and precisions, the cache, the decode
    workers, and a known-answer self-test against transformers. No network is
    used. Exit 0 when no check fails (warnings do not), 1 naming the failed ones.

    Examples:
      $ pickrank doctor
      $ pickrank doctor --model ./my-pickscore --device cuda -f json
    """
    with Command(opts.command):
        from pickrank.doctor import ChecksFailed, failed, render, run_checks

        log.info("doctor: checking (the self-test loads the model twice: seconds for a small model, up to a "
                 "minute for PickScore_v1 on a CPU)")
        checks = run_checks(opts.model, opts.cache, debug=opts.command.debug)
        typer.echo(render(checks, (format or SummaryFormat.table).value))
        bad = failed(checks)
        if bad:
            raise ChecksFailed(f"doctor: {len(bad)} check(s) failed: {', '.join(bad)}")
