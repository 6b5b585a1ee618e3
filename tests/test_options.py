"""Options declared once: the CLI and the library build the same option objects, every shared option
is listed once per command, commands declare only their own parameters; help renders as written; eval -f;
devtools' argument parsing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pickrank.api import PickScorer
from pickrank.cli.app import app
from pickrank.cli.cache import cache_clear, cache_info, cache_prune
from pickrank.cli.compare import compare
from pickrank.cli.evaluate import eval_
from pickrank.cli.export import export_onnx
from pickrank.cli.label import label
from pickrank.cli.prompts import prompts
from pickrank.cli.report import report
from pickrank.cli.score import batch, best_of_n, score
from pickrank.cli.shared import SHARED
from pickrank.cli.tune import tune
from pickrank.errors import UsageError
from pickrank.models import loading
from pickrank.options import DType, Format, ModelOptions, OnError, RunOptions
from tests.support.help import assert_shared_options_once
from tests.support.pairs import write_csv

DATASET = ["image_key", "caption_key", "image_column", "caption_column", "key_column"]

# Each command, its function, and the shared options it takes (as on the command line).
COMMANDS = {
    ("score",): (score, list(SHARED)),
    ("best-of-n",): (best_of_n, list(SHARED)),
    ("batch",): (batch, list(SHARED)),
    ("eval",): (eval_, ["model", "processor", "revision", "offline", "device", "dtype", "alpha", "backend",
                            "decode", "batch_size", "head", "quiet", "max_pixels", "debug", "scale", "with_meta",
                            "meta"]),
    ("label",): (label, ["model", "processor", "revision", "offline", "device", "dtype", "alpha", "backend", "decode",
                         "batch_size", "head", "workers", "max_pixels", "max_bytes", "cache", "no_cache", "quiet",
                         "debug"]),
    ("tune",): (tune, ["model", "processor", "revision", "offline", "device", "dtype", "alpha", "backend", "decode",
                       "batch_size", "workers", "max_pixels", "max_bytes", "cache", "no_cache", "quiet", "debug"]),
    ("export", "onnx"): (export_onnx, ["model", "processor", "revision", "offline", "quiet", "debug"]),
    ("compare",): (compare, [n for n in SHARED if n not in ("format", "html", "null", "with_meta", *DATASET)]),
    ("prompts",): (prompts, ["format", "output", "quiet", "max_pixels", "max_bytes", "debug", *DATASET]),
    ("report",): (report, ["quiet", "debug"]),
    ("cache", "info"): (cache_info, ["cache", "debug"]),
    ("cache", "clear"): (cache_clear, ["cache", "debug"]),
    ("cache", "prune"): (cache_prune, ["cache", "debug"]),
}



@pytest.fixture
def recorded(monkeypatch) -> list[ModelOptions]:
    """The ModelOptions each load is given, recorded on the way to the real loader (nothing else changes)."""
    seen: list[ModelOptions] = []
    real = loading.load_embedder

    def recording(opts: ModelOptions, *args, **kw):
        seen.append(opts)
        return real(opts, *args, **kw)

    monkeypatch.setattr(loading, "load_embedder", recording)
    return seen


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_cli_option_and_its_api_argument_build_the_same_object(runner, model_dir, images, recorded, dtype):
    res = runner.invoke(app, ["score", "-p", "a cat", str(images), "--model", str(model_dir), "--device", "cpu",
                              "--dtype", dtype, "--batch-size", "4", "--no-cache", "--workers", "0", "-q"])
    try:
        PickScorer.from_pretrained(str(model_dir), device="cpu", dtype=dtype, batch_size=4)
    except UsageError:  # bf16 on a CPU without bf16 instructions: the CLI exits 2 on the same check
        assert res.exit_code == 2, res.output
    else:
        assert res.exit_code == 0, res.output
    cli_opts, api_opts = recorded
    assert cli_opts == api_opts == ModelOptions(model=str(model_dir), device="cpu", dtype=DType(dtype),
                                                batch_size=4)
    assert cli_opts.dtype is DType(dtype)  # an enum member, whether given as "bf16" or as DType.bf16


def test_api_takes_the_options_object_itself(model_dir, recorded):
    opts = ModelOptions.from_values(model=str(model_dir), device="cpu", dtype=DType.fp32)
    scorer = PickScorer.from_pretrained(options=opts)
    assert recorded == [opts] and scorer.device.type == "cpu"
    with pytest.raises(UsageError, match="not both"):
        PickScorer.from_pretrained(str(model_dir), options=opts)


def test_option_values_are_checked_in_one_place():
    assert ModelOptions.from_values(dtype="bf16") == ModelOptions(dtype=DType.bf16)
    assert RunOptions.from_values(on_error="fail").on_error is OnError.fail == "fail"
    assert ModelOptions.from_values(dtype="float32") == ModelOptions(dtype=DType.fp32)  # torch's usual names too
    with pytest.raises(UsageError, match="unknown dtype 'float64': use fp32, fp16 or bf16"):
        ModelOptions.from_values(dtype="float64")
    with pytest.raises(TypeError, match="dtypes"):
        ModelOptions.from_values(dtypes="fp32")
    # None means "the default" for the limits, on the command line and in the library alike
    from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
    from pickrank.inputs.files import DEFAULT_MAX_BYTES

    assert RunOptions.from_values(max_pixels=None, max_bytes=None) == RunOptions() == \
        RunOptions(max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_BYTES)


def test_dtype_and_format_names_come_from_one_list():
    import torch

    from pickrank.models import source
    from pickrank.output import writers
    from pickrank.ray import engine as ray_engine

    assert source.DTYPE_NAMES == tuple(d.value for d in DType) == ("fp32", "fp16", "bf16")
    assert ray_engine._DTYPE_NAMES == {str(torch.float32): "fp32", str(torch.float16): "fp16",
                                       str(torch.bfloat16): "bf16"}
    assert writers.FORMATS == tuple(f.value for f in Format)
    with pytest.raises(UsageError, match="use fp32, fp16 or bf16"):
        source.check_dtype_name("fp64")


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_shared_options_are_listed_once_and_commands_declare_only_their_own(runner, monkeypatch, command):
    func, takes = COMMANDS[command]
    assert_shared_options_once(runner, monkeypatch, command, func, takes)


def test_help_shows_brackets_as_written(runner, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    for command in ("score", "best-of-n", "batch"):
        assert "pip install 'pickrank[ray]'" in runner.invoke(app, [command, "--help"]).stdout
    text = runner.invoke(app, ["eval", "--help"]).stdout
    assert "pip install 'pickrank[eval]'" in text
    assert "<= T [default: 0, or chosen with --validation]." in text
    assert "[default: yuvalkirstain/PickScore_v1]" in text and "\\[" not in text


def test_eval_takes_f_json_and_keeps_json_as_its_alias(runner, model_dir, pairs_data, tmp_path):
    folder, rows = pairs_data
    data = write_csv(folder / "pairs.csv", rows, [r["best"] for r in rows])
    args = ["eval", data, "--model", str(model_dir), "--bootstrap", "50", "-q"]
    as_f = runner.invoke(app, [*args, "-f", "json"])
    as_long = runner.invoke(app, [*args, "--format", "json"])
    as_alias = runner.invoke(app, [*args, "--json"])
    assert as_f.exit_code == as_alias.exit_code == 0, as_f.output
    assert json.loads(as_f.stdout) == json.loads(as_alias.stdout) == json.loads(as_long.stdout)
    table = runner.invoke(app, [*args, "-f", "table"])
    assert table.exit_code == 0 and table.stdout == runner.invoke(app, args).stdout
    assert not table.stdout.lstrip().startswith("{")
    both = runner.invoke(app, [*args, "-f", "table", "--json"])
    assert both.exit_code == 2 and both.stderr.startswith("pickrank: error: ")


def test_devtools_has_help_and_builds_where_told(tmp_path):
    env_py = [sys.executable, "-m", "pickrank.devtools"]
    res = subprocess.run([*env_py, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "usage: python -m pickrank.devtools" in res.stdout
    assert list(tmp_path.iterdir()) == []  # no model built in a folder named --help
    res = subprocess.run([*env_py, "--seed", "1", "out", "huge"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr and not (tmp_path / "out").exists()
    res = subprocess.run([*env_py, "m", "--seed", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()


def test_every_command_runs_in_the_one_lifecycle(runner, tmp_path):
    # report and the cache commands used to do their own error handling: now a usage error is one line, exit 2
    res = runner.invoke(app, ["report", "-"])
    assert (res.exit_code, res.stderr) == (2, "pickrank: error: give -o FILE when reading results from stdin\n")
    res = runner.invoke(app, ["cache", "clear", "--model", " ", "--cache", str(tmp_path / "c.sqlite3")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--model must not be empty" in res.stderr
    assert not (tmp_path / "c.sqlite3").exists()  # refused before the cache is opened (and made)
    res = runner.invoke(app, ["cache", "info", "--cache", str(tmp_path)])  # a folder: not a cache
    assert res.exit_code != 0 and res.stderr.startswith("pickrank: error: ") and res.stderr.count("\n") == 1
