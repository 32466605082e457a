"""Reference (PyTorch) weights <-> this project's models.

The key map is one rule set, :func:`reference_entries`, that walks the model's ``nnx.Param``
tree and names the reference ``state_dict`` entry of each parameter:

====================================  ==========================================================
this project (nnx path)               reference key / layout change
====================================  ==========================================================
``.../kernel``                        ``.../weight``, transposed (Flax ``(in, out)``; torch ``(out, in)``)
``.../bias``, RMSNorm ``.../weight``  same name, same layout
``mlp.layers.0``, ``adaLN_modulation.layers.0``  ``mlp.0``, ``adaLN_modulation.0`` (``nn.Sequential`` index)
``y_embedder.embedding_table.embedding``         ``y_embedder.embedding_table.weight``
``patch_blocks.<param>[i]`` (stacked)            ``patch_blocks.<i>.<param>`` (one key per block)
``s_embedder.proj.kernel``            input features permuted: pixel-major ``(i*p+j)*C + c`` here,
                                      channel-major ``c*p*p + i*p + j`` in the reference (``F.unfold``)
====================================  ==========================================================

Every reference key must be consumed and every parameter filled: anything missing, unexpected
or wrongly shaped raises :class:`ConversionError` listing the offending keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.model import build_model
from pixeldit.model_config import C2IConfig, T2IConfig, preset
from pixeldit.repa import REPAProjector, load_projector, projector_to_reference, split_projector_keys
from pixeldit.sampling import REFERENCE_T2I_TIME
from pixeldit.training.checkpoint import load_checkpoint, save_model_checkpoint
from pixeldit.training.config import TrainConfig
from pixeldit.training.optim import make_optimizer
from pixeldit.training.state import TrainState, create_train_state, ema_model, train_model

# Reference constructor arguments that do not change the network's function or weights.
IGNORED_REFERENCE_KWARGS = {
    "t2i": {"num_text_blocks", "repa_encoder_index"},  # unused text blocks; REPA feature tap
    "c2i": set(),
}
CONFIG_CLASSES = {"c2i": C2IConfig, "t2i": T2IConfig}
# state_dict prefixes that are not model weights (REPA projectors, trainer state)
NON_MODEL_PREFIXES = ("diffusion_trainer.", "_repa_projector.", "repa_projector.")
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "core.")  # torch.compile, DDP, the t2i pickle


class ConversionError(ValueError):
    """A reference state dict does not match the model: lists missing, unexpected and misshaped keys."""


# ---------------------------------------------------------------------------------------------
# The key map
# ---------------------------------------------------------------------------------------------


def _reference_name(path: tuple) -> tuple[str, bool]:
    """nnx path -> (reference dotted name, is a transposed linear kernel)."""
    parts: list[str] = []
    transpose = False
    for i, k in enumerate(path):
        if k == "layers" and i + 1 < len(path) and isinstance(path[i + 1], int):
            continue  # nnx.Sequential's list attribute: the reference indexes the Sequential directly
        if k == "kernel" and i == len(path) - 1:
            parts.append("weight")
            transpose = True
        elif k == "embedding" and i == len(path) - 1:
            parts.append("weight")
        else:
            parts.append(str(k))
    return ".".join(parts), transpose


def _patch_perm(config) -> np.ndarray:
    """Index map: our pixel-major feature ``(i*p+j)*C + c`` -> the reference's channel-major ``c*p*p + i*p + j``."""
    p2, c = config.patch_size**2, config.in_channels
    ours = np.arange(p2 * c).reshape(p2, c)  # our feature index of (pixel, channel)
    perm = np.empty(p2 * c, dtype=np.int64)
    for q in range(p2):
        for ch in range(c):
            perm[ours[q, ch]] = ch * p2 + q
    return perm


