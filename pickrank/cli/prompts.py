"""`pickrank prompts`: the prompt read from each image's metadata (no model)."""

from __future__ import annotations

import sys
from typing import Annotated

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import Arg, Opts, with_options
from pickrank.options import CommandOptions, DatasetOptions, OutputOptions, RunOptions


@with_options((OutputOptions, "format", "output"), (RunOptions, "max_pixels", "max_bytes"), DatasetOptions,
              CommandOptions)
def prompts(
    paths: Annotated[list[str], Arg(metavar="PATH", help="Image files, folders, quoted globs ('**' too), or - "
                                                             "to read paths from stdin.")],
    *, opts: Opts,
) -> None:
    """Show the prompt pickrank reads from each image's metadata, its source, and why there is none (no model).

    Examples:
      $ pickrank prompts comfyui_output/
      $ pickrank prompts out/ -f jsonl | jq -r 'select(.prompt == null) | .path'
    """
    with Command(opts.command) as cmd:
        from pickrank.inputs.prompts import prompt_rows
        from pickrank.output.guards import check_outputs
        from pickrank.output.prompt_rows import check_format, write_prompts
        from pickrank.output.targets import Output
        from pickrank.output.writers import choose_format

        fmt = check_format(choose_format(opts.output))
        check_outputs([("-o", opts.output.output)], paths)
        out = Output(opts.output.output)
        cmd.sinks.append(out)  # an -o file is replaced only when every image was listed
        write_prompts(prompt_rows(paths, sys.stdin, opts.run.max_pixels, opts.run.max_bytes, opts.dataset),
                      fmt or ("table" if out.is_terminal else "jsonl"), out)
