"""The seed API of pixeldit.modules: signatures, documented behaviour, golden parity."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import golden
from pixeldit import modules
from pixeldit.convert import load_reference_state_dict
from pixeldit.modules import (
    Buffer,
    FinalLayer,
    PixelMLP,
    RMSNorm,
    SwiGLU,
    TimestepConditioner,
    _get_1d_sincos_pos_embed_from_grid,
    _timestep_embedding,
    get_2d_sincos_pos_embed,
)

# float32 products in full float32 on every backend (see conftest.reference_precision)
pytestmark = pytest.mark.usefixtures("reference_precision")


@pytest.fixture(scope="module")
def gold():
    return golden.load("modules.npz")


# --- the specified signatures ------------------------------------------------------------------

SPEC = {
    SwiGLU: "(self, dim, mlp_ratio=4.0, *, rngs, param_dtype=<class 'jax.numpy.bfloat16'>, dtype=None)",
    PixelMLP: "(self, dim, mlp_ratio=4.0, *, rngs, param_dtype=<class 'jax.numpy.bfloat16'>, dtype=None)",
    TimestepConditioner: "(self, hidden_size, freq_dim=256, *, rngs, param_dtype=<class 'jax.numpy.bfloat16'>, dtype=None)",
    FinalLayer: "(self, hidden_size, out_channels, *, rngs, param_dtype=<class 'jax.numpy.bfloat16'>, dtype=None)",
}


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda c: c.__name__)
def test_class_signatures(cls):
    sig = inspect.signature(cls.__init__)
    names = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    expected_positional = {"SwiGLU": ["dim", "mlp_ratio"], "PixelMLP": ["dim", "mlp_ratio"],
                           "TimestepConditioner": ["hidden_size", "freq_dim"], "FinalLayer": ["hidden_size", "out_channels"]}
    pos = [n for n, k, _ in names[1:] if k == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    kwonly = [n for n, k, _ in names if k == inspect.Parameter.KEYWORD_ONLY]
    assert pos == expected_positional[cls.__name__]
    assert kwonly[:2] == ["rngs", "param_dtype"]
    assert sig.parameters["param_dtype"].default is jnp.bfloat16
    assert sig.parameters["rngs"].default is inspect.Parameter.empty
    if "mlp_ratio" in sig.parameters:
        assert sig.parameters["mlp_ratio"].default == 4.0
    if "freq_dim" in sig.parameters:
        assert sig.parameters["freq_dim"].default == 256


def test_function_signatures():
    assert list(inspect.signature(_timestep_embedding).parameters) == ["t", "dim", "max_period"]
    assert inspect.signature(_timestep_embedding).parameters["max_period"].default == 10.0
    assert list(inspect.signature(get_2d_sincos_pos_embed).parameters) == ["embed_dim", "h", "w"]
    assert list(inspect.signature(_get_1d_sincos_pos_embed_from_grid).parameters) == ["embed_dim", "pos"]
    assert issubclass(Buffer, nnx.Variable) and not issubclass(Buffer, nnx.Param)


def test_default_param_dtype_is_bfloat16():
    m = SwiGLU(8, rngs=nnx.Rngs(0))
    assert m.w1.kernel[...].dtype == jnp.bfloat16


# --- Buffer ---------------------------------------------------------------------------------------


class _WithBuffer(nnx.Module):
    def __init__(self):
        self.table = Buffer(jnp.arange(4.0, dtype=jnp.float32))
        self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))


def test_buffer_is_filterable_and_not_param():
    m = _WithBuffer()
    buffers = jax.tree.leaves(nnx.state(m, Buffer))
    params = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert len(buffers) == 1 and np.array_equal(buffers[0], np.arange(4.0))
    assert all(p.shape != (4,) for p in params) and len(params) == 2


def test_param_cast_leaves_buffer_untouched():
    m = _WithBuffer()
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    m2 = nnx.merge(graphdef, params, rest)
    assert m2.lin.kernel[...].dtype == jnp.bfloat16
    assert m2.table[...].dtype == jnp.float32
    np.testing.assert_array_equal(m2.table[...], np.arange(4.0))


# --- documented behaviour ----------------------------------------------------------------------------


def test_final_layer_is_exact_zero_at_init():
    layer = FinalLayer(16, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (4, 5, 16)) * 10
    assert np.all(np.asarray(layer(x)) == 0.0)
    assert np.all(layer.linear.kernel[...] == 0) and np.all(layer.linear.bias[...] == 0)


def test_timestep_sinusoid_float32_under_bf16():
    t = jnp.asarray([0.1234567, 0.5], dtype=jnp.bfloat16)
    emb = _timestep_embedding(t, 16)
    assert emb.dtype == jnp.float32
    seen = {}
    cond = TimestepConditioner(32, freq_dim=16, rngs=nnx.Rngs(0))  # bfloat16 params by default
    orig = cond.mlp.layers[0].__call__

    def spy(x):
        seen["dtype"] = x.dtype
        return orig(x)

    cond.mlp.layers[0].__call__ = spy  # instance attribute; nnx.Sequential calls the layer
    t32 = jnp.asarray([0.1234567, 0.5], dtype=jnp.float32)
    out = cond(t32)
    assert out.dtype == jnp.bfloat16
    # the sinusoid itself is float32: distinct nearby times stay distinct before the cast
    e = _timestep_embedding(jnp.asarray([0.5, 0.5 + 1e-6]), 256)
    assert e.dtype == jnp.float32 and np.any(np.asarray(e[0] != e[1]))


def test_timestep_conditioner_mlp_init_std():
    cond = TimestepConditioner(512, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    std = float(np.std(np.asarray(cond.mlp.layers[0].kernel[...])))
    assert abs(std - 0.02) < 0.002


def test_swiglu_hidden_width():
    assert SwiGLU(32, rngs=nnx.Rngs(0)).w1.kernel.shape == (32, 85)  # int(2 * 128 / 3)
    assert SwiGLU(24, 3.0, rngs=nnx.Rngs(0)).w2.kernel.shape == (48, 24)
    m = SwiGLU(8, rngs=nnx.Rngs(0))
    assert not hasattr(m.w1, "bias") or m.w1.bias is None


def test_sincos_nonsquare_shape_and_axes():
    t = get_2d_sincos_pos_embed(8, 3, 5)
    assert t.shape == (15, 8) and t.dtype == np.float32
    # first half encodes the w coordinate (column), second half the h coordinate (row)
    w_coord = np.tile(np.arange(5), 3)
    h_coord = np.repeat(np.arange(3), 5)
    np.testing.assert_allclose(t[:, :4], _get_1d_sincos_pos_embed_from_grid(4, w_coord), atol=1e-6)
    np.testing.assert_allclose(t[:, 4:], _get_1d_sincos_pos_embed_from_grid(4, h_coord), atol=1e-6)


def test_1d_sincos_order_is_sin_then_cos():
    e = _get_1d_sincos_pos_embed_from_grid(4, np.array([0.0, 1.0]))
    np.testing.assert_allclose(e[1], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)])


# --- golden parity ----------------------------------------------------------------------------------


def test_golden_timestep_embedding(gold):
    _, d = gold
    for dim in (256, 255):
        golden.assert_close(_timestep_embedding(jnp.asarray(d["in/t"]), dim), d[f"out/timestep_embedding_{dim}"])


def test_golden_sincos(gold):
    _, d = gold
    golden.assert_close(get_2d_sincos_pos_embed(16, 4, 4), d["out/sincos2d_16_4x4"])
    golden.assert_close(get_2d_sincos_pos_embed(24, 3, 5), d["out/sincos2d_24_3x5"])
    golden.assert_close(_get_1d_sincos_pos_embed_from_grid(8, d["in/sincos1d_pos"]), d["out/sincos1d_8"])


def _loaded(module, d, case):
    load_reference_state_dict(module, golden.state_dict(d, f"sd/{case}/"))
    return module


F32 = dict(param_dtype=jnp.float32)


@pytest.mark.parametrize(
    "case,make",
    [
        ("swiglu", lambda: SwiGLU(32, 4.0, rngs=nnx.Rngs(0), **F32)),
        ("swiglu_r3", lambda: SwiGLU(24, 3.0, rngs=nnx.Rngs(0), **F32)),
        ("pixel_mlp", lambda: PixelMLP(16, 4.0, rngs=nnx.Rngs(0), **F32)),
        ("final_layer", lambda: FinalLayer(16, 3, rngs=nnx.Rngs(0), **F32)),
        ("timestep_conditioner", lambda: TimestepConditioner(64, 256, rngs=nnx.Rngs(0), **F32)),
        ("rmsnorm", lambda: RMSNorm(12, param_dtype=jnp.float32)),
    ],
)
def test_golden_module(gold, case, make):
    _, d = gold
    m = _loaded(make(), d, case)
    golden.assert_close(m(jnp.asarray(d[f"in/{case}"])), d[f"out/{case}"])


def test_modules_exports():
    for name in ("Buffer", "SwiGLU", "PixelMLP", "TimestepConditioner", "FinalLayer", "_timestep_embedding",
                 "get_2d_sincos_pos_embed", "_get_1d_sincos_pos_embed_from_grid"):
        assert hasattr(modules, name)
