"""A Flax NNX U-Net for 2D and 3D segmentation, channels-last.

Input ``(B, *spatial, C_in)``, output logits ``(B, *spatial, K)`` in float32 whatever the compute dtype.
Each level is two (conv 3, group/instance norm, leaky ReLU) blocks; down-sampling is a stride-2 max-pool,
up-sampling a transposed convolution with kernel = stride = 2 (see :class:`PatchUpsample`), then
concatenation with the skip connection. Parameters are float32; ``dtype`` sets the compute dtype
(``jnp.bfloat16`` for mixed precision). Every spatial size must be divisible by ``2 ** (len(features) - 1)``;
:func:`pad_to_multiple` pads inputs that are not.

The layers are written for how accelerators run them, with the numbers of the plain formulation (tested
against it: ``nnx.GroupNorm`` + ``jax.nn.leaky_relu``, ``lax.reduce_window`` max-pool, a matmul up-sampling,
``jnp.concatenate``): XLA:GPU runs 3D convolutions channels-first and TPUs pad the innermost axis to 128
lanes, so nothing here transposes a full-resolution activation or leaves a few channels innermost; the
normalization and the max-pool have hand-written backward passes that read each activation as few times as
possible and never scatter. BENCHMARKS.md has the compiled figures.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


class PatchUpsample(nnx.Module):
    """Transposed convolution whose kernel equals its stride (2 per axis), as cuDNN-friendly convolutions.

    With kernel = stride the output patches do not overlap: each input voxel produces its own ``2^d`` output
    voxels, ``y[2i + a] = x[i] @ W[1 - a] + b`` (flax's kernel orientation). It computes exactly what
    ``nnx.ConvTranspose(kernel_size=2, strides=2, padding="VALID")`` computes with the same kernel and bias
    (tested), written as the transpose of the stride-2 convolution ``z -> sum_a z[2i + a] @ W[1 - a]^T``:
    XLA:GPU runs it as cuDNN's strided backward-data convolution, writing the up-sampled tensor in the layout
    the next convolution reads, where ``nnx.ConvTranspose`` becomes a convolution over a zero-dilated input
    (tens of times slower) and a matmul + reshape needs a transpose of the whole up-sampled tensor. Called with
    the skip connection it also concatenates (:func:`upsample_concat`), so that the backward pass reads the
    concatenated gradient without slicing it. On TPUs the 3D up-sampling works on depth folded into the batch
    instead (:func:`_upsample_concat_folded`), the form the convolutions there read.
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

    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        """The up-sampled ``x``; with ``skip``, ``concatenate([up(x), skip], -1)`` (see :func:`upsample_concat`)."""
        dtype = self.dtype or x.dtype
        kernel, bias = jnp.asarray(self.kernel[...], dtype), jnp.asarray(self.bias[...], dtype)
        x = jnp.asarray(x, dtype)
        if skip is None:
            return _upsample(x, kernel, bias)
        return upsample_concat(x, jnp.asarray(skip, dtype), kernel, bias)


def _concat_channels(a, b):
    """``jnp.concatenate([a, b], -1)`` as a select between the two zero-padded arrays.

    The same values, in a form XLA:GPU fuses into the elementwise kernel that writes the up-sampled values.
    """
    ca, cb = a.shape[-1], b.shape[-1]
    pad = [(0, 0)] * (a.ndim - 1)
    channel = jax.lax.broadcasted_iota(jnp.int32, (*a.shape[:-1], ca + cb), a.ndim - 1)
    return jnp.where(channel < ca, jnp.pad(a, [*pad, (0, cb)]), jnp.pad(b, [*pad, (ca, 0)]))


def _strided_conv(g, kernel):
    """The stride-2, 2^d-window convolution of (B, *2s, C) ``g``: the transpose of the up-sampling in its input."""
    d = g.ndim - 2
    names = "DHW"[-d:]
    return jax.lax.conv_general_dilated(g, kernel, (2,) * d, "VALID",
                                        dimension_numbers=(f"N{names}C", f"{names}IO", f"N{names}C"))


def _conv_kernel(kernel):
    """flax's transposed-convolution kernel (a.., c_in, c_out) as the (a.., c_out, c_in) kernel of the stride-2
    convolution it transposes: W[1 - a], swapped (and back: the map is its own inverse)."""
    d = kernel.ndim - 2
    return jnp.swapaxes(kernel[(slice(None, None, -1),) * d], -1, -2)


def _upsample(x, kernel, bias):
    """``y[2i + a] = x[i] @ W[1 - a] + b``: the transpose of :func:`_strided_conv` with :func:`_conv_kernel`."""
    shape = (x.shape[0], *(2 * s for s in x.shape[1:-1]), kernel.shape[-1])
    strided = jax.linear_transpose(lambda z: _strided_conv(z, _conv_kernel(kernel)), jax.ShapeDtypeStruct(shape, x.dtype))
    return strided(x)[0] + bias


def upsample_concat(x, skip, kernel, bias):
    """``concatenate([up(x), skip], -1)`` where ``up`` is :class:`PatchUpsample`'s transposed convolution.

    In 3D the arrangement is chosen per platform when the program is lowered (as for :func:`conv3`): TPUs
    take :func:`_upsample_concat_folded`, the others :func:`_upsample_concat_strided`.
    """
    if x.ndim == 5:
        return _upsample_concat_3d(x, skip, kernel, bias)
    return _upsample_concat_strided(x, skip, kernel, bias)


@jax.custom_vjp
def _upsample_concat_strided(x, skip, kernel, bias):
    """The up-sampling as the transpose of the stride-2 convolution (cuDNN's strided backward-data convolution
    on GPUs), concatenated as a select of zero-padded arrays.

    The backward pass is written out: the up-sampling's input and kernel gradients are the stride-2
    convolution and its filter gradient, read straight from the concatenated gradient (the kernel
    zero-padded over the skip channels), with the bias gradient from the same filter-gradient pass: no slice
    and no transposed copy of the full-resolution gradient.
    """
    return _concat_channels(_upsample(x, kernel, bias), skip)


def _upsample_concat_fwd(x, skip, kernel, bias):
    return _upsample_concat_strided(x, skip, kernel, bias), (x, kernel)


def _upsample_concat_bwd(residuals, grad):
    x, kernel = residuals
    d, (c_in, c_out) = x.ndim - 2, kernel.shape[-2:]
    # y[2i + a] = x[i] @ W[1 - a] + b  =>  dx[i] = sum_a grad[2i + a] @ W[1 - a]^T: the stride-2 convolution of
    # the gradient, with zero weights for the skip channels so that it reads the gradient as it is. The kernel
    # gradient is that convolution's filter gradient against x; a ones channel appended to x gives the bias
    # gradient in the same pass (its filter-gradient row sums the gradient over every voxel of each offset).
    padding = [(0, 0)] * d + [(0, grad.shape[-1] - c_out), (0, 1)]
    conv_kernel = jnp.pad(_conv_kernel(kernel), padding)  # (2,..., C_total, c_in + 1)
    dx, filter_vjp = jax.vjp(lambda w: _strided_conv(grad, w), conv_kernel)
    (dconv_kernel,) = filter_vjp(jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], -1))
    dkernel = _conv_kernel(dconv_kernel[..., :c_out, :c_in])
    dbias = jnp.sum(dconv_kernel[..., :c_out, c_in].astype(jnp.float32), tuple(range(d))).astype(kernel.dtype)
    return dx[..., :c_in], grad[..., c_out:], dkernel, dbias


