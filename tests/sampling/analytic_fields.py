"""Analytic velocity fields shared by the sampling tests (no network weights needed).

Data ``x ~ N(mu_y, s^2)`` per element, ``x_t = t x + (1 - t) eps``::

    var_t = t^2 s^2 + (1 - t)^2,  v(x_t, t) = mu + (t s^2 - (1 - t)) / var_t * (x_t - t mu),

and the exact ODE map sends ``eps`` to ``mu + s * eps``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MU = jnp.array([1.5, -0.75, 0.4], jnp.float32)  # per class
S = 0.5


def gaussian_velocity(x, t, mu, s=S):
    t = t[:, None, None, None]
    mu = mu[:, None, None, None]
    var = t * t * s * s + (1 - t) ** 2
    return mu + (t * s * s - (1 - t)) / var * (x - t * mu)


class GaussianFlow(nnx.Module):
    """Class-conditional analytic rectified-flow velocity (an NNX module with a parameter)."""

    def __init__(self, mu=MU, s=S):
        self.mu = nnx.Param(jnp.asarray(mu))
        self.s = s

    def __call__(self, x, t, y):
        type(self).trace_count += 1  # Python side effect: counts traces
        return gaussian_velocity(x, t, self.mu[...][y], self.s)


GaussianFlow.trace_count = 0


def exact_endpoint(noise, y, mu=MU, s=S):
    return np.asarray(mu)[np.asarray(y)][:, None, None, None] + s * np.asarray(noise)


def make_noise(b=2, h=4, w=4, c=1, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, c), jnp.float32)