def reference_entries(model) -> Iterator[tuple[str, tuple, int | None, bool]]:
    """Yield ``(reference_key, nnx_path, block_index_or_None, transposed)`` for every parameter.

    Works for whole models and for single submodules (a block, an attention layer...): only a
    model (an object with a ``config``) has stacked ``patch_blocks`` / ``pixel_blocks``.
    """
    config = getattr(model, "config", None)
    stacked_roots = {} if config is None else {"patch_blocks": config.patch_depth, "pixel_blocks": config.pixel_depth}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = _reference_name(path)
        root = path[0]
        if root in stacked_roots:
            rest = name[len(root) + 1 :]
            for i in range(stacked_roots[root]):
                yield f"{root}.{i}.{rest}", path, i, transpose
        else:
            yield name, path, None, transpose


def _to_reference_layout(value: np.ndarray, transpose: bool, key: str, model) -> np.ndarray:
    if transpose:
        value = np.swapaxes(value, -1, -2)
    if key == "s_embedder.proj.weight" and hasattr(model, "config"):
        inv = np.argsort(_patch_perm(model.config))
        value = value[:, inv]
    return value


def _from_reference_layout(value: np.ndarray, transpose: bool, key: str, model) -> np.ndarray:
    if key == "s_embedder.proj.weight" and hasattr(model, "config"):
        value = value[:, _patch_perm(model.config)]
    if transpose:
        value = np.swapaxes(value, -1, -2)
    return value


