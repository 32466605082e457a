"""The FID Inception-v3 (pytorch-fid's ``InceptionV3``, the TF 2015-12-05 graph) in Flax NNX.

Returns the 2048-wide pool3 features FID is defined on.  Layer names are torchvision's
(``Conv2d_1a_3x3``, ``Mixed_5b`` ... ``Mixed_7c``, each conv a ``BasicConv2d`` of ``conv`` + ``bn``),
so :func:`load_fid_inception` reads ``pt_inception-2015-12-05-6726825d.pth`` (the file pytorch-fid
downloads; the user supplies it here) key for key.  The FID variant differs from torchvision's
Inception in its average pools (``count_include_pad=False``) and in ``Mixed_7c``'s max pool.
Images are channels-last ``(B, H, W, 3)`` in [0, 1], resized bilinearly to 299 x 299 as
pytorch-fid does, then scaled to [-1, 1].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixeldit.resample import resize
from pixeldit.torchfile import assign, check_consumed, read_state_dict, take

BN_EPS = 1e-3  # torchvision BasicConv2d's BatchNorm2d eps
INPUT_SIZE = 299
FEATURES = 2048


class BasicConv2d(nnx.Module):
    """Conv (no bias) + inference batch norm + ReLU; ``padding="SAME"`` only where torch pads (k-1)/2."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, pad: bool = True):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if pad else ((0, 0), (0, 0))
        self.kernel = nnx.Param(jnp.zeros((kh, kw, c_in, c_out)))  # HWIO; filled by the loader
        self.scale = nnx.Param(jnp.ones((c_out,)))  # bn.weight
        self.bias = nnx.Param(jnp.zeros((c_out,)))  # bn.bias
        self.mean = nnx.Param(jnp.zeros((c_out,)))  # bn.running_mean
        self.var = nnx.Param(jnp.ones((c_out,)))  # bn.running_var

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = (y - self.mean[...]) * (self.scale[...] / jnp.sqrt(self.var[...] + BN_EPS)) + self.bias[...]
        return jax.nn.relu(y)


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3 x 3 max pool (``F.max_pool2d``; padding counts as -inf)."""
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3 x 3, stride 1, padding 1 average with ``count_include_pad=False`` (border windows average fewer)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


def _cat(*xs: jax.Array) -> jax.Array:
    return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):  # FIDInceptionA
    def __init__(self, c_in: int, pool_features: int):
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return _cat(self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionB(nnx.Module):  # torchvision InceptionB (Mixed_6a)
    def __init__(self, c_in: int):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2, pad=False)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, pad=False)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return _cat(self.branch3x3(x), b3, max_pool(x, stride=2))


class InceptionC(nnx.Module):  # FIDInceptionC
    def __init__(self, c_in: int, c7: int):
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return _cat(self.branch1x1(x), b7, d, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionD(nnx.Module):  # torchvision InceptionD (Mixed_7a)
    def __init__(self, c_in: int):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, pad=False)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, pad=False)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat(b3, b7, max_pool(x, stride=2))


class InceptionE(nnx.Module):  # FIDInceptionE_1 (average pool) / FIDInceptionE_2 (max pool)
    def __init__(self, c_in: int, max_pool_branch: bool):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = _cat(self.branch3x3_2a(b3), self.branch3x3_2b(b3))
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = _cat(self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d))
        pooled = max_pool(x, stride=1, pad=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return _cat(self.branch1x1(x), b3, d, self.branch_pool(pooled))


class FIDInceptionV3(nnx.Module):
    """Images ``(B, H, W, 3)`` in [0, 1] -> pool3 features ``(B, 2048)`` (pytorch-fid block 3)."""

    def __init__(self, resize_input: bool = True):
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, pad=False)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, pad=False)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, pad=False)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FID Inception expects images (B, H, W, 3) in [0, 1], got shape {images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize(x, (INPUT_SIZE, INPUT_SIZE), "bilinear")
        x = 2.0 * x - 1.0  # (B, 299, 299, 3) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, stride=2)  # (B, 73, 73, 64)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)  # (B, 35, 35, 192)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)  # ... -> (B, 8, 8, 2048)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1 x 1


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------



def load_torch_state_dict(model: FIDInceptionV3, state_dict: dict[str, np.ndarray]) -> None:
    """Fill ``model`` from pytorch-fid's weights; every conv / bn key is used and shape-checked.

    The 1008-way classifier (``fc.*``) and ``num_batches_tracked`` counters are not used for FID.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    for path, conv in nnx.iter_graph(model):
        if not isinstance(conv, BasicConv2d):
            continue
        key = ".".join(str(p) for p in path)
        kh, kw, c_in, c_out = conv.kernel.shape
        assign(conv.kernel, take(sd, f"{key}.conv.weight", (c_out, c_in, kh, kw)).transpose(2, 3, 1, 0))  # OIHW -> HWIO
        for name, attr in (("weight", conv.scale), ("bias", conv.bias), ("running_mean", conv.mean), ("running_var", conv.var)):
            assign(attr, take(sd, f"{key}.bn.{name}", (c_out,)))
    check_consumed(sd, "FID Inception state dict")


def load_fid_inception(path: str | os.PathLike, *, resize_input: bool = True) -> FIDInceptionV3:
    """The FID Inception with the weights of ``path`` (``pt_inception-2015-12-05-6726825d.pth``)."""
    model = FIDInceptionV3(resize_input=resize_input)
    load_torch_state_dict(model, read_state_dict(path))
    return model
