"""PixelDiT model configurations: one frozen dataclass per model kind, and the named presets.

* :class:`PixelDiTConfig` -- the fields every PixelDiT shares (and this project's dtype, remat
  and scan options),
* :class:`C2IConfig`, :class:`T2IConfig`, :class:`ThetaConfig` -- class-, token- and
  theta-conditional models (``kind`` ``"c2i"``, ``"t2i"``, ``"theta"``),
* :func:`config_from_dict` -- a config back from :meth:`PixelDiTConfig.to_dict` (checkpoints,
  ``run.json``),
* :func:`preset` -- the paper's models by name (``"B/16"``, ``"L/16"``, ``"XL/16"``, ``"T2I-1.3B"``).

Field names are the reference constructors' keyword arguments, so ``C2IConfig(**reference_kwargs)``
describes the reference model.  Every config is validated when it is built (sizes, head widths
divisible for 2D RoPE, dtypes, remat and scan modes, the theta encoding).  The networks built
from them live in :mod:`pixeldit.model`, which re-exports every name here; this module does not
import the models, so code that only reads or writes configs does not load them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from pixeldit.embedders import THETA_TOKEN_EMBEDDINGS
from pixeldit.rope import ROPE_THETA

DTYPES = ("float32", "bfloat16", "float16")
REMAT_MODES = (False, True, "dots")  # see pixeldit.model.scan_blocks
SCAN_UNROLL_AUTO = "auto"  # see pixeldit.model.resolve_scan_unroll


@dataclass(frozen=True)
class PixelDiTConfig:
    """Fields shared by every PixelDiT; defaults are the reference constructor's."""

    kind: ClassVar[str] = ""

    in_channels: int = 3  # image channels (out_channels is the same)
    num_groups: int = 16  # attention heads of the patch-level blocks
    hidden_size: int = 1152  # patch-token width D
    pixel_hidden_size: int = 64  # pixel-token width D_pix (the paper's presets use 16)
    patch_depth: int = 26  # number of patch-level blocks
    pixel_depth: int = 2  # number of PiT blocks (> 0: the pixel pathway is the model's output)
    patch_size: int = 16  # p: patch side; image sides must be multiples of it
    use_pixel_abs_pos: bool = True  # add the 2D sincos table to pixel tokens
    pit_adaln_post_modulation: bool = False  # PiT: 4-chunk post-modulation instead of 6-chunk gated
    # -- this project's options (not reference constructor arguments) --
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # parameter dtype (keep float32 master weights for training)
    remat: bool | str = "dots"  # backward pass keeps: "dots" matmul outputs, False all, True block inputs
    # lax.scan unroll of the block stacks (see pixeldit.model.scan_blocks): "auto" unrolls them fully on GPU/TPU
    # and keeps the loop on CPU; True: fully unrolled; n >= 1: n blocks per loop iteration.
    scan_unroll: int | bool | str = "auto"

    def __post_init__(self):
        for name in ("in_channels", "num_groups", "hidden_size", "pixel_hidden_size", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_depth < 1:
            raise ValueError(f"patch_depth must be >= 1, got {self.patch_depth}")
        if self.pixel_depth < 1:
            raise ValueError(f"pixel_depth must be >= 1 (the pixel pathway produces the output), got {self.pixel_depth}")
        _check_heads("hidden_size", self.hidden_size, "num_groups", self.num_groups)
        if not any(self.remat is m or (isinstance(m, str) and self.remat == m) for m in REMAT_MODES):
            raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
        u = self.scan_unroll
        if not (u == SCAN_UNROLL_AUTO or isinstance(u, bool) or (isinstance(u, int) and u >= 1)):
            raise ValueError(f"scan_unroll must be \"auto\", true, false or an integer >= 1, got {u!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "PixelDiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def pixel_attn_width(self) -> int:
        return self.hidden_size

    @property
    def pixel_heads(self) -> int:
        return self.num_groups


def _check_heads(width_name: str, width: int, heads_name: str, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{width_name}={width} must be divisible by {heads_name}={heads}")
    if (width // heads) % 4:
        raise ValueError(
            f"head_dim = {width_name} / {heads_name} = {width // heads} must be a multiple of 4 for 2D RoPE"
        )


@dataclass(frozen=True)
class C2IConfig(PixelDiTConfig):
    """Class-conditional PixelDiT (reference ``PixDiT``)."""

    kind: ClassVar[str] = "c2i"

    in_channels: int = 4
    num_groups: int = 12
    hidden_size: int = 1152
    pixel_hidden_size: int = 64
    patch_depth: int = 18
    pixel_depth: int = 4
    patch_size: int = 2
    num_classes: int = 1000  # the label table has num_classes + 1 rows; the last is the null class

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


@dataclass(frozen=True)
class T2IConfig(PixelDiTConfig):
    """Text (token) conditional PixelDiT (reference ``PixDiT_T2I``)."""

    kind: ClassVar[str] = "t2i"

    in_channels: int = 3
    num_groups: int = 16
    hidden_size: int = 1152
    pixel_hidden_size: int = 64
    patch_depth: int = 26
    pixel_depth: int = 2
    patch_size: int = 16
    pixel_attn_hidden_size: int | None = None  # PiT attention width (None: hidden_size)
    pixel_num_groups: int | None = None  # PiT attention heads (None: num_groups)
    txt_embed_dim: int = 4096  # width of the incoming text-encoder tokens
    txt_max_length: int = 1024  # longer token sequences are truncated (as in the reference)
    use_text_rope: bool = True  # 1D RoPE on text tokens in the joint attention
    text_rope_theta: float = ROPE_THETA

    def __post_init__(self):
        super().__post_init__()
        _check_heads("pixel_attn_hidden_size", self.pixel_attn_width, "pixel_num_groups", self.pixel_heads)
        if self.txt_embed_dim < 1 or self.txt_max_length < 1:
            raise ValueError(
                f"txt_embed_dim and txt_max_length must be >= 1, got {self.txt_embed_dim}, {self.txt_max_length}"
            )

    @property
    def pixel_attn_width(self) -> int:
        return self.pixel_attn_hidden_size or self.hidden_size

    @property
    def pixel_heads(self) -> int:
        return self.pixel_num_groups or self.num_groups


@dataclass(frozen=True)
class ThetaConfig(PixelDiTConfig):
    """PixelDiT conditioned on a parameter vector ``theta`` of ``theta_dim`` components.

    The token-conditional architecture of :class:`T2IConfig` (MMDiT blocks) with theta as
    ``K = theta_dim`` tokens of ``theta_channels`` features each: input ``(B, K)`` or
    ``(B, K, theta_channels)``.  Token identity comes from ``token_embedding`` ("learned",
    "sincos" or "none"); text RoPE is off by default because theta's components are unordered.
    The text fields of :class:`T2IConfig` are properties here: ``txt_embed_dim`` is
    ``theta_channels`` and ``txt_max_length`` is ``theta_dim``.

    ``theta_center`` / ``theta_scale`` (one value per component; both or neither) make the model
    encode raw theta ``(B, K)`` itself, as the pairs ``((theta - center) / scale, 1)``
    (:func:`pixeldit.embedders.encode_theta`, which says why; ``theta_channels`` must be 2).
    ``pixeldit train`` sets them from the data (the prior box or the data's range maps to
    [-1, 1]); :meth:`with_encoding` sets them from Python.

    ``theta_adaln`` adds theta to the adaLN condition too, ``c = silu(t_emb + MLP(theta))``
    (:class:`pixeldit.embedders.ThetaConditioner`, which says why), beside the joint-attention
    tokens; ``token_init_std`` is the init std of the learned token identity table.
    """

    kind: ClassVar[str] = "theta"

    in_channels: int = 1
    num_groups: int = 4
    hidden_size: int = 256
    pixel_hidden_size: int = 16
    patch_depth: int = 6
    pixel_depth: int = 2
    patch_size: int = 4
    pixel_attn_hidden_size: int | None = None  # PiT attention width (None: hidden_size)
    pixel_num_groups: int | None = None  # PiT attention heads (None: num_groups)
    use_text_rope: bool = False  # 1D RoPE over the theta tokens (off: the components are unordered)
    text_rope_theta: float = ROPE_THETA
    theta_dim: int = 2  # K: components of theta, one token each
    theta_channels: int = 1  # features per token: 1 (raw scalar) or 2 (the affine encoding)
    token_embedding: str = "learned"  # token identity: "learned", "sincos" or "none"
    theta_center: tuple[float, ...] | None = None  # affine encoding: center per component
    theta_scale: tuple[float, ...] | None = None  # affine encoding: scale per component
    token_init_std: float = 0.02  # init std of the "learned" token identity table
    theta_adaln: bool = False  # theta also into the adaLN condition (ThetaConditioner)

    def __post_init__(self):
        super().__post_init__()
        if self.theta_dim < 1 or self.theta_channels < 1:
            raise ValueError(f"theta_dim and theta_channels must be >= 1, got {self.theta_dim}, {self.theta_channels}")
        if self.token_embedding not in THETA_TOKEN_EMBEDDINGS:
            raise ValueError(f"token_embedding must be one of {THETA_TOKEN_EMBEDDINGS}, got {self.token_embedding!r}")
        _check_heads("pixel_attn_hidden_size", self.pixel_attn_width, "pixel_num_groups", self.pixel_heads)
        if not self.token_init_std >= 0:
            raise ValueError(f"token_init_std must be >= 0, got {self.token_init_std!r}")
        if (self.theta_center is None) != (self.theta_scale is None):
            raise ValueError("theta_center and theta_scale go together: give both or neither")
        if self.theta_center is not None:
            center = tuple(float(v) for v in self.theta_center)
            scale = tuple(float(v) for v in self.theta_scale)
            if len(center) != self.theta_dim or len(scale) != self.theta_dim:
                raise ValueError(f"theta_center and theta_scale need theta_dim={self.theta_dim} values each, "
                                 f"got {len(center)} and {len(scale)}")
            if not all(v > 0 for v in scale):
                raise ValueError(f"theta_scale must be > 0, got {scale}")
            if self.theta_channels != 2:
                raise ValueError(f"the affine theta encoding feeds 2 channels per token: theta_channels must be 2, "
                                 f"got {self.theta_channels}")
            object.__setattr__(self, "theta_center", center)  # JSON lists back to hashable tuples
            object.__setattr__(self, "theta_scale", scale)

    def with_encoding(self, low: Sequence[float], high: Sequence[float]) -> "ThetaConfig":
        """This config with the affine encoding that maps the box ``[low, high]`` to ``[-1, 1]``."""
        lo, hi = np.asarray(low, np.float64), np.asarray(high, np.float64)
        scale = np.where(hi > lo, (hi - lo) / 2, 1.0)
        return self.replace(theta_channels=2, theta_center=tuple(((hi + lo) / 2).tolist()), theta_scale=tuple(scale.tolist()))

    @property
    def txt_embed_dim(self) -> int:
        return self.theta_channels

    @property
    def txt_max_length(self) -> int:
        return self.theta_dim

    @property
    def pixel_attn_width(self) -> int:
        return self.pixel_attn_hidden_size or self.hidden_size

    @property
    def pixel_heads(self) -> int:
        return self.pixel_num_groups or self.num_groups


CONFIG_KINDS: dict[str, type[PixelDiTConfig]] = {"c2i": C2IConfig, "t2i": T2IConfig, "theta": ThetaConfig}


def config_from_dict(d: dict[str, Any]) -> PixelDiTConfig:
    """Rebuild a config from :meth:`to_dict` output (``kind`` selects the class)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config kind must be one of {sorted(CONFIG_KINDS)}, got {kind!r}")
    cls = CONFIG_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls)} | ({"txt_embed_dim", "txt_max_length"} if cls is ThetaConfig else set())
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    if cls is ThetaConfig:  # derived fields that older theta configs stored
        d.pop("txt_embed_dim", None)
        d.pop("txt_max_length", None)
    return cls(**d)


# Named presets from the paper (class-to-image Table: B/L/XL with patch 16 and pixel width 16;
# the 1.3B text-to-image model).  Parameter counts match the reference models exactly.
PRESETS: dict[str, Callable[[], PixelDiTConfig]] = {
    "B/16": lambda: C2IConfig(in_channels=3, hidden_size=768, num_groups=12, patch_depth=12, pixel_depth=2,
                              pixel_hidden_size=16, patch_size=16, num_classes=1000),
    "L/16": lambda: C2IConfig(in_channels=3, hidden_size=1024, num_groups=16, patch_depth=22, pixel_depth=4,
                              pixel_hidden_size=16, patch_size=16, num_classes=1000),
    "XL/16": lambda: C2IConfig(in_channels=3, hidden_size=1152, num_groups=16, patch_depth=26, pixel_depth=4,
                               pixel_hidden_size=16, patch_size=16, num_classes=1000),
    "T2I-1.3B": lambda: T2IConfig(in_channels=3, hidden_size=1536, num_groups=24, patch_depth=14, pixel_depth=2,
                                  pixel_hidden_size=16, pixel_attn_hidden_size=1152, pixel_num_groups=16,
                                  txt_embed_dim=2304, txt_max_length=300, patch_size=16),
}


def preset(name: str, **overrides) -> PixelDiTConfig:
    """A named preset (``"B/16"``, ``"L/16"``, ``"XL/16"``, ``"T2I-1.3B"``), optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
