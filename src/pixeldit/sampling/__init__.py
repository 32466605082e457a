"""ODE samplers for PixelDiT flow models (class-to-image and text-to-image).

Conventions
-----------
A model is a Flax NNX module (or any callable) ``model(x, t, y) -> v`` with

* ``x``: channel-last images ``(B, H, W, C)``;
* ``t``: ``(B,)`` float32 in ``[0, 1]``, **t = 0 is pure noise and t = 1 is data**;
* ``y``: the condition: int labels ``(B,)`` for class-conditional models, arrays
  ``(B, L, D)`` / ``(B, K)`` for token / parameter models, or a dict / tuple of such arrays
  (every leaf with leading batch dimension ``B``; a Python list is read as one array);
* ``v``: the velocity ``(B, H, W, C)``.

The forward process is ``x_t = t * x + (1 - t) * eps`` and the velocity target is
``v = x - eps`` (``d x_t / dt``).  Every sampler integrates ``dx/dt = v(x, t)`` from the noise
at ``t = 0`` to the sample at ``t = 1``.  Model outputs are upcast to float32 before the update
(the model may compute in bfloat16); the state ``x`` is always float32.

Modules (each imports only those above it)
------------------------------------------
* :mod:`.solvers`: the solver bodies, one traced loop per method in :data:`METHODS`
  (Euler, reference Heun, exact Heun, FlowDPM, DPM-Solver++(2M), adaptive Dormand-Prince).
* :mod:`.validation`: argument checks, run before anything is compiled.
* :mod:`.schedule`: the float32 time grid (bit-identical to the reference), the time shift,
  DPM-Solver++(2M) coefficients.
* :mod:`.guidance`: classifier-free guidance (one ``2B`` model call per evaluation) and the
  guided velocity.
* :mod:`.t2i`: the reference text-to-image time convention (:class:`ReferenceT2ITime`).
* :mod:`.api`: :func:`sample`, :func:`sample_trajectory`, :func:`solve_adaptive` and the one
  jit-compiled loop behind them.
* :mod:`.batched`: :func:`sample_batched`, many samples in chunks, optionally over a mesh.
"""

from pixeldit.sampling.api import sample, sample_trajectory, solve_adaptive
from pixeldit.sampling.batched import sample_batched
from pixeldit.sampling.guidance import cfg_batch, cfg_combine, cfg_split, guidance_weight
from pixeldit.sampling.schedule import dpm_solver_2m_coefficients, time_shift, timesteps
from pixeldit.sampling.solvers import METHODS
from pixeldit.sampling.t2i import REFERENCE_T2I_TIME, ReferenceT2ITime, sigma_interval_to_t

__all__ = [
    "METHODS",
    "REFERENCE_T2I_TIME",
    "timesteps",
    "time_shift",
    "sample",
    "sample_trajectory",
    "sample_batched",
    "solve_adaptive",
    "guidance_weight",
    "cfg_batch",
    "cfg_split",
    "cfg_combine",
    "sigma_interval_to_t",
    "dpm_solver_2m_coefficients",
    "ReferenceT2ITime",
]
