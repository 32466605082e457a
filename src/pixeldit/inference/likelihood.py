"""Log-likelihood of a field under a theta-conditional flow: the probability-flow ODE.

Convention (:mod:`pixeldit.flow`): ``t = 0`` is noise, ``t = 1`` is data,
``x_t = t x + (1 - t) eps`` and the model returns ``v(x_t, t, theta) = E[x - eps | x_t]``.
Along ``dx/dt = v`` the instantaneous change of variables gives

    log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div_x v(x_t, t) dt,

so the solve runs from ``t = 1`` (the observed field) back to ``t = 0`` (noise), carrying the
running integral of the divergence next to the state.  diffrax does the adaptive integration
(Tsit5 with a PID step controller, float32); the step control holds the divergence integrals
to the tolerances on their own, not only as one entry among the field's pixels.

Batching: ``theta`` is ``(M, K)`` (the same grid for every field) or ``(N, M, K)`` (one grid per
field); the result is ``(N, M)``.  Each (field, theta) pair is its own ``diffeqsolve`` and the
pairs are ``vmap``-ed, so every pair keeps its own step-size control: a field's value does not
depend on which other fields or thetas share the batch.  The whole solve is one ``jit``.

Divergence
----------
``"exact"``: the trace of the Jacobian, one JVP per dimension (``H * W * C`` per solver stage,
chunked by ``exact_chunk``).  For small fields and tests.
``"hutchinson"``: ``K = probes`` fixed probe fields ``z`` (random-phase "spectral" fields by
default, or Rademacher / Gaussian: :mod:`pixeldit.inference.probes`), ``div ~ z^T J z``
(one JVP each).  Each probe gets its own accumulator along the one shared trajectory, so the
result is the mean over probes with its standard error.  Common random numbers: the probes
are drawn per *field* (``fold_in(key, field index)``, or a key per field) and shared by every theta, so
``log p(x | theta1) - log p(x | theta2)`` is smooth in theta and much less noisy than either
value.

Mean mode (``mean_mode``)
-------------------------
``"full"``: the density of the whole ``D = H * W * C`` dimensional field.
``"zero_mean"``: for data whose spatial mean is exactly zero (the built-in GRF has
``S(0) = 0``) the learned density along the mean direction is a near-delta whose learned
value is noise.  This mode removes the per-channel mean from the field, from the velocity
and from the Hutchinson probes, so the flow runs on the ``D - C`` dimensional zero-mean
subspace with a standard normal base there.  The value returned is the log density with
respect to Lebesgue measure on that subspace (orthonormal coordinates), the convention of
:func:`pixeldit.data.grf.grf_log_likelihood`.  For the exact rectified-flow velocity of
zero-mean data this is exact: the noise's mean component is independent of the rest, so the
velocity's zero-mean part does not depend on it.

Guidance: none.  A classifier-free-guided velocity ``u + w (c - u)`` is not the velocity of
any probability flow, so it has no density; :func:`log_prob` refuses ``guidance != 1``.

Data scaling: a model trained on ``x / data_scale`` with an encoded theta is wrapped by
:class:`Emulator`; its log density in data units subtracts ``D_eff * log(data_scale)``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Mapping

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ..sampling import sample_batched
from ..static_model import merge_model, split_model
from .probes import DEFAULT_PROBE, PROBES, draw_probes

DIVERGENCES = ("exact", "hutchinson")
MEAN_MODES = ("full", "zero_mean")

__all__ = ["DIVERGENCES", "Emulator", "LogProb", "MEAN_MODES", "PROBES", "log_prob"]


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A theta-conditional velocity model with the units it was trained in.

    ``model(x_model, t, theta_model) -> v_model``: a Flax NNX module or a pure callable on
    batches (``x`` ``(B, H, W, C)``, ``t`` ``(B,)``, ``theta`` ``(B, K)`` or ``(B, K, 2)``).

    Args:
      model: the velocity network.
      theta_encoding: ``None`` / ``{"kind": "none"}`` (theta fed as is), or
        ``{"kind": "affine", "center": [...], "scale": [...]}``: the model sees each component as
        the pair ``((theta - center) / scale, 1)`` (``pixeldit.runs.encode_theta``).
      data_scale: the model was trained on ``x / data_scale``.
      mean_mode: ``"full"`` or ``"zero_mean"`` (module docstring).
    """

    model: Any
    theta_encoding: Mapping[str, Any] | None = None
    data_scale: float = 1.0
    mean_mode: str = "full"

    def __post_init__(self):
        if not (np.isfinite(self.data_scale) and self.data_scale > 0):
            raise ValueError(f"data_scale must be a finite number > 0, got {self.data_scale}")
        if self.mean_mode not in MEAN_MODES:
            raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {self.mean_mode!r}")
        enc = self.theta_encoding
        if enc and enc.get("kind", "affine") not in ("affine", "none"):
            raise ValueError(f"theta_encoding kind must be 'affine' or 'none', got {enc.get('kind')!r}")

    def encoding_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(center, scale)`` float32 ``(K,)`` of an affine encoding, else ``None``."""
        enc = self.theta_encoding
        if not enc or enc.get("kind", "affine") == "none":
            return None
        center = np.asarray(enc["center"], np.float32).reshape(-1)
        scale = np.asarray(enc["scale"], np.float32).reshape(-1)
        if center.shape != (k,) or scale.shape != (k,):
            raise ValueError(f"theta_encoding center/scale must have {k} values each, got {center.shape} "
                             f"and {scale.shape}")
        return center, scale

    def encode(self, theta) -> np.ndarray:
        """The model's theta input for physical ``theta`` ``(B, K)``: ``(B, K, 2)`` when affine, else as is."""
        theta = np.asarray(theta, np.float32)
        enc = self.encoding_arrays(theta.shape[-1])
        if enc is None:
            return theta
        z = (theta - enc[0]) / enc[1]
        return np.stack([z, np.ones_like(z)], axis=-1)

    def log_prob(self, x, theta, **options) -> "LogProb":
        """:func:`log_prob` of this emulator (options as there)."""
        return log_prob(self, x, theta, **options)

    def sample(self, theta, key, image_shape, *, method: str = "heun", num_steps: int = 24, batch_size: int = 64,
               **options) -> np.ndarray:
        """One field per theta row ``(B, K)`` in data units, ``(B, H, W, C)`` (guidance 1).

        ``method``, ``num_steps`` and ``options`` go to :func:`pixeldit.sampling.sample_batched`.
        """
        theta = np.asarray(theta, np.float32)
        shape = (len(theta),) + tuple(int(v) for v in image_shape)
        x = sample_batched(self.model, key, shape, self.encode(theta), batch_size=batch_size, method=method,
                           num_steps=num_steps, progress=False, **options)
        return x * np.float32(self.data_scale)


