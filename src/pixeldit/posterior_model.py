"""Amortised posterior model ``p(theta | field)``: a PixelDiT patch encoder and a flow on theta.

Neural posterior estimation by flow matching (Dax et al. 2023, "flow matching for scalable
simulation-based inference"), in this project's time convention (t = 0 noise, t = 1 data).

Three parts, each a submodule:

* ``encoder`` (:class:`FieldEncoder`): the field is divided by its RMS (the log-RMS is kept and
  fed in as the adaLN condition of the blocks), cut into ``p x p`` patch tokens
  (``s_embedder``), run through adaLN DiT blocks with 2D RoPE (:class:`pixeldit.blocks.DiTBlock`)
  and pooled to a summary vector.  Pooling keeps the token mean and, per channel, the log of the
  mean square of the patch embeddings and of the last block's tokens: a Gaussian random field's
  sufficient statistics are its spectral powers, and the mean square of a linear filter of the
  field is the power in that filter's band.  With ``spectral_pooling`` the log Fourier power in
  wavenumber shells joins them.  These fixed features (log-RMS, shell powers) are z-scored with
  their mean and std over prior simulations, set once before training
  (:meth:`FieldEncoder.set_standardization`; buffers saved with the weights): their raw offsets
  span ~10 nats between shells (after 2,000 steps, one seed each: 52 % of (field, parameter)
  pairs within the accuracy targets with the z-scoring, 47 % without).
* ``gaussian_head``: the summary -> a Gaussian approximation ``N(mu, L L^T)`` of the posterior of
  the standardised parameters ``u`` (lower-triangular ``L`` with a positive diagonal).
* ``velocity`` (:class:`ConditionalVelocity`): an adaLN (FiLM) MLP giving the velocity of the flow
  on ``z = L^-1 (u - mu)``, conditioned on ``t`` and the summary.

Why the Gaussian stage: a posterior of the built-in GRF is 40-100 times narrower than its prior,
so a flow from unit noise to it would have to resolve velocities far below the noise scale near
t = 1.  Whitening by the per-field Gaussian makes the flow's target O(1) (and the identity for a
Gaussian posterior); the flow corrects skewness, curvature and the prior's hard edges.  The
density stays exact: ``log p(theta) = log p_flow(z) - sum(log diag L) + log|du / dtheta|``.

``u = 2 (theta - low) / (high - low) - 1`` standardises ``theta`` with the prior box (the
configuration's ``prior_low`` / ``prior_high``), so a uniform prior becomes ``U[-1, 1]^K``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.blocks import DiTBlock
from pixeldit.embedders import PatchTokenEmbedder, patchify
from pixeldit.modules import Buffer, RMSNorm, TimestepConditioner, linear, modulate
from pixeldit.rope import rope_2d_angles

LOG_EPS = 1e-6  # floor inside the log of the power pooling and of the field's mean square
MIN_SCALE = 1e-4  # lower bound of the Gaussian head's diagonal scales (standardised units)
TIME_FREQ_DIM = 64  # sinusoid width of the flow's time embedding


@dataclass(frozen=True)
class PosteriorConfig:
    """Sizes of the amortised posterior model and the prior box that standardises theta."""

    image_size: int = 32  # fields are (image_size, image_size, in_channels)
    in_channels: int = 1
    patch_size: int = 4  # 64 patch tokens at 32 x 32
    hidden_size: int = 64  # encoder token width
    depth: int = 2  # encoder DiT blocks
    num_heads: int = 4
    summary_dim: int = 128
    flow_hidden: int = 128
    flow_depth: int = 3  # adaLN MLP blocks of the velocity network
    spectral_pooling: bool = True  # pool the log Fourier power over wavenumber shells too
    prior_low: tuple[float, ...] = (-1.0, 1.0)  # the built-in GRF prior (log_amplitude, slope)
    prior_high: tuple[float, ...] = (1.0, 4.0)
    theta_names: tuple[str, ...] = ("log_amplitude", "slope")

    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(image_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2,
                     summary_dim=16, flow_hidden=16, flow_depth=1),
        "grf": dict(depth=1, patch_size=8),  # the built-in run (configs/grf-posterior.toml)
    }

    def __post_init__(self):
        object.__setattr__(self, "prior_low", tuple(float(v) for v in self.prior_low))
        object.__setattr__(self, "prior_high", tuple(float(v) for v in self.prior_high))
        object.__setattr__(self, "theta_names", tuple(str(v) for v in self.theta_names))
        k = len(self.prior_low)
        if k < 1 or len(self.prior_high) != k or len(self.theta_names) != k:
            raise ValueError(
                f"prior_low, prior_high and theta_names must have one entry per parameter, got "
                f"{len(self.prior_low)}, {len(self.prior_high)} and {len(self.theta_names)}"
            )
        if any(lo >= hi for lo, hi in zip(self.prior_low, self.prior_high)):
            raise ValueError(f"prior box must have low < high, got {self.prior_low} .. {self.prior_high}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        head_dim, rem = divmod(self.hidden_size, self.num_heads)
        if rem or head_dim % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a whole head size "
                f"divisible by 4 (2D RoPE)"
            )
        for name in ("in_channels", "depth", "summary_dim", "flow_hidden", "flow_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PosteriorConfig":
        """The named preset (``"grf"``: the built-in run; ``"tiny"``: 8 x 8 fields for tests)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown posterior preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def theta_dim(self) -> int:
        return len(self.prior_low)

    @property
    def field_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.in_channels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PosteriorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown posterior config keys {unknown}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Theta standardisation with the prior box
