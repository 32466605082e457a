"""The ``pixeldit`` command: a thin typer layer over :mod:`pixeldit.runs`.

Subcommands: ``train``, ``sample``, ``eval``, ``info``, ``convert``, ``infer``, ``calibrate``, ``likelihood``,
``bench``, ``env``.  Each parses its arguments,
calls one library function and prints the result; errors in configs, data or checkpoints are
printed as one ``error:`` line (exit code 1).  Ctrl-C (SIGINT) or SIGTERM during training lets
the step and any save under way finish, saves a checkpoint and exits with 130 or 143 (128 plus
the signal number, as a shell reports a process killed by it, so schedulers see the job did not
finish; rerunning resumes).  More subcommands register on :data:`app`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pixeldit import cli_infer

app = typer.Typer(
    name="pixeldit",
    help="PixelDiT (pixel-space diffusion transformer) in JAX: train, sample, evaluate, convert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup(debug: bool = typer.Option(
        False, "--debug", help="Show the Python traceback of an error (also: PIXELDIT_DEBUG=1).")) -> None:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's per-open notices about read-only managers
    if debug:
        os.environ["PIXELDIT_DEBUG"] = "1"


SET_HELP = "Override a config value: section.key=value (value read as TOML), e.g. --set train.steps=200. Repeatable."


def _errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are user errors: reported as their one-line message."""
    from pixeldit.convert import ConversionError
    from pixeldit.data import DataError
    from pixeldit.runconfig import ConfigError
    from pixeldit.training import IncompatibleCheckpointError, NonFiniteLossError, WorkdirLockedError

    return (ConfigError, DataError, ConversionError, IncompatibleCheckpointError, NonFiniteLossError,
            WorkdirLockedError, ValueError, ImportError)


def _message(e: BaseException) -> str:
    """The one line printed for ``e``."""
    if isinstance(e, OSError) and e.strerror:  # e.g. a read-only workdir, a full disk, a missing file
        where = f": '{e.filename}'" if e.filename else ""
        return f"{e.strerror}{where}" + (f" -> '{e.filename2}'" if e.filename2 else "")
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    text = "; ".join(ln.strip() for ln in lines) if lines else type(e).__name__
    if not isinstance(e, _errors() + (OSError,)):
        text = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)"
    return text


