"""Runs: config files and the train / sample / eval / info / convert operations behind the CLI.

A *run config* is a TOML file with five sections (built-in ones ship in ``pixeldit/configs``)::

    [model]   kind ("auto", "c2i" or "theta") and PixelDiT config fields; in_channels,
              num_classes and theta_dim come from the data; theta models also take
              theta_encoding ("affine" or "none", see :func:`theta_encoding_for`)
    [train]   pixeldit.train.TrainConfig fields
    [data]    source ("digits", "grf", a .npz file or an image folder) and its options
    [sample]  sampling settings (also the preview grids written during training)
    [eval]    evaluation settings (unset sampling keys fall back to [sample])

Unknown keys are errors that name the key and list the known ones.  Overrides are
``"section.key=value"`` strings whose value is read as TOML (``train.lr=3e-4``,
``sample.labels=[1, 7]``) or else taken as a plain string (``data.source=my_images/``).

A *workdir* holds one run: ``run.json`` (the resolved run config), the training checkpoints
and metrics of :mod:`pixeldit.train`, ``samples/`` (grids written during training and by
:func:`sample_run`) and ``eval/`` (metrics JSON and plots of :func:`eval_run`).

Every function here is a plain library call (usable from a notebook); :mod:`pixeldit.cli`
only parses arguments and prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_FILE = "run.json"  # the resolved run config of a workdir
SAMPLES_DIR = "samples"
EVAL_DIR = "eval"
SECTIONS = ("model", "train", "data", "sample", "eval")
MODEL_KINDS = ("auto", "c2i", "theta")  # trainable from data; t2i models come from `convert` only
THETA_ENCODINGS = ("affine", "none")
RUN_MODEL_KEYS = ("kind", "theta_encoding")  # [model] keys of the run, not of the model config
# Model fields taken from the data; a value given in [model] must agree with it.
DATA_DERIVED_MODEL_FIELDS = ("in_channels", "num_classes", "theta_dim")
REFERENCE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
# Time convention of reference text-to-image checkpoints (sigma * 1000, negated velocity).
REFERENCE_T2I_TIME = "reference_t2i"

# Quality targets of the built-in benchmarks (issue 4), reported next to the metrics.
DIGITS_MIN_ACCURACY = 0.90
DIGITS_MIN_DIVERSITY = 0.5
GRF_MAX_SPECTRUM_ERROR = 0.10
GRF_STD_RATIO_RANGE = (0.9, 1.1)


class ConfigError(ValueError):
    """An invalid run config, override or command-line setting; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return isinstance(value, (list, tuple))
    raise AssertionError(kind)


