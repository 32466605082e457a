import jax.numpy as jnp
import numpy as np
import pytest
from paper_golden import load

from pixeldit.resample import adaptive_avg_pool, resize, resize_matrix, scaled_size

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
FLOAT32_ATOL = 5e-6  # float32 rounding of a different summation order; a wrong kernel is off by >1e-2
CASES = {
    "bilinear_up": ((20, 30), "bilinear"),
    "bilinear_down": ((7, 9), "bilinear"),
    "bicubic_up": ((20, 30), "bicubic"),
    "bicubic_down": ((7, 9), "bicubic"),
    "area_down": ((5, 6), "area"),
    "area_up": ((16, 20), "area"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch(case):
    _, g = load("resample.npz")
    size, method = CASES[case]
    np.testing.assert_allclose(resize(jnp.asarray(g["x"]), size, method), g[case], atol=FLOAT32_ATOL, rtol=0)


def test_scale_factor_matches_torch():
    config, g = load("resample.npz")
    sh, sw = config["scale"]
    size = (scaled_size(13, sh), scaled_size(17, sw))
    assert size == g["bicubic_scale"].shape[1:3]
    out = resize(jnp.asarray(g["x"]), size, "bicubic", scale=(sh, sw))
    np.testing.assert_allclose(out, g["bicubic_scale"], atol=FLOAT32_ATOL, rtol=0)


def test_dinov2_preprocessing_matches_torch():
    _, g = load("resample.npz")
    x = (jnp.asarray(g["raw"]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(resize(x.astype(jnp.float32), (28, 28), "bicubic"), g["dino_preprocess"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area"])
def test_rows_sum_to_one_and_identity_at_same_size(method):
    m = resize_matrix(11, 4, method)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(resize_matrix(6, 6, method), np.eye(6), atol=1e-12)


def test_adaptive_pool_of_divisible_size_is_block_mean():
    x = jnp.arange(2 * 4 * 6 * 1, dtype=jnp.float32).reshape(2, 4, 6, 1)
    expected = x.reshape(2, 2, 2, 3, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(adaptive_avg_pool(x, (2, 3)), expected, atol=1e-6)


def test_bad_method_is_one_clear_error():
    with pytest.raises(ValueError, match="resize method must be one of"):
        resize(jnp.zeros((1, 4, 4, 1)), (2, 2), "nearest")
