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

with ``A = alpha / (N |C|)``, the Dice coefficients ``U = -(1 - alpha) c 2 / den / (n_b |C|)`` and
``V = -(1 - alpha) c num / den^2 / (n_b |C|)``, ``w`` the voxel mask and ``c`` the class weights. At most one
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
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_HALF = math.log(0.5)


class ComboOptions(NamedTuple):
    alpha: float
    beta: float
    smooth: float
    first_channel: int
    batch_dice: bool


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
    alpha, beta, smooth, c0, batch_dice = options
    batch, n, k_all = x.shape
    num_organs = k_all - c0
    ones = _ones_like_voxels(x)
    xs = [x[..., k] for k in range(k_all)]
    lse, lse_rest, m, argmax = _voxel_stats(xs, ones)
    if mask is not None:
        count = jnp.maximum(jnp.sum(mask), 1.0)
    else:
        count = jnp.asarray(batch * n, x.dtype)
    a_ce = alpha / (count * num_organs)

    # log(q_a p_a) - lse_rest for the channel a with p_a > 1/2 (-inf where there is none, or q_a = 0); the
    # backward pass reads it (see the module docstring).
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
    ce = jnp.zeros_like(lse)
    product = jnp.ones_like(lse)
    above_half = jnp.zeros(lse.shape, jnp.bool_)
    for k in range(c0, k_all):
        lp = xs[k] - lse
        t = _channel_target(labels, k)
        is_hi = lp > _LOG_HALF
        if product_form:
            ce = ce + jnp.where(t, lp, 0.0)
            product = product * jnp.where(t | is_hi, 1.0, 1.0 - jnp.exp(lp))
            above_half = above_half | (is_hi & ~t)
        else:
            log1m = jnp.where(is_hi, lse_rest - lse, jnp.log1p(-jnp.exp(jnp.where(is_hi, -jnp.inf, lp))))
            term = _mix(t, beta * lp, (1.0 - beta) * log1m)
            ce = ce + (term if weights is None else weights[k] * term)
    if product_form:
        ce = beta * ce + (1.0 - beta) * (jnp.log(product) + jnp.where(above_half, lse_rest - lse, 0.0))
    if mask is not None:
        ce = ce * mask
    ce_mean = -jnp.sum(_sum_root(ce, lse)) / (count * num_organs)

    # Dice sums over the spatial axis, from the per-channel probabilities.
    inter, psum, tsum = [], [], []
    for k in range(c0, k_all):
        p = jnp.exp(xs[k] - lse)
        if mask is not None:
            p = p * mask
        t = _channel_target(labels, k)
        inter.append(jnp.sum(_mix(t, p, 0.0), axis=1))
        psum.append(jnp.sum(p, axis=1))
        if mask is not None:
            tsum.append(jnp.sum(_mix(t, mask, 0.0), axis=1))
        elif t.dtype == jnp.bool_:
            tsum.append(jnp.sum(t, axis=1, dtype=jnp.int32).astype(x.dtype))
        else:
            tsum.append(jnp.sum(t, axis=1))
    inter, psum, tsum = (jnp.stack(v, axis=-1) for v in (inter, psum, tsum))  # (B, |C|)
    if batch_dice:
        inter, psum, tsum = (jnp.sum(v, axis=0) for v in (inter, psum, tsum))  # (|C|,)
    num = 2.0 * inter + smooth
    den = psum + tsum + smooth
    dice = num / den
    if weights is not None:
        dice = dice * weights[c0:]
    loss = alpha * ce_mean - (1.0 - alpha) * jnp.mean(dice)
    return loss, (lse, log_qa, num, den, count)


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
    alpha, beta, smooth, c0, batch_dice = options
    x, labels, mask, weights, (lse, log_qa, num, den, count) = residuals
    batch, _, k_all = x.shape
    num_organs = k_all - c0
    a_ce = alpha / (count * num_organs)
    n_dice = num_organs * (1 if batch_dice else batch)
    organ_w = jnp.ones((num_organs,), x.dtype) if weights is None else weights[c0:]
    u = -(1.0 - alpha) * organ_w * 2.0 / den / n_dice  # (B, |C|) or (|C|,)
    v = -(1.0 - alpha) * organ_w * num / (den * den) / n_dice
    if batch_dice:
        u, v = jnp.broadcast_to(u, (batch, num_organs)), jnp.broadcast_to(v, (batch, num_organs))

    def organ_weight(k):
        return 1.0 if weights is None else weights[k]

    # S = sum_k h_reg_k + sum_{k != a} q_k o_k per voxel, from the channel slices, stored once.
    xs = [x[..., k] for k in range(k_all)]
    s = jnp.zeros_like(lse)
    for k in range(c0, k_all):
        lp = xs[k] - lse
        p = jnp.exp(lp)
        t = _channel_target(labels, k)
        uk, vk = u[:, k - c0, None], v[:, k - c0, None]
        h = _mix(t, p * (uk - vk) - a_ce * organ_weight(k) * beta, -p * vk)
        q = _mix(t, 0.0, a_ce * organ_weight(k) * (1.0 - beta))
        s = s + h + jnp.where(lp > _LOG_HALF, 0.0, q * p / (1.0 - p))
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
    cw = jnp.where(classes >= c0, 1.0 if weights is None else weights, 0.0).astype(x.dtype)
    u_full = jnp.pad(u, ((0, 0), (c0, 0)))[:, None, :]
    v_full = jnp.pad(v, ((0, 0), (c0, 0)))[:, None, :]
    lp = x - voxel(lse)
    p = jnp.exp(lp)
    h = _mix(t, p * (u_full - v_full) - a_ce * cw * beta, -p * v_full)
    qk = _mix(t, 0.0, a_ce * cw * (1.0 - beta))
    if mask is not None:
        h, qk = h * voxel(mask), qk * voxel(mask)
    is_hi = lp > _LOG_HALF
    odds = p / (1.0 - jnp.where(is_hi, 0.0, p))
    dx = g * (h - p * voxel(s) + jnp.where(is_hi, qk * p, qk * odds - jnp.exp(x + voxel(log_qa))))
    return dx, None, None, None


combo_softmax.defvjp(_combo_fwd, _combo_bwd)