@dataclasses.dataclass(frozen=True)
class LogProb:
    """Result of :func:`log_prob`, every array ``(N, M)`` (fields x thetas).

    ``value``: log density in nats (data units, on the subspace of ``mean_mode``).
    ``stderr``: Hutchinson standard error over probes (``None`` for the exact divergence;
    NaN with one probe).  ``num_steps``: accepted + rejected solver steps per pair.
    ``dim``: the number of dimensions the density lives on (``D`` or ``D - C``).
    """

    value: np.ndarray
    stderr: np.ndarray | None
    num_steps: np.ndarray
    dim: int

    @property
    def nats_per_dim(self) -> np.ndarray:
        """Negative log-likelihood per dimension, in nats."""
        return -self.value / self.dim

    @property
    def bits_per_dim(self) -> np.ndarray:
        """Negative log-likelihood per dimension, in bits (a continuous density: no dequantisation)."""
        return -self.value / (self.dim * math.log(2.0))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def log_prob(
    model,
    x,
    theta,
    *,
    divergence: str = "exact",
    probes: int = 8,
    probe: str = DEFAULT_PROBE,
    key: jax.Array | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    exact_chunk: int = 64,
    guidance: float = 1.0,
) -> LogProb:
    """Log density ``log p(x | theta)`` of each field at each theta by the probability-flow ODE.

    Args:
      model: an :class:`Emulator`, or a velocity model ``model(x, t, theta) -> v`` used as
        ``Emulator(model)`` (theta as is, unit data scale, ``mean_mode="full"``).
      x: fields ``(N, H, W, C)`` (or one field ``(H, W, C)``), data units.
      theta: ``(M, K)`` shared by all fields, or ``(N, M, K)`` per field (physical units).
      divergence: ``"exact"`` or ``"hutchinson"`` (module docstring).
      probes, probe, key: Hutchinson probe count, kind and PRNG key (required then): one key
        (field ``i`` uses ``fold_in(key, i)``) or a batch of ``N`` keys, one per field.  ``probe``:
        ``"rademacher"``, ``"gaussian"`` or ``"spectral"`` (random-phase fields: far less noise
        for fields with near-stationary statistics, :mod:`pixeldit.inference.probes`).
      rtol, atol: diffrax PID controller tolerances on the state and the divergence integrals.
      max_steps: solver step limit per pair; a pair that hits it returns NaN.
      exact_chunk: JVPs evaluated together for the exact divergence (memory vs speed).
      guidance: must be 1: a guided velocity has no density.

    Returns:
      :class:`LogProb` with ``(N, M)`` numpy arrays.
    """
    if guidance != 1.0:
        raise ValueError(
            f"log_prob needs guidance 1 (the model's own velocity), got {guidance}: a classifier-free-"
            "guided velocity is not the probability flow of any density"
        )
    emu = model if isinstance(model, Emulator) else Emulator(model)
    x, theta = _check_inputs(x, theta)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if divergence == "hutchinson":
        if int(probes) < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        if key is None:
            raise ValueError("the Hutchinson divergence needs a PRNG key (key=jax.random.key(...))")
    else:
        key = jax.random.key(0)  # unused by the exact divergence
    n, h, w, c = x.shape
    keys = _field_keys(key, n)
    k = theta.shape[-1]
    enc = emu.encoding_arrays(k)
    center, scale = enc if enc is not None else (np.zeros(k, np.float32), np.ones(k, np.float32))
    static_model, params = split_model(emu.model)
    value, per_probe, steps = _solve_all(
        static_model, params, jnp.asarray(x / emu.data_scale), jnp.asarray(theta), keys,
        jnp.asarray(center), jnp.asarray(scale),
        encode=enc is not None, zero_mean=emu.mean_mode == "zero_mean", divergence=divergence,
        probes=int(probes) if divergence == "hutchinson" else 1, probe=probe,
        rtol=float(rtol), atol=float(atol), max_steps=int(max_steps), exact_chunk=int(exact_chunk),
    )
    dim = h * w * c - (c if emu.mean_mode == "zero_mean" else 0)
    shift = dim * math.log(emu.data_scale)
    value = np.asarray(value, np.float64) - shift
    stderr = None
    if divergence == "hutchinson":
        pp = np.asarray(per_probe, np.float64)
        stderr = pp.std(axis=-1, ddof=1) / np.sqrt(pp.shape[-1]) if pp.shape[-1] > 1 else np.full(value.shape, np.nan)
    return LogProb(value=value, stderr=stderr, num_steps=np.asarray(steps), dim=dim)