def to_reference_state_dict(model) -> dict[str, np.ndarray]:
    """Export the model's weights as a reference-named float32 ``state_dict`` (numpy arrays)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, path, idx, transpose in reference_entries(model):
        value = np.asarray(params[path][...], dtype=np.float32)
        if idx is not None:
            value = value[idx]
        out[key] = np.ascontiguousarray(_to_reference_layout(value, transpose, key, model))
    return out


def load_reference_state_dict(model, state_dict: Mapping[str, Any]) -> None:
    """Fill the parameters of ``model`` (a whole model or one submodule) in place from a reference-named ``state_dict``.

    Raises :class:`ConversionError` naming every missing, unexpected or misshaped key;
    nothing is loaded unless everything matches.
    """
    sd = {k: _as_numpy(v) for k, v in state_dict.items()}
    entries = list(reference_entries(model))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    expected = {}
    for key, path, idx, transpose in entries:
        shape = tuple(params[path].shape[1:] if idx is not None else params[path].shape)
        if transpose:
            shape = shape[:-2] + shape[:-3:-1]
        expected[key] = shape
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise ConversionError("reference state dict does not match the model:\n  " + "\n  ".join(lines))
    new = {path: np.array(params[path][...], dtype=np.float32) for path in params}
    for key, path, idx, transpose in entries:
        value = _from_reference_layout(sd[key], transpose, key, model)  # sd is float32 already
        if idx is None:
            new[path] = value
        else:
            new[path][idx] = value
    for path, variable in params.items():
        variable.set_value(jnp.asarray(new[path], dtype=variable.get_value().dtype))


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v, dtype=np.float32)  # no copy when already float32


# ---------------------------------------------------------------------------------------------
# Building models from reference arguments
# ---------------------------------------------------------------------------------------------


def config_from_reference(kind: str, reference_kwargs: Mapping[str, Any], **options):
    """The config equivalent to ``PixDiT(**kwargs)`` (``kind="c2i"``) or ``PixDiT_T2I(**kwargs)`` (``"t2i"``).

    ``options`` sets this project's own fields (``dtype``, ``param_dtype``, ``remat``).
    """
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"kind must be 'c2i' or 't2i', got {kind!r}")
    cls = CONFIG_CLASSES[kind]
    kwargs = {k: v for k, v in reference_kwargs.items() if k not in IGNORED_REFERENCE_KWARGS[kind]}
    allowed = {f for f in cls.__dataclass_fields__} - {"dtype", "param_dtype", "remat"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown reference {kind} constructor arguments: {unknown}; known: {sorted(allowed)}")
    return cls(**kwargs, **options)


def from_reference(kind: str, reference_kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], **options):
    """Build the model equivalent to the reference's and load its ``state_dict``.

    ``kind``: ``"c2i"`` (``PixDiT``) or ``"t2i"`` (``PixDiT_T2I``); ``reference_kwargs``: the
    reference constructor's keyword arguments; ``state_dict``: reference key -> array (numpy or
    torch).  The result is called ``model(x, t, y)`` with channel-last ``x`` ``(B, H, W, C)``,
    ``t`` ``(B,)`` and ``y`` labels ``(B,)`` (c2i) or text embeddings ``(B, L, txt_dim)`` (t2i).
    """
    config = config_from_reference(kind, reference_kwargs, **options)
    model = build_model(config, rngs=nnx.Rngs(0))
    load_reference_state_dict(model, state_dict)
    return model


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading pickled PyTorch checkpoints (.ckpt / .pth / .pt) needs torch: "
            "pip install 'pixeldit[torch]' (CPU build: pip install torch==2.13.0), "
            "or convert the file to .safetensors"
        ) from e
    return torch


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def extract_model_state_dict(raw: Mapping[str, Any], *, ema: bool = True) -> dict[str, Any]:
    """The model weights out of a checkpoint's state dict.

    Lightning checkpoints carry ``denoiser.`` (raw) and ``ema_denoiser.`` (EMA, the evaluated
    weights) prefixes: ``ema`` picks which.  ``_orig_mod.``, ``module.`` and ``core.`` wrappers are
    stripped; REPA projector / trainer keys are dropped.
    """
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    keys = [_strip_wrappers(k) for k in raw]
    has_ema = any(k.startswith("ema_denoiser.") for k in keys)
    has_raw = any(k.startswith("denoiser.") for k in keys)
    if ema and not has_ema and has_raw:
        raise ConversionError("ema=True but the checkpoint has no 'ema_denoiser.' weights; pass ema=False")
    want = "ema_denoiser." if (ema and has_ema) else ("denoiser." if has_raw else "")
    out = {}
    for k, v in raw.items():
        k = _strip_wrappers(k)
        if k.startswith(NON_MODEL_PREFIXES):
            continue
        if want:
            if not k.startswith(want):
                continue
            k = _strip_wrappers(k[len(want) :])
        elif k.startswith(("ema_denoiser.", "denoiser.")):
            continue
        out[k] = v
    if not out:
        raise ConversionError("no model weights found in the checkpoint")
    return out


def read_checkpoint_file(path: str | os.PathLike, *, ema: bool = True) -> dict[str, np.ndarray]:
    """Read reference weights from ``.safetensors``, a Lightning ``.ckpt`` or a ``.pth``/``.pt`` file."""
    sd = extract_model_state_dict(read_raw_checkpoint(path), ema=ema)
    return {k: _as_numpy(v) for k, v in sd.items()}


def read_raw_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """A checkpoint file's contents as stored: a Lightning / torch pickle's dict (``state_dict``,
    ``global_step``...) or a ``.safetensors`` file's tensors (as float32 numpy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # noqa: PLC0415

        raw = {}
        with safe_open(str(path), framework="flax") as f:
            for k in f.keys():
                raw[k] = np.asarray(jnp.asarray(f.get_tensor(k), dtype=jnp.float32))
    elif path.suffix in (".ckpt", ".pth", ".pt", ".bin"):
        torch = _torch()
        raw = torch.load(str(path), map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"unsupported checkpoint type {path.suffix!r} ({path}); expected .safetensors, .ckpt, .pth or .pt")
    if not isinstance(raw, Mapping):
        raise ConversionError(f"'{path}' holds a {type(raw).__name__}, not a dict of tensors "
                              "(a state dict or a checkpoint)")
    return raw


def from_reference_file(kind: str, reference_kwargs: Mapping[str, Any], path, *, ema: bool = True, **options):
    """:func:`from_reference` on the weights of a checkpoint file (see :func:`read_checkpoint_file`)."""
    return from_reference(kind, reference_kwargs, read_checkpoint_file(path, ema=ema), **options)


