"""The ``pixeldit`` command: a thin typer layer over :mod:`pixeldit.runs`.

Subcommands: ``train``, ``sample``, ``eval``, ``info``, ``convert``, ``bench``, ``env``.  Each parses its arguments,
calls one library function and prints the result; errors in configs, data or checkpoints are
printed as one ``error:`` line (exit code 1), Ctrl-C during training exits with 130 after the
train loop has saved a checkpoint.  More subcommands register on :data:`app`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    name="pixeldit",
    help="PixelDiT (pixel-space diffusion transformer) in JAX: train, sample, evaluate, convert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's per-open notices about read-only managers


SET_HELP = "Override a config value: section.key=value (value read as TOML), e.g. --set train.steps=200. Repeatable."


def _errors() -> tuple[type[BaseException], ...]:
    """Exceptions reported as a one-line error instead of a traceback."""
    from pixeldit.convert import ConversionError
    from pixeldit.data import DataError
    from pixeldit.runconfig import ConfigError
    from pixeldit.training import IncompatibleCheckpointError, NonFiniteLossError

    return (ConfigError, DataError, ConversionError, IncompatibleCheckpointError, NonFiniteLossError,
            FileNotFoundError, ImportError)


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except _errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _echo_json(d: Any) -> None:
    typer.echo(json.dumps(d, indent=2))


def _parse_rows(text: str) -> list[list[float]]:
    """``"0.5,2;0,3"`` -> ``[[0.5, 2.0], [0.0, 3.0]]``."""
    try:
        return [[float(v) for v in row.split(",")] for row in text.split(";") if row.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected rows of comma-separated numbers separated by ';', got {text!r}") from None


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
    from pixeldit.posterior_run import is_posterior_source
    from pixeldit.runconfig import ConfigError, load_run_config
    from pixeldit.training import latest_checkpoint_step

    def go():
        if config is None and workdir is None:
            raise ConfigError("give a run config (digits, grf or a .toml file) or --workdir of a run to resume")
        if is_posterior_source(config if config is not None else workdir):
            return _train_posterior(config if config is not None else workdir, set_, data, workdir)
        run = load_run_config(config if config is not None else workdir, set_, data=data)
        wd = workdir if workdir is not None else Path("runs") / run.name
        typer.echo(f"run {run.name!r}: data {run.data.source!r}, {run.train.steps} steps, workdir {wd}")
        try:
            return runs.train_run(run, wd, progress=progress, echo=typer.echo)
        except KeyboardInterrupt:
            step = latest_checkpoint_step(wd)
            saved = f"checkpoint at step {step} in {wd}" if step is not None else "no checkpoint yet"
            typer.echo(f"\ninterrupted: {saved}; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    summary = _call(go)
    if summary is None:  # a posterior run, reported by _train_posterior
        return
    typer.echo(
        f"done: step {summary['step']} ({summary['steps_run']} this run) in {summary['wall_time']:.1f} s, "
        f"{summary['steps_per_sec']:.2f} steps/s, final loss {summary['final_loss']}, "
        f"{summary['num_params']:,} parameters\n"
        f"checkpoint: {summary['checkpoint_path']}\nmetrics: {Path(summary['workdir']) / 'metrics.jsonl'}"
    )


def _train_posterior(source: Any, set_: list[str], data: Optional[str], workdir: Optional[Path]) -> None:
    """`pixeldit train` of an amortised posterior run config (``model.kind = "posterior"``)."""
    from pixeldit.posterior_run import load_posterior_run, train_posterior_run
    from pixeldit.runconfig import ConfigError

    if data is not None:
        raise ConfigError("--data does not apply to an amortised posterior run: it simulates GRF fields on the fly")
    run = load_posterior_run(source, set_)
    wd = workdir if workdir is not None else Path("runs") / run.name
    typer.echo(f"run {run.name!r}: amortised posterior on simulated GRF fields, {run.train.steps} steps, workdir {wd}")
    try:
        s = train_posterior_run(run, wd, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: nothing saved (the posterior is saved at the end of training); "
                   "run the same command again to start over", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"done: {s['steps_done']} steps in {s['train_seconds']:.1f} s, final nll {s['final_nll']:.4f}, "
               f"flow loss {s['final_flow']:.4f}\ncheckpoint: {s['checkpoint_path']}")


@app.command()
def sample(
    workdir: Path = typer.Argument(..., help="Run directory (or a `pixeldit convert` output) with a checkpoint."),
    num: Optional[int] = typer.Option(None, "--num", "-n", help="Number of samples."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class labels to draw, cycled: e.g. 3 or 0,1,2."),
    theta: Optional[str] = typer.Option(None, "--theta", help="Theta rows to draw, cycled: e.g. '0.5,2.0;-0.5,3.5'."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", help="Classifier-free guidance scale (1: none)."),
    method: Optional[str] = typer.Option(None, "--method", help="euler, heun, heun_exact, flow_dpm, dpm_solver_2m, adaptive."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Solver steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw training weights instead of the EMA weights."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default WORKDIR/samples)."),
    image_size: Optional[tuple[int, int]] = typer.Option(None, "--image-size", help="H W (default: the training data's)."),
    condition: Optional[Path] = typer.Option(None, "--condition", help="t2i models: .npz with text-encoder tokens y (N, L, D) [and y_null]."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override [sample] keys: sample.key=value."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Draw samples from a checkpoint: writes samples.png (grid) and samples.npz (arrays)."""
    from pixeldit import runs

    sets = list(set_)
    for key, value in (("num_samples", num), ("guidance", guidance), ("method", method), ("steps", steps),
                       ("seed", seed)):
        if value is not None:
            sets.append(f"sample.{key}={json.dumps(value)}")
    if labels is not None:
        sets.append(f"sample.labels=[{labels}]")
    if theta is not None:
        sets.append(f"sample.theta={json.dumps(_parse_rows(theta))}")
    if image_size is not None:
        sets.append(f"sample.image_size={json.dumps(list(image_size))}")
    res = _call(lambda: runs.sample_run(workdir, out=out, step=step, ema=not raw, overrides=sets,
                                        condition_file=condition, progress=progress))
    typer.echo(f"{res['num_samples']} samples from step {res['step']} in {res['wall_time']:.1f} s\n"
               f"grid: {res['png']}\narrays: {res['npz']}")