_upsample_concat_strided.defvjp(_upsample_concat_fwd, _upsample_concat_bwd)


def _upsample_concat_folded(x, skip, kernel, bias):
    """The TPU's 3D up-sampling: depth folded into the batch, one 2D up-sampling per depth offset ``a`` (kernel
    ``W[1 - a]``), the two interleaved along the folded axis; then a plain concatenation, and autodiff's
    backward pass. The same numbers as :func:`_upsample_concat_strided`.

    Written on the folded form that the planar convolutions (:func:`_conv3d_folded`) read and write, XLA:TPU
    keeps its layout instead of relaying the full-resolution tensors out between 5-D and folded forms
    (BENCHMARKS.md).
    """
    batch, depth, height, width, c_in = x.shape
    folded = x.reshape(batch * depth, height, width, c_in)
    halves = [_upsample(folded, kernel[1 - a], bias) for a in range(2)]
    up = jnp.stack(halves, 1).reshape(batch, 2 * depth, 2 * height, 2 * width, kernel.shape[-1])
    return jnp.concatenate([up, skip], -1)


def _platform_routes(**routes):
    """One function computing the same values by a route chosen per platform when the program is lowered
    (``lax.platform_dependent``, keyword arguments as there), in the forward and the backward pass.

    Differentiating through ``platform_dependent`` itself would keep, in every lowering, the residuals of
    every route (a conditional with a constant index and zero-filled stand-ins for the other routes'
    residuals). The routes here are linear in each argument, so the arguments are the only residuals, and the
    backward pass picks its route on its own (each route's own backward pass: autodiff, or its custom rule).
    """
    @jax.custom_vjp
    def routed(*args):
        return jax.lax.platform_dependent(*args, **routes)

    def transposed(route):
        return lambda *args: jax.vjp(route, *args[:-1])[1](args[-1])

    def fwd(*args):
        return routed(*args), args

    def bwd(args, cotangent):
        return jax.lax.platform_dependent(*args, cotangent, **{k: transposed(r) for k, r in routes.items()})

    routed.defvjp(fwd, bwd)
    return routed


