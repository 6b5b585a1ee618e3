"""`pickrank export onnx`: the model exported for ONNX Runtime (`pickrank.models.onnx_export`)."""

from __future__ import annotations

import logging
from typing import Annotated

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import Arg, Opts, with_options
from pickrank.options import CommandOptions, ModelOptions

log = logging.getLogger("pickrank")


@with_options((ModelOptions, "model", "processor", "revision", "offline"), CommandOptions)
def export_onnx(
    out_dir: Annotated[str, Arg(metavar="OUT_DIR", help="New (or empty) folder for the export; an earlier export "
                                "there is replaced, anything else is refused.")],
    *, opts: Opts,
) -> None:
    """Export the vision and text towers as ONNX graphs (fp32), checked against torch, for the onnx backend.

    The folder is then the model of any scoring command, run by ONNX Runtime.

    Examples:
      $ pickrank export onnx pickscore-onnx/
      $ pickrank score --model pickscore-onnx/ -p "a red cat" images/
    """
    with Command(opts.command):
        from pickrank.models.loading import require_torch

        require_torch("pickrank export onnx")  # it traces the torch model
        from pickrank.models.onnx_export import export_onnx as export

        manifest = export(opts.model, out_dir)
        log.info("wrote %s (max score difference to torch %.2g)", out_dir, manifest["parity"]["max_score_diff"])