@app.command("eval")
def eval_(
    workdir: Path = typer.Argument(..., help="Run directory trained with `pixeldit train`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default WORKDIR/eval)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override [eval] / [sample] keys, e.g. eval.samples_per_class=20."),
    raw: bool = typer.Option(False, "--raw", help="Evaluate the raw training weights instead of the EMA weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Measure sample quality (digits: classifier accuracy and diversity; grf: power spectra) and plot it."""
    from pixeldit import runs

    res = _call(lambda: runs.eval_run(workdir, out=out, step=step, overrides=set_, ema=not raw, progress=progress))
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
    batch: int = typer.Option(1, "--batch", help="Batch size for the FLOPs count."),
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
) -> None:
    """Reference checkpoint <-> this project's checkpoint directory (direction from SOURCE)."""
    from pixeldit import convert
    from pixeldit.runconfig import ConfigError

    def go():
        if source.is_dir():
            if preset or kwargs or kind or image_size:
                raise ConfigError("--preset/--kwargs/--kind/--image-size apply to reference files, not to a workdir source")
            return convert.workdir_to_reference_file(source, dest, step=step, ema=not raw)
        if not source.exists():
            raise FileNotFoundError(f"no such file or workdir: {source}")
        if not convert.is_reference_file(source):
            raise ConfigError(f"'{source}' is neither a workdir nor a reference checkpoint ({', '.join(convert.REFERENCE_FILE_SUFFIXES)})")
        return convert.reference_file_to_workdir(source, dest, kwargs_file=kwargs, preset_name=preset, kind=kind,
                                                 ema=not raw, image_size=image_size)

    res = _call(go)
    if "file" in res:
        typer.echo(f"wrote {res['num_tensors']} reference-named tensors ({res['kind']}) to {res['file']}")
    else:
        typer.echo(f"wrote a {res['kind']} checkpoint from {res['num_tensors']} tensors to {res['checkpoint']}\n"
                   f"sample it with: pixeldit sample {res['workdir']}")


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
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: the preset's)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed repeats after warm-up (medians are reported)."),
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
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line)."),
) -> None:
    """Time forward, train step and sampler step; FLOPs from XLA; fraction of the backend's matmul rate.

    Runs with the command's host settings (see: pixeldit env); set PIXELDIT_HOST_TUNING=0 to measure without them.
    """
    from pixeldit.bench import format_result, run_benchmark

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
            result = run_benchmark(preset, batch_size=batch, repeats=repeats,
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


def main() -> None:
    """Entry point of the ``pixeldit`` command (and ``python -m pixeldit``).

    Before JAX starts: :func:`pixeldit.runtime.configure_host` (CPU XLA flags, huge pages for
    malloc; may re-execute the process once) and the persistent compilation cache (off for
    ``bench``, which measures cold compiles).  Then runs :data:`app`.
    """
    import sys

    from pixeldit.runtime import configure_compilation_cache, configure_host

    configure_host()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    configure_compilation_cache(enable=command != "bench")
    app(prog_name="pixeldit")


if __name__ == "__main__":
    main()
