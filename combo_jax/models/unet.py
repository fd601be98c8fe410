"""A Flax NNX U-Net for 2D and 3D segmentation, channels-last.

Input ``(B, *spatial, C_in)``, output logits ``(B, *spatial, K)`` in float32 whatever the compute dtype.
Each level is two (conv 3, norm, activation) blocks; down-sampling is a stride-2 max-pool, up-sampling a
transposed convolution with kernel = stride = 2 written as one matmul per voxel plus a reshape (see
:class:`PatchUpsample`), then concatenation with the skip connection. Parameters are float32; ``dtype``
sets the compute dtype (``jnp.bfloat16`` for mixed precision). Every spatial size must be divisible by
``2 ** (len(features) - 1)``; :func:`pad_to_multiple` pads inputs that are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class PatchUpsample(nnx.Module):
    """Transposed convolution whose kernel equals its stride (2 per axis), as a matmul plus a reshape.

    With kernel = stride the output patches do not overlap: each input voxel produces its own
    ``2^d`` output voxels, ``y[2i + a] = x[i] @ W[1 - a] + b`` (flax's kernel orientation). That is one ``(C_in, 2^d C_out)`` matmul per voxel
    and a reshape that interleaves the patches. It computes exactly what ``nnx.ConvTranspose(kernel_size=2,
    strides=2, padding="VALID")`` computes with the same kernel and bias (tested), while XLA's general transposed
    convolution for this case is tens of times slower on GPU.
    """

    def __init__(self, in_features: int, out_features: int, spatial_dims: int, *, dtype=None, rngs: nnx.Rngs):
        self.spatial_dims = spatial_dims
        self.out_features = out_features
        self.dtype = dtype
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        # kernel[a_1, ..., a_d, c_in, c_out], as nnx.ConvTranspose stores it.
        shape = (2,) * spatial_dims + (in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.spatial_dims
        dtype = self.dtype or x.dtype
        # nnx.ConvTranspose (lax.conv_transpose, transpose_kernel=False) maps y[2i + a] = x[i] @ W[1 - a]:
        # flip the spatial axes so the two modules share parameters.
        kernel = jnp.asarray(self.kernel[...], dtype)[(slice(None, None, -1),) * d]
        c_in, c_out = kernel.shape[-2:]
        # (a_1..a_d, c_in, c_out) -> (c_in, a_1..a_d, c_out) -> (c_in, 2^d c_out)
        w = jnp.moveaxis(kernel, d, 0).reshape(c_in, -1)
        y = jnp.asarray(x, dtype) @ w  # (B, *spatial, 2^d * c_out)
        batch, spatial = y.shape[0], y.shape[1 : 1 + d]
        y = y.reshape(batch, *spatial, *(2,) * d, c_out)
        # (B, s_1..s_d, a_1..a_d, C) -> (B, s_1, a_1, ..., s_d, a_d, C) -> (B, 2 s_1, ..., 2 s_d, C)
        order = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)] + [1 + 2 * d]
        y = y.transpose(order).reshape(batch, *(2 * s for s in spatial), c_out)
        return y + jnp.asarray(self.bias[...], dtype)


def _norm(kind: str, features: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "instance":
        # Instance norm: one group per channel, statistics over the spatial axes of each sample.
        return nnx.GroupNorm(features, num_groups=features, epsilon=1e-5, dtype=dtype, rngs=rngs)
    if kind == "group":
        return nnx.GroupNorm(features, num_groups=min(8, features), epsilon=1e-5, dtype=dtype, rngs=rngs)
    raise ValueError(f"UNet: unknown norm {kind!r}; expected 'instance' or 'group'")


class ConvBlock(nnx.Module):
    """Two (conv 3, norm, leaky ReLU) layers."""

    def __init__(self, in_features, out_features, spatial_dims, *, norm, dtype, rngs: nnx.Rngs):
        kernel = (3,) * spatial_dims
        self.conv1 = nnx.Conv(in_features, out_features, kernel, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = _norm(norm, out_features, dtype, rngs)
        self.conv2 = nnx.Conv(out_features, out_features, kernel, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(norm, out_features, dtype, rngs)

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return jax.nn.leaky_relu(self.norm2(self.conv2(x)), 0.01)


class UNet(nnx.Module):
    """U-Net with ``len(features)`` levels.

    Args:
      spatial_dims: 2 or 3.
      in_channels: input channels (1 for CT/MRI).
      num_classes: output channels K.
      features: channels per level, e.g. (32, 32, 64, 128, 256) as MONAI's BasicUNet.
      norm: ``"instance"`` or ``"group"``.
      deep_supervision: also return logits from the decoder levels below full resolution (up-sampled by
        nearest neighbour to full resolution), as a list after the main output.
      dtype: compute dtype (parameters and logits stay float32).
      remat: rematerialize each block's activations in the backward pass (less memory, more compute).
      rngs: ``nnx.Rngs`` for the initial parameters (keyword-only, no default).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] = (32, 32, 64, 128, 256),
        norm: str = "instance",
        deep_supervision: bool = False,
        dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet: spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(features) < 2:
            raise ValueError(f"UNet: features needs at least two levels, got {tuple(features)}")
        self.spatial_dims = spatial_dims
        self.features = tuple(int(f) for f in features)
        self.deep_supervision = deep_supervision
        self.dtype = dtype
        self.remat = remat
        block = dict(norm=norm, dtype=dtype, rngs=rngs)
        self.down = nnx.List([])
        prev = in_channels
        for f in self.features:
            self.down.append(ConvBlock(prev, f, spatial_dims, **block))
            prev = f
        self.up = nnx.List([])
        self.up_blocks = nnx.List([])
        self.heads = nnx.List([])
        for i in range(len(self.features) - 2, -1, -1):
            f = self.features[i]
            self.up.append(PatchUpsample(prev, f, spatial_dims, dtype=dtype, rngs=rngs))
            self.up_blocks.append(ConvBlock(2 * f, f, spatial_dims, **block))
            if deep_supervision and i > 0:
                self.heads.append(nnx.Conv(f, num_classes, (1,) * spatial_dims, dtype=dtype, rngs=rngs))
            prev = f
        self.out = nnx.Conv(prev, num_classes, (1,) * spatial_dims, dtype=dtype, rngs=rngs)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def __call__(self, x: jax.Array):
        d = self.spatial_dims
        if x.ndim != d + 2:
            raise ValueError(f"UNet: expected input of shape (B, *{d} spatial, C), got {x.shape}")
        bad = [s for s in x.shape[1:-1] if s % self.divisor]
        if bad:
            raise ValueError(
                f"UNet: every spatial size must be divisible by 2^(levels-1) = {self.divisor}, got spatial shape "
                f"{x.shape[1:-1]}; pad the input (combo_jax.models.unet.pad_to_multiple) or crop it"
            )
        run = (lambda blk, h: nnx.remat(lambda m, v: m(v))(blk, h)) if self.remat else (lambda blk, h: blk(h))
        h = x.astype(self.dtype)
        skips = []
        for i, blk in enumerate(self.down):
            h = run(blk, h)
            if i < len(self.down) - 1:
                skips.append(h)
                h = _max_pool(h, d)
        extra = []
        head = 0
        for level, (up, blk) in enumerate(zip(self.up, self.up_blocks)):
            h = up(h)
            h = run(blk, jnp.concatenate([h, skips.pop()], axis=-1))
            if self.deep_supervision and level < len(self.up) - 1:
                low = self.heads[head](h).astype(jnp.float32)
                head += 1
                extra.append(_upsample_nearest(low, x.shape[1:-1]))
        logits = self.out(h).astype(jnp.float32)
        return [logits, *extra[::-1]] if self.deep_supervision else logits


def _max_pool(x, d):
    window = (1,) + (2,) * d + (1,)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")


def _upsample_nearest(x, spatial):
    for axis, size in enumerate(spatial, start=1):
        x = jnp.repeat(x, size // x.shape[axis], axis=axis)
    return x


def pad_to_multiple(x: jax.Array, multiple: int, *, value=0.0):
    """Pads the spatial axes of a (B, *spatial, C) array at the end up to multiples of `multiple`.

    Returns the padded array and the original spatial shape (crop predictions back with it).
    """
    spatial = x.shape[1:-1]
    pad = [(0, 0)] + [(0, (-s) % multiple) for s in spatial] + [(0, 0)]
    return jnp.pad(x, pad, constant_values=value), spatial
