"""The run-config schema: TOML run configs, their sections, overrides and ``run.json``.

A *run config* is a TOML file with five sections (built-in ones ship in ``pixeldit/configs``)::

    [model]   kind ("auto", "c2i" or "theta") and PixelDiT config fields; in_channels,
              num_classes and theta_dim come from the data; theta models also take
              theta_encoding ("affine" or "none", see :class:`pixeldit.model_config.ThetaConfig`)
    [train]   pixeldit.training.TrainConfig fields
    [data]    source ("digits", "grf", a .npz file, an image folder, the reference's images.h5
              folder or ImageNet parquet shards) and its options; streaming = true reads
              the data lazily (pixeldit.data.stream); scale = "auto" or a number trains on
              x / scale (samples come back in data units)
    [sample]  sampling settings (also the preview grids written during training)
    [eval]    evaluation settings (unset sampling keys fall back to [sample])

Unknown keys are errors that name the key and list the known ones.  Overrides are
``"section.key=value"`` strings whose value is read as TOML (``train.lr=3e-4``,
``sample.labels=[1, 7]``) or else taken as a plain string (``data.source=my_images/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pixeldit.model_config import CONFIG_KINDS
from pixeldit.sampling import METHODS
from pixeldit.training import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
RUN_FILE = "run.json"  # the resolved run config of a workdir
SECTIONS = ("model", "train", "data", "sample", "eval")
MODEL_KINDS = ("auto", "c2i", "theta")  # trainable from data; t2i models come from `convert` only
THETA_ENCODINGS = ("affine", "none")
RUN_MODEL_KEYS = ("kind", "theta_encoding")  # [model] keys of the run, not of the model config
# [model] sizes checked before the data is read (the data loader takes patch_size)
POSITIVE_MODEL_INTS = ("in_channels", "num_groups", "hidden_size", "pixel_hidden_size", "patch_size", "patch_depth",
                       "pixel_depth", "num_classes", "theta_dim", "pixel_attn_hidden_size", "pixel_num_groups")

__all__ = [
    "ConfigError",
    "DataSection",
    "EvalSection",
    "RUN_FILE",
    "RunConfig",
    "SampleSection",
    "apply_section_overrides",
    "build_run_config",
    "builtin_configs",
    "load_run_config",
    "model_fields",
    "parse_override",
    "read_run_config",
    "save_run_config",
]


class ConfigError(ValueError):
    """An invalid run config, override or command-line setting; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _type_ok(value: Any, kind: str) -> bool:
    if "|" in kind:
        return any(_type_ok(value, k) for k in kind.split("|"))
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


def _positive_int(v: Any) -> bool:
    return _type_ok(v, "int") and v >= 1


def _finite_number(v: Any) -> bool:
    return _type_ok(v, "float") and math.isfinite(v)


def _check_positive(section: str, obj: Any, names: Sequence[str]) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and not _positive_int(v):
            raise ConfigError(f"{section}.{name} must be a whole number >= 1, got {v!r}")


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
                if not math.isfinite(v):
                    raise ConfigError(f"{self._name}.{f.name} must be a finite number, got {v!r}")
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
STREAM_OPTIONS = ("streaming", "resolution", "flip", "on_corrupt", "workers")  # pixeldit.data.stream
DATA_SOURCE_OPTIONS = {
    "digits": ("resolution", "upsample"),
    "grf": ("size", "prior_low", "prior_high"),
    "npz": ("normalize", "streaming", "workers"),
    "folder": ("channels",) + STREAM_OPTIONS,
    "stream": ("channels",) + STREAM_OPTIONS,  # images.h5 folders and parquet: read lazily only
}


