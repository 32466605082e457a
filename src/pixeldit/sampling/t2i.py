"""The reference text-to-image time convention, and its adapter to these samplers.

The reference text-to-image model (SANA lineage) uses a noise level ``sigma`` with
``x = (1 - sigma) * data + sigma * noise``, time input ``sigma * 1000`` and velocity target
``noise - data``.  In this package's terms ``t = 1 - sigma`` and ``v = -v_t2i``;
:class:`ReferenceT2ITime` wraps such a model accordingly.  The reference shifts the noise
level as ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (s = 3 at 512 px, 4 at 1024 px).  This
is exactly :func:`pixeldit.sampling.time_shift` with the same ``s``::

    1 - t / (t + (1 - t) s) = (1 - t) s / (t + (1 - t) s) = s sigma / (1 + (s - 1) sigma)

so the reference's shifted sigma schedule is ``1 -`` our shifted time grid.  The reference
t2i sampler is DPM-Solver++(2M) multistep with ``lower_order_final`` over sigmas
``shift(linspace(0, 0.999, N + 1))`` flipped, i.e. ``t = shift(linspace(0.001, 1, N + 1))``,
with the guidance interval ``(lo_s, hi_s)`` tested against sigma.  The equivalent here::

    sample(ReferenceT2ITime(model), noise, y, y_null, method="dpm_solver_2m",
           num_steps=N, timeshift=s, guidance=w, t_start=0.001,
           guidance_interval=sigma_interval_to_t(lo_s, hi_s))

(equal in exact arithmetic; the float32 rounding differs).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx


def sigma_interval_to_t(lo_sigma: float, hi_sigma: float) -> tuple[float, float]:
    """A t2i guidance interval on sigma, ``lo < sigma < hi``, as one on ``t = 1 - sigma``."""
    return (1.0 - hi_sigma, 1.0 - lo_sigma)


#: Name of the reference text-to-image time convention in checkpoint metadata (``time_convention``).
REFERENCE_T2I_TIME = "reference_t2i"


class ReferenceT2ITime(nnx.Module):
    """Run a reference-convention text-to-image model with these samplers.

    Forwards ``(x, t, y)`` to ``model(x, (1 - t) * time_scale, y)`` (the noise level
    ``sigma = 1 - t``, times 1000) and negates the output (``v = data - noise``).
    """

    def __init__(self, model: Callable, time_scale: float = 1000.0):
        self.model = model
        self.time_scale = float(time_scale)

    def __call__(self, x, t, y, **kwargs):
        t = jnp.asarray(t, jnp.float32)
        sigma = 1.0 - t
        return -self.model(x, sigma * self.time_scale, y, **kwargs)
