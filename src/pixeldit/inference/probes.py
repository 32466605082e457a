"""Probe fields of the Hutchinson divergence estimator: Rademacher, Gaussian and random-phase spectral.

``div v = tr J`` is estimated by ``mean_p z_p^T J z_p`` over i.i.d. probe fields with
``E[z z^T] = I``; the estimate is unbiased for any ``J``, and its variance is what the probe
kind decides.

* ``"rademacher"`` / ``"gaussian"``: i.i.d. entries.  One Rademacher probe's variance is
  ``2 sum_{i != j} J_ij^2``: every off-diagonal entry of ``J`` *in the pixel basis* adds to it.
  A field model's ``J`` is close to a convolution (translation-invariant statistics), whose
  off-diagonal entries hold almost all of its mass: at 32 x 32 one probe's error on the
  exact GRF velocity is 1.6-1.8 nats over a posterior region, enough to move a posterior
  built from log-likelihood differences by about one posterior std.
* ``"spectral"``: a random-phase field of flat unit power, ``z = IFFT(sqrt(H W) exp(i phi_k))``
  with independent uniform phases (Hermitian-symmetric, so ``z`` is real; the self-conjugate
  modes get a random sign), one per channel.  ``E[z z^T] = I`` as for Rademacher, but the
  variance is ``2 sum_{k != k'} |J_kk'|^2`` over the off-diagonal entries *in the Fourier
  basis*.  A convolution is diagonal there, so for a stationary field model one probe gives
  the exact divergence, and for a nearly stationary one (a patch-based network) the noise is
  what breaks stationarity.  ``||z||^2 = H W C``, as for Rademacher probes.

The phases come from the FFT of Gaussian white noise normalised to unit amplitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PROBES = ("rademacher", "gaussian", "spectral")
DEFAULT_PROBE = "spectral"  # of log_prob and the inference commands: the least noise for field models

__all__ = ["DEFAULT_PROBE", "PROBES", "draw_probes"]


def _spectral_probes(key, shape, count: int):
    h, w, c = shape
    noise = jax.random.normal(key, (count, h, w, c), jnp.float32)
    f = jnp.fft.fft2(noise, axes=(1, 2))
    mag = jnp.abs(f)
    unit = jnp.where(mag > 0, f / jnp.where(mag > 0, mag, 1.0), 1.0)  # exp(i phi); real +-1 where self-conjugate
    return jnp.real(jnp.fft.ifft2(unit * jnp.sqrt(float(h * w)), axes=(1, 2))).astype(jnp.float32)


def draw_probes(key, shape: tuple[int, int, int], count: int, kind: str):
    """``count`` i.i.d. probe fields ``(count, H, W, C)`` of ``kind`` (module docstring)."""
    if kind == "rademacher":
        return jax.random.rademacher(key, (count,) + tuple(shape), jnp.float32)
    if kind == "gaussian":
        return jax.random.normal(key, (count,) + tuple(shape), jnp.float32)
    if kind == "spectral":
        return _spectral_probes(key, tuple(shape), count)
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
