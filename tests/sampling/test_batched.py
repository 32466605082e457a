"""Tests for pixeldit.sampling.batched: chunking, padding and per-sample noise keys."""

import jax
import numpy as np
import pytest

from analytic_fields import GaussianFlow
from pixeldit.sampling import sample, sample_batched


def test_sample_batched_chunks_and_padding():
    model = GaussianFlow()
    key = jax.random.PRNGKey(3)
    shape = (5, 2, 2, 1)
    y = np.array([0, 1, 2, 0, 1])
    y_null = np.full((5,), 2)
    kw = dict(method="euler", num_steps=3, guidance=1.5, progress=False)
    a = sample_batched(model, key, shape, y, y_null, batch_size=2, **kw)
    b = sample_batched(model, key, shape, y, y_null, batch_size=5, **kw)
    assert isinstance(a, np.ndarray) and a.shape == shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)  # independent of the chunking
    keys = jax.random.split(key, 5)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys)
    direct = sample(model, noise, y, y_null, method="euler", num_steps=3, guidance=1.5)
    np.testing.assert_allclose(a, np.asarray(direct), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batched(model, key, shape, y, y_null, batch_size=0, **kw)
