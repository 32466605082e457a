"""Conditions of the models' inputs: class labels, theta vectors (and their encoding), text tokens.

Used by sampling, previews and evaluation: :func:`make_conditions` builds ``(y, y_null)`` for a
model, :func:`draw_samples` draws images for them, and the dataset wrappers present
unconditional data as one class (:class:`ConstantLabelDataset`), theta data in the encoding
the theta model was trained with (:class:`ThetaEncodedDataset`, :func:`encode_theta`) and data
in the units the model was trained in (:class:`ScaledDataset`, :func:`data_scale_of`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pixeldit.data import PRIOR_HIGH, PRIOR_LOW, make_rng
from pixeldit.embedders import encode_theta as embed_theta
from pixeldit.runconfig import ConfigError, RunConfig
from pixeldit.sampling import REFERENCE_T2I_TIME, ReferenceT2ITime, sample_batched

__all__ = [
    "ConstantLabelDataset",
    "ScaledDataset",
    "ThetaEncodedDataset",
    "auto_data_scale",
    "data_scale_of",
    "dataset_meta",
    "default_test_theta",
    "default_theta",
    "draw_samples",
    "encode_theta",
    "labels_for_plot",
    "make_conditions",
    "theta_box",
    "value_range_for",
]


class ConstantLabelDataset:
    """Unconditional data presented as one class (label 0): trained as a one-class c2i model."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = dataset.name
        self.image_shape = dataset.image_shape
        self.condition = "class"
        self.num_classes = 1
        self.theta_dim = None
        self.class_names = None

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        batch = dict(self.dataset.get_batch(step, batch_size))
        batch["y"] = np.zeros(len(batch["x"]), np.int32)
        return batch

    def arrays(self):
        x, _ = self.dataset.arrays()
        return x, np.zeros(len(x), np.int32)

    def metadata(self) -> dict[str, Any]:
        return dict(self.dataset.metadata(), condition="class", num_classes=1, unconditional=True)


