"""Per-sample, per-class sums of a softmax output over voxels, and their derivative.

Every softmax loss of the family (Combo, its weighted cross-entropy, Dice, Dice + cross-entropy, Tversky,
generalized Dice) is a small function of six sums over the voxels ``v`` of each sample (``w`` the voxel mask,
``t`` the target, ``p = softmax(x)``):

    intersection = sum_v w p t            predicted   = sum_v w p        target = sum_v w t
    ce_positive  = -sum_v w t log p       ce_negative = -sum_v w (1 - t) log(1 - p)
    voxels       = sum_v w

each of shape (B, K) (``voxels`` (B,)). The sums hold no hyperparameter: alpha, beta, smoothing and class
weights act on the small arrays only, so they may be traced values, and the sums of several devices add up
(one ``psum`` gives the global batch).

This module is the plain formula. :func:`softmax_sums` computes the sums with the channel axis as an array
axis (vectorized in K) and gives them a ``jax.custom_jvp`` rule: the tangent of every sum is linear in the
tangent of the logits, through the softmax Jacobian,

    d log p_k = dx_k - sum_j p_j dx_j,        d p_k = p_k d log p_k,

and JAX transposes that linear map for reverse mode. The rule is plain JAX, so it can itself be
differentiated (Hessians, ``jacfwd``). The per-class outputs (``reduction="none"``, :func:`class_sums`) use
it directly; the scalar losses evaluate through the two-pass kernels of :mod:`combo_jax._fused` and use this
formula for their higher derivatives. Stability: ``log(1 - p_k)`` is ``log1p(-p_k)`` for every channel below
1/2, and for the one channel ``a`` above (there is at most one, the argmax) it is ``lse_rest - lse``, the
log-sum-exp of the other channels minus that of all; its tangent ``-d log(1 - p_a) = p_a (dx_a - sum_{j != a}
q_j dx_j)`` uses the softmax ``q`` of the other channels, and every other channel's ``-d log(1 - p_k) = o_k d
log p_k`` the odds ``o_k = p_k / (1 - p_k) <= 1``. All factors are bounded for logits of any size.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

LOG_HALF = math.log(0.5)


class ClassSums(NamedTuple):
    """Per-sample, per-class sums over voxels from which every loss of the family is computed.

    Fields (``w`` the voxel mask, ``t`` the target, ``p`` the probabilities; sums over the voxels of a sample):
      intersection: ``(B, K)``, ``sum w p t``.
      predicted: ``(B, K)``, ``sum w p``.
      target: ``(B, K)``, ``sum w t``.
      ce_positive: ``(B, K)``, ``-sum w t log p``.
      ce_negative: ``(B, K)``, ``-sum w (1 - t) log(1 - p)`` (zeros where a loss did not need it).
      voxels: ``(B,)``, ``sum w``, the number of voxels that count.

    Sums add: the sums of two halves of a batch, concatenated, are the sums of the batch, and
    ``jax.tree.map(lambda s: s.sum(0, keepdims=True), sums)`` pools the batch into one sample (batch Dice).
    """

    intersection: jax.Array
    predicted: jax.Array
    target: jax.Array
    ce_positive: jax.Array
    ce_negative: jax.Array
    voxels: jax.Array


def targets(labels: jax.Array, num_classes: int) -> jax.Array:
    """(B, N, K) targets: boolean from integer ids (B, N), the float labels (B, N, K) as they are."""
    if labels.ndim == 2:
        return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)
    return labels


def select(t: jax.Array, if_one, if_zero):
    """``t * if_one + (1 - t) * if_zero``; a select for boolean targets."""
    if t.dtype == jnp.bool_:
        return jnp.where(t, if_one, if_zero)
    return t * if_one + (1.0 - t) * if_zero


def voxel_sum(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Sum over the voxel axis of (B, N, K) values, weighted by the (B, N) mask."""
    if mask is not None:
        values = values * mask[..., None]
    return jnp.sum(values, axis=1)


class SoftmaxParts(NamedTuple):
    """Per-voxel quantities of the softmax shared by the sums, their tangent and the kernels' gradient."""

    lp: jax.Array  # (B, N, K) log p
    p: jax.Array  # (B, N, K)
    hi: jax.Array | None  # (B, N, K) the channel with p > 1/2 (at most one per voxel, the argmax)
    log1m: jax.Array | None  # (B, N, K) log(1 - p)
    lse_rest: jax.Array | None  # (B, N, 1) log-sum-exp of the channels other than the one above 1/2


