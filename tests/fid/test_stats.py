import jax.numpy as jnp
import numpy as np
import pytest
from paper_golden import load

from pixeldit.fid.stats import (
    cached_statistics,
    extract_features,
    feature_statistics,
    fid_of_features,
    frechet_distance,
    load_statistics,
)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent restatement: Tr sqrt(S1 S2) as the sum of sqrt(eigenvalues of S1 S2)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real.clip(0))))


def test_identical_sets_have_zero_fid():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert abs(fid_of_features(x, x)) < 1e-8


def test_two_halves_match_numpy_and_pytorch_fid():
    _, g = load("frechet.npz")
    a, b = g["features"][:200], g["features"][200:]
    value = fid_of_features(a, b)
    assert value > 0.5  # the halves differ: a distance that is not trivially zero
    np.testing.assert_allclose(value, _reference_fid(a, b), rtol=1e-8)
    np.testing.assert_allclose(value, g["fid"], rtol=1e-10)  # pytorch-fid's calculate_frechet_distance


def test_rank_deficient_covariances_give_a_finite_distance():
    x = np.random.default_rng(1).normal(size=(5, 16))  # 5 samples in 16 dims: rank-deficient covariances
    assert np.isfinite(fid_of_features(x, x + 0.1))


def test_statistics_are_computed_once_and_cached(tmp_path):
    calls = []
    x = np.random.default_rng(2).normal(size=(50, 4))

    def compute():
        calls.append(1)
        return x

    fingerprint = {"data": "images/", "num": 50, "resolution": 32}
    mu, sigma = cached_statistics(tmp_path / "ref.npz", fingerprint, compute)
    mu2, sigma2 = cached_statistics(tmp_path / "ref.npz", fingerprint, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    np.testing.assert_array_equal(load_statistics(tmp_path / "ref.npz")[0], feature_statistics(x)[0])
    with pytest.raises(ValueError, match="was made from"):
        cached_statistics(tmp_path / "ref.npz", {**fingerprint, "num": 49}, compute)


def test_extract_features_pads_the_last_batch():
    def model(x):
        return jnp.mean(x, axis=(1, 2))  # (b, 3): a stand-in feature map

    images = np.random.default_rng(3).uniform(size=(7, 4, 4, 3)).astype(np.float32)
    feats = extract_features(model, [images[:4], images[4:]], batch_size=4)
    np.testing.assert_allclose(feats, images.mean(axis=(1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="larger than batch_size"):
        extract_features(model, [images], batch_size=4)


def test_mismatched_statistics_are_a_clear_error():
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
