"""PixelDiT models: the three conditional variants, built from the configs of :mod:`pixeldit.model_config`.

* :class:`PixelDiT` -- class-conditional (reference ``PixDiT``, ``pixeldit_c2i.py``),
* :class:`PixelDiTT2I` -- token-conditional (reference ``PixDiT_T2I``, ``pixeldit_t2i.py``),
* :class:`PixelDiTTheta` -- conditioned on a parameter vector ``theta`` (field emulators).

Each is built from one frozen config dataclass whose field names are the reference
constructor's keyword arguments, so ``C2IConfig(**reference_kwargs)`` is the reference model.
The model returns the velocity ``v(x_t, t, y)`` in the reference class-to-image time convention
(t = 0 noise, t = 1 data); it knows nothing of losses or samplers.  The configs and presets
live in :mod:`pixeldit.model_config`; this module re-exports them, so
``from pixeldit.model import C2IConfig, preset`` works as well.

Two levels (top-level forward):
  patch level: ``x`` -> ``p x p`` patch tokens ``(B, L, D)`` -> adaLN DiT / MMDiT blocks
  pixel level: ``x`` -> pixel tokens ``(B, L, p*p, D_pix)`` -> PiT blocks conditioned per pixel on
  the patch tokens -> ``FinalLayer`` -> ``(B, H, W, C)``.

Blocks of each level are stacked on a leading depth axis (``nnx.vmap`` at construction) and
run with ``jax.lax.scan``, so compile time does not grow with depth; ``remat`` (``True`` or
``"dots"``) wraps each block in ``jax.checkpoint``.  Deliberate deviation: the reference keeps
per-block modules (``patch_blocks.0``, ``patch_blocks.1``...); :mod:`pixeldit.convert` stacks /
unstacks them.

Initialisation, every rule in one table (the reference's ``initialize_weights`` and torch's
defaults; each rule is applied where the module is built, named in the last column):

=============================================  =============================================  ==============================
parameter                                      rule                                           set by
=============================================  =============================================  ==============================
every ``Linear`` not named below (attention    kernel ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``   ``modules.linear``
qkv/proj, MLPs, pixel embedder, theta proj)    (torch's default), bias zero                   (``torch_default_kernel_init``)
``s_embedder.proj``, t2i ``y_embedder.proj``   ``xavier_uniform`` kernel, bias zero           ``embedders.PatchTokenEmbedder``
``t_embedder.mlp`` (both linears)              ``normal(std=0.02)`` kernel, bias zero         ``modules.TimestepConditioner``
``y_embedder.embedding_table`` (c2i)           ``normal(std=0.02)``                           ``embedders.ClassEmbedder``
``adaLN_modulation*`` (DiT, MMDiT, PiT)        zero kernel and bias (adaLN-Zero) in the c2i   ``blocks._adaln``, switched by
                                               and theta models; torch default in t2i,        ``_zero_init_adaln`` of each
                                               whose reference zeroes only the final layer    model class
``final_layer.linear``                         zero kernel and bias                           ``modules.FinalLayer``
RMSNorm ``weight``                             ones                                           ``modules.RMSNorm``
``y_pos_embedding`` (t2i)                      ``normal(std=1)`` (``torch.randn``)            :class:`PixelDiTT2I`
theta ``null_token``                           ``normal(std=0.02)``                           ``embedders.ThetaEmbedder``
theta ``pos_embedding``                        ``normal(std=token_init_std)`` (0.02 unless    ``embedders.ThetaEmbedder``
                                               set); ``"sincos"``: a fixed table
theta ``theta_adaln.mlp`` (``theta_adaln``)    torch default kernel, bias zero (as every      ``embedders.ThetaConditioner``
                                               ``Linear`` above)
=============================================  =============================================  ==============================

With zero adaLN and final layers a fresh c2i or theta model outputs exactly zero.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.blocks import DiTBlock, MMDiTBlock, PiTBlock
from pixeldit.embedders import (
    ClassEmbedder,
    PatchTokenEmbedder,
    PixelTokenEmbedder,
    ThetaConditioner,
    ThetaEmbedder,
    encode_theta,
    unpatchify,
    patchify,
)
from pixeldit.model_config import (  # re-exported: the configs are importable from here too
    CONFIG_KINDS,
    DTYPES,
    PRESETS,
    REMAT_MODES,
    SCAN_UNROLL_AUTO,
    C2IConfig,
    PixelDiTConfig,
    T2IConfig,
    ThetaConfig,
    config_from_dict,
    preset,
)
from pixeldit.modules import FinalLayer, TimestepConditioner
from pixeldit.rope import rope_1d_angles, rope_2d_angles

MLP_RATIO = 4.0  # the reference hard-codes mlp_ratio=4 for every block


# ---------------------------------------------------------------------------------------------
# Stacked blocks
# ---------------------------------------------------------------------------------------------


def _stacked(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """``depth`` independently initialised blocks whose parameters share a leading depth axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    return create(rngs)


