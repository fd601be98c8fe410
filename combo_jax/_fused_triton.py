"""The two passes of :mod:`combo_jax._fused` as Pallas kernels for NVIDIA GPUs (Triton).

Two kernels, each reading the logits and labels once in their own dtype (bf16 logits stay bf16 in memory):

* :func:`sums`: every program takes a run of voxels of one sample, computes the softmax of each voxel over
  the classes in registers and accumulates the per-class sums (``I, P, T, CE+, CE-``); it writes one small
  row of partial sums, which XLA adds up (a deterministic order, no atomics).
* :func:`sums_vjp`: every program takes a block of voxels, recomputes the per-voxel softmax, and writes the
  gradient ``J_S^T c`` (the formula of :mod:`combo_jax._fused_xla`) in the logits' dtype.

The classes are padded to a power of two in registers (Triton's block shapes), with ``-inf`` logits, so any
K works; memory is read and written unpadded. Offsets are int32: arrays up to 2^31 elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from combo_jax._fused_xla import voxel_gradient, voxel_terms
from combo_jax._sums import ClassSums, select, softmax_parts

_ELEMENTS_PER_BLOCK = 4096  # voxels x padded classes held by one program at a time
_SUM_STEPS = 8  # blocks of voxels accumulated by one program of the sums kernel
_ROWS = 8  # rows of a partial-sums record: I, P, T, CE+, CE-, then padding (a power of two)


def supports(x, labels, mask) -> bool:
    """Whether the kernels apply: int32 offsets suffice."""
    return x.size < 2**31 and labels.size < 2**31


def _layout(x):
    batch, n, num_classes = x.shape
    padded = pl.next_power_of_2(num_classes)
    block = max(16, _ELEMENTS_PER_BLOCK // padded)
    return batch, n, num_classes, padded, block


class _Voxels:
    """Per-voxel softmax quantities of one block of voxels: ``(block, padded classes)`` arrays."""

    def __init__(self, x_ref, labels_ref, mask_ref, sample, start, *, n, num_classes, padded, block, complement):
        rows = start + jnp.arange(block)
        cols = jnp.arange(padded)
        row_ok = rows < n
        col_ok = cols < num_classes
        ok = row_ok[:, None] & col_ok[None, :]
        voxel = sample * n + rows
        offsets = voxel[:, None] * num_classes + cols[None, :]
        self.offsets, self.ok = offsets, ok
        # Rows past the end read as zeros (finite, weight 0); padded classes as -inf (probability 0).
        x = plgpu.load(x_ref.at[offsets], mask=ok, other=0.0).astype(jnp.float32)
        x = jnp.where(col_ok[None, :], x, -jnp.inf)
        if jnp.issubdtype(labels_ref.dtype, jnp.floating):  # one-hot / soft labels, flattened like x
            self.t = plgpu.load(labels_ref.at[offsets], mask=ok, other=0.0).astype(jnp.float32)
        else:
            ids = plgpu.load(labels_ref.at[voxel], mask=row_ok, other=-1)
            self.t = ids[:, None] == cols[None, :]
        w = row_ok.astype(jnp.float32)
        if mask_ref is not None:
            w = w * plgpu.load(mask_ref.at[voxel], mask=row_ok, other=0.0)
        self.w = w[:, None]
        self.x = x
        parts = softmax_parts(x, complement, axis=1)
        self.parts = parts._replace(lp=jnp.where(col_ok[None, :], parts.lp, 0.0))  # -inf on padded classes

    def select(self, if_one, if_zero):
        return select(self.t, if_one, if_zero)


def _sums_kernel(*refs, has_mask, n, num_classes, padded, block, steps, complement):
    x_ref, labels_ref, *rest = refs
    mask_ref = rest.pop(0) if has_mask else None
    (out_ref,) = rest
    program = pl.program_id(0)
    blocks_per_sample = pl.cdiv(n, block * steps)
    sample, first = program // blocks_per_sample, (program % blocks_per_sample) * steps

    def step(i, acc):
        v = _Voxels(x_ref, labels_ref, mask_ref, sample, (first + i) * block, n=n, num_classes=num_classes,
                    padded=padded, block=block, complement=complement)
        terms = voxel_terms(v.select, v.parts, complement)
        return tuple(a + jnp.sum(term * v.w, axis=0) for a, term in zip(acc, terms))

    zeros = jnp.zeros((padded,), jnp.float32)
    acc = jax.lax.fori_loop(0, steps, step, (zeros,) * (5 if complement else 4))
    for row in range(_ROWS):
        out_ref[row, :] = acc[row] if row < len(acc) else zeros


def _vjp_kernel(*refs, has_mask, n, num_classes, padded, block, complement):
    x_ref, labels_ref, *rest = refs
    mask_ref = rest.pop(0) if has_mask else None
    coef_ref, g_ref = rest
    program = pl.program_id(0)
    blocks_per_sample = pl.cdiv(n, block)
    sample, start = program // blocks_per_sample, (program % blocks_per_sample) * block
    v = _Voxels(x_ref, labels_ref, mask_ref, sample, start, n=n, num_classes=num_classes, padded=padded,
                block=block, complement=complement)
    coefficients = tuple(coef_ref[row, :][None, :] for row in range(4))
    g = voxel_gradient(v.select, v.parts, v.x, v.w, coefficients, axis=1, complement=complement)
    plgpu.store(g_ref.at[v.offsets], g.astype(g_ref.dtype), mask=v.ok)


def _operands(x, labels, mask):
    flat = [x.reshape(-1), labels.reshape(-1)]
    if mask is not None:
        flat.append(mask.reshape(-1).astype(jnp.float32))
    return flat


_ANY = pl.BlockSpec(memory_space=pl.ANY)


@functools.partial(jax.jit, static_argnames=("complement", "interpret"))
def sums(x, labels, mask, complement: bool, interpret: bool = False) -> ClassSums:
    """:class:`ClassSums` (float32) of the logits ``(B, N, K)``, labels ``(B, N)`` ids or ``(B, N, K)`` floats."""
    batch, n, num_classes, padded, block = _layout(x)
    steps = max(1, min(_SUM_STEPS, pl.cdiv(n, block)))
    programs = batch * pl.cdiv(n, block * steps)
    operands = _operands(x, labels, mask)
    kernel = functools.partial(_sums_kernel, has_mask=mask is not None, n=n, num_classes=num_classes,
                               padded=padded, block=block, steps=steps, complement=complement)
    partial = pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[_ANY] * len(operands),
        out_specs=pl.BlockSpec((None, _ROWS, padded), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((programs, _ROWS, padded), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="combo_class_sums",
    )(*operands)
    totals = jnp.sum(partial.reshape(batch, -1, _ROWS, padded), axis=1)[:, :, :num_classes]
    zeros = jnp.zeros((batch, num_classes), jnp.float32)
    voxels = jnp.full((batch,), n, jnp.float32) if mask is None else jnp.sum(mask.astype(jnp.float32), axis=1)
    return ClassSums(totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3],
                     totals[:, 4] if complement else zeros, voxels)


@functools.partial(jax.jit, static_argnames=("complement", "interpret"))
def sums_vjp(x, labels, mask, cot: ClassSums, complement: bool, interpret: bool = False) -> jax.Array:
    """``J_S(x)^T cot`` in x's dtype: the gradient of ``<cot, S(x)>`` with respect to the logits."""
    batch, n, num_classes, padded, block = _layout(x)
    programs = batch * pl.cdiv(n, block)
    coefficients = jnp.stack([cot.intersection, cot.predicted, cot.ce_positive, cot.ce_negative], axis=1)
    coefficients = jnp.pad(coefficients.astype(jnp.float32), ((0, 0), (0, 0), (0, padded - num_classes)))
    operands = _operands(x, labels, mask)
    blocks_per_sample = pl.cdiv(n, block)
    kernel = functools.partial(_vjp_kernel, has_mask=mask is not None, n=n, num_classes=num_classes,
                               padded=padded, block=block, complement=complement)
    g = pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[_ANY] * len(operands) + [pl.BlockSpec((None, 4, padded), lambda i: (i // blocks_per_sample, 0, 0))],
        out_specs=_ANY,
        out_shape=jax.ShapeDtypeStruct((x.size,), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="combo_class_sums_vjp",
    )(*operands, coefficients)
    return g.reshape(x.shape)
