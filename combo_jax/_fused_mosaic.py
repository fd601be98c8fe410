"""The two passes of :mod:`combo_jax._fused` as Pallas kernels for TPUs (Mosaic).

On a TPU, XLA lays out logits ``(B, ..., H, W, K)`` with few classes class-major above the last two spatial
axes (``{..., 4, 1, 0}``-style layouts with ``(H, W)`` in the (8, 128) tiles: one ``(H, W)`` plane per class),
so the kernels work on the view ``(L, K, H, W)``, ``L = B * (product of the other spatial axes)``, which
costs no copy. Per-voxel reductions over the classes are then elementwise operations between the K planes,
and per-class sums over voxels are sublane and lane reductions. Logits with one spatial axis are viewed as
``(B, K, 1, N)``.

* :func:`sums`: a grid over ``(sample, plane, row block, column block)`` accumulates each sample's per-class
  sums ``(I, P, T, CE+, CE-)`` over rows in a resident output block, leaving the lanes to XLA.
* :func:`sums_vjp`: a grid over blocks writes the gradient ``J_S^T c`` (the formula of
  :mod:`combo_jax._fused_xla`) in the logits' dtype, in the same view.

Blocks hold the whole class axis; they are sized to about 256 KiB of float32 logits, and partial blocks at
the ends of H and W are masked. With many classes XLA keeps the class axis minor; those take the XLA routine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from combo_jax._fused_xla import voxel_gradient, voxel_terms
from combo_jax._sums import ClassSums, select, softmax_parts

_BLOCK_BYTES = 1 << 18  # float32 logits per block
_MAX_CLASSES = 32  # above this, XLA lays the class axis out in lanes: the view would cost a copy
_ROWS = 5  # I, P, T, CE+, CE-


def supports(x, labels, mask) -> bool:
    return x.shape[-1] <= _MAX_CLASSES


class _View:
    """The ``(L, K, H, W)`` view of ``(B, *spatial, K)`` arrays, and the block sizes."""

    def __init__(self, x):
        self.batch, *spatial, self.num_classes = x.shape
        if len(spatial) == 1:
            spatial = [1, *spatial]
        *middle, self.rows, self.cols = spatial
        self.planes = math.prod(middle)  # planes per sample
        self.spatial = tuple(x.shape[1:-1])
        # A block: all classes, `block_rows` x `block_cols` of one plane; rows in multiples of 8 (or all),
        # columns in multiples of 128 (or all).
        per_row = 4 * self.num_classes * self.cols
        if 8 * per_row <= _BLOCK_BYTES or self.cols <= 128:
            self.block_cols = self.cols
            cap = max(8, _BLOCK_BYTES // per_row // 8 * 8)
            self.block_rows = self.rows if self.rows <= cap else next(
                (r for r in range(cap, 7, -8) if self.rows % r == 0), cap)
        else:
            self.block_rows = min(self.rows, 8)
            cap = max(128, _BLOCK_BYTES // (4 * self.num_classes * self.block_rows) // 128 * 128)
            self.block_cols = self.cols if self.cols <= cap else next(
                (c for c in range(cap, 127, -128) if self.cols % c == 0), cap)
        self.grid_rows = pl.cdiv(self.rows, self.block_rows)
        self.grid_cols = pl.cdiv(self.cols, self.block_cols)

    def classes(self, a):
        """``(B, *spatial, K)`` -> ``(L, K, H, W)``."""
        a = jnp.moveaxis(a, -1, 1 if len(self.spatial) == 1 else -3)
        return a.reshape(self.batch * self.planes, self.num_classes, self.rows, self.cols)

    def voxels(self, a):
        """``(B, *spatial)`` -> ``(L, H, W)``."""
        return a.reshape(self.batch * self.planes, self.rows, self.cols)

    def back(self, a):
        """``(L, K, H, W)`` -> ``(B, *spatial, K)``."""
        if len(self.spatial) == 1:
            return jnp.moveaxis(a.reshape(self.batch, self.num_classes, *self.spatial), 1, -1)
        a = a.reshape(self.batch, *self.spatial[:-2], self.num_classes, self.rows, self.cols)
        return jnp.moveaxis(a, -3, -1)

    def operands(self, x, labels, mask):
        """The kernel operands and their blocks, with index maps of ``(plane, row block, column block)``."""
        k, r, c = self.num_classes, self.block_rows, self.block_cols
        operands = [self.classes(x)]
        specs = [((None, k, r, c), lambda l, i, j: (l, 0, i, j))]
        if labels.ndim == x.ndim:
            operands.append(self.classes(labels))
            specs.append(((None, k, r, c), lambda l, i, j: (l, 0, i, j)))
        else:
            operands.append(self.voxels(labels.astype(jnp.int32)))
            specs.append(((None, r, c), lambda l, i, j: (l, i, j)))
        if mask is not None:
            operands.append(self.voxels(mask.astype(jnp.float32)))
            specs.append(((None, r, c), lambda l, i, j: (l, i, j)))
        return operands, specs


class _Voxels:
    """Per-voxel softmax quantities of one block: ``(K, rows, cols)`` arrays."""

    def __init__(self, x_ref, labels_ref, mask_ref, view: _View, row_block, col_block, *, complement):
        x = x_ref[...].astype(jnp.float32)
        shape = x.shape
        rows = row_block * view.block_rows + jax.lax.broadcasted_iota(jnp.int32, shape[1:], 0)
        cols = col_block * view.block_cols + jax.lax.broadcasted_iota(jnp.int32, shape[1:], 1)
        ok = (rows < view.rows) & (cols < view.cols)  # partial blocks read past the ends: weight 0, made finite
        x = jnp.where(ok[None], x, 0.0)
        if jnp.issubdtype(labels_ref.dtype, jnp.floating):
            self.t = jnp.where(ok[None], labels_ref[...].astype(jnp.float32), 0.0)
        else:
            self.t = labels_ref[...][None] == jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        w = ok.astype(jnp.float32)
        if mask_ref is not None:
            w = jnp.where(ok, mask_ref[...], 0.0)
        self.w = w[None]
        self.x = x
        self.parts = softmax_parts(x, complement, axis=0)

    def select(self, if_one, if_zero):
        return select(self.t, if_one, if_zero)


def _split_refs(refs, has_mask):
    x_ref, labels_ref, *rest = refs
    mask_ref = rest.pop(0) if has_mask else None
    return x_ref, labels_ref, mask_ref, rest


def _sums_kernel(*refs, view: _View, has_mask, complement):
    x_ref, labels_ref, mask_ref, (out_ref,) = _split_refs(refs, has_mask)
    plane, row_block, col_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when((plane == 0) & (row_block == 0) & (col_block == 0))
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    v = _Voxels(x_ref, labels_ref, mask_ref, view, row_block, col_block, complement=complement)
    for row, term in enumerate(voxel_terms(v.select, v.parts, complement)):
        out_ref[row] += jnp.sum(term * v.w, axis=1, keepdims=True)


def _vjp_kernel(*refs, view: _View, has_mask, complement):
    x_ref, labels_ref, mask_ref, (coef_ref, g_ref) = _split_refs(refs, has_mask)
    v = _Voxels(x_ref, labels_ref, mask_ref, view, pl.program_id(1), pl.program_id(2), complement=complement)
    coefficients = tuple(coef_ref[row] for row in range(4))  # (K, 1, 1) each
    g = voxel_gradient(v.select, v.parts, v.x, v.w, coefficients, axis=0, complement=complement)
    g_ref[...] = g.astype(g_ref.dtype)


@functools.partial(jax.jit, static_argnames=("complement", "interpret"))
def sums(x, labels, mask, complement: bool, interpret: bool = False) -> ClassSums:
    """:class:`ClassSums` (float32) of logits ``(B, *spatial, K)`` and ids ``(B, *spatial)`` or float labels."""
    view = _View(x)
    operands, specs = view.operands(x, labels, mask)
    planes = view.planes
    in_specs = [pl.BlockSpec(shape, lambda b, p, i, j, index=index: index(b * planes + p, i, j))
                for shape, index in specs]
    rows = _ROWS if complement else _ROWS - 1
    k, c = view.num_classes, view.block_cols
    partial = pl.pallas_call(
        functools.partial(_sums_kernel, view=view, has_mask=mask is not None, complement=complement),
        grid=(view.batch, planes, view.grid_rows, view.grid_cols),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, k, 1, c), lambda b, p, i, j: (b, 0, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((view.batch, rows, k, 1, c), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="combo_class_sums",
    )(*operands)
    totals = jnp.sum(partial, axis=(3, 4))  # (B, rows, K)
    zeros = jnp.zeros((view.batch, k), jnp.float32)
    voxels = jnp.full((view.batch,), math.prod(view.spatial), jnp.float32) if mask is None else \
        jnp.sum(mask.astype(jnp.float32).reshape(view.batch, -1), axis=1)
    return ClassSums(totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3],
                     totals[:, 4] if complement else zeros, voxels)


@functools.partial(jax.jit, static_argnames=("complement", "interpret"))
def sums_vjp(x, labels, mask, cot: ClassSums, complement: bool, interpret: bool = False) -> jax.Array:
    """``J_S(x)^T cot`` in x's dtype: the gradient of ``<cot, S(x)>`` with respect to the logits."""
    view = _View(x)
    operands, specs = view.operands(x, labels, mask)
    planes, k = view.planes, view.num_classes
    coefficients = jnp.stack([cot.intersection, cot.predicted, cot.ce_positive, cot.ce_negative], axis=1)
    coefficients = coefficients.astype(jnp.float32)[..., None, None]  # (B, 4, K, 1, 1)
    in_specs = [pl.BlockSpec(shape, index) for shape, index in specs]
    # lax.div: truncating division of non-negative indices (floor division lowers through sign()).
    in_specs.append(pl.BlockSpec((None, 4, k, 1, 1), lambda l, i, j: (jax.lax.div(l, planes), 0, 0, 0, 0)))
    g = pl.pallas_call(
        functools.partial(_vjp_kernel, view=view, has_mask=mask is not None, complement=complement),
        grid=(view.batch * planes, view.grid_rows, view.grid_cols),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, k, view.block_rows, view.block_cols), lambda l, i, j: (l, 0, i, j)),
        out_shape=jax.ShapeDtypeStruct((view.batch * planes, k, view.rows, view.cols), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name="combo_class_sums_vjp",
    )(*operands, coefficients)
    return view.back(g)