def softmax_parts(x: jax.Array, complement: bool, axis: int = -1) -> SoftmaxParts:
    """The softmax of ``x`` over the class axis ``axis`` (kept as size 1 in the per-voxel statistics)."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    lse = m + jnp.log(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True))
    lp = x - lse
    p = jnp.exp(lp)
    if not complement:
        return SoftmaxParts(lp, p, None, None, None)
    hi = lp > LOG_HALF
    others = jnp.where(hi, -jnp.inf, x)
    m2 = jax.lax.stop_gradient(jnp.max(others, axis=axis, keepdims=True))
    lse_rest = m2 + jnp.log(jnp.sum(jnp.where(hi, 0.0, jnp.exp(others - m2)), axis=axis, keepdims=True))
    # log1p(-p) below 1/2 (the argument made safe where the other branch is taken, so that derivatives of
    # the unused branch stay finite).
    log1m = jnp.where(hi, lse_rest - lse, jnp.log1p(-jnp.exp(jnp.where(hi, LOG_HALF, lp))))
    return SoftmaxParts(lp, p, hi, log1m, lse_rest)


def plain_sums(x, labels, mask, complement: bool) -> ClassSums:
    s = softmax_parts(x, complement)
    t = targets(labels, x.shape[-1])
    voxels = jnp.full(x.shape[:1], x.shape[1], x.dtype) if mask is None else jnp.sum(mask, axis=1)
    ce_negative = jnp.zeros(x.shape[::2], x.dtype)
    if complement:
        ce_negative = -voxel_sum(select(t, 0.0, s.log1m), mask)
    return ClassSums(
        intersection=voxel_sum(select(t, s.p, 0.0), mask),
        predicted=voxel_sum(s.p, mask),
        target=voxel_sum(select(t, 1.0, 0.0).astype(x.dtype), mask),
        ce_positive=-voxel_sum(select(t, s.lp, 0.0), mask),
        ce_negative=ce_negative,
        voxels=voxels.astype(x.dtype),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def softmax_sums(x: jax.Array, labels: jax.Array, mask: jax.Array | None, complement: bool) -> ClassSums:
    """:class:`ClassSums` of ``softmax(x)`` against ``labels``.

    Args:
      x: logits (B, N, K), float32 or float64.
      labels: integer ids (B, N), or one-hot/soft labels (B, N, K) of x's dtype. Constants: no derivative
        flows to them.
      mask: (B, N) float weights of the voxels (1 counts, 0 is left out), or None.
      complement: compute ``ce_negative`` (the ``log(1 - p)`` terms); zeros otherwise.
    """
    return plain_sums(x, labels, mask, complement)


@softmax_sums.defjvp
def _softmax_sums_jvp(complement, primals, tangents):
    x, labels, mask = primals
    dx = tangents[0]
    s = softmax_parts(x, complement)
    sums = plain_sums(x, labels, mask, complement)
    t = targets(labels, x.shape[-1])
    dlp = dx - jnp.sum(s.p * dx, axis=-1, keepdims=True)
    dp = s.p * dlp
    zeros = jnp.zeros_like(sums.target)
    d_negative = zeros
    if complement:
        # -d log(1 - p_k): o_k d log p_k below 1/2, p_a (dx_a - sum_{j != a} q_j dx_j) for the channel above.
        q = jnp.where(s.hi, 0.0, jnp.exp(jnp.where(s.hi, 0.0, x - s.lse_rest)))
        odds = s.p / (1.0 - jnp.where(s.hi, 0.0, s.p))
        d_rest = jnp.sum(q * dx, axis=-1, keepdims=True)
        d_neg_log1m = jnp.where(s.hi, s.p * (dx - d_rest), odds * dlp)
        d_negative = voxel_sum(select(t, 0.0, d_neg_log1m), mask)
    tangent = ClassSums(
        intersection=voxel_sum(select(t, dp, 0.0), mask),
        predicted=voxel_sum(dp, mask),
        target=zeros,
        ce_positive=-voxel_sum(select(t, dlp, 0.0), mask),
        ce_negative=d_negative,
        voxels=jnp.zeros_like(sums.voxels),
    )
    return sums, tangent
