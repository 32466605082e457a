"""``pixeldit bench`` on the tiny preset: one JSON object with the documented keys."""

import json

from typer.testing import CliRunner

from pixeldit.cli import app

KEYS = {"forward_ms", "train_step_ms", "sample_step_ms", "compile_s", "gflops_forward", "matmul_gflops_per_s",
        "gflops_train_step", "forward_fraction_of_matmul", "train_step_fraction_of_matmul"}


def test_bench_json_last_line():
    res = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--repeats", "1", "--gemm-floor", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result["gflops_forward"] > 0 and result["train_step_ms"] > 0
    # the train step does forward + backward: at least twice the forward's FLOPs
    assert result["gflops_train_step"] > 2 * result["gflops_forward"]
    # --gemm-floor: the products are part of the counted FLOPs, and the backward has more of them
    for key in ("forward", "train_step"):
        assert 0 < result[f"{key}_gemm_gflops"] < result[f"gflops_{key}"]
        assert result[f"{key}_gemm_floor_ms"] > 0 and result[f"{key}_gemm_bound_fraction"] > 0
    assert result["train_step_gemm_gflops"] > 2 * result["forward_gemm_gflops"]
    from pixeldit.tools.gemm_floor import format_lines

    assert "matrix products timed alone: forward" in format_lines(result)[0]


def test_dot_calls_counts_scan_bodies_by_length():
    """Products inside a scan count once per iteration; batched products count their batch."""
    import jax
    import jax.numpy as jnp
    import pytest

    from pixeldit.tools.gemm_floor import dot_calls, gemm_floor

    def f(x, ws, a, b):
        def body(h, w):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(body, x, ws)  # 3 products (8x16 by 16x16)
        nt = jax.lax.dot_general(h, a, (((1,), (1,)), ((), ())))  # 8x16 by (5x16)^T
        return nt, jnp.einsum("bij,bjk->bik", b, b)  # a batch of 4 (6x6 by 6x6)

    args = (jnp.ones((8, 16)), jax.ShapeDtypeStruct((3, 16, 16), jnp.float32), jnp.ones((5, 16)),
            jnp.ones((4, 6, 6), jnp.bfloat16))
    calls = dot_calls(f, *args)
    got = sorted((c.lhs_shape, c.rhs_shape, c.count, c.flops) for c in calls)
    assert got == sorted([
        ((8, 16), (16, 16), 3, 2 * 8 * 16 * 16),
        ((8, 16), (5, 16), 1, 2 * 8 * 16 * 5),
        ((4, 6, 6), (4, 6, 6), 1, 2 * 4 * 6 * 6 * 6),
    ])
    nt = next(c for c in calls if c.rhs_shape == (5, 16))
    assert (nt.lhs_contracting, nt.rhs_contracting, nt.dtype) == ((1,), (1,), "float32")
    assert next(c for c in calls if c.lhs_batch).lhs_dtype == "bfloat16"
    # the backward's products: input and weight gradients of each scanned product, 3 times each
    grads = dot_calls(jax.grad(lambda x, ws: jnp.sum(f(x, ws, args[2], args[3])[0]), argnums=(0, 1)), args[0],
                      args[1])
    assert sorted((c.lhs_shape, c.rhs_shape, c.lhs_contracting, c.rhs_contracting, c.count) for c in grads) == sorted([
        ((8, 16), (16, 16), (1,), (0,), 3),  # forward
        ((8, 16), (16, 16), (1,), (1,), 3),  # input gradient: dh @ W^T
        ((8, 16), (8, 16), (0,), (0,), 3),  # weight gradient: h^T @ dh
        ((8, 16), (5, 16), (1,), (1,), 1),
        ((8, 5), (5, 16), (1,), (0,), 1),  # its input gradient
        ((4, 6, 6), (4, 6, 6), (2,), (1,), 1),  # unused here, but traced: the jaxpr is not pruned
    ])
    floor = gemm_floor(calls, repeats=1)
    assert floor["num_products"] == 3 and floor["floor_ms"] > 0
    assert floor["gemm_gflops"] == pytest.approx(sum(c.count * c.flops for c in calls) / 1e9)
    with pytest.raises(ValueError, match="inside a 'while'"):
        dot_calls(lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0],
                  jnp.ones((4, 4)))


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