class _Section:
    """Checks each field against ``_types`` (``"int" | "float" | "str" | "bool" | "list"``; None allowed where the default is None)."""

    _name: str = ""
    _types: dict[str, str] = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            if not _type_ok(v, self._types[f.name]):
                raise ConfigError(f"{self._name}.{f.name} must be of type {self._types[f.name]}, got {v!r}")
            if self._types[f.name] == "list":
                object.__setattr__(self, f.name, _freeze(v))
            elif self._types[f.name] == "float":
                object.__setattr__(self, f.name, float(v))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in [{cls._name}]: {', '.join(unknown)}; known keys: {', '.join(known)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _freeze(v):
    return tuple(_freeze(e) for e in v) if isinstance(v, (list, tuple)) else v


def _thaw(v):
    return [_thaw(e) for e in v] if isinstance(v, tuple) else v


# Options of each data source kind (besides "source" and "seed").
DATA_SOURCE_OPTIONS = {
    "digits": ("resolution", "upsample"),
    "grf": ("size", "prior_low", "prior_high"),
    "npz": ("normalize",),
    "folder": ("channels",),
}


@dataclass(frozen=True)
class DataSection(_Section):
    """``[data]``: where the training images come from (see :func:`pixeldit.data.load_dataset`)."""

    _name = "data"
    _types = {
        "source": "str", "seed": "int", "resolution": "int", "upsample": "str", "size": "int",
        "prior_low": "list", "prior_high": "list", "normalize": "str", "channels": "int",
    }

    source: str = "digits"  # "digits", "grf", a .npz file or an image folder
    seed: int = 0  # seed of the data stream (batch order, GRF draws)
    resolution: int | None = None  # digits: image side (16; 32 also works)
    upsample: str | None = None  # digits: "bilinear" or "nearest"
    size: int | None = None  # grf: grid side N
    prior_low: tuple | None = None  # grf: lower bounds of (log_amplitude, slope)
    prior_high: tuple | None = None  # grf: upper bounds
    normalize: str | None = None  # npz: "none", "uint8" or "minmax"
    channels: int | None = None  # image folder: 1 or 3

    def __post_init__(self):
        super().__post_init__()
        kind = self.source_kind
        allowed = DATA_SOURCE_OPTIONS[kind]
        bad = [k for opts in DATA_SOURCE_OPTIONS.values() for k in opts if k not in allowed and getattr(self, k) is not None]
        if bad:
            raise ConfigError(
                f"data.{', data.'.join(bad)} do(es) not apply to data source {self.source!r} ({kind}); "
                f"its options are: {', '.join(('seed',) + allowed)}"
            )

    @property
    def source_kind(self) -> str:
        if self.source in ("digits", "grf"):
            return self.source
        return "npz" if self.source.lower().endswith(".npz") else "folder"

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`pixeldit.data.load_dataset`."""
        keys = ("seed",) + DATA_SOURCE_OPTIONS[self.source_kind]
        return {k: _thaw(getattr(self, k)) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class SampleSection(_Section):
    """``[sample]``: how samples are drawn (``pixeldit sample``, the training preview grids)."""

    _name = "sample"
    _types = {
        "num_samples": "int", "method": "str", "steps": "int", "guidance": "float",
        "guidance_interval": "list", "timeshift": "float", "seed": "int", "batch_size": "int",
        "labels": "list", "theta": "list", "preview_samples": "int", "image_size": "list",
    }

    num_samples: int = 64
    method: str = "heun"  # one of pixeldit.sampling.METHODS
    steps: int = 32  # solver steps
    guidance: float = 1.0  # classifier-free guidance scale (1: no guidance)
    guidance_interval: tuple = (0.0, 1.0)  # guidance only for lo < t < hi
    timeshift: float = 1.0
    seed: int = 0
    batch_size: int = 64  # samples per compiled call
    labels: tuple = ()  # class labels to draw (cycled); empty: every class in turn
    theta: tuple = ()  # theta rows to draw (cycled); empty: a fixed draw from the data / prior
    preview_samples: int = 40  # size of the grid written every train.sample_every steps
    image_size: tuple | None = None  # (H, W); default: the training data's

    def __post_init__(self):
        super().__post_init__()
        from pixeldit.sampling import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"sample.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_samples", "steps", "batch_size", "preview_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.guidance_interval) != 2:
            raise ConfigError(f"sample.guidance_interval must be [lo, hi], got {list(self.guidance_interval)}")
        if self.image_size is not None and len(self.image_size) != 2:
            raise ConfigError(f"sample.image_size must be [H, W], got {list(self.image_size)}")


@dataclass(frozen=True)
class EvalSection(_Section):
    """``[eval]``: quality evaluation; sampling keys left unset take the ``[sample]`` values."""

    _name = "eval"
    _types = {
        "samples_per_class": "int", "test_theta": "list", "samples_per_theta": "int", "n_sim": "int",
        "num_samples": "int", "method": "str", "steps": "int", "guidance": "float", "seed": "int",
        "batch_size": "int",
    }

    samples_per_class: int = 50  # class data: samples drawn per class
    test_theta: tuple = ()  # grf: the fixed test thetas (empty: a 3 x 3 grid inside the prior)
    samples_per_theta: int = 64  # grf: samples per test theta
    n_sim: int = 256  # grf: simulator realisations per test theta for the reference spectrum
    num_samples: int = 256  # other data: samples drawn
    method: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 1  # differs from [sample]'s so eval draws are not the preview draws
    batch_size: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """A whole run: ``model`` (a dict, resolved against the data), ``train``, ``data``, ``sample``, ``eval``."""

    name: str
    model: dict
    train: Any  # pixeldit.train.TrainConfig
    data: DataSection
    sample: SampleSection
    eval: EvalSection

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": dict(self.model),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
            "sample": self.sample.to_dict(),
            "eval": self.eval.to_dict(),
        }


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ---------------------------------------------------------------------------------------------


def builtin_configs() -> list[str]:
    """Names of the run configs shipped with the package (``digits``, ``grf``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> ``(section, key, value)``; the value is parsed as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=200)")
    lhs, raw = text.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the name must be section.key with a section of {', '.join(SECTIONS)}")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section [{section}]; sections: {', '.join(SECTIONS)}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def _read_raw(source: str | os.PathLike) -> tuple[str, dict]:
    """Read a run config (built-in name, ``.toml`` file or workdir ``run.json``) as ``(name, dict)``."""
    path = Path(source)
    if path.is_dir() and (path / RUN_FILE).is_file():
        path = path / RUN_FILE
    if path.is_file():
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text())
            else:
                raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot parse run config '{path}': {e}") from e
        name = raw.pop("name", None) or (path.parent.name if path.name == RUN_FILE else path.stem)
        return str(name), raw
    builtin = CONFIG_DIR / f"{source}.toml"
    if builtin.is_file():
        return str(source), tomllib.loads(builtin.read_text())
    raise ConfigError(
        f"no run config {str(source)!r}: not a built-in name ({', '.join(builtin_configs())}), "
        "a .toml file or a workdir with run.json"
    )


