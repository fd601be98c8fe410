"""The softmax Combo loss with a hand-derived gradient, arranged for XLA's fusion passes.

:func:`combo_jax.losses.combo_loss` and :func:`combo_jax.losses.weighted_cross_entropy` route softmax
inputs here. The math is exactly theirs; only the evaluation differs, for speed.

How XLA:CPU treats the straightforward formula, and what this module does about it (measured with the
XLA:CPU profiler, see BENCHMARKS.md):

* A reduction over the small channel axis (softmax's max and sum over K) is fused into each elementwise
  consumer and recomputed there, K times per voxel and unvectorized. Here every channel is a ``(B, N)``
  slice and per-voxel reductions over channels are elementwise chains over those slices.
* XLA duplicates *cheap* producers (max, compare, select, add) into every consumer, and an
  ``optimization_barrier`` is gone before fusion runs. A per-voxel statistic that many kernels read
  (the log-sum-exp) is therefore divided by a runtime array of ones (:func:`_computed_once`): a divide
  is expensive to XLA, so the statistic is computed once and stored, not recomputed in every reader.
* A sum's elementwise producer is split at every add and multiply into separate stored arrays (they
  become operands of the reduction kernel). Sums here end their producer with a select or an
  exponential, so each producer stays one kernel.
* Autodiff of the softmax chain materializes many full-size intermediates. ``jax.custom_vjp`` replaces it
  with one forward pass and one backward pass that writes the gradient directly.

Gradient. With ``h_k = p_k dL/dp_k`` (per voxel), the softmax Jacobian gives ``dL/dx_j = h_j - p_j sum_k h_k``.
For the Combo loss ``h_k = h_reg_k + q_k o_k`` where ``o_k = p_k / (1 - p_k)`` (from the ``log(1 - p_k)`` term)
and ``h_reg_k`` collects the rest:

    h_reg_k = w [-A c_k beta t_k + p_k (U_k t_k - V_k)],    q_k = A w c_k (1 - beta)(1 - t_k),

with ``A = alpha / (N |C|)``, ``U = dL/dI`` and ``V = -dL/dP`` the derivatives of the region term with
respect to the per-class sums ``I = sum p t`` and ``P = sum p`` (for the Combo loss's Dice,
``U = -(1 - alpha) c 2 / den / (n_b |C|)`` and ``V = -(1 - alpha) c num / den^2 / (n_b |C|)``), ``w`` the voxel
mask and ``c`` the class weights. At most one
channel ``a`` per voxel has ``p_a > 1/2``; its odds can be huge (``p_a`` near 1), so its part is rewritten
with ``r = 1 - p_a`` computed from the other channels (never ``1 - p_a`` by subtraction):

    j = a:   dL/dx_a = h_reg_a - p_a S + q_a p_a
    j != a:  dL/dx_j = h_reg_j - p_j S + q_j o_j - q_a p_a (p_j / r)

where ``S = sum_k h_reg_k + sum_{k != a} q_k o_k``. Every factor is bounded (for ``j != a``, ``p_j < 1/2``
and ``p_j / r <= 1``), so the gradient stays finite for logits of any size. ``q_a p_a p_j / r`` is evaluated as
``exp(x_j + log(q_a p_a) - lse_rest)``, with ``lse_rest`` the log-sum-exp of the channels other than the
argmax; when no channel passes 1/2, ``q_a p_a`` is 0 and the formula is the plain one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_HALF = math.log(0.5)


class ComboOptions(NamedTuple):
    """Static options: the loss is ``ce_weight * L_wce + region_weight * region(I, P, T, weights)``.

    ``L_wce`` spans channels ``ce_first_channel:``. ``region`` maps the per-class sums over the spatial axis
    of channels ``first_channel:`` -- intersection ``I = sum p t``, ``P = sum p``, ``T = sum t``, each
    (B, |C|), or (|C|,) summed over the batch too with ``batch_dice`` -- and the (K,) class weights (or None)
    to a scalar: ``-mean(D)`` for the Combo loss, ``mean(1 - D)`` for a Dice loss, a Tversky or generalized
    Dice loss. Its gradient with respect to I and P is taken by autodiff on those small arrays.

    The Combo loss has ``ce_weight = alpha``, ``region_weight = 1 - alpha``; its cross-entropy term alone has
    ``region_weight = 0``; MONAI-style Dice + cross-entropy has ``beta = 1`` and a cross-entropy over all
    channels. A weight of 0 leaves its term out of the computation. ``ce_over_valid_labels`` averages the
    cross-entropy over the voxels whose integer label is in ``[0, K)`` only, as torch's cross-entropy does
    (otherwise such a voxel is a row of zeros, counted in the mean).
    """

    ce_weight: float
    region_weight: float
    beta: float
    first_channel: int
    ce_first_channel: int
    batch_dice: bool
    region: Callable | None
    ce_over_valid_labels: bool = False


def _channel_target(labels: jax.Array, k: int) -> jax.Array:
    """Target of channel k as (B, N): boolean from ids (B, N), float from one-hot/soft labels (B, N, K)."""
    if labels.ndim == 2:
        return labels == k
    return labels[..., k]


def _mix(t: jax.Array, if_one, if_zero):
    """t * if_one + (1 - t) * if_zero; a select for boolean targets, which XLA evaluates more cheaply."""
    if t.dtype == jnp.bool_:
        return jnp.where(t, if_one, if_zero)
    return t * if_one + (1.0 - t) * if_zero


def _ones_like_voxels(x: jax.Array) -> jax.Array:
    """A (B, N) array of ones that XLA cannot fold to a constant (NaN where the first logit is not finite)."""
    return 1.0 + 0.0 * x[..., 0]


def _computed_once(value: jax.Array, ones: jax.Array) -> jax.Array:
    """``value`` itself, marked expensive (a divide by a runtime one) so that XLA stores it once.

    Without it, XLA:CPU fuses the cheap chain that produces ``value`` (maxima, compares, selects over the
    channel slices) into every kernel that reads it.
    """
    return value / ones


def _sum_root(value: jax.Array, nan_if: jax.Array) -> jax.Array:
    """``value`` (NaN where ``nan_if`` is NaN) ending in a select, so a sum over it stays one kernel."""
    return jnp.where(nan_if == nan_if, value, nan_if)


def _argmax_and_max(xs: list[jax.Array]):
    m = functools.reduce(jnp.maximum, xs)
    argmax = jnp.full(m.shape, len(xs) - 1, jnp.int32)
    for k in range(len(xs) - 2, -1, -1):
        argmax = jnp.where(xs[k] == m, k, argmax)
    return m, argmax


def _voxel_stats(xs: list[jax.Array], ones: jax.Array):
    """Per voxel: log-sum-exp ``lse``, log-sum-exp of the other channels ``lse_rest``, max ``m``, argmax.

    Both log-sum-exps are exact for any logit gap: ``lse = m + log1p(sum_{j != a} exp(x_j - m))`` needs no
    second shift (a sum that underflows means ``log1p`` of it is below rounding), and ``lse_rest`` is shifted
    by the largest of the other channels, so ``log(1 - p_a) = lse_rest - lse`` never underflows.
    """
    m, argmax = _argmax_and_max(xs)
    others = [jnp.where(argmax == k, -jnp.inf, xk) for k, xk in enumerate(xs)]
    lse = m + jnp.log1p(functools.reduce(jnp.add, [jnp.exp(o - m) for o in others]))
    m2 = functools.reduce(jnp.maximum, others)
    lse_rest = m2 + jnp.log(functools.reduce(jnp.add, [jnp.exp(o - m2) for o in others]))
    return _computed_once(lse, ones), _computed_once(lse_rest, ones), m, argmax


def _forward(x, labels, mask, weights, options: ComboOptions):
    ce_weight, region_weight, beta, c0, ce0, batch_dice, region, ce_over_valid_labels = options
    batch, n, k_all = x.shape
    ones = _ones_like_voxels(x)
    xs = [x[..., k] for k in range(k_all)]
    lse, lse_rest, m, argmax = _voxel_stats(xs, ones)
    if ce_over_valid_labels and labels.ndim == 2:
        in_range = (labels >= 0) & (labels < k_all)
        count = jnp.maximum(jnp.sum(_mix(in_range, 1.0 if mask is None else mask, 0.0)), 1.0)
    elif mask is not None:
        count = jnp.maximum(jnp.sum(mask), 1.0)
    else:
        count = jnp.asarray(batch * n, x.dtype)
    loss = jnp.zeros((), x.dtype)
    sums = log_qa = None
    if ce_weight != 0.0:
        a_ce = ce_weight / (count * (k_all - ce0))
        ce_sum, log_qa = _cross_entropy(xs, labels, mask, weights, lse, lse_rest, m, argmax, ones, ce0, beta, a_ce)
        loss = loss + a_ce * ce_sum
    if region_weight != 0.0:
        sums = _region_sums(xs, labels, mask, lse, c0, batch_dice)
        loss = loss + region_weight * region(*sums, weights)
    return loss, (lse, log_qa, sums, count)


def _cross_entropy(xs, labels, mask, weights, lse, lse_rest, m, argmax, ones, c0, beta, a_ce):
    """(-sum over voxels and channels c0: of the weighted cross-entropy, log(q_a p_a) - lse_rest or None)."""
    k_all = len(xs)

    # log(q_a p_a) - lse_rest for the channel a with p_a > 1/2 (-inf where there is none, or q_a = 0); the
    # backward pass reads it (see the module docstring). With beta = 1 every q is 0.
    log_qa = None
    if beta != 1.0:
        hi = (m - lse) > _LOG_HALF
        q_a = jnp.zeros_like(lse)
        for k in range(c0, k_all):
            q_k = _mix(_channel_target(labels, k), 0.0, 1.0 - beta) * (1.0 if weights is None else weights[k])
            q_a = jnp.where(argmax == k, q_k, q_a)
        if mask is not None:
            q_a = q_a * mask
        log_qa = jnp.where(hi & (q_a > 0), jnp.log(a_ce * q_a) + (m - lse) - lse_rest, -jnp.inf)
        log_qa = _computed_once(log_qa, ones)

    # Cross-entropy per voxel. log(1 - p_k) is log1p(-p_k) for every channel below 1/2 (exact there) and
    # lse_rest - lse for the one above. With integer labels and no class weights, the (1 - beta) part over
    # the channels below 1/2 is the log of a product whose factors are all >= 1/2: one logarithm per voxel.
    product_form = labels.ndim == 2 and weights is None
    cross_only = beta == 1.0  # no log(1 - p) terms
    ce = jnp.zeros_like(lse)
    product = jnp.ones_like(lse)
    above_half = jnp.zeros(lse.shape, jnp.bool_)
    for k in range(c0, k_all):
        lp = xs[k] - lse
        t = _channel_target(labels, k)
        if cross_only:
            term = _mix(t, lp, 0.0)
            ce = ce + (term if weights is None else weights[k] * term)
            continue
        is_hi = lp > _LOG_HALF
        if product_form:
            ce = ce + jnp.where(t, lp, 0.0)
            product = product * jnp.where(t | is_hi, 1.0, 1.0 - jnp.exp(lp))
            above_half = above_half | (is_hi & ~t)
        else:
            log1m = jnp.where(is_hi, lse_rest - lse, jnp.log1p(-jnp.exp(jnp.where(is_hi, -jnp.inf, lp))))
            term = _mix(t, beta * lp, (1.0 - beta) * log1m)
            ce = ce + (term if weights is None else weights[k] * term)
    if product_form and not cross_only:
        ce = beta * ce + (1.0 - beta) * (jnp.log(product) + jnp.where(above_half, lse_rest - lse, 0.0))
    if mask is not None:
        ce = ce * mask
    return -jnp.sum(_sum_root(ce, lse)), log_qa


def _region_sums(xs, labels, mask, lse, c0, batch_dice):
    """Sums of p t, p and t over voxels for channels c0:, (B, |C|) or (|C|,), from the channel slices."""
    k_all = len(xs)
    inter, psum, tsum = [], [], []
    for k in range(c0, k_all):
        p = jnp.exp(xs[k] - lse)
        if mask is not None:
            p = p * mask
        t = _channel_target(labels, k)
        inter.append(jnp.sum(_mix(t, p, 0.0), axis=1))
        psum.append(jnp.sum(p, axis=1))
        tsum.append(jnp.sum(_mix(t, 1.0 if mask is None else mask, 0.0), axis=1))
    inter, psum, tsum = (jnp.stack(v, axis=-1) for v in (inter, psum, tsum))  # (B, |C|)
    if batch_dice:
        inter, psum, tsum = (jnp.sum(v, axis=0) for v in (inter, psum, tsum))  # (|C|,)
    return inter, psum, tsum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def combo_softmax(x, labels, mask, weights, options: ComboOptions):
    """Combo loss of flattened softmax inputs.

    Args:
      x: logits (B, N, K), float32 or float64.
      labels: integer ids (B, N) or one-hot/soft labels (B, N, K) of x's dtype; treated as constants.
      mask: (B, N) float mask of valid voxels, or None.
      weights: (K,) class weights, or None; treated as constants.
      options: the static options.
    """
    return _forward(x, labels, mask, weights, options)[0]


def _combo_fwd(x, labels, mask, weights, options):
    loss, stats = _forward(x, labels, mask, weights, options)
    return loss, (x, labels, mask, weights, stats)


def _combo_bwd(options, residuals, g):
    ce_weight, region_weight, beta, c0, ce0, batch_dice, region, _ = options
    x, labels, mask, weights, (lse, log_qa, sums, count) = residuals
    batch, _, k_all = x.shape
    has_ce, has_region = ce_weight != 0.0, region_weight != 0.0
    has_q = log_qa is not None  # the (1 - beta) log(1 - p) terms
    if not (has_ce or has_region):
        return jnp.zeros_like(x), None, None, None
    a_ce = ce_weight / (count * (k_all - ce0))

    def class_weight(k):
        return 1.0 if weights is None else weights[k]

    # Region coefficients per (sample, channel): U = dL/dI and V = -dL/dP, zero for the channels left out.
    u = v = jnp.zeros((batch, k_all), x.dtype)
    if has_region:
        num_organs = k_all - c0
        inter, psum, tsum = sums
        grad_i, grad_p = jax.grad(lambda i, p: region(i, p, tsum, weights), argnums=(0, 1))(inter, psum)
        u, v = region_weight * grad_i, -region_weight * grad_p  # (B, |C|) or (|C|,)
        if batch_dice:
            u, v = jnp.broadcast_to(u, (batch, num_organs)), jnp.broadcast_to(v, (batch, num_organs))
        u, v = jnp.pad(u, ((0, 0), (c0, 0))), jnp.pad(v, ((0, 0), (c0, 0)))
    first = min(c0 if has_region else k_all, ce0 if has_ce else k_all)

    # S = sum_k h_reg_k + sum_{k != a} q_k o_k per voxel, from the channel slices, stored once.
    xs = [x[..., k] for k in range(k_all)]
    s = jnp.zeros_like(lse)
    for k in range(first, k_all):
        lp = xs[k] - lse
        p = jnp.exp(lp)
        t = _channel_target(labels, k)
        if has_region and k >= c0:
            uk, vk = u[:, k, None], v[:, k, None]
            s = s + p * _mix(t, uk - vk, -vk)
        if has_ce and k >= ce0:
            s = s - _mix(t, a_ce * class_weight(k) * beta, 0.0)
            if has_q:
                q = _mix(t, 0.0, a_ce * class_weight(k) * (1.0 - beta))
                s = s + jnp.where(lp > _LOG_HALF, 0.0, q * p / (1.0 - p))
    if mask is not None:
        s = s * mask
    s = _computed_once(s, _ones_like_voxels(x))

    # The gradient as one elementwise expression over (B, N, K): per-voxel statistics broadcast along the
    # channel axis, per-class Dice coefficients along the voxel axis. (Per-channel arrays stacked at the
    # end would be a concatenation, which XLA:CPU does not vectorize.)
    def voxel(a):
        return a[..., None]

    classes = jnp.arange(k_all)
    t = labels[..., None] == classes if labels.ndim == 2 else labels
    ce_w = a_ce * jnp.where(classes >= ce0, 1.0 if weights is None else weights, 0.0).astype(x.dtype)
    lp = x - voxel(lse)
    p = jnp.exp(lp)
    h = jnp.zeros_like(x)
    if has_region:
        h = p * _mix(t, (u - v)[:, None, :], -v[:, None, :])
    if has_ce:
        h = h - _mix(t, ce_w * beta, 0.0)
    if mask is not None:
        h = h * voxel(mask)
    dx = h - p * voxel(s)
    if has_q:
        qk = _mix(t, 0.0, ce_w * (1.0 - beta))
        if mask is not None:
            qk = qk * voxel(mask)
        is_hi = lp > _LOG_HALF
        odds = p / (1.0 - jnp.where(is_hi, 0.0, p))
        dx = dx + jnp.where(is_hi, qk * p, qk * odds - jnp.exp(x + voxel(log_qa)))
    return g * dx, None, None, None


combo_softmax.defvjp(_combo_fwd, _combo_bwd)
