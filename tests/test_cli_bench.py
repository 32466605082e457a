"""``pixeldit bench`` on the tiny preset: one JSON object with the documented keys."""

import json

from typer.testing import CliRunner

from pixeldit.cli import app

KEYS = {"forward_ms", "train_step_ms", "sample_step_ms", "compile_s", "gflops_forward", "matmul_gflops_per_s",
        "gflops_train_step", "forward_fraction_of_matmul", "train_step_fraction_of_matmul"}


def test_bench_json_last_line():
    res = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result["gflops_forward"] > 0 and result["train_step_ms"] > 0
    # the train step does forward + backward: at least twice the forward's FLOPs
    assert result["gflops_train_step"] > 2 * result["gflops_forward"]


def test_bench_unknown_preset():
    res = CliRunner().invoke(app, ["bench", "--preset", "huge"])
    assert res.exit_code != 0
    assert "s8-64" in res.output


def test_bench_rejects_unknown_remat_mode():
    res = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--remat", "all"])
    assert res.exit_code != 0
    assert "--remat must be one of" in res.output and "dots" in res.output