def resolve_scan_unroll(unroll: int | bool | str) -> int | bool:
    """The ``lax.scan`` unroll for a config's ``scan_unroll`` on the default backend.

    ``"auto"`` is ``True`` (every block inlined) on GPU/TPU and ``1`` (a loop) on CPU.  Measured
    (docs/benchmark-log.md): on an H200 the unrolled ``xl16-256`` train step is 16-17 % faster
    (the loop's residual stacks and weight slices are gone) for about twice the compile time;
    on the 2-core CPU the step time is the same and the compile time doubles.
    """
    if unroll == SCAN_UNROLL_AUTO:
        return 1 if jax.default_backend() == "cpu" else True
    return unroll


def scan_blocks(blocks: nnx.Module, carry, step: Callable, *, remat: bool | str = False,
                unroll: int | bool | str = 1, part: slice = slice(None)):
    """Run stacked ``blocks`` in sequence: ``carry = step(block_i, carry)`` via ``jax.lax.scan``.

    ``remat`` chooses what the backward pass keeps of each block's forward: ``False`` every
    intermediate; ``"dots"`` only matrix-multiply outputs (elementwise work such as norms,
    modulation and activations is recomputed inside the backward's fused kernels: less memory
    traffic, same FLOPs of matrix multiplies); ``True`` only the block input (the whole block is
    recomputed: least memory, one more forward of FLOPs).  All three give the same gradients.
    ``part`` runs only those blocks of the stack (``slice(0, k)`` then ``slice(k, None)``: the
    tokens after block ``k`` without collecting every block's output).
    """
    graphdef, state = nnx.split(blocks)
    state = jax.tree.map(lambda a: a[part], state)

    def body(c, block_state):
        return step(nnx.merge(graphdef, block_state), c), None

    if remat == "dots":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
    elif remat is True:
        body = jax.checkpoint(body, prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state, unroll=resolve_scan_unroll(unroll))
    return carry


def matmul_precision(dtype: str) -> str | None:
    """The matmul precision a model with compute ``dtype`` traces under: ``"highest"`` for float32.

    The reference computes float32 matmuls in full float32 (PyTorch's default
    ``allow_tf32=False``), while JAX's default precision lets a GPU/TPU run them in TF32/bf16
    passes: on an H200 that moved the golden parity errors from below 1e-5 to about 1e-2.  So
    a float32 model traces its products at ``"highest"`` (no change on CPU, where float32 is
    always exact).  bfloat16 models keep JAX's default.  A precision you set yourself
    (``jax.default_matmul_precision(...)`` or ``jax_default_matmul_precision``) wins, e.g.
    ``"tensorfloat32"`` to trade float32 exactness for speed on a GPU.
    """
    if dtype != "float32" or jax.config.jax_default_matmul_precision is not None:
        return None
    return "highest"