def _call(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an exception becomes one ``error:`` line on stderr and exit code 1, unless
    ``--debug`` / ``PIXELDIT_DEBUG=1`` asks for the traceback."""
    try:
        return fn()
    except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
        raise
    except Exception as e:
        if os.environ.get("PIXELDIT_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"error: {_message(e)}", err=True)
        raise typer.Exit(1) from None


def _echo_json(d: Any) -> None:
    typer.echo(json.dumps(d, indent=2))


def _bad(message: str) -> Exception:
    from pixeldit.runconfig import ConfigError

    return ConfigError(message)


def _parse_rows(text: str) -> list[list[float]]:
    """``"0.5,2;0,3"`` -> ``[[0.5, 2.0], [0.0, 3.0]]``: rows of equal length of finite numbers."""
    try:
        rows = [[float(v) for v in row.split(",")] for row in text.split(";") if row.strip()]
    except ValueError:
        raise _bad(f"--theta: expected rows of comma-separated numbers separated by ';', got {text!r}") from None
    if not rows:
        raise _bad(f"--theta: expected at least one row of numbers, got {text!r}")
    if len({len(r) for r in rows}) > 1:
        raise _bad(f"--theta: every row needs the same number of values, got rows of {[len(r) for r in rows]} "
                   f"values in {text!r}")
    if not all(math.isfinite(v) for r in rows for v in r):
        raise _bad(f"--theta: values must be finite numbers, got {text!r}")
    return rows


def _parse_labels(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: whole non-negative numbers only (no silent ``1.9 -> 1``)."""
    out = []
    for v in text.split(","):
        v = v.strip()
        if not v.isdigit():
            raise _bad(f"--labels: class labels are whole numbers >= 0 separated by ',', got {v!r} in {text!r}")
        out.append(int(v))
    return out


@app.command()
def train(
    config: Optional[str] = typer.Argument(
        None, help="Built-in run config (digits, grf, grf-posterior), a .toml file, or omit to resume --workdir with its run.json."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    data: Optional[str] = typer.Option(
        None, "--data", help="Train on this data instead: an image folder (one subfolder per class, or none) or a .npz file."),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", "-w", help="Run directory (default runs/<config name>). Rerunning resumes from its latest checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train a model (resumes when WORKDIR already holds a checkpoint)."""
    from pixeldit import runs
    from pixeldit.posterior_run import is_posterior_source, train_posterior_source
    from pixeldit.runconfig import ConfigError, load_run_config
    from pixeldit.training import latest_checkpoint_step

    def go():
        if config is None and workdir is None:
            raise ConfigError("give a run config (digits, grf, grf-posterior or a .toml file) or --workdir of a run to resume")
        if workdir is not None and workdir.exists() and not workdir.is_dir():
            raise ConfigError(f"--workdir '{workdir}' is a file; give a directory (new or of a run to resume)")
        if is_posterior_source(config if config is not None else workdir):
            return train_posterior_source(config if config is not None else workdir, set_, data, workdir, typer.echo)
        run = load_run_config(config if config is not None else workdir, set_, data=data)
        wd = workdir if workdir is not None else Path("runs") / run.name
        typer.echo(f"run {run.name!r}: data {run.data.source!r}, {run.train.steps} steps, workdir {wd}")
        try:
            return runs.train_run(run, wd, progress=progress, echo=typer.echo)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            step = latest_checkpoint_step(wd)
            saved = f"checkpoint at step {step} in {wd}" if step is not None else "no checkpoint yet"
            typer.echo(f"\ninterrupted ({signal.Signals(signum).name}): {saved}; run the same command again to resume",
                       err=True)
            raise typer.Exit(128 + signum) from None

    summary = _call(go)
    if "message" in summary:  # an amortised posterior run
        return typer.echo(summary["message"])
    typer.echo(
        f"done: step {summary['step']} ({summary['steps_run']} this run) in {summary['wall_time']:.1f} s, "
        f"{summary['steps_per_sec']:.2f} steps/s, final loss {summary['final_loss']}, "
        f"{summary['num_params']:,} parameters\n"
        f"checkpoint: {summary['checkpoint_path']}\nmetrics: {Path(summary['workdir']) / 'metrics.jsonl'}"
    )


@app.command()
def sample(
    workdir: Path = typer.Argument(..., help="Run directory (or a `pixeldit convert` output) with a checkpoint."),
    num: Optional[int] = typer.Option(None, "--num", "-n", min=1, help="Number of samples."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class labels to draw, cycled: e.g. 3 or 0,1,2."),
    theta: Optional[str] = typer.Option(None, "--theta", help="Theta rows to draw, cycled: e.g. '0.5,2.0;-0.5,3.5'."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Classifier-free guidance scale (1: none)."),
    method: Optional[str] = typer.Option(None, "--method", help="euler, heun, heun_exact, flow_dpm, dpm_solver_2m, adaptive."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Solver steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw training weights instead of the EMA weights."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default WORKDIR/samples)."),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="H W (default: the training data's)."),
    condition: Optional[Path] = typer.Option(None, "--condition", help="t2i models: .npz with text-encoder tokens y (N, L, D) [and y_null]."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override \\[sample] keys: sample.key=value."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    adm_out: Optional[Path] = typer.Option(None, "--adm-out", help="Write ADM-evaluator .npz batches (uint8 NHWC) here; resumable."),
) -> None:
    """Draw samples from a checkpoint: writes samples.png (grid) and samples.npz (arrays), or ADM batches."""
    from pixeldit import runs

    def go():
        sets = list(set_)
        for key, value in (("num_samples", num), ("guidance", guidance), ("method", method), ("steps", steps),
                           ("seed", seed)):
            if value is not None:
                sets.append(f"sample.{key}={json.dumps(value)}")
        if labels is not None:
            sets.append(f"sample.labels={json.dumps(_parse_labels(labels))}")
        if theta is not None:
            sets.append(f"sample.theta={json.dumps(_parse_rows(theta))}")
        if image_size is not None:
            sets.append(f"sample.image_size={json.dumps(list(image_size))}")
        return runs.sample_run(workdir, out=out, step=step, ema=not raw, overrides=sets, condition_file=condition,
                               progress=progress, adm_out=adm_out)

    res = _call(go)
    if adm_out is not None:
        share = f" (process {res['process_index']} of {res['process_count']})" if res["process_count"] > 1 else ""
        typer.echo(f"{res['num_samples']} samples from step {res['step']}: {res['batches_drawn']} batches drawn, "
                   f"{res['batches_skipped']} already there{share}\nADM evaluator file: {res['adm_npz']}")
        return
    typer.echo(f"{res['num_samples']} samples from step {res['step']} in {res['wall_time']:.1f} s\n"
               f"grid: {res['png']}\narrays: {res['npz']}")


@app.command("eval")
def eval_(
    workdir: Path = typer.Argument(..., help="Run directory trained with `pixeldit train`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default WORKDIR/eval)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override \\[eval] / \\[sample] keys, e.g. eval.samples_per_class=20."),
    raw: bool = typer.Option(False, "--raw", help="Evaluate the raw training weights instead of the EMA weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    inception: Optional[Path] = typer.Option(None, "--inception", help="FID Inception weights (pt_inception-2015-12-05-*.pth): also report FID."),
    fid_stats: Optional[Path] = typer.Option(None, "--fid-stats", help="Cache file of the training images' FID statistics."),
) -> None:
    """Measure sample quality (digits: classifier accuracy and diversity; grf: power spectra; FID with --inception)."""
    from pixeldit import runs

    res = _call(lambda: runs.eval_run(workdir, out=out, step=step, overrides=set_, ema=not raw, progress=progress,
                                      inception=inception, fid_stats=fid_stats))
    skip = {"per_theta", "accuracy_per_class", "diversity_per_class", "plots", "checks", "sampling"}
    _echo_json({k: v for k, v in res.items() if k not in skip})
    for name, ok in res.get("checks", {}).items():
        typer.echo(f"{'PASS' if ok else 'FAIL'}  {name}")
    for name, path in res.get("plots", {}).items():
        typer.echo(f"plot {name}: {path}")
    typer.echo(f"metrics: {res['metrics_json']}")


@app.command()
def info(
    target: str = typer.Argument(..., help="A preset (B/16, L/16, XL/16, T2I-1.3B), a run config (digits, grf, .toml) or a workdir."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="H W for the FLOPs count."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size for the FLOPs count."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Compile the forward pass to count FLOPs."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Model size: parameter count, float32 bytes and FLOPs per forward (XLA cost analysis)."""
    from pixeldit import runs

    res = _call(lambda: runs.model_info(target, overrides=set_, image_size=image_size, batch=batch, flops=flops))
    if as_json:
        _echo_json(res)
        return
    cfg = {k: v for k, v in res["config"].items() if k not in ("dtype", "param_dtype", "remat", "scan_unroll")}
    typer.echo(f"{res['source']}: {res['kind']} model")
    typer.echo("  " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    typer.echo(f"parameters: {res['num_params']:,} ({res['param_bytes_float32'] / 2**20:.1f} MiB in float32)")
    h, w = res["image_size"]
    typer.echo(f"image {h}x{w}: {res['tokens']} patch tokens")
    if "flops_per_forward" in res:
        typer.echo(f"FLOPs per forward (batch {res['batch']}): {res['flops_per_forward']:.4g} "
                   f"({res['flops_per_forward'] / 1e9:.3f} GFLOPs)")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A reference checkpoint file (.safetensors/.ckpt/.pth) or a workdir."),
    dest: Path = typer.Argument(..., help="A new workdir (from a reference file) or a .safetensors file (from a workdir)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Reference architecture by preset name, e.g. XL/16."),
    kwargs: Optional[Path] = typer.Option(None, "--kwargs", help="JSON file of the reference constructor's keyword arguments."),
    kind: Optional[str] = typer.Option(None, "--kind", help="c2i (PixDiT) or t2i (PixDiT_T2I); default c2i or the JSON's 'kind'."),
    raw: bool = typer.Option(False, "--raw", help="Take the raw (non-EMA) weights."),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="Default sampling size H W (reference file only; default 256 256)."),
    step: Optional[int] = typer.Option(None, "--step", help="Workdir checkpoint step (default: latest)."),
    config: Optional[str] = typer.Option(
        None, "--config", "-c",
        help="Continue a reference training run: the run config (built-in name or .toml) it resumes under. SOURCE "
             "is then a Lightning training checkpoint (denoiser, EMA, REPA projector, global_step) and DEST a "
             "resumable workdir."),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP + " With --config only."),
    data: Optional[str] = typer.Option(None, "--data", help="With --config: train on this data source instead."),
) -> None:
    """Reference checkpoint <-> this project's checkpoint directory (direction from SOURCE)."""
    from pixeldit import convert
    from pixeldit.runconfig import ConfigError

    def go():
        if config is not None or set_ or data is not None:
            if config is None:
                raise ConfigError("--set/--data apply with --config (continuing a reference training run)")
            if preset or kwargs or kind or raw or image_size or step is not None:
                raise ConfigError("--preset/--kwargs/--kind/--raw/--image-size/--step do not apply with --config: the "
                                  "run config gives the model, the checkpoint's global_step the step")
            if source.is_dir() or not convert.is_reference_file(source):
                raise ConfigError(f"--config needs a reference training checkpoint file (.ckpt) as SOURCE, "
                                  f"got '{source}'")
            from pixeldit.reference_run import reference_run_to_workdir

            return reference_run_to_workdir(source, dest, config, set_, data=data)
        if source.is_dir():
            if preset or kwargs or kind or image_size:
                raise ConfigError("--preset/--kwargs/--kind/--image-size apply to reference files, not to a workdir source")
            return convert.workdir_to_reference_file(source, dest, step=step, ema=not raw)
        if not source.exists():
            raise FileNotFoundError(f"no such file or workdir: {source}")
        if not convert.is_reference_file(source):
            raise ConfigError(f"'{source}' is neither a workdir nor a reference checkpoint ({', '.join(convert.REFERENCE_FILE_SUFFIXES)})")
        try:
            return convert.reference_file_to_workdir(source, dest, kwargs_file=kwargs, preset_name=preset, kind=kind,
                                                     ema=not raw, image_size=image_size)
        except _errors() + (OSError,):
            raise
        except Exception as e:  # the file's reader failed: safetensors, torch.load or pickle errors
            first = (str(e).strip().splitlines() or [""])[0]
            raise convert.ConversionError(f"cannot read '{source}' as a reference checkpoint ({type(e).__name__}: "
                                          f"{first})") from e

    res = _call(go)
    if "config_name" in res:
        repa = ", REPA projector included" if res["repa"] else ""
        typer.echo(f"wrote a resumable {res['kind']} run ({res['config_name']!r}) at step {res['step']}{repa} to "
                   f"{res['workdir']}\ncontinue it with: pixeldit train --workdir {res['workdir']}")
    elif "file" in res:
        typer.echo(f"wrote {res['num_tensors']} reference-named tensors ({res['kind']}) to {res['file']}")
    else:
        typer.echo(f"wrote a {res['kind']} checkpoint from {res['num_tensors']} tensors to {res['checkpoint']}\n"
                   f"sample it with: pixeldit sample {res['workdir']}")


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a command of :mod:`pixeldit.cli_infer`) with this module's one-line error handling."""

    @functools.wraps(fn)
    def command(*args, **kwargs):
        return _call(lambda: fn(*args, **kwargs))

    return command


