"""`pickrank report`: saved results rendered as an HTML gallery."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Optional

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import OUTPUT, Arg, Opt, Opts, with_options
from pickrank.errors import UsageError
from pickrank.options import CommandOptions

log = logging.getLogger("pickrank")


@with_options(CommandOptions)
def report(
    results: Annotated[str, Arg(metavar="RESULTS.jsonl", help="Results saved with -f jsonl (or -f json); - for "
                                "stdin.")],
    output: Annotated[Optional[str], Opt("--output", "-o", metavar="FILE", panel=OUTPUT, help="The HTML page to write "
                                         "[default: RESULTS with .html].")] = None,
    *, opts: Opts,
) -> None:
    """Render saved results as a self-contained HTML gallery (image files must still exist for thumbnails).

    Examples:
      $ pickrank score -p "a red cat" images/ -o scores.jsonl
      $ pickrank report scores.jsonl -o report.html
    """
    with Command(opts.command):
        if output is None:
            if results == "-":
                raise UsageError("give -o FILE when reading results from stdin")
            output = os.path.splitext(results)[0] + ".html"
        from pickrank.output.guards import same_file
        from pickrank.report.gallery import render_results

        if results != "-" and same_file(results, output):
            raise UsageError(f"-o {output}: is the results file; give another name for the page")
        rankings, missing = render_results(results, output)
        if missing:
            log.warning("%d image file(s) no longer exist: shown as placeholders", missing)
        log.info("wrote %s (%d ranking(s))", output, rankings)
