"""The operations behind the CLI: train, sample, evaluate and describe runs.

A *workdir* holds one run: ``run.json`` (the resolved run config, :mod:`pixeldit.runconfig`),
the training checkpoints and metrics (:mod:`pixeldit.training`), ``samples/`` (grids written
during training and by :func:`sample_run`) and ``eval/`` (metrics JSON and plots of
:func:`eval_run`).  Conversion of reference checkpoints is :mod:`pixeldit.convert`.

Every function here is a plain library call (usable from a notebook); :mod:`pixeldit.cli`
only parses arguments and prints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from pixeldit.bench import forward_flops
from pixeldit.conditions import (
    ConstantLabelDataset,
    ScaledDataset,
    ThetaEncodedDataset,
    auto_data_scale,
    data_scale_of,
    dataset_meta,
    draw_samples,
    labels_for_plot,
    make_conditions,
    theta_box,
    value_range_for,
)
from pixeldit.data import load_dataset
from pixeldit.data.stream import StreamBatches, host_shard, open_stream
from pixeldit.encoders import build_encoder
from pixeldit.evaluate import benchmarks, plot_sample_grid
from pixeldit.evaluate.fid_eval import adm_export, fid_against_data
from pixeldit.fid import load_fid_inception
from pixeldit.model import count_params
from pixeldit.model_config import CONFIG_KINDS, PRESETS, config_from_dict, preset
from pixeldit.parallel import initialize_distributed, local_data_mesh
from pixeldit.runconfig import (
    RUN_FILE,
    ConfigError,
    RunConfig,
    SampleSection,
    apply_section_overrides,
    load_run_config,
    model_fields,
    parse_override,
    read_run_config,
    save_run_config,
)
from pixeldit.training import (
    RESUME_OPTIMIZER_FIELDS,
    IncompatibleCheckpointError,
    workdir_lock,
    latest_checkpoint_step,
    load_checkpoint,
    read_checkpoint_meta,
    train,
)
from pixeldit.training.loggers import MetricsLogger, open_logger

__all__ = ["eval_run", "load_run_dataset", "model_info", "resolve_model_config", "run_data_scale", "sample_run",
           "scaled_run_dataset", "train_run"]

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
EVAL_DIR = "eval"
# Model fields taken from the data; a value given in [model] must agree with it.
DATA_DERIVED_MODEL_FIELDS = ("in_channels", "num_classes", "theta_dim")


def load_run_dataset(run: RunConfig):
    """The training dataset of ``run`` (image sides checked against the model's patch size).

    Unconditional data is wrapped as one class.  Theta comes raw: the theta model encodes it
    (:func:`resolve_model_config`).
    """
    patch = run.model.get("patch_size")
    if run.data.streams:
        stream = open_stream(run.data.source, patch_size=patch, **run.data.options())
        ds = StreamBatches(stream, shard=host_shard(), workers=run.data.workers or 0)
    else:
        ds = load_dataset(run.data.source, patch_size=patch, **run.data.options())
    return ConstantLabelDataset(ds) if ds.condition == "none" else ds


def resolve_model_config(model: Mapping[str, Any], dataset):
    """The model config for ``dataset``: kind from its condition, in_channels / num_classes / theta_dim from its shape."""
    model = dict(model)
    kind = model.pop("kind", "auto")
    affine = model.pop("theta_encoding", "affine") == "affine"
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
        derived["theta_channels"] = 2 if affine else 1
    for k, v in derived.items():
        if k in model and model[k] != v:
            raise ConfigError(f"model.{k}={model[k]} but the data {dataset.name!r} has {k}={v}; drop model.{k}")
    model.update(derived)
    known = set(model_fields(kind))
    bad = sorted(set(model) - known)
    if bad:
        raise ConfigError(f"key(s) {', '.join('model.' + k for k in bad)} do not apply to a {kind} model")
    try:
        cfg = CONFIG_KINDS[kind](**model)
        return cfg.with_encoding(*theta_box(dataset)) if kind == "theta" and affine else cfg
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[model]: {e}") from e


def run_data_scale(run: RunConfig, dataset, saved_meta: Mapping[str, Any]) -> float | None:
    """The data scale a run trains with: ``data.scale`` (a number, or ``"auto"``: the one its
    checkpoint recorded, else :func:`pixeldit.conditions.auto_data_scale`); ``None`` without one."""
    spec = run.data.scale
    if spec is None:
        return None
    if spec == "auto":
        saved = dataset_meta(saved_meta).get("data_scale")
        return float(saved) if saved is not None else auto_data_scale(dataset)
    return float(spec)


def scaled_run_dataset(run: RunConfig, dataset, saved_meta: Mapping[str, Any]):
    """``dataset`` as the run trains on it: wrapped in :class:`ScaledDataset` when it has a data
    scale other than 1 (:func:`run_data_scale`; no recorded scale reads as 1)."""
    scale = run_data_scale(run, dataset, saved_meta)
    return ScaledDataset(dataset, scale) if scale is not None and scale != 1.0 else dataset


def _data_units(dataset):
    """``dataset`` without the wrappers that change its batches for the model (encoding, scale)."""
    while isinstance(dataset, (ThetaEncodedDataset, ScaledDataset)):
        dataset = dataset.dataset
    return dataset


def preview_callback(run: RunConfig, model_config, dataset, workdir: Path, echo: Callable[[str], Any] | None = None,
                     logger: MetricsLogger | None = None):
    """``cb(step, ema_model)`` writing ``workdir/samples/step_<step>.png``: EMA samples next to real data
    (also sent to ``logger``, the run's TensorBoard / W&B logger, as image ``samples``)."""
    meta = dataset.metadata()
    s = run.sample
    n = s.preview_samples
    raw = _data_units(dataset)
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
                         seed=s.seed, batch_size=s.batch_size, theta_encoding=meta.get("theta_encoding"),
                         data_scale=float(meta.get("data_scale", 1.0)))
        path = plot_sample_grid(x, workdir / SAMPLES_DIR / f"step_{step:06d}.png", real=real,
                                labels=labels_for_plot(model_config, y), real_labels=real_y, ncols=ncols,
                                value_range=value_range_for(meta, run), class_names=getattr(dataset, "class_names", None))
        if logger is not None:
            logger.image(step, "samples", path)
        if echo is not None:
            echo(f"step {step}: sample grid {path}")

    return callback


def repa_encoder(train_config, model_config):
    """The frozen encoder ``train.repa.encoder`` names (None without REPA)."""
    repa = train_config.repa
    if repa is None:
        return None
    if repa.encoder is None:
        raise ValueError('train.repa.encoder must name the encoder: "tiny" or a DINOv2 weights file (.pth / .safetensors)')
    dtype = train_config.compute_dtype or model_config.dtype
    return build_encoder(repa.encoder, dim=repa.encoder_dim, base_patch_size=model_config.patch_size, dtype=dtype)


def train_run(run: RunConfig, workdir: str | os.PathLike, *, progress: bool = True,
              echo: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train ``run`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes ``run.json``, the checkpoints and ``metrics.jsonl`` (:func:`pixeldit.training.train`), a
    preview grid every ``train.sample_every`` steps and ``summary.json``.  With ``data.scale`` the
    model trains on ``x / scale`` (:func:`run_data_scale`; recorded in the checkpoints).  Returns the summary
    (the train loop's, without per-step losses, plus ``workdir``, ``run_config``, ``num_params``).
    ``KeyboardInterrupt`` propagates after the train loop has saved a checkpoint.
    """
    workdir = Path(workdir)
    dataset = load_run_dataset(run)
    model_config = resolve_model_config(run.model, dataset)
    with workdir_lock(workdir):  # before run.json is written: a second run must not touch it
        return _train_locked(run, workdir, dataset, model_config, progress, echo)


def _train_locked(run: RunConfig, workdir: Path, dataset, model_config, progress: bool, echo) -> dict[str, Any]:
    latest = latest_checkpoint_step(workdir)
    fresh = latest is None
    if latest is not None and run.train.steps < latest:
        raise ConfigError(f"train.steps={run.train.steps} is below the step of the latest checkpoint in '{workdir}' "
                          f"({latest}); give train.steps >= {latest} to continue this run, or use a new --workdir")
    saved = {} if fresh else read_checkpoint_meta(workdir, warn=False)  # train() reports a damaged one
    if "theta_encoding" in (saved.get("dataset") or {}) and not saved["model_config"].get("theta_center"):
        # a theta run whose encoding is recorded beside the data: resume it in that layout
        dataset = ThetaEncodedDataset(dataset, saved["dataset"]["theta_encoding"])
        model_config = model_config.replace(theta_center=None, theta_scale=None)
    dataset = scaled_run_dataset(run, dataset, saved)
    if fresh:
        save_run_config(run, workdir)
    encoder = repa_encoder(run.train, model_config)
    logger = open_logger(run.train.logger, workdir, run.to_dict()) if jax.process_index() == 0 else MetricsLogger()
    callbacks = [preview_callback(run, model_config, dataset, workdir, echo, logger)] if run.train.sample_every else []
    incompatible = False
    try:
        result = train(model_config, run.train, dataset, workdir, callbacks=callbacks, progress=progress,
                       encoder=encoder, logger=logger)
    except IncompatibleCheckpointError:
        incompatible = True
        raise
    finally:
        logger.close()
        if not incompatible and not fresh:  # settings a resumed run may change (steps, optimiser, sample, eval)
            save_run_config(run, workdir, history=_resume_changes(saved, run))
    summary = {k: v for k, v in result.summary.items() if k != "losses"}
    summary.update(workdir=str(workdir), run_config=str(workdir / RUN_FILE), num_params=count_params(model_config),
                   dataset=dataset.metadata().get("name"), image_shape=list(dataset.image_shape))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _resume_changes(saved: Mapping[str, Any], run: RunConfig) -> list[dict[str, Any]]:
    """``run.json`` history entry of a resume that changed optimiser settings or steps (else none)."""
    old, new = saved.get("train_config", {}), run.train.to_dict()
    changed = {k: [old.get(k), new[k]] for k in sorted(RESUME_OPTIMIZER_FIELDS | {"steps"}) if old.get(k) != new[k]}
    if not changed:
        return []
    return [{"resumed_at_step": saved.get("step"), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed}]


def _image_shape(meta: Mapping[str, Any], sample: SampleSection, patch_size: int) -> tuple[int, int]:
    if sample.image_size is not None:
        if any(v % patch_size for v in sample.image_size):
            raise ConfigError(f"--image-size (sample.image_size) {list(sample.image_size)}: both sides must be "
                              f"multiples of the model's patch size {patch_size}")
        return tuple(int(v) for v in sample.image_size)
    shape = dataset_meta(meta).get("image_shape")
    if not shape:
        raise ConfigError("the checkpoint does not record an image size: pass --image-size H W (sample.image_size)")
    return int(shape[0]), int(shape[1])


def check_condition_options(model_config, sample: SampleSection) -> None:
    """Options that do not apply to the model's kind are errors; odd-but-valid ones a warning line
    (negative guidance, theta outside the box the model's theta encoding was fitted to)."""
    kind = model_config.kind
    if sample.theta and kind != "theta":
        raise ConfigError(f"--theta (sample.theta) applies to theta models; this is a {kind} model (use --labels)")
    if sample.labels and kind != "c2i":
        raise ConfigError(f"--labels (sample.labels) applies to class-conditional models; this is a {kind} model"
                          + (" (use --theta)" if kind == "theta" else ""))
    if sample.guidance < 0:
        log.warning("guidance %g < 0 pushes samples away from the condition (1: no guidance)", sample.guidance)
    center, scale = getattr(model_config, "theta_center", None), getattr(model_config, "theta_scale", None)
    if sample.theta and center is not None and scale is not None:
        rows = np.asarray(sample.theta, np.float64).reshape(-1, len(center))
        far = np.abs(rows - np.asarray(center)) > np.asarray(scale)
        if far.any():
            lo, hi = np.asarray(center) - np.asarray(scale), np.asarray(center) + np.asarray(scale)
            log.warning("theta %s lies outside the training box [%s, %s]: the model extrapolates there",
                        rows[far.any(axis=1)][0].tolist(), lo.tolist(), hi.tolist())


def sample_run(workdir: str | os.PathLike, *, out: str | os.PathLike | None = None, step: int | None = None,
               ema: bool = True, overrides: Sequence[str] = (), condition_file: str | os.PathLike | None = None,
               progress: bool = True, adm_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Draw samples from a workdir checkpoint (EMA weights by default).

    ``overrides`` are ``sample.key=value`` strings on top of the workdir's ``[sample]`` section.
    Writes ``<out>/samples.png`` (grid) and ``<out>/samples.npz`` (``x`` ``(N, H, W, C)``, the
    condition as ``y`` (labels) or ``theta``, and the settings as JSON in ``settings``);
    ``out`` defaults to ``workdir/samples``.  Returns the paths and settings.  With ``adm_out``
    the samples go instead to ADM-evaluator batches in that folder, one per ``sample.batch_size``
    (resumable: :func:`pixeldit.evaluate.fid_eval.adm_export`), each drawn data parallel over
    this process's devices; started on several hosts (:func:`pixeldit.parallel.initialize_distributed`)
    each process draws its share of the batches.
    """
    workdir = Path(workdir)
    if adm_out is not None:
        initialize_distributed()  # a no-op unless the environment asks for multi-host
    run = read_run_config(workdir)
    sample = apply_section_overrides(run.sample if run else SampleSection(), overrides, ("sample",))["sample"]
    ckpt = load_checkpoint(workdir, step=step, ema=ema)
    model, model_config, meta = ckpt.model, ckpt.model_config, ckpt.meta
    dmeta = dataset_meta(meta)
    check_condition_options(model_config, sample)
    if model_config.kind == "theta" and not sample.theta and dmeta.get("name") != "grf" and run is not None:
        _, data_theta = load_run_dataset(run).arrays()  # the training data's own thetas, cycled
        y = data_theta[np.arange(sample.num_samples) % len(data_theta)].astype(np.float32)
        y_null = np.full_like(y, np.nan)
    else:
        y, y_null = make_conditions(model_config, dmeta, sample.num_samples, labels=sample.labels,
                                    theta=sample.theta, seed=sample.seed, condition_file=condition_file)
    image_shape = _image_shape(meta, sample, model_config.patch_size)
    settings = dict(sample.to_dict(), step=int(meta["step"]), ema=ema, workdir=str(workdir))

    mesh = local_data_mesh() if adm_out is not None else None

    def draw(y, y_null, seed, progress=False):
        return draw_samples(model, model_config, image_shape, y, y_null, method=sample.method, steps=sample.steps,
                            guidance=sample.guidance, guidance_interval=sample.guidance_interval,
                            timeshift=sample.timeshift, seed=seed, batch_size=sample.batch_size, progress=progress,
                            time_convention=meta.get("time_convention"), theta_encoding=dmeta.get("theta_encoding"),
                            data_scale=data_scale_of(meta), mesh=mesh)

    t0 = time.perf_counter()
    if adm_out is not None:
        res = adm_export(draw, y, y_null, adm_out, batch_size=sample.batch_size, seed=sample.seed,
                         labels=model_config.kind == "c2i")
        return dict(res, num_samples=len(y), step=int(meta["step"]), wall_time=time.perf_counter() - t0,
                    settings=settings)
    x = draw(y, y_null, sample.seed, progress)
    wall = time.perf_counter() - t0
    out = Path(out) if out is not None else workdir / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x, "settings": np.asarray(json.dumps(settings))}
    if model_config.kind == "c2i":
        arrays["y"] = y
    elif model_config.kind == "theta":
        arrays["theta"] = y
    np.savez(out / "samples.npz", **arrays)
    class_names = dmeta.get("class_names")
    ncols = model_config.num_classes if model_config.kind == "c2i" and model_config.num_classes <= 12 \
        and not sample.labels else 8
    png = plot_sample_grid(x, out / "samples.png", labels=labels_for_plot(model_config, y),
                           ncols=ncols, value_range=value_range_for(dmeta, run), class_names=class_names)
    return {"png": png, "npz": str(out / "samples.npz"), "num_samples": len(x), "step": int(meta["step"]),
            "wall_time": wall, "settings": settings}


def eval_run(workdir: str | os.PathLike, *, out: str | os.PathLike | None = None, step: int | None = None,
             overrides: Sequence[str] = (), ema: bool = True, progress: bool = True,
             inception: str | os.PathLike | None = None, fid_stats: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a workdir checkpoint (EMA weights unless ``ema=False``); writes ``<out>/metrics.json`` and plots.

    ``out`` defaults to ``workdir/eval``.

    What is measured on digits, GRFs and other data: :mod:`pixeldit.evaluate.benchmarks`.

    ``overrides``: ``eval.key=value`` / ``sample.key=value`` strings.  Returns the metrics dict
    (also in the JSON), with a ``checks`` entry for the built-in benchmarks' targets.  With
    ``inception`` (the FID Inception weights file) image runs also get ``fid`` of ``eval.num_samples``
    samples against the training images, whose statistics are cached in ``fid_stats`` if given.
    """
    workdir = Path(workdir)
    run = read_run_config(workdir)
    if run is None:
        raise ConfigError(f"'{workdir}' has no {RUN_FILE}: eval needs a run trained with `pixeldit train`")
    secs = apply_section_overrides(None, overrides, ("sample", "eval"), {"sample": run.sample, "eval": run.eval})
    s, e = secs["sample"], secs["eval"]
    method, steps = e.method or s.method, e.steps or s.steps
    guidance = s.guidance if e.guidance is None else e.guidance
    batch_size = e.batch_size or s.batch_size
    ckpt = load_checkpoint(workdir, step=step, ema=ema)
    model, model_config, meta = ckpt.model, ckpt.model_config, ckpt.meta
    dmeta = dataset_meta(meta)
    out = Path(out) if out is not None else workdir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    draw = dict(method=method, steps=steps, guidance=guidance, guidance_interval=s.guidance_interval,
                timeshift=s.timeshift, seed=e.seed, batch_size=batch_size, progress=progress,
                theta_encoding=dmeta.get("theta_encoding"), data_scale=data_scale_of(meta))
    result: dict[str, Any] = {
        "workdir": str(workdir), "step": int(meta["step"]), "ema": ema, "dataset": dmeta.get("name"),
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in draw.items()
                     if k not in ("progress", "theta_encoding", "data_scale")},
        "data_scale": draw["data_scale"],
    }
    t0 = time.perf_counter()
    if dmeta.get("name") == "digits":
        result.update(benchmarks.evaluate_digits(model, model_config, dmeta, e, draw, out))
    elif dmeta.get("name") == "grf":
        result.update(benchmarks.evaluate_grf(model, model_config, dmeta, e, draw, out))
    else:
        result.update(benchmarks.evaluate_data(model, model_config, dmeta, load_run_dataset(run), run, s, e, draw, out))
    if inception is not None:
        result.update(_fid(model, model_config, dmeta, run, e, draw, inception, fid_stats))
    result["eval_wall_time"] = time.perf_counter() - t0
    result["metrics_json"] = str(out / "metrics.json")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fid(model, model_config, dmeta, run: RunConfig, e, draw: dict, inception, fid_stats) -> dict[str, Any]:
    """FID of ``e.num_samples`` samples against the run's training images (image runs only)."""
    if model_config.kind != "c2i":
        raise ConfigError(f"FID needs an image run (class-conditional or unconditional images), not a {model_config.kind} run")
    dataset = load_run_dataset(run)
    real = dataset.arrays()[0] if hasattr(dataset, "arrays") else dataset.get_batch(0, e.num_samples)["x"]
    y, y_null = make_conditions(model_config, dmeta, e.num_samples)
    x = draw_samples(model, model_config, dmeta["image_shape"][:2], y, y_null, **draw)
    fingerprint = {"dataset": dmeta, "inception": Path(inception).name}
    return fid_against_data(x, real, load_fid_inception(inception), stats_cache=fid_stats, fingerprint=fingerprint,
                            batch_size=draw["batch_size"])


def _is_workdir(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / RUN_FILE).is_file())


def model_info(target: str, *, overrides: Sequence[str] = (), image_size: tuple[int, int] | None = None,
               batch: int = 1, flops: bool = True) -> dict[str, Any]:
    """Size of a model: a preset name (``XL/16``), a run config (name / .toml) or a workdir.

    Returns ``kind``, ``config``, ``num_params``, ``param_bytes_float32``, ``image_size`` and, if
    ``flops``, ``flops_per_forward`` (batch ``batch``, XLA cost analysis).  Presets default to
    256 x 256 images; run configs and workdirs to their data's size.
    """
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
        meta = read_checkpoint_meta(path)
        cfg = config_from_dict(meta["model_config"])
        shape = dataset_meta(meta).get("image_shape")
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