_upsample_concat_3d = _platform_routes(tpu=_upsample_concat_folded, default=_upsample_concat_strided)


class Norm(nnx.Module):
    """Group normalization followed by leaky ReLU, with a hand-written backward pass.

    Computes what ``nnx.GroupNorm`` (fast variance, float32 statistics, scale and bias in the compute dtype)
    followed by ``jax.nn.leaky_relu`` computes, with the same parameters (``scale``, ``bias``).
    ``group_size = 1`` is instance normalization. The backward pass (:func:`norm_leaky_relu`) reads the
    input and the incoming gradient twice, once for the per-channel sums and once to form the gradient,
    and stores nothing else: two passes over the activation instead of the three that autodiff of the
    composition gives.
    """

    def __init__(self, features: int, group_size: int, *, negative_slope: float = 0.01, epsilon: float = 1e-5,
                 dtype=None, rngs: nnx.Rngs | None = None):
        if features % group_size:
            raise ValueError(f"Norm: features ({features}) must be a multiple of group_size ({group_size})")
        self.group_size = group_size
        self.negative_slope = negative_slope
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        if rngs is not None:
            # nnx.GroupNorm draws a key for its scale and one for its bias: drawing them too keeps every later
            # layer's initial parameters, for a given seed, those of the plain formulation (and of earlier runs).
            rngs.params()
            rngs.params()

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        return norm_leaky_relu(jnp.asarray(x, dtype), jnp.asarray(self.scale[...], dtype),
                               jnp.asarray(self.bias[...], dtype), self.group_size, self.negative_slope,
                               self.epsilon)