def _check_inputs(x, theta):
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"x must be fields (N, H, W, C) or one field (H, W, C), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values")
    theta = np.asarray(theta, np.float32)
    if theta.ndim == 2:
        theta = np.broadcast_to(theta, (x.shape[0],) + theta.shape)
    if theta.ndim != 3 or theta.shape[0] != x.shape[0] or theta.shape[1] < 1:
        raise ValueError(f"theta must be (M, K) or (N, M, K) with N = {x.shape[0]} fields, got shape {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta contains NaN or infinite values (the null condition has no likelihood)")
    return x, np.ascontiguousarray(theta)


# --------------------------------------------------------------------------------------------
# Jitted core
# --------------------------------------------------------------------------------------------


def _field_keys(key, n: int):
    """One probe key per field: ``fold_in(key, i)`` from one key, or a given ``(N,)`` batch of keys."""
    if key.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    if key.shape != (n,):
        raise ValueError(f"key must be one PRNG key or one per field (shape ({n},)), got shape {key.shape}")
    return key


def _project(a, zero_mean: bool):
    """Remove the per-channel spatial mean of ``a`` (H, W, C) when ``zero_mean``."""
    return a - jnp.mean(a, axis=(0, 1), keepdims=True) if zero_mean else a


def _error_norm(scaled_error):
    """Step-size control norm: the field's RMS error or any divergence integral's, whichever is larger.

    diffrax's default RMS over the whole state would weigh the few divergence integrals (the
    quantity wanted) by ``1 / (H W C)`` against the field's pixels, leaving them uncontrolled.
    """
    x_err, acc_err = scaled_error
    return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x_err))), jnp.max(jnp.abs(acc_err)))