def build_run_config(name: str, raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw nested dict into a :class:`RunConfig` (unknown sections and keys are errors)."""
    from pixeldit.train import TrainConfig

    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(f'[{s}]' for s in unknown)}; sections: {', '.join(SECTIONS)}")
    for s in SECTIONS:
        if not isinstance(raw.get(s, {}), Mapping):
            raise ConfigError(f"[{s}] must be a table of key = value pairs, got {raw[s]!r}")
    model = dict(raw.get("model", {}))
    _check_model_keys(model)
    train_raw = dict(raw.get("train", {}))
    known_train = [f.name for f in dataclasses.fields(TrainConfig)]
    bad = sorted(set(train_raw) - set(known_train))
    if bad:
        raise ConfigError(f"unknown key(s) in [train]: {', '.join(bad)}; known keys: {', '.join(known_train)}")
    if isinstance(train_raw.get("betas"), list):
        train_raw["betas"] = tuple(train_raw["betas"])
    try:
        train = TrainConfig(**train_raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[train]: {e}") from e
    return RunConfig(
        name=name,
        model=model,
        train=train,
        data=DataSection.from_dict(raw.get("data", {})),
        sample=SampleSection.from_dict(raw.get("sample", {})),
        eval=EvalSection.from_dict(raw.get("eval", {})),
    )


def _model_fields(kind: str) -> list[str]:
    from pixeldit.model import CONFIG_KINDS

    return [f.name for f in dataclasses.fields(CONFIG_KINDS[kind])]


def _check_model_keys(model: Mapping[str, Any]) -> None:
    kind = model.get("kind", "auto")
    if kind not in MODEL_KINDS:
        raise ConfigError(
            f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r} "
            "(text-to-image models are not trained from the CLI; convert reference checkpoints instead)"
        )
    fields = set(_model_fields("c2i")) | set(_model_fields("theta")) if kind == "auto" else set(_model_fields(kind))
    known = sorted(set(RUN_MODEL_KEYS) | fields)
    bad = sorted(set(model) - set(known))
    if bad:
        raise ConfigError(f"unknown key(s) in [model]: {', '.join(bad)}; known keys: {', '.join(known)}")
    if model.get("theta_encoding", "affine") not in THETA_ENCODINGS:
        raise ConfigError(f"model.theta_encoding must be one of {', '.join(THETA_ENCODINGS)}, "
                          f"got {model['theta_encoding']!r}")


def load_run_config(
    source: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    data: str | os.PathLike | None = None,
) -> RunConfig:
    """Load a run config and apply overrides.

    Args:
      source: a built-in name (:func:`builtin_configs`), a ``.toml`` file, or a workdir (its ``run.json``).
      overrides: ``"section.key=value"`` strings, applied in order.
      data: replace the whole ``[data]`` section by this source (keeping ``data.seed``); use it to
        train a built-in model on your own images (``--set data.channels=3`` etc. still apply).
    """
    name, raw = _read_raw(source)
    raw = {s: dict(raw.get(s, {})) if isinstance(raw.get(s, {}), Mapping) else raw[s] for s in set(raw) | set(SECTIONS)}
    if data is not None:
        seed = raw["data"].get("seed")
        raw["data"] = {"source": str(data)} | ({"seed": seed} if seed is not None else {})
    for text in overrides:
        section, key, value = parse_override(text)
        raw[section][key] = value
    return build_run_config(name, raw)


def save_run_config(run: RunConfig, workdir: str | os.PathLike) -> Path:
    """Write ``workdir/run.json`` (the resolved run config), atomically."""
    path = Path(workdir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_run_config(workdir: str | os.PathLike) -> RunConfig | None:
    """The run config stored in ``workdir`` (None if it has no ``run.json``)."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        return None
    name, raw = _read_raw(path)
    return build_run_config(name, raw)


# ---------------------------------------------------------------------------------------------
# Data and model resolution
# ---------------------------------------------------------------------------------------------


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


def theta_encoding_for(dataset) -> dict[str, Any]:
    """The affine theta encoding of ``dataset``: ``center`` and ``scale`` per component.

    The theta model embeds each component with ``Linear(theta_channels -> D)`` followed by
    RMSNorm.  Fed a bare scalar (``theta_channels = 1``) that keeps only the scalar's sign at
    initialisation (the bias starts at zero, and RMSNorm divides the magnitude out), so the
    model cannot tell slope 1 from slope 4.  The encoding feeds each component as the pair
    ``((theta - center) / scale, 1)`` instead (``theta_channels = 2``): the token's direction
    then moves with theta.  ``center`` / ``scale`` map the GRF prior box, or the data's range,
    to [-1, 1].
    """
    meta = dataset.metadata()
    if "prior_low" in meta and "prior_high" in meta:
        lo, hi = np.asarray(meta["prior_low"], np.float64), np.asarray(meta["prior_high"], np.float64)
    else:
        _, theta = dataset.arrays()
        lo, hi = theta.min(axis=0).astype(np.float64), theta.max(axis=0).astype(np.float64)
    scale = np.where(hi > lo, (hi - lo) / 2, 1.0)
    return {"kind": "affine", "center": ((hi + lo) / 2).tolist(), "scale": scale.tolist()}


def encode_theta(theta: np.ndarray, encoding: Mapping[str, Any] | None) -> np.ndarray:
    """Model input for theta ``(N, K)``: ``(N, K, 2)`` under an affine encoding (NaN rows stay NaN), else unchanged."""
    theta = np.asarray(theta, np.float32)
    if not encoding or encoding.get("kind") == "none":
        return theta
    z = (theta - np.asarray(encoding["center"], np.float32)) / np.asarray(encoding["scale"], np.float32)
    ones = np.where(np.isnan(z), np.nan, 1.0).astype(np.float32)
    return np.stack([z, ones], axis=-1)


class ThetaEncodedDataset:
    """A theta dataset whose batches carry :func:`encode_theta` of theta as ``y``."""

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


def load_run_dataset(run: RunConfig):
    """The training dataset of ``run`` (image sides checked against the model's patch size).

    Unconditional data is wrapped as one class; theta data is wrapped with the run's theta encoding.
    """
    from pixeldit.data import load_dataset

    patch = run.model.get("patch_size")
    ds = load_dataset(run.data.source, patch_size=patch, **run.data.options())
    if ds.condition == "none":
        ds = ConstantLabelDataset(ds)
    if ds.condition == "theta" and run.model.get("theta_encoding", "affine") == "affine":
        ds = ThetaEncodedDataset(ds, theta_encoding_for(ds))
    return ds


def resolve_model_config(model: Mapping[str, Any], dataset):
    """The model config for ``dataset``: kind from its condition, in_channels / num_classes / theta_dim from its shape."""
    from pixeldit.model import CONFIG_KINDS

    model = dict(model)
    kind = model.pop("kind", "auto")
    model.pop("theta_encoding", None)
    cond = dataset.condition
    if kind == "auto":
        kind = "theta" if cond == "theta" else "c2i"
    if (kind == "theta") != (cond == "theta"):
        raise ConfigError(
            f"model.kind={kind!r} does not fit the data {dataset.name!r}, whose condition is {cond!r} "
            "(class labels need kind 'c2i', theta vectors kind 'theta'; 'auto' picks it)"
        )
    derived = {"in_channels": int(dataset.image_shape[-1])}
    if kind == "c2i":
        derived["num_classes"] = int(dataset.num_classes)
    else:
        derived["theta_dim"] = int(dataset.theta_dim)
        derived["theta_channels"] = 2 if isinstance(dataset, ThetaEncodedDataset) else 1
    for k, v in derived.items():
        if k in model and model[k] != v:
            raise ConfigError(f"model.{k}={model[k]} but the data {dataset.name!r} has {k}={v}; drop model.{k}")
    model.update(derived)
    known = set(_model_fields(kind))
    bad = sorted(set(model) - known)
    if bad:
        raise ConfigError(f"key(s) {', '.join('model.' + k for k in bad)} do not apply to a {kind} model")
    try:
        return CONFIG_KINDS[kind](**model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[model]: {e}") from e


# ---------------------------------------------------------------------------------------------
# Conditions and sampling helpers
# ---------------------------------------------------------------------------------------------


def _describe(meta: Mapping[str, Any]) -> dict[str, Any]:
    return dict(meta.get("dataset") or {})


def value_range_for(dataset_meta: Mapping[str, Any], run: RunConfig | None = None) -> tuple[float, float] | None:
    """Display range of images: [-1, 1] for image data; None (each image's min/max) for physical fields (grf, raw .npz)."""
    if dataset_meta.get("name") == "grf":
        return None
    if run is not None and run.data.source_kind == "npz" and (run.data.normalize or "none") == "none":
        return None
    return (-1.0, 1.0)


def default_theta(dataset_meta: Mapping[str, Any], n: int, seed: int) -> np.ndarray:
    """``n`` theta rows drawn (with ``seed``) from the GRF prior; other theta data needs explicit rows."""
    from pixeldit.data import PRIOR_HIGH, PRIOR_LOW, make_rng

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
                 theta_encoding: Mapping[str, Any] | None = None) -> np.ndarray:
    """Draw ``len(y)`` samples ``(N, H, W, C)`` with :func:`pixeldit.sampling.sample_batched`.

    ``y`` / ``y_null`` are labels or raw theta; theta is encoded for the model with
    ``theta_encoding`` (the checkpoint's, see :func:`encode_theta`).
    """
    import jax

    from pixeldit.sampling import ReferenceT2ITime, sample_batched

    if time_convention == REFERENCE_T2I_TIME:
        model = ReferenceT2ITime(model)
    if model_config.kind == "theta":
        y, y_null = encode_theta(y, theta_encoding), encode_theta(y_null, theta_encoding)
    n = len(y)
    h, w = int(image_shape[0]), int(image_shape[1])
    return sample_batched(
        model, jax.random.key(seed), (n, h, w, model_config.in_channels), y,
        None if guidance == 1.0 else y_null,
        batch_size=min(batch_size, n), method=method, num_steps=steps, progress=progress,
        guidance=float(guidance), guidance_interval=tuple(float(v) for v in guidance_interval),
        timeshift=float(timeshift),
    )


def _labels_for_plot(model_config, y):
    return y if model_config.kind in ("c2i", "theta") else None


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


def preview_callback(run: RunConfig, model_config, dataset, workdir: Path, echo: Callable[[str], Any] | None = None):
    """``cb(step, ema_model)`` writing ``workdir/samples/step_<step>.png``: EMA samples next to real data."""
    from pixeldit.evaluate import plot_sample_grid

    meta = dataset.metadata()
    s = run.sample
    n = s.preview_samples
    raw = dataset.dataset if isinstance(dataset, ThetaEncodedDataset) else dataset
    real_batch = raw.get_batch(0, n)
    real, real_y = real_batch["x"], real_batch["y"]
    if model_config.kind == "theta" and not s.theta:  # generate at the thetas of the real fields shown
        y, y_null = real_y, np.full_like(real_y, np.nan)
    else:
        y, y_null = make_conditions(model_config, meta, n, labels=s.labels, theta=s.theta, seed=s.seed)
    ncols = model_config.num_classes if model_config.kind == "c2i" and model_config.num_classes <= 12 and not s.labels else 8

    def callback(step: int, model) -> None:
        x = draw_samples(model, model_config, dataset.image_shape, y, y_null, method=s.method, steps=s.steps,
                         guidance=s.guidance, guidance_interval=s.guidance_interval, timeshift=s.timeshift,
                         seed=s.seed, batch_size=s.batch_size, theta_encoding=meta.get("theta_encoding"))
        path = plot_sample_grid(x, workdir / SAMPLES_DIR / f"step_{step:06d}.png", real=real,
                                labels=_labels_for_plot(model_config, y), real_labels=real_y, ncols=ncols,
                                value_range=value_range_for(meta, run), class_names=getattr(dataset, "class_names", None))
        if echo is not None:
            echo(f"step {step}: sample grid {path}")

    return callback


def train_run(run: RunConfig, workdir: str | os.PathLike, *, progress: bool = True,
              echo: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train ``run`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes ``run.json``, the checkpoints and ``metrics.jsonl`` (:func:`pixeldit.train.train`), a
    preview grid every ``train.sample_every`` steps and ``summary.json``.  Returns the summary
    (the train loop's, without per-step losses, plus ``workdir``, ``run_config``, ``num_params``).
    ``KeyboardInterrupt`` propagates after the train loop has saved a checkpoint.
    """
    from pixeldit import train as T
    from pixeldit.model import count_params

    workdir = Path(workdir)
    dataset = load_run_dataset(run)
    model_config = resolve_model_config(run.model, dataset)
    fresh = T.latest_checkpoint_step(workdir) is None
    if fresh:
        save_run_config(run, workdir)
    callbacks = [preview_callback(run, model_config, dataset, workdir, echo)] if run.train.sample_every else []
    incompatible = False
    try:
        result = T.train(model_config, run.train, dataset, workdir, callbacks=callbacks, progress=progress)
    except T.IncompatibleCheckpointError:
        incompatible = True
        raise
    finally:
        if not incompatible and not fresh:
            save_run_config(run, workdir)  # settings a resumed run may change (steps, sample, eval)
    summary = {k: v for k, v in result.items() if k != "losses"}
    summary.update(workdir=str(workdir), run_config=str(workdir / RUN_FILE), num_params=count_params(model_config),
                   dataset=dataset.metadata().get("name"), image_shape=list(dataset.image_shape))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# Sample
# ---------------------------------------------------------------------------------------------


def _load(workdir, step=None, ema=True):
    from pixeldit import train as T

    model, model_config, _ = T.load_checkpoint(workdir, step=step, ema=ema)
    meta = T.read_checkpoint_meta(workdir, step)
    return model, model_config, meta


def _image_shape(meta: Mapping[str, Any], sample: SampleSection) -> tuple[int, int]:
    if sample.image_size is not None:
        return tuple(int(v) for v in sample.image_size)
    shape = _describe(meta).get("image_shape")
    if not shape:
        raise ConfigError("the checkpoint does not record an image size: pass --image-size H W (sample.image_size)")
    return int(shape[0]), int(shape[1])


def sample_run(workdir: str | os.PathLike, *, out: str | os.PathLike | None = None, step: int | None = None,
               ema: bool = True, overrides: Sequence[str] = (), condition_file: str | os.PathLike | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Draw samples from a workdir checkpoint (EMA weights by default).

    ``overrides`` are ``sample.key=value`` strings on top of the workdir's ``[sample]`` section.
    Writes ``<out>/samples.png`` (grid) and ``<out>/samples.npz`` (``x`` ``(N, H, W, C)``, the
    condition as ``y`` (labels) or ``theta``, and the settings as JSON in ``settings``);
    ``out`` defaults to ``workdir/samples``.  Returns the paths and settings.
    """
    from pixeldit.evaluate import plot_sample_grid

    workdir = Path(workdir)
    run = read_run_config(workdir)
    sample = _apply_section_overrides(run.sample if run else SampleSection(), overrides, ("sample",))["sample"]
    model, model_config, meta = _load(workdir, step, ema)
    dmeta = _describe(meta)
    if model_config.kind == "theta" and not sample.theta and dmeta.get("name") != "grf" and run is not None:
        _, data_theta = load_run_dataset(run).arrays()  # the training data's own thetas, cycled
        y = data_theta[np.arange(sample.num_samples) % len(data_theta)].astype(np.float32)
        y_null = np.full_like(y, np.nan)
    else:
        y, y_null = make_conditions(model_config, dmeta, sample.num_samples, labels=sample.labels,
                                    theta=sample.theta, seed=sample.seed, condition_file=condition_file)
    image_shape = _image_shape(meta, sample)
    t0 = time.perf_counter()
    x = draw_samples(model, model_config, image_shape, y, y_null, method=sample.method, steps=sample.steps,
                     guidance=sample.guidance, guidance_interval=sample.guidance_interval,
                     timeshift=sample.timeshift, seed=sample.seed, batch_size=sample.batch_size, progress=progress,
                     time_convention=meta.get("time_convention"), theta_encoding=dmeta.get("theta_encoding"))
    wall = time.perf_counter() - t0
    out = Path(out) if out is not None else workdir / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(sample.to_dict(), step=int(meta["step"]), ema=ema, workdir=str(workdir))
    arrays = {"x": x, "settings": np.asarray(json.dumps(settings))}
    if model_config.kind == "c2i":
        arrays["y"] = y
    elif model_config.kind == "theta":
        arrays["theta"] = y
    np.savez(out / "samples.npz", **arrays)
    class_names = dmeta.get("class_names")
    ncols = model_config.num_classes if model_config.kind == "c2i" and model_config.num_classes <= 12 \
        and not sample.labels else 8
    png = plot_sample_grid(x, out / "samples.png", labels=_labels_for_plot(model_config, y),
                           ncols=ncols, value_range=value_range_for(dmeta, run), class_names=class_names)
    return {"png": png, "npz": str(out / "samples.npz"), "num_samples": len(x), "step": int(meta["step"]),
            "wall_time": wall, "settings": settings}


def _apply_section_overrides(section_obj, overrides: Sequence[str], allowed: Sequence[str], others=None):
    """Apply ``section.key=value`` overrides restricted to ``allowed`` sections; returns ``{section: obj}``."""
    objs = {"sample": section_obj} if others is None else dict(others)
    raw = {name: obj.to_dict() for name, obj in objs.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in allowed:
            raise ConfigError(f"override {text!r}: only {', '.join(f'[{s}]' for s in allowed)} can be set here")
        raw[section][key] = value
    cls = {"sample": SampleSection, "eval": EvalSection}
    return {name: cls[name].from_dict(d) for name, d in raw.items()}


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------


def default_test_theta(dataset_meta: Mapping[str, Any]) -> np.ndarray:
    """A 3 x 3 grid of test thetas at 1/6, 1/2, 5/6 of each GRF prior range."""
    from pixeldit.data import PRIOR_HIGH, PRIOR_LOW

    lo = np.asarray(dataset_meta.get("prior_low", PRIOR_LOW), np.float64)
    hi = np.asarray(dataset_meta.get("prior_high", PRIOR_HIGH), np.float64)
    f = np.array([1 / 6, 1 / 2, 5 / 6])
    a, s = lo[0] + f * (hi[0] - lo[0]), lo[1] + f * (hi[1] - lo[1])
    return np.array([(ai, si) for ai in a for si in s], np.float64)


def eval_run(workdir: str | os.PathLike, *, out: str | os.PathLike | None = None, step: int | None = None,
             overrides: Sequence[str] = (), ema: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate a workdir checkpoint (EMA weights unless ``ema=False``); writes ``<out>/metrics.json`` and plots.

    ``out`` defaults to ``workdir/eval``.

    * digits: an independent scikit-learn classifier labels class-conditional samples
      (``eval.samples_per_class`` per class, CFG scale ``eval.guidance``): accuracy, per-class
      diversity relative to the real data; plot ``samples_vs_real.png``.
    * grf: ``eval.samples_per_theta`` fields at each test theta vs ``eval.n_sim`` simulator
      realisations: mean |log10| power-spectrum error and pixel-std ratios; plots
      ``power_spectra.png`` and ``samples_vs_real.png``.
    * other data: pixel statistics of samples vs real data and ``samples_vs_real.png``.

    ``overrides``: ``eval.key=value`` / ``sample.key=value`` strings.  Returns the metrics dict
    (also in the JSON), with a ``checks`` entry for the built-in benchmarks' targets.
    """
    from pixeldit.data import load_dataset
    from pixeldit.evaluate import (
        digits_metrics,
        grf_metrics,
        plot_power_spectra,
        plot_sample_grid,
        train_digit_classifier,
    )

    workdir = Path(workdir)
    run = read_run_config(workdir)
    if run is None:
        raise ConfigError(f"'{workdir}' has no {RUN_FILE}: eval needs a run trained with `pixeldit train`")
    secs = _apply_section_overrides(None, overrides, ("sample", "eval"), {"sample": run.sample, "eval": run.eval})
    s, e = secs["sample"], secs["eval"]
    method, steps = e.method or s.method, e.steps or s.steps
    guidance = s.guidance if e.guidance is None else e.guidance
    batch_size = e.batch_size or s.batch_size
    model, model_config, meta = _load(workdir, step, ema)
    dmeta = _describe(meta)
    out = Path(out) if out is not None else workdir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    draw = dict(method=method, steps=steps, guidance=guidance, guidance_interval=s.guidance_interval,
                timeshift=s.timeshift, seed=e.seed, batch_size=batch_size, progress=progress,
                theta_encoding=dmeta.get("theta_encoding"))
    result: dict[str, Any] = {
        "workdir": str(workdir), "step": int(meta["step"]), "ema": ema, "dataset": dmeta.get("name"),
        "sampling": {k: _thaw(v) for k, v in draw.items() if k not in ("progress", "theta_encoding")},
    }
    t0 = time.perf_counter()
    name = dmeta.get("name")
    if name == "digits":
        res = int(dmeta["image_shape"][0])
        k = model_config.num_classes
        labels = np.tile(np.arange(k, dtype=np.int32), e.samples_per_class)  # sample i has class i % k
        x = draw_samples(model, model_config, (res, res), labels, np.full_like(labels, k), **draw)
        result["sample_wall_time"] = time.perf_counter() - t0
        clf = train_digit_classifier(res)
        ds = load_dataset("digits", resolution=res)
        real_x, real_y = ds.arrays()
        result.update(digits_metrics(x, labels, clf, real_x, real_y))
        per_class = np.stack([real_x[real_y == c][:5] for c in range(k)])  # (k, 5, H, W, C)
        real_show = per_class.transpose(1, 0, 2, 3, 4).reshape(-1, *real_x.shape[1:])  # image j has class j % k
        result["plots"] = {"samples_vs_real": plot_sample_grid(
            x[: 5 * k], out / "samples_vs_real.png", real=real_show, labels=labels[: 5 * k],
            real_labels=np.tile(np.arange(k), 5), ncols=k)}
        result["checks"] = {
            f"accuracy >= {DIGITS_MIN_ACCURACY}": bool(result["accuracy"] >= DIGITS_MIN_ACCURACY),
            f"diversity_min >= {DIGITS_MIN_DIVERSITY}": bool(result.get("diversity_min", 0.0) >= DIGITS_MIN_DIVERSITY),
        }
    elif name == "grf":
        test = np.asarray(e.test_theta, np.float64) if len(e.test_theta) else default_test_theta(dmeta)
        theta = np.repeat(test, e.samples_per_theta, axis=0).astype(np.float32)
        x = draw_samples(model, model_config, dmeta["image_shape"][:2], theta, np.full_like(theta, np.nan), **draw)
        result["sample_wall_time"] = time.perf_counter() - t0
        result.update(grf_metrics(x, theta, n_sim=e.n_sim, seed=e.seed))
        from pixeldit.data import simulate

        show = np.arange(len(test)) * e.samples_per_theta  # first sample of each test theta
        sim = simulate(test, np.random.default_rng(np.random.SeedSequence([e.seed, 31])), int(dmeta["image_shape"][0]))
        result["plots"] = {
            "power_spectra": plot_power_spectra(x, theta, out / "power_spectra.png", max_curves=len(test)),
            "samples_vs_real": plot_sample_grid(x[show], out / "samples_vs_real.png", real=sim, labels=theta[show],
                                                real_labels=test, ncols=3, value_range=None),
        }
        lo, hi = GRF_STD_RATIO_RANGE
        result["checks"] = {
            f"spectrum_log10_error <= {GRF_MAX_SPECTRUM_ERROR}": bool(result["spectrum_log10_error"] <= GRF_MAX_SPECTRUM_ERROR),
            f"std_ratio_mean in [{lo}, {hi}]": bool(lo <= result["std_ratio_mean"] <= hi),
            f"std_ratio in [{lo}, {hi}] at every test theta (stricter)": bool(
                result["std_ratio_min"] >= lo and result["std_ratio_max"] <= hi),
        }
    else:
        ds = load_run_dataset(run)
        real_x, real_y = ds.arrays() if hasattr(ds, "arrays") else (ds.get_batch(0, e.num_samples)["x"], None)
        n = e.num_samples
        if model_config.kind == "theta":
            idx = np.arange(n) % len(real_y)
            y, y_null = real_y[idx], np.full_like(real_y[idx], np.nan)
        else:
            y, y_null = make_conditions(model_config, dmeta, n, labels=s.labels)
        x = draw_samples(model, model_config, dmeta["image_shape"][:2], y, y_null, **draw)
        result["sample_wall_time"] = time.perf_counter() - t0
        result.update({
            "num_samples": int(n), "sample_mean": float(x.mean()), "sample_std": float(x.std()),
            "real_mean": float(real_x.mean()), "real_std": float(real_x.std()),
            "std_ratio": float(x.std() / max(real_x.std(), 1e-12)),
        })
        result["plots"] = {"samples_vs_real": plot_sample_grid(
            x, out / "samples_vs_real.png", real=real_x[:64], labels=_labels_for_plot(model_config, y),
            value_range=value_range_for(dmeta, run), class_names=dmeta.get("class_names"))}
    result["eval_wall_time"] = time.perf_counter() - t0
    result["metrics_json"] = str(out / "metrics.json")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# Info
# ---------------------------------------------------------------------------------------------


def forward_flops(model_config, image_size: tuple[int, int], batch: int = 1) -> float:
    """FLOPs of one forward pass at ``image_size`` and ``batch`` (no weights allocated).

    Counted by :func:`pixeldit.bench.count_flops` (XLA's cost analysis of the lowered program)
    with the block stacks fully unrolled (``scan_unroll=True``): XLA counts a while loop's body
    once whatever its trip count.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pixeldit.bench import count_flops
    from pixeldit.model import abstract_model

    graphdef, state = nnx.split(abstract_model(model_config.replace(scan_unroll=True)))
    h, w = image_size
    x = jax.ShapeDtypeStruct((batch, h, w, model_config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    if model_config.kind == "c2i":
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif model_config.kind == "theta":
        y = jax.ShapeDtypeStruct((batch, model_config.theta_dim, model_config.theta_channels), jnp.float32)
    else:
        y = jax.ShapeDtypeStruct((batch, model_config.txt_max_length, model_config.txt_embed_dim), jnp.float32)

    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return count_flops(forward, state, x, t, y)


def _is_workdir(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / RUN_FILE).is_file())


def model_info(target: str, *, overrides: Sequence[str] = (), image_size: tuple[int, int] | None = None,
               batch: int = 1, flops: bool = True) -> dict[str, Any]:
    """Size of a model: a preset name (``XL/16``), a run config (name / .toml) or a workdir.

    Returns ``kind``, ``config``, ``num_params``, ``param_bytes_float32``, ``image_size`` and, if
    ``flops``, ``flops_per_forward`` (batch ``batch``, XLA cost analysis).  Presets default to
    256 x 256 images; run configs and workdirs to their data's size.
    """
    from pixeldit.model import PRESETS, count_params, preset

    path = Path(target)
    source = target
    size: tuple[int, int] | None = None
    if target in PRESETS:
        changes = {}
        for text in overrides:
            section, key, value = parse_override(text)
            if section != "model":
                raise ConfigError(f"override {text!r}: only [model] keys apply to a preset")
            changes[key] = value
        try:
            cfg = preset(target, **changes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preset {target}: {e}") from e
        size = (256, 256)
        source = f"preset {target}"
    elif _is_workdir(path) and (path / "checkpoints").is_dir() and not overrides:
        from pixeldit import train as T
        from pixeldit.model import config_from_dict

        meta = T.read_checkpoint_meta(path)
        cfg = config_from_dict(meta["model_config"])
        shape = _describe(meta).get("image_shape")
        size = (int(shape[0]), int(shape[1])) if shape else (256, 256)
        source = f"workdir {path} (step {meta['step']})"
    else:
        run = load_run_config(target, overrides)
        ds = load_run_dataset(run)
        cfg = resolve_model_config(run.model, ds)
        size = tuple(int(v) for v in ds.image_shape[:2])
        source = f"run config {run.name}"
    if image_size is not None:
        size = tuple(int(v) for v in image_size)
    n = count_params(cfg)
    info = {
        "source": source, "kind": cfg.kind, "config": cfg.to_dict(), "num_params": n,
        "param_bytes_float32": 4 * n, "image_size": list(size), "batch": batch,
        "tokens": (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size),
    }
    if flops:
        info["flops_per_forward"] = forward_flops(cfg, size, batch)
    return info


# ---------------------------------------------------------------------------------------------
# Convert
# ---------------------------------------------------------------------------------------------


def _read_reference_kwargs(kwargs_file: str | os.PathLike) -> tuple[str | None, dict]:
    path = Path(kwargs_file)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read reference kwargs '{path}': {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"'{path}' must hold a JSON object of reference constructor arguments")
    kind = d.pop("kind", None)
    return kind, d


def save_model_checkpoint(model, workdir: str | os.PathLike, *, image_shape: Sequence[int] | None,
                          extra_meta: Mapping[str, Any] | None = None, step: int = 0) -> Path:
    """Write ``model`` as a checkpoint of ``workdir`` that :func:`pixeldit.train.load_checkpoint` reads.

    The raw and EMA weights are both ``model``'s; no optimiser state is written (such a
    checkpoint is for sampling, evaluation and export, not for resuming training).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from pixeldit import train as T

    workdir = Path(workdir)
    if T.latest_checkpoint_step(workdir) is not None:
        raise ConfigError(f"'{workdir}' already holds checkpoints; convert into a new directory")
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype("float32"), params)
    extra = {"step": np.asarray(step, np.int32), "rng": np.zeros((2,), np.uint32), "model_state": rest}
    meta = {
        "model_config": model.config.to_dict(),
        "train_config": T.TrainConfig().to_dict(),
        "dataset": {"name": "converted", "image_shape": list(image_shape) if image_shape else None},
        "step": step,
        **dict(extra_meta or {}),
    }
    with T.checkpoint_manager(workdir, keep=1) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            ema_params=ocp.args.StandardSave(params),
            extra=ocp.args.StandardSave(extra),
            meta=ocp.args.JsonSave(T._json_roundtrip(meta)),
        ), force=True)
        mngr.wait_until_finished()
    (workdir / "config.json").write_text(json.dumps(T._json_roundtrip(meta), indent=2) + "\n")
    return workdir / "checkpoints" / str(step)


def convert_from_reference(checkpoint_file: str | os.PathLike, workdir: str | os.PathLike, *,
                           kwargs_file: str | os.PathLike | None = None, preset_name: str | None = None,
                           kind: str | None = None, ema: bool = True,
                           image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Reference checkpoint file (.safetensors / .ckpt / .pth) -> a workdir checkpoint.

    The architecture comes from ``preset_name`` (``"XL/16"``...) or from ``kwargs_file`` (JSON of
    the reference constructor's keyword arguments, optionally with ``"kind": "c2i" | "t2i"``;
    ``kind`` overrides it, default ``c2i``).  ``ema`` picks the EMA weights of Lightning
    checkpoints.  t2i checkpoints are marked with the reference time convention so that
    :func:`sample_run` wraps them in :class:`pixeldit.sampling.ReferenceT2ITime`.
    ``image_size`` (H, W) is recorded as the default sampling size (default 256 x 256).
    """
    from flax import nnx

    from pixeldit.convert import config_from_reference, load_reference_state_dict, read_checkpoint_file
    from pixeldit.model import build_model, preset

    if (kwargs_file is None) == (preset_name is None):
        raise ConfigError("give exactly one of a reference kwargs JSON file (--kwargs) or a preset (--preset)")
    if preset_name is not None:
        try:
            cfg = preset(preset_name)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if kind is not None and kind != cfg.kind:
            raise ConfigError(f"preset {preset_name} is a {cfg.kind} model, not {kind}")
    else:
        file_kind, kwargs = _read_reference_kwargs(kwargs_file)
        kind = kind or file_kind or "c2i"
        try:
            cfg = config_from_reference(kind, kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"reference kwargs '{kwargs_file}': {e}") from e
    state_dict = read_checkpoint_file(checkpoint_file, ema=ema)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    load_reference_state_dict(model, state_dict)
    size = tuple(int(v) for v in image_size) if image_size else (256, 256)
    extra = {"source": {"reference_file": str(Path(checkpoint_file).resolve()), "ema": ema}}
    if cfg.kind == "t2i":
        extra["time_convention"] = REFERENCE_T2I_TIME
    path = save_model_checkpoint(model, workdir, image_shape=(*size, cfg.in_channels), extra_meta=extra)
    return {"checkpoint": str(path), "workdir": str(workdir), "kind": cfg.kind, "num_tensors": len(state_dict),
            "config": cfg.to_dict()}


def convert_to_reference(workdir: str | os.PathLike, out_file: str | os.PathLike, *, step: int | None = None,
                         ema: bool = True) -> dict[str, Any]:
    """A workdir checkpoint (EMA weights by default) -> reference-named ``.safetensors``."""
    from pixeldit import train as T
    from pixeldit.convert import save_reference_safetensors, to_reference_state_dict

    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConfigError(f"the output file must end in .safetensors, got '{out_file}'")
    model, model_config, _ = T.load_checkpoint(workdir, step=step, ema=ema)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_reference_safetensors(model, out_file)
    return {"file": str(out_file), "kind": model_config.kind, "num_tensors": len(to_reference_state_dict(model))}


def is_reference_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in REFERENCE_FILE_SUFFIXES


__all__ = [
    "ConfigError",
    "DataSection",
    "EvalSection",
    "RunConfig",
    "SampleSection",
    "builtin_configs",
    "convert_from_reference",
    "convert_to_reference",
    "draw_samples",
    "eval_run",
    "forward_flops",
    "load_run_config",
    "load_run_dataset",
    "make_conditions",
    "model_info",
    "parse_override",
    "read_run_config",
    "resolve_model_config",
    "sample_run",
    "save_run_config",
    "train_run",
]