def _group_sum(v, group_size):
    """Sums (B, C) per-channel values over the groups of ``group_size`` channels, broadcast back to (B, C)."""
    if group_size == 1:
        return v
    b, c = v.shape
    return jnp.repeat(v.reshape(b, c // group_size, group_size).sum(-1), group_size, axis=-1)


def _channel_sums(*values):
    """Sums of each (B, *spatial, C) value over the spatial axes, shape (B, C), float32."""
    axes = tuple(range(1, values[0].ndim - 1))
    return [jnp.sum(v, axes, dtype=jnp.float32) for v in values]


def _expand(v, ndim):
    """(B, C) -> (B, 1, ..., 1, C) for broadcasting against a (B, *spatial, C) array."""
    return v.reshape(v.shape[0], *(1,) * (ndim - 2), v.shape[-1])


def _norm_stats(x, group_size, epsilon):
    """Per-(sample, channel) mean and 1/sqrt(var + eps), (B, C) float32, from float32 sums of x and x^2."""
    count = math.prod(x.shape[1:-1]) * group_size
    xf = x.astype(jnp.float32)
    s1, s2 = _channel_sums(xf, xf * xf)
    mean = _group_sum(s1, group_size) / count
    # E[x^2] - E[x]^2 can round below zero.
    var = jnp.maximum(0.0, _group_sum(s2, group_size) / count - mean * mean)
    return mean, jax.lax.rsqrt(var + epsilon)


def _norm_apply(x, mean, rstd, scale, bias):
    """(x - mean) * (rstd * scale) + bias in float32, cast to x's dtype: the pre-activation."""
    n = x.ndim
    mul = _expand(rstd, n) * scale.astype(jnp.float32)
    return ((x.astype(jnp.float32) - _expand(mean, n)) * mul + bias.astype(jnp.float32)).astype(x.dtype)


def _leaky_relu(y, negative_slope):
    return jnp.where(y >= 0, y, negative_slope * y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def norm_leaky_relu(x, scale, bias, group_size, negative_slope, epsilon):
    """``leaky_relu(group_norm(x) * scale + bias)`` over the spatial axes of (B, *spatial, C) ``x``.

    Statistics are float32 (``mean(x)``, ``mean(x^2) - mean(x)^2`` over the spatial axes and the
    ``group_size`` channels of each group); the result has ``x``'s dtype. ``scale`` and ``bias`` have shape
    (C,) and ``x``'s dtype.
    """
    mean, rstd = _norm_stats(x, group_size, epsilon)
    return _leaky_relu(_norm_apply(x, mean, rstd, scale, bias), negative_slope)


def _norm_leaky_relu_fwd(x, scale, bias, group_size, negative_slope, epsilon):
    mean, rstd = _norm_stats(x, group_size, epsilon)
    return _leaky_relu(_norm_apply(x, mean, rstd, scale, bias), negative_slope), (x, mean, rstd, scale, bias)


def _norm_leaky_relu_bwd(group_size, negative_slope, epsilon, residuals, grad):
    del epsilon
    x, mean, rstd, scale, bias = residuals
    n = x.ndim
    pre = _norm_apply(x, mean, rstd, scale, bias)
    # Leaky ReLU's backward in the compute dtype, as autodiff of jnp.where gives it.
    g = jnp.where(pre >= 0, grad, negative_slope * grad).astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - _expand(mean, n)) * _expand(rstd, n)
    # (B, C): the bias and scale gradients per sample. The barrier keeps XLA from merging the sums over the
    # batch below into one reduction over the whole activation, which would need g stored from this pass.
    sum_g, sum_gx = jax.lax.optimization_barrier(_channel_sums(g, g * xhat))
    scale32 = scale.astype(jnp.float32)
    count = math.prod(x.shape[1:-1]) * group_size
    # d/dx of the normalized value, with the mean's and the variance's paths folded into two group sums.
    mean_g = _group_sum(sum_g * scale32, group_size) / count
    mean_gx = _group_sum(sum_gx * scale32, group_size) / count
    dx = _expand(rstd, n) * (g * scale32 - _expand(mean_g, n) - xhat * _expand(mean_gx, n))
    return dx.astype(x.dtype), sum_gx.sum(0).astype(scale.dtype), sum_g.sum(0).astype(bias.dtype)


norm_leaky_relu.defvjp(_norm_leaky_relu_fwd, _norm_leaky_relu_bwd)


def _group_size(kind: str, features: int) -> int:
    if kind == "instance":
        # Instance norm: one group per channel, statistics over the spatial axes of each sample.
        return 1
    if kind == "group":
        return features // min(8, features)
    raise ValueError(f"UNet: unknown norm {kind!r}; expected 'instance' or 'group'")


class ConvBlock(nnx.Module):
    """Two (conv 3, norm, leaky ReLU) layers."""

    def __init__(self, in_features, out_features, spatial_dims, *, norm, dtype, rngs: nnx.Rngs):
        kernel = (3,) * spatial_dims
        group_size = _group_size(norm, out_features)
        self.conv1 = nnx.Conv(in_features, out_features, kernel, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = Norm(out_features, group_size, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, kernel, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = Norm(out_features, group_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.norm1(checkpoint_name(conv3(self.conv1, x), "conv"))
        return self.norm2(checkpoint_name(conv3(self.conv2, h), "conv"))


def conv3(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a bias-free ``nnx.Conv`` of kernel 3 and "SAME" padding, the 3D case arranged per backend.

    On CPUs and TPUs a 3D convolution is computed as a 2D one (the planar route): the input and its two
    neighbours along the first spatial axis are stacked on the channel axis (``3 C`` channels) and the three
    depth taps of the kernel become input channels of a 3 x 3 kernel, with that axis folded into the batch.
    Same sums, in another order. XLA:CPU runs 5-D convolutions several times slower than 4-D ones (measured
    2-6x forward and backward at the U-Net's widths); XLA:TPU rewrites a native 3D convolution of 32-64
    channels into buffers of all 27 taps, where the planar route leaves nine to a 2D convolution (a block at
    32 channels, 128^3, compiled for a v5p: 179 -> 19 GB accessed; see BENCHMARKS.md). TPUs fold depth into
    the batch first and, except in the first layer, stack the depth taps on the output side
    (:func:`_conv3d_folded`), which suits XLA:TPU's layouts; the up-sampling and the max-pool work on the
    same folded form there.
    On GPUs the native 3D convolution (cuDNN) is kept: there the planar route moves more.

    The route is chosen when the program is lowered (``lax.platform_dependent``), separately in the forward
    and the backward pass (:func:`_conv3d_same`), so that a program lowered for one platform holds its own
    route and nothing of the other. Reverse mode only: ``jax.jvp`` through a 3D U-Net is refused (it is a
    ``jax.custom_vjp``).
    """
    if x.ndim != 5:
        return conv(x)
    dtype = conv.dtype or jnp.result_type(x.dtype, conv.kernel.dtype)
    return _conv3d_same(x.astype(dtype), conv.kernel[...].astype(dtype))


# XLA:CPU hands convolutions to its YNNPACK library kernels by default ("individual convolution" library
# fusions); at the U-Net's widths its own convolutions run 1.6-1.9x faster forward and backward, and with them
# the planar route above makes a 3D training step about 3.5x faster (BENCHMARKS.md). The value is XLA's default
# list less that one type: the reductions and dots keep their library kernels, and the losses compile to the
# same program either way (tested).
_CPU_LIBRARY_FUSIONS = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def compiler_options() -> dict:
    """XLA options for ``jax.jit(..., compiler_options=...)`` of programs that run this U-Net.

    On the CPU backend: XLA's own convolutions instead of its library kernels (see above); elsewhere, or where
    ``XLA_FLAGS`` already sets the library fusion types, or where this XLA does not know the option: ``{}``.
    The trainer and :class:`combo_jax.inference.DevicePredictor` use it; a program of your own that runs the
    model can pass it too.
    """
    return dict(_compiler_options())


@functools.cache
def _compiler_options() -> tuple:
    import os

    if jax.default_backend() != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return ()
    options = {"xla_cpu_experimental_ynn_fusion_type": _CPU_LIBRARY_FUSIONS}
    try:
        jax.jit(lambda v: v + 1, compiler_options=options).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # an XLA without this option (or these names): its defaults
        return ()
    return tuple(options.items())


def _conv3d(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        precision=None)


def _conv2d_same(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _planar_conv(stacked, kernel, spatial):
    """The 3 x 3 2D convolution of ``stacked`` (B * D, H, W, 3 C), whose channel a * C + c holds depth tap a of
    channel c, with the 3D ``kernel``; the result as (B, D, H, W, C_out), ``spatial`` being (B, D, H, W)."""
    channels = kernel.shape[-2]
    # kernel[a, i, j, c, o] -> [i, j, a * C + c, o], matching the stacked channels.
    planar = jnp.moveaxis(kernel, 0, 2).reshape(3, 3, 3 * channels, kernel.shape[-1])
    return _conv2d_same(stacked, planar).reshape(*spatial, kernel.shape[-1])


def _conv3d_as_2d(x, kernel):
    """The CPU's planar route: the depth taps stacked on the 5-D array, then folded into the batch."""
    batch, depth, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    # stacked[b, z, y, x, a * C + c] = x[b, z + a - 1, y, x, c]: the depth taps a = 0, 1, 2 as channels.
    stacked = jnp.concatenate([padded[:, a:a + depth] for a in range(3)], axis=-1)
    return _planar_conv(stacked.reshape(batch * depth, height, width, 3 * channels), kernel, x.shape[:-1])


def _depth_shift(folded, depth, offset):
    """``v[b, z + offset]`` (zero where ``z + offset`` leaves ``[0, depth)``) of an array ``v`` whose depth is
    folded into its leading axis, ``folded[b * depth + z] = v[b, z]``; ``offset`` is -1 or 1."""
    z = (jnp.arange(folded.shape[0]) % depth).reshape(-1, *(1,) * (folded.ndim - 1))
    zero = jnp.zeros_like(folded[:1])
    if offset < 0:
        return jnp.where(z > 0, jnp.concatenate([zero, folded[:-1]]), 0)
    return jnp.where(z < depth - 1, jnp.concatenate([folded[1:], zero]), 0)


def _conv3d_folded(x, kernel):
    """The TPU's planar route: depth folded into the batch first, the depth taps then taken as shifts by one
    along the folded axis (zero where a shift would cross into the next or previous sample).

    Two arrangements of the same sums. Where the stacked input is no wider than the output (``3 C_in <=
    C_out``: the first layer), the input's three depth neighbours are stacked as channels as in
    :func:`_conv3d_as_2d`. Elsewhere the depth taps are stacked on the output side: one 2D convolution gives
    each tap's contribution ``P_a`` (``3 C_out`` channels, each rounded to the compute dtype) and
    ``out[z] = P_0[z - 1] + P_1[z] + P_2[z + 1]``, so that no stacked copy of the input is formed and the
    backward pass forms the input gradient in one convolution instead of adding three shifted ones.

    Written this way, XLA:TPU lays the activations out with the folded batch innermost, the layout its 2D
    convolution reads, instead of copying each stacked input into it (BENCHMARKS.md: a level-1 block compiled
    for a v5p, 30.1 -> 23.4 GB accessed with the input stacked, 18.8 GB with the output stacked).
    """
    batch, depth, *plane = x.shape
    c_in, c_out = kernel.shape[-2:]
    folded = x.reshape(batch * depth, *plane)
    if 3 * c_in <= c_out:
        stacked = jnp.concatenate([_depth_shift(folded, depth, -1), folded, _depth_shift(folded, depth, 1)], -1)
        return _planar_conv(stacked, kernel, x.shape[:-1])
    # kernel[a, i, j, c, o] -> [i, j, c, a * C_out + o]: the taps' contributions side by side.
    taps = _conv2d_same(folded, jnp.moveaxis(kernel, 0, 3).reshape(3, 3, c_in, 3 * c_out))
    before, centre, after = (taps[..., a * c_out:(a + 1) * c_out] for a in range(3))
    out = _depth_shift(before, depth, -1) + centre + _depth_shift(after, depth, 1)
    return out.reshape(*x.shape[:-1], c_out)


# The 3D convolution of conv3, per platform.
_conv3d_same = _platform_routes(cpu=_conv3d_as_2d, tpu=_conv3d_folded, default=_conv3d)


# Rematerialization policies for the blocks' activations (``UNet(remat=...)``): what the forward pass keeps for
# the backward pass inside each block; the rest is recomputed there. Block inputs and outputs are always kept.
REMAT_POLICIES = {
    # Keep everything: the least compute, the most memory.
    "none": None,
    # Keep the convolutions' outputs; recompute the normalizations and activations (elementwise work only).
    "convs": jax.checkpoint_policies.save_only_these_names("conv"),
    # Keep nothing: the block's two convolutions run again in the backward pass (about a third more compute).
    "blocks": jax.checkpoint_policies.nothing_saveable,
}


def _remat_policy(remat):
    """The policy name of a ``remat`` argument: a name from REMAT_POLICIES, or a bool (True is "blocks").

    "true" and "false" are read as the bools, as a command-line override of a config gives them.
    """
    if isinstance(remat, str) and remat.lower() in ("true", "false"):
        remat = remat.lower() == "true"
    if isinstance(remat, bool):
        return "blocks" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"UNet: unknown remat {remat!r}; expected a bool or one of {', '.join(REMAT_POLICIES)}")
    return remat


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
      remat: what each block keeps for the backward pass, a name from ``REMAT_POLICIES``: ``"none"`` (all its
        activations), ``"convs"`` (its convolutions' outputs; the normalizations are recomputed) or
        ``"blocks"`` (nothing; the whole block is recomputed). ``True`` means ``"blocks"``, ``False``
        ``"none"``.
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
        remat: bool | str = False,
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
        self.remat = _remat_policy(remat)
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
        def down(blk, h):
            return blk(h)

        def up(upsample, blk, h, skip):  # the up-sampled, concatenated input is recomputed too
            return blk(upsample(h, skip))

        if self.remat != "none":
            policy = REMAT_POLICIES[self.remat]
            down, up = nnx.remat(down, policy=policy), nnx.remat(up, policy=policy)
        h = x.astype(self.dtype)
        skips = []
        for i, blk in enumerate(self.down):
            h = down(blk, h)
            if i < len(self.down) - 1:
                skips.append(h)
                h = max_pool(h, d)
        extra = []
        head = 0
        for level, (upsample, blk) in enumerate(zip(self.up, self.up_blocks)):
            h = up(upsample, blk, h, skips.pop())
            if self.deep_supervision and level < len(self.up) - 1:
                low = _pointwise(self.heads[head], h).astype(jnp.float32)
                head += 1
                extra.append(_upsample_nearest(low, x.shape[1:-1]))
        logits = _pointwise(self.out, h).astype(jnp.float32)
        return [logits, *extra[::-1]] if self.deep_supervision else logits


def _pointwise(conv: nnx.Conv, x):
    """``conv(x)`` for a 1x1 ``nnx.Conv`` (with bias), as a product formed channels-first.

    Formed as (B, K, *spatial), the few output channels are not the innermost axis: TPUs pad that axis to 128
    lanes, which made the 6-class logits of a 128^3 batch a 1 GB buffer.
    """
    dtype = conv.dtype or x.dtype
    kernel = jnp.asarray(conv.kernel[...], dtype).reshape(conv.kernel.shape[-2:])  # (C, K)
    batch = x.shape[0]
    w = jnp.broadcast_to(kernel.T, (batch, *kernel.T.shape))
    y = jax.lax.dot_general(w, jnp.asarray(x, dtype), (((2,), (x.ndim - 1,)), ((0,), (0,))))  # (B, K, *spatial)
    return jnp.moveaxis(y, 1, -1) + jnp.asarray(conv.bias[...], dtype)


def _windows(x, d):
    """The 2^d strided views x[:, a_1::2, ..., a_d::2, :] of a (B, *spatial, C) array, in window order."""
    return [x[(slice(None), *(slice(a, None, 2) for a in offset), slice(None))]
            for offset in itertools.product(range(2), repeat=d)]


def max_pool(x, d):
    """2^d max-pool with stride 2 over the spatial axes of (B, *spatial, C) ``x``, as an elementwise max.

    The gradient goes to the first maximum of each window in row-major window order, as XLA's
    select-and-scatter (the gradient of ``lax.reduce_window`` max) gives it; it is formed elementwise from a
    stored int8 index of that maximum, with no scatter. In 3D, TPUs pool the array with depth folded into the
    batch (the form the planar convolutions use; the same windows, as the depth is even), chosen when the
    program is lowered.
    """
    return _max_pool(x, d, "platform")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, d, route):
    """:func:`max_pool` by ``route``: "plain", "folded" (3D only: depth folded into the batch) or "platform"
    (folded on TPUs in 3D, plain otherwise)."""
    return _max_pool_routed(route, d, lambda v: functools.reduce(jnp.maximum, _windows(v, d)), x)


def _max_pool_routed(route, d, plain, *arrays):
    """``plain(*arrays)``, or on the depth-folded view of each array (route "folded", or "platform" on TPUs)."""
    batch = arrays[0].shape[0]

    def folded(*arrays):
        out = plain(*(a.reshape(1, -1, *a.shape[2:]) for a in arrays))
        return jax.tree.map(lambda o: o.reshape(batch, -1, *o.shape[2:]), out)

    if d != 3 or route == "plain":
        return plain(*arrays)
    if route == "folded":
        return folded(*arrays)
    return jax.lax.platform_dependent(*arrays, tpu=folded, default=plain)


def _max_pool_index(x, d):
    views = _windows(x, d)
    y = functools.reduce(jnp.maximum, views)
    first = jnp.full(y.shape, len(views) - 1, jnp.int8)
    for i in range(len(views) - 2, -1, -1):
        first = jnp.where(views[i] == y, jnp.int8(i), first)
    return y, first


def _max_pool_grad(d, first, grad):
    # (B, s_1, 2, ..., s_d, 2, C): the window offsets as separate axes; broadcast index and gradient over them.
    b, c = grad.shape[0], grad.shape[-1]
    spatial = grad.shape[1:-1]
    full = (b, *(v for s in spatial for v in (s, 2)), c)
    offset = sum(jax.lax.broadcasted_iota(jnp.int8, full, 2 + 2 * i) * (1 << (d - 1 - i)) for i in range(d))

    def spread(v):
        return v.reshape(b, *(v for s in spatial for v in (s, 1)), c)

    dx = jnp.where(offset == spread(first), spread(grad), jnp.zeros((), grad.dtype))
    return dx.reshape(b, *(2 * s for s in spatial), c)


def _max_pool_fwd(x, d, route):
    return _max_pool_routed(route, d, lambda v: _max_pool_index(v, d), x)


def _max_pool_bwd(d, route, first, grad):
    return (_max_pool_routed(route, d, functools.partial(_max_pool_grad, d), first, grad),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