app.command("infer")(_guarded(cli_infer.infer))
app.command("calibrate")(_guarded(cli_infer.calibrate))


@app.command()
def likelihood(
    run: Path = typer.Argument(..., help="A theta-conditional run directory."),
    observed: Path = typer.Option(..., "--observed", "-x", help=cli_infer.OBSERVED_HELP),
    theta: str = typer.Option(..., "--theta", help="Theta rows, e.g. '0.5,2.0;-0.5,3.5'."),
    divergence: str = typer.Option("hutchinson", "--divergence", help=cli_infer.DIVERGENCE_HELP),
    probes: int = typer.Option(16, "--probes", help="Hutchinson probes (the same for every theta)."),
    probe: str = typer.Option(cli_infer.DEFAULT_PROBE, "--probe", help=cli_infer.PROBE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the probes."),
    guidance: float = typer.Option(1.0, "--guidance", help="Must be 1: a guided velocity has no density."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw training weights instead of the EMA weights."),
) -> None:
    """Learned log-likelihood log p(x | theta) of each observed field at each theta (and the exact one for grf)."""
    from pixeldit import infer_run

    rows = _parse_rows(theta)
    res = _call(lambda: infer_run.likelihood_run(run, observed, rows, step=step, ema=not raw, divergence=divergence,
                                                 probes=probes, seed=seed, guidance=guidance, probe=probe))
    typer.echo(f"log p(x | theta) in nats over {res['dim']} dimensions ({res['divergence']} divergence)")
    for i, values in enumerate(res["log_prob"]):
        for j, th in enumerate(res["theta"]):
            line = f"field {i} theta ({', '.join(f'{v:g}' for v in th)}): {values[j]:.3f}"
            if res["stderr"] is not None:
                line += f" +- {res['stderr'][i, j]:.3f}"
            line += f" ({res['bits_per_dim'][i, j]:.4f} bits/dim)"
            if res["exact"] is not None:
                line += f", exact {res['exact'][i, j]:.3f}"
            typer.echo(line)


@app.command("env")
def env_() -> None:
    """Versions, JAX backend and devices, and the runtime settings in effect (JSON)."""
    import importlib.metadata as md
    import platform

    import jax

    from pixeldit.runtime import settings

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    _echo_json({
        "python": platform.python_version(),
        **{name: version(name) for name in ("pixeldit", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        **settings(),
    })


@app.command()
def bench(
    preset: str = typer.Option("s8-64", "--preset", "-p", help="Benchmark preset: s8-64, xl16-256 or tiny."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Batch size (default: the preset's)."),
    repeats: Optional[int] = typer.Option(
        None, "--repeats", min=1,
        help="Timed repeats after warm-up (default 5, medians reported; --inference: 1, best reported)."),
    remat: Optional[str] = typer.Option(
        None, "--remat", help="Backward-pass rematerialisation: false, true or dots (default: the preset's)."),
    scan_unroll: Optional[str] = typer.Option(
        None, "--scan-unroll",
        help="Unroll of the block stacks: a positive integer, 'full' or 'auto' (default: the preset's, 'auto': "
             "fully unrolled on GPU/TPU, a loop on CPU)."),
    profile: Optional[Path] = typer.Option(
        None, "--profile", help="Also trace three train steps with jax.profiler into this folder (Perfetto trace)."),
    gemm_floor: bool = typer.Option(
        False, "--gemm-floor",
        help="Also time every matrix product of the forward and train step alone: their sum bounds the "
             "fraction of the matmul rate the program can reach."),
    inference: bool = typer.Option(
        False, "--inference",
        help="Time field inference instead: log-likelihood fields/s (Hutchinson at 32x32 and 64x64, exact at "
             "32x32), the emulator posterior per observation, or an amortised run's draws/s."),
    run: Optional[Path] = typer.Option(
        None, "--run",
        help="With --inference: a trained theta run or amortised posterior to time (default: an untrained grf-preset "
             "model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line)."),
) -> None:
    """Time forward, train step and sampler step; FLOPs from XLA; fraction of the backend's matmul rate.

    Runs with the command's host settings (see: pixeldit env); set PIXELDIT_HOST_TUNING=0 to measure without them.
    """
    from pixeldit.bench import format_result, run_benchmark

    if inference:
        return _call(lambda: cli_infer.bench_inference(run, 1 if repeats is None else repeats, as_json))
    modes = {"false": False, "true": True, "dots": "dots"}
    if remat is not None and remat.lower() not in modes:
        raise typer.BadParameter(f"--remat must be one of {sorted(modes)}, got {remat!r}")

    unroll: int | bool | str | None = None
    if scan_unroll is not None:
        choice = scan_unroll.strip().lower()
        if choice == "full":
            unroll = True
        elif choice == "auto":
            unroll = "auto"
        elif choice.isdigit() and int(choice) > 0:
            unroll = int(choice)
        else:
            raise typer.BadParameter(f"--scan-unroll must be a positive integer, 'full' or 'auto', got {scan_unroll!r}")

    def go():
        hook = None
        if gemm_floor:  # research tooling outside the library
            from pixeldit.tools import gemm_floor as floor

            hook = floor.measure
        try:
            result = run_benchmark(preset, batch_size=batch, repeats=5 if repeats is None else repeats,
                                   remat=None if remat is None else modes[remat.lower()], scan_unroll=unroll,
                                   profile_dir=None if profile is None else str(profile), program_hook=hook)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        return floor.add_bound_fractions(result) if gemm_floor else result

    result = _call(go)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        from pixeldit.tools.gemm_floor import format_lines

        typer.echo("\n".join([format_result(result), *format_lines(result)]))


def run(args: list[str] | None = None) -> int:
    """Run :data:`app` on ``args`` (default: the command line); returns the exit code.

    Usage errors (an unknown option, a value out of range) print one ``error:`` line, as the
    commands' own errors do (:func:`_call`), instead of click's usage box.
    """
    try:
        code = app(args=args, prog_name="pixeldit", standalone_mode=False)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except typer.TyperException as e:  # a usage error: unknown option, value out of range
        if os.environ.get("PIXELDIT_DEBUG", "") not in ("", "0"):
            raise
        typer.echo(f"error: {e.format_message()} (see: pixeldit --help)", err=True)
        return e.exit_code
    return code if isinstance(code, int) else 0


def main() -> None:
    """Entry point of the ``pixeldit`` command (and ``python -m pixeldit``).

    Before JAX starts: :func:`pixeldit.runtime.configure_host` (CPU XLA flags, huge pages for
    malloc; may re-execute the process once) and the persistent compilation cache (off for
    ``bench``, which measures cold compiles).  Then runs :data:`app` (:func:`run`).
    """
    import sys

    from pixeldit.runtime import configure_compilation_cache, configure_host

    configure_host()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    configure_compilation_cache(enable=command != "bench")
    sys.exit(run())


if __name__ == "__main__":
    main()
