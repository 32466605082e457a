"""Built-in simulator of 2-D Gaussian random fields (GRF) with an exact likelihood.

Model
-----
A field ``f`` lives on a periodic ``N x N`` grid (unit spacing, default
``N = 32``, one channel).  It is parametrised by ``theta = (log_amplitude, slope)``:

* integer wavenumbers ``k = (kx, ky)`` with ``kx, ky`` from ``numpy.fft.fftfreq(N) * N``
  and ``|k| = sqrt(kx**2 + ky**2)``;
* power spectrum ``S(k) = c * |k| ** (-slope)`` for ``k != 0`` and ``S(0) = 0``;
* the *spectrum* (not each field) is normalised,
  ``c = exp(2 * log_amplitude) * N**2 / sum_{k != 0} |k| ** (-slope)``, so that the
  expected pixel variance ``(1 / N**2) * sum_k S(k)`` is exactly ``exp(2 * log_amplitude)``;
* simulation: white noise ``w ~ N(0, I)``, ``f = ifft2(sqrt(S) * fft2(w))``
  (done with ``rfft2`` / ``irfft2``).  ``f`` is exactly Gaussian with the
  circulant covariance ``C = F^-1 diag(S) F`` and has exactly zero spatial mean.

Prior (``sample_prior``): independent uniforms
``log_amplitude ~ U[-1, 1]`` (pixel std ``exp(log_amplitude)`` in [0.37, 2.72]) and
``slope ~ U[1, 4]``.

Likelihood (``grf_log_likelihood``): because ``S(0) = 0`` the covariance is
singular along the constant (zero-mean) direction.  That mode is treated as
degenerate and excluded: the returned value is the exact Gaussian log density
of the field's projection onto the ``N**2 - 1`` dimensional zero-mean subspace
(Lebesgue measure in an orthonormal basis of that subspace).  Any mean in the
input is ignored.  With the unnormalised DFT ``F = fft2(f)`` it reads::

    log p = -1/2 * [ sum_{k != 0} |F(k)|**2 / (N**2 S(k)) + sum_{k != 0} log S(k)
                     + (N**2 - 1) log(2 pi) ]

which handles the Hermitian symmetry automatically: a conjugate pair
``{k, -k}`` contributes two real degrees of freedom (real and imaginary part,
each of variance ``S(k)`` in the orthonormal real Fourier basis) and appears
twice in the full-grid sum, while self-conjugate modes (Nyquist rows/columns
for even ``N``) are real and appear once.

Power spectrum estimator (``radial_power_spectrum``): ``|fft2(f)|**2 / N**2``
(whose expectation is ``S(k)``) averaged over the modes in integer radial bins
``b = round(|k|)`` for ``b = 1 .. N // 2``; ``expected_power_spectrum`` averages
the exact ``S(k)`` over the same bins, so it is the exact expectation of the
estimator.
"""

from __future__ import annotations

import numpy as np

from .base import check_patch_size, check_step_batch, make_rng

THETA_NAMES = ("log_amplitude", "slope")
PRIOR_LOW = (-1.0, 1.0)
PRIOR_HIGH = (1.0, 4.0)
DEFAULT_SIZE = 32


def as_generator(rng: np.random.Generator | np.random.SeedSequence | int | None) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from a Generator, SeedSequence, int seed or ``None``."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def wavenumber_magnitude(size: int) -> np.ndarray:
    """Return ``|k|`` on the full ``(size, size)`` FFT grid (integer wavenumbers, float64)."""
    k = np.fft.fftfreq(size) * size
    return np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)


def _theta_array(theta) -> tuple[np.ndarray, bool]:
    t = np.asarray(theta, dtype=np.float64)
    single = t.ndim == 1
    t = np.atleast_2d(t)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"theta must have shape (2,) or (B, 2) = (log_amplitude, slope), got {np.shape(theta)}")
    return t, single