# ---------------------------------------------------------------------------------------------


def standardize(theta: jax.Array, config: PosteriorConfig) -> jax.Array:
    """``theta`` -> ``u = 2 (theta - low) / (high - low) - 1`` (the prior box becomes [-1, 1]^K)."""
    low = jnp.asarray(config.prior_low, jnp.float32)
    high = jnp.asarray(config.prior_high, jnp.float32)
    return 2.0 * (theta - low) / (high - low) - 1.0


def unstandardize(u: jax.Array, config: PosteriorConfig) -> jax.Array:
    """The inverse of :func:`standardize`."""
    low = jnp.asarray(config.prior_low, jnp.float32)
    high = jnp.asarray(config.prior_high, jnp.float32)
    return low + 0.5 * (u + 1.0) * (high - low)


def standardize_log_det(config: PosteriorConfig) -> float:
    """``log |d u / d theta|``, the constant log-Jacobian of :func:`standardize`."""
    widths = np.asarray(config.prior_high) - np.asarray(config.prior_low)
    return float(np.sum(np.log(2.0 / widths)))


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------

EXACT_SHELLS_BELOW = 5.0  # below this |k| every distinct |k| is its own shell; above, round(|k|)


def spectral_shells(height: int, width: int) -> np.ndarray:
    """Averaging matrix ``(H*W, num_shells)`` of the Fourier modes ``k != 0`` over wavenumber shells.

    Integer wavenumbers ``k = (ky, kx)`` (``fftfreq * size``).  Modes with ``|k| < 5`` are grouped
    by their exact ``|k|^2`` (a spectrum varies fastest, relative to the shell width, at small
    ``|k|``); the others by ``round(|k|)``, corners included.  Each column averages its modes.
    """
    ky = np.fft.fftfreq(height) * height
    kx = np.fft.fftfreq(width) * width
    k2 = (ky[:, None] ** 2 + kx[None, :] ** 2).reshape(-1)
    exact = (k2 > 0) & (k2 < EXACT_SHELLS_BELOW**2)
    labels = np.where(exact, k2, np.where(k2 > 0, 1000.0 * np.rint(np.sqrt(k2)), -1.0))
    values = np.unique(labels[labels >= 0])
    onehot = (labels[:, None] == values[None, :]).astype(np.float32)
    return onehot / onehot.sum(axis=0, keepdims=True)


def spectral_pool(x: jax.Array) -> jax.Array:
    """Log Fourier power of ``x`` ``(B, H, W, C)`` averaged over :func:`spectral_shells`: ``(B, C * shells)``."""
    b, h, w, c = x.shape
    power = jnp.abs(jnp.fft.fft2(x, axes=(1, 2))) ** 2 / (h * w)  # (B, H, W, C), E = S(k)
    shells = jnp.asarray(spectral_shells(h, w))  # (H*W, shells)
    pooled = jnp.einsum("bmc,ms->bcs", power.reshape(b, h * w, c), shells)  # (B, C, shells)
    return jnp.log(pooled + LOG_EPS).reshape(b, -1)