@partial(jax.jit, static_argnames=("static_model", "encode", "zero_mean", "divergence", "probes", "probe",
                                   "rtol", "atol", "max_steps", "exact_chunk"))
def _solve_all(static_model, params, x, theta, keys, center, scale, *, encode, zero_mean, divergence, probes,
               probe, rtol, atol, max_steps, exact_chunk):
    net = merge_model(static_model, params)
    n, h, w, c = x.shape
    d = h * w * c

    def velocity(xi, t, th):  # one field (H, W, C), scalar t, one theta (K,)
        th = (th - center) / scale if encode else th
        th = jnp.stack([th, jnp.ones_like(th)], axis=-1) if encode else th  # (K, 2) or (K,)
        v = net(xi[None], jnp.reshape(t, (1,)).astype(jnp.float32), th[None])[0]
        return _project(jnp.asarray(v, jnp.float32), zero_mean)

    def divergences(xi, t, th, z):  # -> (value of v, (P,) divergence estimates)
        v, jvp = jax.linearize(lambda a: velocity(a, t, th), xi)
        if divergence == "hutchinson":
            return v, jax.vmap(lambda zz: jnp.sum(zz * jvp(zz)))(z)
        basis = jnp.arange(d)

        def diag(i):
            e = jax.nn.one_hot(i, d, dtype=jnp.float32).reshape(h, w, c)
            return jvp(e).reshape(-1)[i]

        return v, jnp.sum(jax.lax.map(diag, basis, batch_size=min(exact_chunk, d)))[None]

    def solve_pair(xi, th, z):
        def field(t, y, args):
            v, div = divergences(y[0], t, th, z)
            return v, div

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Tsit5(), t0=1.0, t1=0.0, dt0=None,
            y0=(_project(xi, zero_mean), jnp.zeros((probes,), jnp.float32)),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_error_norm),
            saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False,
        )
        x0, acc = sol.ys[0][0], sol.ys[1][0]  # acc = int_1^0 div dt = -int_0^1 div dt
        dim = d - (c if zero_mean else 0)
        base = -0.5 * jnp.sum(jnp.square(x0)) - 0.5 * dim * math.log(2.0 * math.pi)
        per_probe = base + acc  # (P,): log N(x_0) - int_0^1 div dt
        ok = sol.result == diffrax.RESULTS.successful
        per_probe = jnp.where(ok, per_probe, jnp.nan)
        return jnp.mean(per_probe), per_probe, sol.stats["num_steps"]

    def solve_field(k, xi, thetas):
        z = draw_probes(k, (h, w, c), probes, probe)
        z = jax.vmap(lambda a: _project(a, zero_mean))(z)
        return jax.vmap(lambda th: solve_pair(xi, th, z))(thetas)

    return jax.vmap(solve_field)(keys, x, theta)