def power_spectrum(theta, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Return the exact 2-D spectrum ``S(k)`` on the full FFT grid.

    Shape ``(size, size)`` for ``theta`` of shape ``(2,)``, ``(B, size, size)`` for ``(B, 2)``;
    float64, ``S(0) = 0`` and ``mean(S) = exp(2 * log_amplitude)``.
    """
    t, single = _theta_array(theta)
    kmag = wavenumber_magnitude(size)
    nonzero = kmag > 0
    shape = np.zeros_like(kmag)[None].repeat(len(t), axis=0)
    kk = kmag[nonzero]
    shape[:, nonzero] = kk[None, :] ** (-t[:, 1:2])
    norm = np.exp(2.0 * t[:, 0]) * size**2 / shape.sum(axis=(1, 2))
    spec = shape * norm[:, None, None]
    return spec[0] if single else spec


def sample_prior(
    rng: np.random.Generator | int | None,
    n: int,
    low=PRIOR_LOW,
    high=PRIOR_HIGH,
) -> np.ndarray:
    """Draw ``n`` parameter vectors from the uniform prior; returns float64 ``(n, 2)``.

    Columns are ``(log_amplitude, slope)``; defaults ``log_amplitude ~ U[-1, 1]``,
    ``slope ~ U[1, 4]``.
    """
    rng = as_generator(rng)
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    return low + (high - low) * rng.random((int(n), 2))


def simulate(theta, rng: np.random.Generator | np.random.SeedSequence | int | None = None, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Simulate Gaussian random fields.

    Args:
        theta: ``(2,)`` or ``(B, 2)`` array of ``(log_amplitude, slope)``.
        rng: ``numpy.random.Generator``, ``SeedSequence`` or int seed (``None``: fresh entropy).
        size: grid side ``N``.

    Returns:
        float32 fields, channel-last: ``(N, N, 1)`` for a single theta,
        ``(B, N, N, 1)`` for a batch.  Each field has exactly zero mean and
        expected pixel variance ``exp(2 * log_amplitude)``.
    """
    t, single = _theta_array(theta)
    rng = as_generator(rng)
    size = int(size)
    amp = np.sqrt(power_spectrum(t, size))[:, :, : size // 2 + 1]
    noise = rng.standard_normal((len(t), size, size))
    fields = np.fft.irfft2(amp * np.fft.rfft2(noise), s=(size, size))
    fields = fields.astype(np.float32)[..., None]
    return fields[0] if single else fields


def _fields_array(field) -> np.ndarray:
    f = np.asarray(field, dtype=np.float64)
    if f.ndim >= 3 and f.shape[-1] == 1:
        f = f[..., 0]
    if f.ndim < 2 or f.shape[-1] != f.shape[-2]:
        raise ValueError(f"fields must be square (..., N, N) or (..., N, N, 1), got {np.shape(field)}")
    return f


def grf_log_likelihood(field, theta) -> np.ndarray | float:
    """Exact log density of field(s) given ``theta`` (zero mode excluded, see module docstring).

    Args:
        field: ``(N, N)``, ``(N, N, 1)``, ``(B, N, N)`` or ``(B, N, N, 1)``.
        theta: ``(2,)`` or ``(B, 2)`` (broadcast against the batch of fields).

    Returns:
        float64 log density per field (Python float for a single field and theta,
        else an array of shape ``(B,)``).  Density is w.r.t. Lebesgue measure on
        the ``N**2 - 1`` dimensional zero-mean subspace; the field's mean is ignored.
    """
    f = _fields_array(field)
    t, single_t = _theta_array(theta)
    single_f = f.ndim == 2
    n = f.shape[-1]
    f2 = f.reshape(-1, n, n)
    spec = power_spectrum(t, n).reshape(-1, n, n)  # (Bt, N, N)
    power = np.abs(np.fft.fft2(f2)) ** 2 / n**2  # (Bf, N, N)
    mask = wavenumber_magnitude(n) > 0
    safe = np.where(mask, spec, 1.0)
    quad = np.sum(np.where(mask, power / safe, 0.0), axis=(-2, -1))  # broadcast Bf vs Bt
    logdet = np.sum(np.where(mask, np.log(safe), 0.0), axis=(-2, -1))
    ll = -0.5 * (quad + logdet + (n * n - 1) * np.log(2.0 * np.pi))
    if single_f and single_t:
        return float(ll[0])
    return ll


def whitened_chi2(field, theta) -> np.ndarray:
    """Return ``sum_{k != 0} |F(k)|**2 / (N**2 S(k)) / (N**2 - 1)`` per field (float64 ``(B,)``).

    Its expectation is exactly 1 for fields simulated at ``theta``.
    """
    f = _fields_array(field)
    t, _ = _theta_array(theta)
    n = f.shape[-1]
    f2 = f.reshape(-1, n, n)
    spec = power_spectrum(t, n).reshape(-1, n, n)
    power = np.abs(np.fft.fft2(f2)) ** 2 / n**2
    mask = wavenumber_magnitude(n) > 0
    safe = np.where(mask, spec, 1.0)
    return np.sum(np.where(mask, power / safe, 0.0), axis=(-2, -1)) / (n * n - 1)


def radial_bins(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(bin_index, k_centres)``.

    ``bin_index`` is an int ``(size, size)`` map of ``round(|k|) - 1`` with ``-1``
    for modes outside ``1 <= round(|k|) <= size // 2`` (the zero mode and corners);
    ``k_centres`` are the float64 bin centres ``1 .. size // 2``.
    """
    b = np.rint(wavenumber_magnitude(size)).astype(int)
    nb = size // 2
    idx = np.where((b >= 1) & (b <= nb), b - 1, -1)
    return idx, np.arange(1, nb + 1, dtype=np.float64)


def _bin_average(power: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    idx, k = radial_bins(size)
    nb = len(k)
    onehot = (idx.reshape(-1)[:, None] == np.arange(nb)[None, :]).astype(np.float64)  # (N*N, nb)
    counts = onehot.sum(axis=0)
    flat = power.reshape(power.shape[:-2] + (size * size,))
    return k, flat @ onehot / counts


def radial_power_spectrum(fields) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of each field.

    Args:
        fields: ``(N, N)``, ``(N, N, 1)``, ``(B, N, N)`` or ``(B, N, N, 1)``.

    Returns:
        ``(k, P)``: ``k`` float64 ``(N // 2,)`` bin centres ``1 .. N // 2`` and ``P``
        float64 ``(..., N // 2)``: ``|fft2(f)|**2 / N**2`` averaged over the modes with
        ``round(|k|) == bin``.  ``E[P] == expected_power_spectrum(theta, N)[1]``.
    """
    f = _fields_array(fields)
    n = f.shape[-1]
    power = np.abs(np.fft.fft2(f)) ** 2 / n**2
    return _bin_average(power, n)


def expected_power_spectrum(theta, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Exact expectation of :func:`radial_power_spectrum` for fields simulated at ``theta``.

    Returns ``(k, P)`` with ``k`` float64 ``(size // 2,)`` and ``P`` float64 ``(size // 2,)``
    for a single theta or ``(B, size // 2)`` for a batch.
    """
    return _bin_average(power_spectrum(theta, size), int(size))


class GRFDataset:
    """Infinite, reproducible stream of GRFs with their parameters (``name="grf"``).

    Args:
        size: grid side ``N`` (default 32).
        seed: base seed; batch ``step`` uses ``default_rng(SeedSequence([seed, step]))``
            to draw ``theta`` from the prior and then the fields.
        prior_low, prior_high: bounds of the uniform prior on ``(log_amplitude, slope)``
            (defaults ``(-1, 1)`` and ``(1, 4)``).
        patch_size: if given, ``size`` must be a multiple of it (else ``DataError``).

    ``get_batch(step, B)`` -> ``{"x": float32 (B, N, N, 1) unscaled fields,
    "y": float32 (B, 2) theta}``.  ``condition="theta"``, ``theta_dim=2``.
    """

    condition = "theta"
    num_classes = None
    theta_dim = 2
    theta_names = THETA_NAMES
    class_names = None

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        *,
        seed: int = 0,
        prior_low=PRIOR_LOW,
        prior_high=PRIOR_HIGH,
        patch_size: int | None = None,
    ) -> None:
        size = int(size)
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        check_patch_size((size, size), patch_size, f"grf (size={size})")
        self.name = "grf"
        self.size = size
        self.image_shape = (size, size, 1)
        self.seed = int(seed)
        self.prior_low = tuple(float(v) for v in prior_low)
        self.prior_high = tuple(float(v) for v in prior_high)
        if len(self.prior_low) != 2 or len(self.prior_high) != 2 or any(
            lo >= hi for lo, hi in zip(self.prior_low, self.prior_high)
        ):
            raise ValueError(f"invalid prior bounds {self.prior_low} .. {self.prior_high}")

    def sample_prior(self, rng, n: int) -> np.ndarray:
        """Draw ``n`` thetas from this dataset's prior (float64 ``(n, 2)``)."""
        return sample_prior(rng, n, self.prior_low, self.prior_high)

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Return ``{"x": float32 (B, N, N, 1), "y": float32 (B, 2)}`` for ``step`` (deterministic)."""
        step, batch_size = check_step_batch(step, batch_size)
        rng = make_rng(self.seed, step)
        theta = self.sample_prior(rng, batch_size)
        x = simulate(theta, rng, self.size)
        return {"x": x, "y": theta.astype(np.float32)}

    def metadata(self) -> dict:
        """Return a JSON-serialisable description including the prior bounds."""
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "condition": self.condition,
            "num_classes": None,
            "theta_dim": 2,
            "theta_names": list(THETA_NAMES),
            "prior_low": list(self.prior_low),
            "prior_high": list(self.prior_high),
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return f"GRFDataset(size={self.size}, seed={self.seed}, prior_low={self.prior_low}, prior_high={self.prior_high})"