class FieldEncoder(nnx.Module):
    """Field ``(B, H, W, C)`` -> summary ``(B, summary_dim)`` (see the module docstring)."""

    def __init__(self, config: PosteriorConfig, *, rngs: nnx.Rngs):
        c, d, p = config, config.hidden_size, config.patch_size
        self.patch_size = p
        self.head_dim = d // c.num_heads
        # log-RMS of the field -> adaLN condition of the blocks
        self.scale_embedder = nnx.Sequential(linear(1, d, rngs=rngs), jax.nn.silu, linear(d, d, rngs=rngs))
        self.s_embedder = PatchTokenEmbedder(p * p * c.in_channels, d, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(d, c.num_heads, rngs=rngs) for _ in range(c.depth)])
        self.norm = RMSNorm(d, param_dtype=jnp.float32)
        self.spectral_pooling = c.spectral_pooling
        num_spectral = c.in_channels * spectral_shells(c.image_size, c.image_size).shape[1] if c.spectral_pooling else 0
        # z-scoring of the fixed (unlearned) summary features: log-RMS and the log shell powers,
        # whose offsets span ~10 nats between shells.  Identity until set_standardization().
        self.feature_shift = Buffer(jnp.zeros((1 + num_spectral,), jnp.float32))
        self.feature_scale = Buffer(jnp.ones((1 + num_spectral,), jnp.float32))
        self.pool_proj = nnx.Sequential(
            linear(3 * d + 1 + num_spectral, c.summary_dim, rngs=rngs),
            jax.nn.silu,
            linear(c.summary_dim, c.summary_dim, rngs=rngs),
        )

    def fixed_features(self, x: jax.Array) -> jax.Array:
        """The summary features that no weight shapes, before z-scoring: ``(B, 1 + C * shells)``."""
        x = x.astype(jnp.float32)
        log_rms = 0.5 * jnp.log(jnp.mean(x * x, axis=(1, 2, 3)) + LOG_EPS)  # (B,)
        spectral = [spectral_pool(x * jnp.exp(-log_rms)[:, None, None, None])] if self.spectral_pooling else []
        return jnp.concatenate([log_rms[:, None], *spectral], axis=-1)

    def set_standardization(self, x) -> None:
        """Z-score the fixed features with their mean and std over the fields ``x`` (prior simulations)."""
        f = np.asarray(self.fixed_features(jnp.asarray(x)), np.float64)
        std = f.std(axis=0)
        self.feature_shift.set_value(jnp.asarray(f.mean(axis=0), jnp.float32))
        self.feature_scale.set_value(jnp.asarray(np.where(std > 1e-6, std, 1.0), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        p = self.patch_size
        x = x.astype(jnp.float32)
        raw = self.fixed_features(x)  # (B, 1 + C * shells): log-RMS first
        log_rms = raw[:, 0]  # (B,)
        fixed = (raw - self.feature_shift.get_value()) / self.feature_scale.get_value()
        x = x * jnp.exp(-log_rms)[:, None, None, None]  # unit mean square
        c = self.scale_embedder(log_rms[:, None])[:, None, :]  # (B, 1, D)
        tokens = patchify(x, p).reshape(b, (h // p) * (w // p), -1)  # (B, L, p*p*C)
        e = self.s_embedder(tokens)  # (B, L, D)
        rope = jnp.asarray(rope_2d_angles(self.head_dim, h // p, w // p))  # (L, head_dim/2)
        z = e
        for block in self.blocks:
            z = block(z, c, rope)  # (B, L, D)
        pooled = jnp.concatenate(
            [
                jnp.mean(self.norm(z), axis=1),  # (B, D) token mean
                jnp.log(jnp.mean(e * e, axis=1) + LOG_EPS),  # (B, D) band powers of the patch filters
                jnp.log(jnp.mean(z * z, axis=1) + LOG_EPS),  # (B, D) band powers after the blocks
                fixed,  # (B, 1 + C * shells) log-RMS and log shell powers, z-scored
            ],
            axis=-1,
        )
        return self.pool_proj(pooled)  # (B, summary_dim)


# ---------------------------------------------------------------------------------------------
# Velocity network on theta
# ---------------------------------------------------------------------------------------------


class FlowBlock(nnx.Module):
    """Residual MLP block with adaLN-Zero modulation: ``h + gate * mlp(h * (1 + scale) + shift)``.

    No normalisation of ``h``: an RMSNorm of a projected 2-vector would drop its magnitude.
    """

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = nnx.Sequential(linear(hidden, hidden, rngs=rngs), jax.nn.silu, linear(hidden, hidden, rngs=rngs))
        zeros = nnx.initializers.zeros
        self.adaLN_modulation = nnx.Sequential(
            jax.nn.silu, linear(hidden, 3 * hidden, rngs=rngs, kernel_init=zeros, bias_init=zeros)
        )

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.adaLN_modulation(c), 3, axis=-1)
        return h + gate * self.mlp(modulate(h, shift, scale))


class ConditionalVelocity(nnx.Module):
    """``v(z_t, t, summary)`` for ``z_t`` ``(..., K)``; zero at initialisation (zero final layer)."""

    def __init__(self, config: PosteriorConfig, *, rngs: nnx.Rngs):
        hid = config.flow_hidden
        self.z_embedder = linear(config.theta_dim, hid, rngs=rngs)
        self.t_embedder = TimestepConditioner(hid, TIME_FREQ_DIM, rngs=rngs, param_dtype=jnp.float32)
        self.s_proj = linear(config.summary_dim, hid, rngs=rngs)
        self.blocks = nnx.List([FlowBlock(hid, rngs=rngs) for _ in range(config.flow_depth)])
        zeros = nnx.initializers.zeros
        self.final_layer = linear(hid, config.theta_dim, rngs=rngs, kernel_init=zeros, bias_init=zeros)

    def __call__(self, z: jax.Array, t: jax.Array, summary: jax.Array) -> jax.Array:
        # z: (..., K); t and summary (..., S) broadcast against z.shape[:-1].  The condition keeps
        # their own shape (one per field and time when sampling), so the adaLN modulations are
        # computed once per field, not once per draw.
        c = self.t_embedder(jnp.asarray(t, jnp.float32)) + self.s_proj(summary)  # (..., H)
        h = self.z_embedder(z)  # (..., H)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(jax.nn.silu(h))  # (..., K)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class AmortizedPosterior(nnx.Module):
    """``encoder`` + ``gaussian_head`` + ``velocity`` (see the module docstring)."""

    def __init__(self, config: PosteriorConfig, *, rngs: nnx.Rngs):
        self.config = config
        k = config.theta_dim
        self.num_tril = k * (k - 1) // 2
        self.encoder = FieldEncoder(config, rngs=rngs)
        self.gaussian_head = linear(config.summary_dim, 2 * k + self.num_tril, rngs=rngs)
        self.velocity = ConditionalVelocity(config, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        """Fields ``(B, H, W, C)`` -> summaries ``(B, summary_dim)``."""
        return self.encoder(x)

    def gaussian(self, summary: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Summaries ``(B, S)`` -> ``mu`` ``(B, K)`` and lower-triangular ``L`` ``(B, K, K)`` (standardised units)."""
        k = self.config.theta_dim
        out = self.gaussian_head(summary).astype(jnp.float32)
        mu, raw_diag, off = out[:, :k], out[:, k : 2 * k], out[:, 2 * k :]
        diag = jax.nn.softplus(raw_diag) + MIN_SCALE
        rows, cols = np.tril_indices(k, -1)
        chol = jnp.zeros((out.shape[0], k, k), jnp.float32)
        chol = chol.at[:, np.arange(k), np.arange(k)].set(diag)
        chol = chol.at[:, rows, cols].set(off * diag[:, rows])  # off-diagonals relative to their row's scale
        return mu, chol

    def __call__(self, z_t: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
        """Velocity of the whitened flow for ``z_t`` ``(B, K)`` at times ``t`` ``(B,)`` given fields ``(B, H, W, C)``."""
        return self.velocity(z_t, t, self.encode(x))