def save_reference_safetensors(model, path: str | os.PathLike) -> Path:
    """Write the model's weights, reference-named, to a ``.safetensors`` file (written atomically)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(to_reference_state_dict(model), str(tmp))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Reference files <-> run directories (behind `pixeldit convert`)
# ---------------------------------------------------------------------------------------------

REFERENCE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


def is_reference_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a reference checkpoint file (by its suffix)."""
    return Path(path).suffix.lower() in REFERENCE_FILE_SUFFIXES


def _read_reference_kwargs(kwargs_file: str | os.PathLike) -> tuple[str | None, dict]:
    path = Path(kwargs_file)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read reference kwargs '{path}': {e}") from e
    if not isinstance(d, dict):
        raise ConversionError(f"'{path}' must hold a JSON object of reference constructor arguments")
    kind = d.pop("kind", None)
    return kind, d


def reference_file_to_workdir(checkpoint_file: str | os.PathLike, workdir: str | os.PathLike, *,
                           kwargs_file: str | os.PathLike | None = None, preset_name: str | None = None,
                           kind: str | None = None, ema: bool = True,
                           image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Reference checkpoint file (.safetensors / .ckpt / .pth) -> a workdir checkpoint.

    The architecture comes from ``preset_name`` (``"XL/16"``...) or from ``kwargs_file`` (JSON of
    the reference constructor's keyword arguments, optionally with ``"kind": "c2i" | "t2i"``;
    ``kind`` overrides it, default ``c2i``).  ``ema`` picks the EMA weights of Lightning
    checkpoints.  t2i checkpoints are marked with the reference time convention so that
    :func:`pixeldit.runs.sample_run` wraps them in :class:`pixeldit.sampling.ReferenceT2ITime`.
    ``image_size`` (H, W) is recorded as the default sampling size (default 256 x 256).
    """
    if (kwargs_file is None) == (preset_name is None):
        raise ConversionError("give exactly one of a reference kwargs JSON file (--kwargs) or a preset (--preset)")
    if preset_name is not None:
        try:
            cfg = preset(preset_name)
        except ValueError as e:
            raise ConversionError(str(e)) from e
        if kind is not None and kind != cfg.kind:
            raise ConversionError(f"preset {preset_name} is a {cfg.kind} model, not {kind}")
    else:
        file_kind, kwargs = _read_reference_kwargs(kwargs_file)
        kind = kind or file_kind or "c2i"
        try:
            cfg = config_from_reference(kind, kwargs)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"reference kwargs '{kwargs_file}': {e}") from e
    state_dict = read_checkpoint_file(checkpoint_file, ema=ema)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    load_reference_state_dict(model, state_dict)
    size = tuple(int(v) for v in image_size) if image_size else (256, 256)
    extra = {"source": {"reference_file": str(Path(checkpoint_file).resolve()), "ema": ema}}
    if cfg.kind == "t2i":
        extra["time_convention"] = REFERENCE_T2I_TIME
    try:
        path = save_model_checkpoint(model, workdir, image_shape=(*size, cfg.in_channels), extra_meta=extra)
    except FileExistsError as e:
        raise ConversionError(str(e)) from e
    return {"checkpoint": str(path), "workdir": str(workdir), "kind": cfg.kind, "num_tensors": len(state_dict),
            "config": cfg.to_dict()}


def workdir_to_reference_file(workdir: str | os.PathLike, out_file: str | os.PathLike, *, step: int | None = None,
                         ema: bool = True) -> dict[str, Any]:
    """A workdir checkpoint (EMA weights by default) -> reference-named ``.safetensors``."""
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConversionError(f"the output file must end in .safetensors, got '{out_file}'")
    ckpt = load_checkpoint(workdir, step=step, ema=ema)
    model, model_config = ckpt.model, ckpt.model_config
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_reference_safetensors(model, out_file)
    return {"file": str(out_file), "kind": model_config.kind, "num_tensors": len(to_reference_state_dict(model))}


# ---------------------------------------------------------------------------------------------
# Reference training checkpoints <-> train states (continue a reference run, REPA projector included)
# ---------------------------------------------------------------------------------------------


def _load_model(model_config, state_dict: Mapping[str, Any], seed: int):
    model = build_model(model_config, rngs=nnx.Rngs(seed))
    load_reference_state_dict(model, state_dict)
    return model


def reference_train_state(raw: Mapping[str, Any], model_config, train_config: TrainConfig) -> TrainState:
    """A :class:`~pixeldit.training.TrainState` holding a reference training checkpoint's weights.

    ``raw`` is the checkpoint's state dict (or the Lightning file's dict with ``state_dict``):
    ``denoiser.*`` become the parameters, ``ema_denoiser.*`` the EMA (the parameters when
    absent), and the REPA projector (``diffusion_trainer.proj.0.*`` or ``_repa_projector.*``)
    ``state.repa``; it must be there exactly when ``train_config.repa`` is set, in its style.  The
    AdamW moments start at zero (the reference's torch optimiser state is not read); the step is
    the Lightning ``global_step`` when present.
    """
    inner = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    has_ema = any(_strip_wrappers(k).startswith("ema_denoiser.") for k in inner)
    seed = train_config.seed
    model = _load_model(model_config, extract_model_state_dict(raw, ema=False), seed)
    state = create_train_state(model_config, train_config, model=model)
    if has_ema:
        ema = _load_model(model_config, extract_model_state_dict(raw, ema=True), seed)
        state = state.replace(flat_ema=state.layout.flatten(nnx.state(ema, nnx.Param)))
    weights, _, style = split_projector_keys({_strip_wrappers(k): _as_numpy(v) for k, v in inner.items()})
    repa = train_config.repa
    if (repa is None) != (style is None):
        raise ConversionError(
            f"the checkpoint {'has no' if style is None else 'has a'} REPA projector but train_config.repa is "
            f"{'set' if repa is not None else 'None'}"
        )
    if repa is not None:
        if style != repa.style:
            raise ConversionError(f"the checkpoint's REPA projector is {style}-style, train_config.repa.style is {repa.style}")
        projector = REPAProjector.for_model(repa, model_config.hidden_size, rngs=nnx.Rngs(0))
        try:
            load_projector(projector, weights)
        except ValueError as e:
            raise ConversionError(f"REPA projector: {e}") from e
        params = nnx.state(projector, nnx.Param)
        state = state.replace(repa={"params": params, "opt_state": make_optimizer(train_config).init(params)})
    step = raw.get("global_step") if isinstance(raw.get("global_step"), int) else 0
    return state.replace(step=jnp.asarray(step, jnp.int32))


def train_state_to_reference(state: TrainState, style: str = "c2i") -> dict[str, np.ndarray]:
    """A train state as a reference state dict that :func:`reference_train_state` reads back.

    ``style="c2i"``: the Lightning layout (``denoiser.*``, ``ema_denoiser.*`` and a REPA projector
    as ``diffusion_trainer.proj.0.*``); ``"t2i"``: the model's keys and ``_repa_projector.*``.
    """
    if style not in ("c2i", "t2i"):
        raise ValueError(f"style must be 'c2i' or 't2i', got {style!r}")
    model = train_model(state)
    projector = {}
    if state.repa is not None:
        kernels = [v for path, v in nnx.to_flat_state(state.repa["params"]) if path[-1] == "kernel"]  # layers 0, 2, 4
        (model_dim, hidden), encoder_dim = kernels[0].shape, kernels[-1].shape[1]
        module = REPAProjector(model_dim, hidden, encoder_dim, rngs=nnx.Rngs(0))
        nnx.update(module, state.repa["params"])
        projector = projector_to_reference(module, style)
    if style == "t2i":
        return {**to_reference_state_dict(model), **projector}
    out = {f"denoiser.{k}": v for k, v in to_reference_state_dict(model).items()}
    out.update({f"ema_denoiser.{k}": v for k, v in to_reference_state_dict(ema_model(state)).items()})
    return {**out, **projector}