@dataclass(frozen=True)
class DataSection(_Section):
    """``[data]``: where the training images come from (see :func:`pixeldit.data.load_dataset`)."""

    _name = "data"
    _types = {
        "source": "str", "seed": "int", "resolution": "int", "upsample": "str", "size": "int",
        "prior_low": "list", "prior_high": "list", "normalize": "str", "channels": "int",
        "streaming": "bool", "flip": "bool", "on_corrupt": "str", "workers": "int", "scale": "float|str",
    }

    source: str = "digits"  # "digits", "grf", a .npz file or an image folder
    seed: int = 0  # seed of the data stream (batch order, GRF draws)
    resolution: int | None = None  # digits: image side (16; 32 also works); streamed images: ADM centre crop
    upsample: str | None = None  # digits: "bilinear" or "nearest"
    size: int | None = None  # grf: grid side N
    prior_low: tuple | None = None  # grf: lower bounds of (log_amplitude, slope)
    prior_high: tuple | None = None  # grf: upper bounds
    normalize: str | None = None  # npz: "none", "uint8" or "minmax"
    channels: int | None = None  # image folder: 1 or 3
    streaming: bool | None = None  # read lazily with grain (always for images.h5 folders and parquet)
    flip: bool | None = None  # streaming: random horizontal flip (the reference's c2i recipe: none)
    on_corrupt: str | None = None  # streaming: "stop" (default) or "skip" unreadable images
    workers: int | None = None  # streaming: decoding processes (default 0: threads only)
    # The model trains on x / scale and samples come back times scale (recorded in the checkpoint):
    # a number, or "auto" for the data's global std (pixeldit.conditions.auto_data_scale); none: 1.
    scale: float | str | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scale, str) and self.scale != "auto":
            raise ConfigError(f"data.scale must be \"auto\" or a number > 0, got {self.scale!r}")
        if isinstance(self.scale, (int, float)):
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ConfigError(f"data.scale must be \"auto\" or a number > 0, got {self.scale!r}")
            object.__setattr__(self, "scale", float(self.scale))
        kind = self.source_kind
        allowed = DATA_SOURCE_OPTIONS[kind]
        bad = [k for opts in DATA_SOURCE_OPTIONS.values() for k in opts if k not in allowed and getattr(self, k) is not None]
        if bad:
            raise ConfigError(
                f"data.{', data.'.join(bad)} do(es) not apply to data source {self.source!r} ({kind}); "
                f"its options are: {', '.join(('seed',) + allowed)}"
            )
        _check_positive("data", self, ("resolution", "size"))
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels!r}")
        for name in ("prior_low", "prior_high"):
            v = getattr(self, name)
            if v is not None and not (len(v) == 2 and all(_finite_number(x) for x in v)):
                raise ConfigError(f"data.{name} must be two finite numbers [log_amplitude, slope], got {list(v)!r}")
        if kind == "stream" and self.streaming is False:
            raise ConfigError(f"data source {self.source!r} is read by streaming only; drop data.streaming = false")
        stream_only = [k for k in STREAM_OPTIONS[1:] if k in allowed and getattr(self, k) is not None]
        if kind in ("folder", "npz") and stream_only and not self.streaming:
            raise ConfigError(f"data.{', data.'.join(stream_only)} need(s) data.streaming = true")

    @property
    def source_kind(self) -> str:
        if self.source in ("digits", "grf"):
            return self.source
        path = Path(self.source)
        if path.suffix.lower() == ".parquet" or (path / "images.h5").is_file() or (
            path.is_dir() and any(path.glob("*.parquet"))
        ):
            return "stream"
        return "npz" if self.source.lower().endswith(".npz") else "folder"

    @property
    def streams(self) -> bool:
        """Whether the data is read lazily (:mod:`pixeldit.data.stream`)."""
        return self.source_kind == "stream" or bool(self.streaming)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`pixeldit.data.load_dataset`, or for
        :func:`pixeldit.data.stream.open_stream` when :attr:`streams` (``workers`` excluded)."""
        keys = ("seed",) + DATA_SOURCE_OPTIONS[self.source_kind]
        skip = ("streaming", "workers")
        return {k: _thaw(getattr(self, k)) for k in keys if k not in skip and getattr(self, k) is not None}


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
        if self.method not in METHODS:
            raise ConfigError(f"sample.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_samples", "steps", "batch_size", "preview_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.guidance_interval) != 2:
            raise ConfigError(f"sample.guidance_interval must be [lo, hi], got {list(self.guidance_interval)}")
        if self.image_size is not None and not (len(self.image_size) == 2 and all(map(_positive_int, self.image_size))):
            raise ConfigError(f"sample.image_size must be [H, W] of whole numbers >= 1, got {list(self.image_size)}")
        lo, hi = self.guidance_interval
        if not (_finite_number(lo) and _finite_number(hi) and 0 <= lo <= hi <= 1):
            raise ConfigError(f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {[lo, hi]}")
        if self.timeshift <= 0:
            raise ConfigError(f"sample.timeshift must be a number > 0 (1: no shift), got {self.timeshift}")
        if bad := [v for v in self.labels if not (_type_ok(v, "int") and v >= 0)]:
            raise ConfigError(f"sample.labels must be class indices (whole numbers >= 0), got {bad[0]!r}")
        rows = [r if isinstance(r, (list, tuple)) else (r,) for r in self.theta]
        if any(isinstance(r, (list, tuple)) for r in self.theta) and len({len(r) for r in rows}) > 1:
            raise ConfigError(f"sample.theta rows must all have the same length, got lengths {[len(r) for r in rows]}")
        if not all(_finite_number(v) for r in rows for v in r):
            raise ConfigError(f"sample.theta must hold finite numbers, got {_thaw(self.theta)!r}")


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

    def __post_init__(self):
        super().__post_init__()
        _check_positive("eval", self, ("samples_per_class", "samples_per_theta", "n_sim", "num_samples", "steps",
                                       "batch_size"))
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"eval.method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: ``model`` (a dict, resolved against the data), ``train``, ``data``, ``sample``, ``eval``."""

    name: str
    model: dict
    train: TrainConfig
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
    parts = lhs.strip().split(".", 1)  # section.table.key reaches a table such as [train.repa]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the name must be section.key with a section of {', '.join(SECTIONS)}")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section [{section}]; sections: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
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
        raw.pop("history", None)  # run.json: settings changed on resume, not part of the config
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
    for f in dataclasses.fields(TrainConfig):
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(f.default))
        if f.name in train_raw and kind and not _type_ok(train_raw[f.name], kind):
            raise ConfigError(f"train.{f.name} must be of type {kind}, got {train_raw[f.name]!r}")
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