def _at_matmul_precision(call: Callable) -> Callable:
    """Run a model's ``__call__`` under :func:`matmul_precision` of its config's dtype."""

    @functools.wraps(call)
    def wrapped(self, *args, **kwargs):
        precision = matmul_precision(self.config.dtype)
        if precision is None:
            return call(self, *args, **kwargs)
        with jax.default_matmul_precision(precision):
            return call(self, *args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class _PixelDiTBase(nnx.Module):
    """The shared pixel-level pathway and input checks."""

    config: PixelDiTConfig

    def _init_pixel_pathway(self, cfg: PixelDiTConfig, rngs: nnx.Rngs, kw: dict) -> None:
        self.pixel_embedder = PixelTokenEmbedder(
            cfg.in_channels, cfg.pixel_hidden_size, use_pixel_abs_pos=cfg.use_pixel_abs_pos, rngs=rngs, **kw
        )
        self.pixel_blocks = _stacked(
            lambda r: PiTBlock(
                cfg.pixel_hidden_size,
                cfg.hidden_size,
                cfg.patch_size,
                cfg.pixel_heads,
                MLP_RATIO,
                cfg.pixel_attn_width,
                adaln_post_modulation=cfg.pit_adaln_post_modulation,
                zero_init_adaln=self._zero_init_adaln,
                rngs=r,
                **kw,
            ),
            cfg.pixel_depth,
            rngs,
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels, rngs=rngs, **kw)

    def _pixel_level(self, x: jax.Array, s: jax.Array) -> jax.Array:
        """Pixel pathway: image ``x`` ``(B, H, W, C)`` and patch condition ``s`` ``(B, L, D)`` -> velocity."""
        cfg = self.config
        _, h, w, _ = x.shape
        p = cfg.patch_size
        rope = rope_2d_angles(cfg.pixel_attn_width // cfg.pixel_heads, h // p, w // p)
        pix = self.pixel_embedder(x, p)  # (B, L, p*p, D_pix)
        pix = scan_blocks(self.pixel_blocks, pix, lambda blk, z: blk(z, s, rope), remat=cfg.remat, unroll=cfg.scan_unroll)
        out = self.final_layer(pix)  # (B, L, p*p, C)
        return unpatchify(out, h, w, p).astype(jnp.float32)  # (B, H, W, C)

    def _patch_level(self, carry, step: Callable, tokens_after: int | None):
        """``(carry, image tokens after block tokens_after or None)``: the patch blocks in one or two scans."""
        cfg, blocks = self.config, self.patch_blocks
        run = functools.partial(scan_blocks, blocks, step=step, remat=cfg.remat, unroll=cfg.scan_unroll)
        if tokens_after is None:
            return run(carry), None
        if not 1 <= tokens_after <= cfg.patch_depth:
            raise ValueError(f"tokens_after counts patch blocks 1..{cfg.patch_depth}, got {tokens_after}")
        carry = run(carry, part=slice(0, tokens_after))
        tokens = carry[0] if isinstance(carry, tuple) else carry  # (B, L, D); MMDiT carries text tokens too
        return run(carry, part=slice(tokens_after, None)), tokens

    @staticmethod
    def _output(v: jax.Array, tokens, tokens_after: int | None):
        """``v``, or ``(v, tokens)`` when the tokens after a patch block were asked for (REPA)."""
        return v if tokens_after is None else (v, tokens)

    def _check_xt(self, x, t) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"x must be (B, H, W, C) channel-last, got shape {getattr(x, 'shape', type(x))}")
        b, h, w, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"x has {c} channels (last axis of shape {x.shape}); this model expects in_channels={cfg.in_channels}"
                " (inputs are channel-last (B, H, W, C))"
            )
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"image sides (H, W) = ({h}, {w}) must be multiples of patch_size={cfg.patch_size}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({b},), got {t.shape}")
        return x.astype(jnp.dtype(cfg.dtype)), t.astype(jnp.float32)

    def _dtypes(self, cfg: PixelDiTConfig) -> dict:
        return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class PixelDiT(_PixelDiTBase):
    """Class-conditional PixelDiT (reference ``PixDiT``): ``model(x, t, y) -> v``.

    ``x`` ``(B, H, W, C)``, ``t`` ``(B,)`` in [0, 1] (0 noise, 1 data), ``y`` int labels ``(B,)``
    in ``[0, num_classes]`` where ``num_classes`` is the null class.  Returns ``(B, H, W, C)`` float32;
    with ``tokens_after=k`` also the patch tokens ``(B, L, D)`` after block ``k`` (REPA), as ``(v, tokens)``.
    """

    _zero_init_adaln = True  # reference initialize_weights zeroes every adaLN projection

    def __init__(self, config: C2IConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        kw = self._dtypes(cfg)
        self.s_embedder = PatchTokenEmbedder(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size, rngs=rngs, **kw)
        self.t_embedder = TimestepConditioner(cfg.hidden_size, rngs=rngs, **kw)
        self.y_embedder = ClassEmbedder(cfg.num_classes + 1, cfg.hidden_size, rngs=rngs, **kw)
        self.patch_blocks = _stacked(
            lambda r: DiTBlock(cfg.hidden_size, cfg.num_groups, MLP_RATIO, zero_init_adaln=self._zero_init_adaln, rngs=r, **kw),
            cfg.patch_depth,
            rngs,
        )
        self._init_pixel_pathway(cfg, rngs, kw)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def null_condition(self, y: jax.Array) -> jax.Array:
        """The null condition for classifier-free guidance, shaped like ``y``: the null class index."""
        return jnp.full_like(jnp.asarray(y), self.config.num_classes)

    @_at_matmul_precision
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array | None = None, *,
                 tokens_after: int | None = None):
        cfg = self.config
        if mask is not None:
            raise ValueError("the class-conditional model takes no mask (mask is for padded text tokens)")
        x, t = self._check_xt(x, t)
        b, h, w, _ = x.shape
        y = jnp.asarray(y)
        if y.shape != (b,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y must be integer class labels of shape (B,) = ({b},), got {y.shape} {y.dtype}")
        p = cfg.patch_size
        rope = rope_2d_angles(cfg.hidden_size // cfg.num_groups, h // p, w // p)  # (L, hd/2)
        t_emb = self.t_embedder(t)[:, None]  # (B, 1, D)
        c = jax.nn.silu(t_emb + self.y_embedder(y)[:, None])  # (B, 1, D)
        patches = patchify(x, p).reshape(b, -1, p * p * cfg.in_channels)  # (B, L, p*p*C), pixel-major
        s = self.s_embedder(patches)  # (B, L, D)
        s, tokens = self._patch_level(s, lambda blk, z: blk(z, c, rope), tokens_after)
        s = jax.nn.silu(t_emb + s)  # (B, L, D) per-patch condition of the pixel level
        return self._output(self._pixel_level(x, s), tokens, tokens_after)


class PixelDiTT2I(_PixelDiTBase):
    """Token-conditional PixelDiT (reference ``PixDiT_T2I``): ``model(x, t, y, mask=None) -> v``.

    ``y`` ``(B, L_txt, txt_embed_dim)`` text-encoder tokens (truncated to ``txt_max_length``);
    ``mask`` ``(B, L_txt)`` optional, 1 for real tokens, 0 for padding: it masks padded text
    keys in the joint attention only (the reference passes it on to the pixel blocks too, where
    it cannot apply; its trainer never uses a mask).  Time convention as the c2i model; the
    released reference checkpoints were trained with ``t_in = sigma * 1000``, see
    :mod:`pixeldit.sampling` for the adapter.
    """

    _zero_init_adaln = False  # the reference t2i initialize_weights only zeroes the final layer

    def __init__(self, config: T2IConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        kw = self._dtypes(cfg)
        self.s_embedder = PatchTokenEmbedder(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size, rngs=rngs, **kw)
        self.t_embedder = TimestepConditioner(cfg.hidden_size, rngs=rngs, **kw)
        self._init_condition_embedder(cfg, rngs, kw)
        self.patch_blocks = _stacked(
            lambda r: MMDiTBlock(
                cfg.hidden_size, cfg.num_groups, MLP_RATIO, zero_init_adaln=self._zero_init_adaln, rngs=r, **kw
            ),
            cfg.patch_depth,
            rngs,
        )
        self._init_pixel_pathway(cfg, rngs, kw)

    def _init_condition_embedder(self, cfg: T2IConfig, rngs: nnx.Rngs, kw: dict) -> None:
        self.y_embedder = PatchTokenEmbedder(cfg.txt_embed_dim, cfg.hidden_size, norm=True, rngs=rngs, **kw)
        # reference: nn.Parameter(torch.randn(1, txt_max_length, hidden_size))
        self.y_pos_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, cfg.txt_max_length, cfg.hidden_size), kw["param_dtype"])
        )

    def _global_condition(self, y: jax.Array) -> jax.Array | None:
        """A condition added to the timestep embedding of adaLN; the reference t2i has none."""
        return None

    def _embed_condition(self, y: jax.Array) -> jax.Array:
        n = y.shape[1]
        return self.y_embedder(y) + self.y_pos_embedding[:, :n].astype(jnp.dtype(self.config.dtype))

    def _check_condition(self, y: jax.Array, b: int) -> jax.Array:
        cfg = self.config
        y = jnp.asarray(y)
        if y.ndim != 3 or y.shape[0] != b or y.shape[2] != cfg.txt_embed_dim:
            raise ValueError(
                f"y must be text tokens of shape (B, L, txt_embed_dim) = ({b}, L, {cfg.txt_embed_dim}), got {y.shape}"
            )
        return y[:, : cfg.txt_max_length].astype(jnp.dtype(cfg.dtype))

    def null_condition(self, y: jax.Array) -> jax.Array:
        """Default null condition: all-zero tokens shaped like ``y`` (pass an encoded empty prompt instead where you have one)."""
        return jnp.zeros_like(jnp.asarray(y))

    @_at_matmul_precision
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array | None = None, *,
                 tokens_after: int | None = None):
        cfg = self.config
        x, t = self._check_xt(x, t)
        b, h, w, _ = x.shape
        y = self._check_condition(y, b)
        n_txt = y.shape[1]
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] < n_txt:
                raise ValueError(f"mask must be (B, L_txt) = ({b}, {n_txt}), got {mask.shape}")
            mask = mask[:, :n_txt].astype(bool)
        p = cfg.patch_size
        head_dim = cfg.hidden_size // cfg.num_groups
        rope = rope_2d_angles(head_dim, h // p, w // p)  # (L, hd/2)
        rope_txt = rope_1d_angles(head_dim, n_txt, cfg.text_rope_theta) if cfg.use_text_rope else None
        t_emb = self.t_embedder(t)[:, None]  # (B, 1, D)
        g = self._global_condition(y)  # (B, 1, D) or None: t2i's tokens enter through joint attention only
        c = jax.nn.silu(t_emb if g is None else t_emb + g)  # (B, 1, D)
        y_tok = self._embed_condition(y)  # (B, L_txt, D)
        patches = patchify(x, p).reshape(b, -1, p * p * cfg.in_channels)  # (B, L, p*p*C)
        s = self.s_embedder(patches)  # (B, L, D)
        (s, _), tokens = self._patch_level(
            (s, y_tok), lambda blk, carry: blk(carry[0], carry[1], c, rope, rope_txt, mask), tokens_after
        )
        s = jax.nn.silu(t_emb + s)  # (B, L, D)
        return self._output(self._pixel_level(x, s), tokens, tokens_after)


class PixelDiTTheta(PixelDiTT2I):
    """PixelDiT conditioned on a parameter vector: ``model(x, t, theta) -> v``.

    ``theta`` ``(B, K)`` or ``(B, K, theta_channels)`` (raw ``(B, K)`` is encoded first when the
    config carries an encoding, see :class:`ThetaConfig`); NaN entries mark the null condition
    used for classifier-free guidance (see :meth:`null_condition`).  adaLN projections are
    zero-initialised as in the class-conditional model.
    """

    _zero_init_adaln = True

    def _init_condition_embedder(self, cfg: ThetaConfig, rngs: nnx.Rngs, kw: dict) -> None:
        self.y_embedder = ThetaEmbedder(
            cfg.theta_dim, cfg.theta_channels, cfg.hidden_size, token_embedding=cfg.token_embedding,
            table_init_std=cfg.token_init_std, rngs=rngs, **kw
        )
        self.theta_adaln = ThetaConditioner(cfg.theta_dim, cfg.hidden_size, rngs=rngs, **kw) if cfg.theta_adaln else None

    def _global_condition(self, y: jax.Array) -> jax.Array | None:
        return None if self.theta_adaln is None else self.theta_adaln(y)

    def _embed_condition(self, y: jax.Array) -> jax.Array:
        return self.y_embedder(y)

    def _check_condition(self, y: jax.Array, b: int) -> jax.Array:
        cfg = self.config
        y = jnp.asarray(y)
        if cfg.theta_center is not None and y.shape == (b, cfg.theta_dim):  # raw theta: the config's encoding
            y = encode_theta(y.astype(jnp.float32), cfg.theta_center, cfg.theta_scale)  # (B, K, 2)
        elif y.ndim == 2 and cfg.theta_channels == 1:
            y = y[..., None]
        if y.shape != (b, cfg.theta_dim, cfg.theta_channels):
            raise ValueError(
                f"theta must have shape (B, K) or (B, K, C) = ({b}, {cfg.theta_dim}, {cfg.theta_channels}), got {y.shape}"
            )
        return y.astype(jnp.dtype(cfg.dtype))

    def null_condition(self, y: jax.Array) -> jax.Array:
        """The null condition: NaN-filled, shaped like ``theta``; mapped to a learned null token."""
        return jnp.full(jnp.shape(y), jnp.nan, dtype=jnp.float32)


MODEL_CLASSES = {"c2i": PixelDiT, "t2i": PixelDiTT2I, "theta": PixelDiTTheta}


def build_model(config: PixelDiTConfig, *, rngs: nnx.Rngs) -> _PixelDiTBase:
    """Construct the model class that matches ``config.kind``."""
    return MODEL_CLASSES[config.kind](config, rngs=rngs)


def abstract_model(config: PixelDiTConfig) -> _PixelDiTBase:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes without allocating memory."""
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))


def count_params(model_or_config) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves); a config is counted without allocating."""
    model = abstract_model(model_or_config) if isinstance(model_or_config, PixelDiTConfig) else model_or_config
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))