def theta_box(dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` of theta for the affine encoding: the GRF prior box, else the data's range.

    ``ThetaConfig.with_encoding(low, high)`` turns it into the model's own encoding
    (:func:`pixeldit.embedders.encode_theta`).
    """
    meta = dataset.metadata()
    if "prior_low" in meta and "prior_high" in meta:
        return np.asarray(meta["prior_low"], np.float64), np.asarray(meta["prior_high"], np.float64)
    _, theta = dataset.arrays()
    return theta.min(axis=0).astype(np.float64), theta.max(axis=0).astype(np.float64)


def encode_theta(theta: np.ndarray, encoding: Mapping[str, Any] | None) -> np.ndarray:
    """Theta ``(N, K)`` under an encoding recorded in a checkpoint's dataset metadata.

    ``{"kind": "affine", "center", "scale"}`` gives ``(N, K, 2)``
    (:func:`pixeldit.embedders.encode_theta`); ``None`` or ``"none"`` leaves theta unchanged.
    Checkpoints of theta models that carry the encoding in their config (``theta_center``) take
    raw theta instead; this is for those that record it beside the data (:class:`ThetaEncodedDataset`).
    """
    theta = np.asarray(theta, np.float32)
    if not encoding or encoding.get("kind") == "none":
        return theta
    return np.asarray(embed_theta(theta, encoding["center"], encoding["scale"]))


class ThetaEncodedDataset:
    """A theta dataset whose batches carry :func:`encode_theta` of theta as ``y``.

    The layout of theta runs whose model config has no ``theta_center`` (the encoding recorded
    in the dataset metadata instead); :func:`pixeldit.runs.train_run` resumes such runs with it.
    """

    def __init__(self, dataset, encoding: Mapping[str, Any]):
        self.dataset = dataset
        self.encoding = dict(encoding)
        for name in ("name", "image_shape", "condition", "num_classes", "theta_dim", "class_names"):
            setattr(self, name, getattr(dataset, name, None))

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        batch = dict(self.dataset.get_batch(step, batch_size))
        batch["y"] = encode_theta(batch["y"], self.encoding)
        return batch

    def arrays(self):
        return self.dataset.arrays()  # raw theta, for plots and eval

    def metadata(self) -> dict[str, Any]:
        return dict(self.dataset.metadata(), theta_encoding=self.encoding)


def dataset_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset description inside checkpoint metadata (empty if none)."""
    return dict(meta.get("dataset") or {})


class ScaledDataset:
    """A dataset whose batches carry ``x / scale``: the units a model with a data scale trains in.

    The scale is recorded in the metadata (``data_scale``, so in the checkpoint); samples return
    to data units times it (:func:`draw_samples`, :func:`data_scale_of`).  Other attributes are
    the wrapped dataset's.
    """

    def __init__(self, dataset, scale: float):
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"data scale must be a finite number > 0, got {scale!r}")
        self.dataset = dataset
        self.scale = float(scale)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (copy / pickle): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def get_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        batch = dict(self.dataset.get_batch(step, batch_size))
        batch["x"] = (np.asarray(batch["x"], np.float32) / np.float32(self.scale)).astype(np.float32)
        return batch

    def metadata(self) -> dict[str, Any]:
        return dict(self.dataset.metadata(), data_scale=self.scale)


def grf_data_scale(prior_low: float, prior_high: float) -> float:
    """The GRF prior's pixel std ``sqrt(E[exp(2 a)])`` for ``a ~ U[prior_low, prior_high]`` (exact).

    Each field has pixel variance ``exp(2 a)`` and zero mean (:mod:`pixeldit.data.grf`), so the
    global second moment is ``(exp(2 hi) - exp(2 lo)) / (2 (hi - lo))``: 1.347**2 for ``[-1, 1]``.
    """
    lo, hi = float(prior_low), float(prior_high)
    if hi <= lo:
        return float(np.exp(lo))
    return float(np.sqrt((np.exp(2 * hi) - np.exp(2 * lo)) / (2 * (hi - lo))))


def auto_data_scale(dataset) -> float:
    """``data.scale = "auto"``: the data's global std.

    GRF data: the exact prior value (:func:`grf_data_scale`).  Other in-memory data: the std of
    all pixels of the training set (``dataset.arrays()``).  Streamed data has no such pass over
    the set: give the scale as a number there.
    """
    meta = dataset.metadata()
    if meta.get("name") == "grf":
        return grf_data_scale(meta["prior_low"][0], meta["prior_high"][0])
    if not callable(getattr(dataset, "arrays", None)):
        raise ConfigError(f"data.scale = \"auto\" needs the whole training set in memory; the data "
                          f"{meta.get('name', '?')!r} is streamed: give data.scale as a number")
    x, _ = dataset.arrays()
    std = float(np.std(np.asarray(x, np.float64)))
    if not (np.isfinite(std) and std > 0):
        raise ConfigError(f"data.scale = \"auto\": the training data's std is {std}; give data.scale as a number")
    return std


def data_scale_of(checkpoint_or_meta) -> float:
    """The data scale of a trained model: its samples are model outputs times this.

    Takes a :class:`pixeldit.training.Checkpoint` or its ``meta`` dict; checkpoints written
    before data scales were recorded (or trained without one) give 1.
    """
    meta = getattr(checkpoint_or_meta, "meta", checkpoint_or_meta)
    return float(dataset_meta(meta).get("data_scale", 1.0))


def value_range_for(dataset_meta: Mapping[str, Any], run: RunConfig | None = None) -> tuple[float, float] | None:
    """Display range of images: [-1, 1] for image data; None (each image's min/max) for physical fields (grf, raw .npz)."""
    if dataset_meta.get("name") == "grf":
        return None
    if run is not None and run.data.source_kind == "npz" and (run.data.normalize or "none") == "none":
        return None
    return (-1.0, 1.0)


def default_theta(dataset_meta: Mapping[str, Any], n: int, seed: int) -> np.ndarray:
    """``n`` theta rows drawn (with ``seed``) from the GRF prior; other theta data needs explicit rows."""
    lo = np.asarray(dataset_meta.get("prior_low", PRIOR_LOW), np.float64)
    hi = np.asarray(dataset_meta.get("prior_high", PRIOR_HIGH), np.float64)
    rng = make_rng(seed, 17)
    if dataset_meta.get("name") == "grf":
        return (lo + (hi - lo) * rng.random((n, len(lo)))).astype(np.float32)
    raise ConfigError("no theta given: pass theta rows (sample.theta / --theta) for a theta model on non-GRF data")


def make_conditions(model_config, dataset_meta: Mapping[str, Any], n: int, *, labels: Sequence = (),
                    theta: Sequence = (), seed: int = 0, condition_file: str | os.PathLike | None = None):
    """Conditions ``(y, y_null)`` for ``n`` samples of a model of ``model_config.kind``.

    c2i: ``labels`` cycled (default: every class in turn); the null class for CFG.
    theta: ``theta`` rows cycled (default: :func:`default_theta`); NaN rows as the null.
    t2i: ``y`` (and optionally ``y_null``) read from ``condition_file`` (.npz, text-encoder tokens).
    """
    kind = model_config.kind
    if kind == "c2i":
        k = model_config.num_classes
        lab = np.asarray(labels if len(labels) else np.arange(k), dtype=np.int64).reshape(-1)
        if lab.min() < 0 or lab.max() >= k:
            raise ConfigError(f"labels must be in [0, {k - 1}] for this {k}-class model, got {lab.tolist()}")
        y = lab[np.arange(n) % len(lab)].astype(np.int32)
        return y, np.full_like(y, k)
    if kind == "theta":
        if len(theta):
            rows = np.asarray(theta, np.float32).reshape(-1, model_config.theta_dim) if np.ndim(theta) < 2 \
                else np.asarray(theta, np.float32)
            if rows.shape[1] != model_config.theta_dim:
                raise ConfigError(f"theta rows must have {model_config.theta_dim} values each, got shape {rows.shape}")
            y = rows[np.arange(n) % len(rows)]
        else:
            y = default_theta(dataset_meta, n, seed)
        return y, np.full_like(y, np.nan)
    if condition_file is None:
        raise ConfigError("a text-to-image model needs --condition FILE.npz with text-encoder tokens 'y' (N, L, D)")
    with np.load(condition_file) as f:
        if "y" not in f:
            raise ConfigError(f"'{condition_file}' has no array 'y' (text-encoder tokens (N, L, D))")
        y = np.asarray(f["y"], np.float32)
        y_null = np.asarray(f["y_null"], np.float32) if "y_null" in f else np.zeros_like(y)
    idx = np.arange(n) % len(y)
    return y[idx], y_null[np.arange(n) % len(y_null)]


def draw_samples(model, model_config, image_shape, y, y_null, *, method: str, steps: int, guidance: float,
                 guidance_interval=(0.0, 1.0), timeshift: float = 1.0, seed: int = 0, batch_size: int = 64,
                 progress: bool = False, time_convention: str | None = None,
                 theta_encoding: Mapping[str, Any] | None = None, data_scale: float = 1.0,
                 mesh=None) -> np.ndarray:
    """Draw ``len(y)`` samples ``(N, H, W, C)`` with :func:`pixeldit.sampling.sample_batched`
    (data parallel over ``mesh`` when given, see there).

    ``y`` / ``y_null`` are labels or raw theta.  A theta model whose config carries its encoding
    takes raw theta; otherwise theta is encoded here with ``theta_encoding`` (the checkpoint's
    dataset metadata, see :func:`encode_theta`).  Samples come back in data units: the model's
    output times ``data_scale`` (:func:`data_scale_of`).
    """
    if time_convention == REFERENCE_T2I_TIME:
        model = ReferenceT2ITime(model)
    if model_config.kind == "theta" and model_config.theta_center is None:
        y, y_null = encode_theta(y, theta_encoding), encode_theta(y_null, theta_encoding)
    n = len(y)
    h, w = int(image_shape[0]), int(image_shape[1])
    x = sample_batched(
        model, jax.random.key(seed), (n, h, w, model_config.in_channels), y,
        None if guidance == 1.0 else y_null,
        batch_size=min(batch_size, n), method=method, num_steps=steps, progress=progress,
        guidance=float(guidance), guidance_interval=tuple(float(v) for v in guidance_interval),
        timeshift=float(timeshift), mesh=mesh,
    )
    return x if data_scale == 1.0 else (np.asarray(x) * np.float32(data_scale)).astype(np.float32)


def labels_for_plot(model_config, y):
    """Labels to print on a sample grid: class labels or theta rows (none for text)."""
    return y if model_config.kind in ("c2i", "theta") else None


def default_test_theta(dataset_meta: Mapping[str, Any]) -> np.ndarray:
    """A 3 x 3 grid of test thetas at 1/6, 1/2, 5/6 of each GRF prior range."""
    lo = np.asarray(dataset_meta.get("prior_low", PRIOR_LOW), np.float64)
    hi = np.asarray(dataset_meta.get("prior_high", PRIOR_HIGH), np.float64)
    f = np.array([1 / 6, 1 / 2, 5 / 6])
    a, s = lo[0] + f * (hi[0] - lo[0]), lo[1] + f * (hi[1] - lo[1])
    return np.array([(ai, si) for ai in a for si in s], np.float64)