def model_fields(kind: str) -> list[str]:
    """The config fields of a model of ``kind`` (``"c2i"``, ``"t2i"``, ``"theta"``)."""
    return [f.name for f in dataclasses.fields(CONFIG_KINDS[kind])]


def _check_model_keys(model: Mapping[str, Any]) -> None:
    kind = model.get("kind", "auto")
    if kind not in MODEL_KINDS:
        hint = ("an amortised posterior run: `pixeldit train` trains it, pixeldit.posterior_training loads it"
                if kind == "posterior" else "text-to-image models are not trained from the CLI; convert reference checkpoints instead")
        raise ConfigError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r} ({hint})")
    fields = set(model_fields("c2i")) | set(model_fields("theta")) if kind == "auto" else set(model_fields(kind))
    known = sorted(set(RUN_MODEL_KEYS) | fields)
    bad = sorted(set(model) - set(known))
    if bad:
        raise ConfigError(f"unknown key(s) in [model]: {', '.join(bad)}; known keys: {', '.join(known)}")
    for k in POSITIVE_MODEL_INTS:
        if k in model and model[k] is not None and not _positive_int(model[k]):
            raise ConfigError(f"model.{k} must be a whole number >= 1, got {model[k]!r}")
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
        table, _, leaf = key.rpartition(".")  # "repa.encoder": key encoder of the table [train.repa]
        (raw[section].setdefault(table, {}) if table else raw[section])[leaf] = value
    return build_run_config(name, raw)


def save_run_config(run: RunConfig, workdir: str | os.PathLike, history: Sequence[Mapping] = ()) -> Path:
    """Write ``workdir/run.json`` (the resolved run config), atomically, keeping its ``history``
    (settings changed on resume: :func:`pixeldit.runs.train_run`) with ``history`` appended."""
    path = Path(workdir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    history = (json.loads(path.read_text()).get("history", []) if path.is_file() else []) + list(history)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(run.to_dict() | ({"history": history} if history else {}), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_run_config(workdir: str | os.PathLike) -> RunConfig | None:
    """The run config stored in ``workdir`` (None if it has no ``run.json``)."""
    path = Path(workdir) / RUN_FILE
    if not path.is_file():
        return None
    name, raw = _read_raw(path)
    return build_run_config(name, raw)


def apply_section_overrides(section_obj, overrides: Sequence[str], allowed: Sequence[str], others=None):
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
