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


def test_bench_rejects_bad_scan_unroll():
    res = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--scan-unroll", "0"])
    assert res.exit_code != 0
    assert "--scan-unroll must be a positive integer, 'full' or 'auto'" in res.output and "'0'" in res.output


def test_count_flops_uses_shapes_only_and_counts_matmuls_exactly():
    """FLOPs of a chain of two matmuls from shapes alone, lowered for the CPU whatever the backend."""
    import jax
    import jax.numpy as jnp

    from pixeldit.bench import count_flops

    a = jax.ShapeDtypeStruct((32, 48), jnp.float32)
    b = jax.ShapeDtypeStruct((48, 16), jnp.float32)
    c = jnp.ones((16, 8), jnp.float32)
    assert count_flops(lambda a, b, c: (a @ b) @ c, a, b, c) == 2 * 32 * 48 * 16 + 2 * 32 * 16 * 8
    # elementwise work counts one FLOP per element (XLA's convention): the cast adds 32 * 16
    a16, b16 = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (a, b))
    assert count_flops(lambda a, b, c: (a @ b).astype(jnp.float32) @ c, a16, b16, c) == (
        2 * 32 * 48 * 16 + 32 * 16 + 2 * 32 * 16 * 8)


def test_bench_profile_writes_trace_and_hlo(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--repeats", "1", "--scan-unroll", "full",
                                   "--profile", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert result["scan_unroll"] is True and result["profile_dir"] == str(tmp_path)
    assert list(tmp_path.rglob("perfetto_trace.json.gz"))
    assert "ENTRY" in (tmp_path / "train_step.hlo.txt").read_text()
