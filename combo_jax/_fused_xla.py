"""The two passes of :mod:`combo_jax._fused` as vectorized XLA code (channel axis as an array axis).

The routine for platforms without a kernel of their own (and float64 on accelerators). Pass one is the plain
sums of :func:`combo_jax._sums.plain_sums`; pass two is their vector-Jacobian product written out: with the
cotangents ``cI, cP, cCEp, cCEn`` of the sums (``(B, K)`` each), per voxel and channel

    A_k = w [ (cI_k t_k + cP_k) p_k - cCEp_k t_k + cCEn_k (1 - t_k) o_k [k not above 1/2] ]
    Q   = w sum_k [k above 1/2] cCEn_k (1 - t_k) p_k
    g_j = A_j - p_j sum_k A_k + Q ([j above 1/2] - [j not above 1/2] q_j)

with ``o_k = p_k / (1 - p_k)`` the odds of a channel below 1/2 and ``q_j = exp(x_j - lse_rest)`` the softmax
of the channels other than the one above 1/2 (the tangents of :mod:`combo_jax._sums`, transposed). Every
factor is bounded for logits of any size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from combo_jax._sums import ClassSums, SoftmaxParts, plain_sums, select, softmax_parts, targets


def _compute(x, labels, mask):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    if labels.ndim == 3:
        labels = labels.astype(dtype)
    return x.astype(dtype), labels, None if mask is None else mask.astype(dtype)


def sums(x, labels, mask, complement: bool) -> ClassSums:
    return plain_sums(*_compute(x, labels, mask), complement)


def voxel_terms(select, s: SoftmaxParts, complement: bool) -> list:
    """Per voxel and class, the summands of ``(I, P, T, CE+, CE-)`` (``select(a, b)``: ``a`` on the target)."""
    terms = [select(s.p, 0.0), s.p, select(1.0, 0.0), -select(s.lp, 0.0)]
    if complement:
        terms.append(-select(0.0, s.log1m))
    return terms


def voxel_gradient(select, s: SoftmaxParts, x, w, coefficients, *, axis: int, complement: bool):
    """``A - p sum_k A_k + Q (...)`` of the module docstring, per voxel, ``axis`` the class axis.

    ``coefficients``: ``(cI, cP, cCE+, cCE-)`` broadcastable against ``x``; ``w``: the voxel weights (with a
    size-1 class axis) or None; ``select`` as in :func:`voxel_terms`.
    """
    c_i, c_p, c_pos, c_neg = coefficients
    a = select((c_i + c_p) * s.p - c_pos, c_p * s.p)
    if complement:
        odds = s.p / (1.0 - jnp.where(s.hi, 0.0, s.p))
        a = a + select(0.0, jnp.where(s.hi, 0.0, c_neg * odds))
    if w is not None:
        a = a * w
    g = a - s.p * jnp.sum(a, axis=axis, keepdims=True)
    if complement:
        q = jnp.sum(select(0.0, jnp.where(s.hi, c_neg * s.p, 0.0)), axis=axis, keepdims=True)
        if w is not None:
            q = q * w
        g = g + q * jnp.where(s.hi, 1.0, -jnp.exp(x - s.lse_rest))
    return g


def sums_vjp(x, labels, mask, cot: ClassSums, complement: bool) -> jax.Array:
    """``J_S(x)^T cot``: the gradient of ``<cot, S(x)>`` with respect to the logits, in x's dtype."""
    xc, labels, mask = _compute(x, labels, mask)
    t = targets(labels, xc.shape[-1])
    coefficients = tuple(c[:, None, :] for c in (cot.intersection, cot.predicted, cot.ce_positive,
                                                  cot.ce_negative))
    g = voxel_gradient(functools.partial(select, t), softmax_parts(xc, complement), xc,
                       None if mask is None else mask[..., None], coefficients, axis=-1, complement=complement)
    return g.astype(x.dtype)
