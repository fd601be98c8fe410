"""The softmax Combo loss with a hand-derived gradient, written per channel.

:func:`combo_jax.losses.combo_loss` and :func:`combo_jax.losses.weighted_cross_entropy` route softmax
inputs here. The math is exactly theirs; only the evaluation differs, for speed:

* The channel axis is small (K of 2 to 20 organs), and XLA:CPU fuses a reduction over a small minor axis
  into its elementwise consumers, recomputing it for every channel (K^2 work) and running it unvectorized.
  Here every channel is a separate ``(B, N)`` array and per-voxel reductions over channels are elementwise
  sums of those arrays.
* Autodiff of the softmax chain materializes many full-size intermediates. ``jax.custom_vjp`` replaces it
  with one forward pass (per-voxel log-sum-exp, then the sums the loss needs) and one backward pass that
  writes the gradient directly.

Gradient. With ``h_k = p_k dL/dp_k`` (per voxel), the softmax Jacobian gives ``dL/dx_j = h_j - p_j sum_k h_k``.
For the Combo loss ``h_k = h_reg_k + q_k o_k`` where ``o_k = p_k / (1 - p_k)`` (from the ``log(1 - p_k)`` term)
and ``h_reg_k`` collects the rest:

    h_reg_k = w [-A c_k beta t_k + p_k (U_k t_k - V_k)],    q_k = A w c_k (1 - beta)(1 - t_k),

with ``A = alpha / (N |C|)``, the Dice coefficients ``U = -(1 - alpha) c 2 / den / (n_b |C|)`` and
``V = -(1 - alpha) c num / den^2 / (n_b |C|)``, ``w`` the voxel mask and ``c`` the class weights. The odds
``o_a`` of the most likely channel ``a`` can be huge (``p_a`` near 1), so its part is rewritten with
``r = 1 - p_a`` summed from the other channels (never ``1 - p_a`` by subtraction):

    j = a:   dL/dx_a = h_reg_a - p_a H_reg + q_a p_a - p_a R
    j != a:  dL/dx_j = h_reg_j - p_j H_reg + q_j o_j - p_j R - q_a p_a (p_j / r)

where ``H_reg = sum_k h_reg_k`` and ``R = sum_{k != a} q_k o_k``. Every factor is bounded (for ``j != a``,
``p_j <= 1/2`` and ``p_j / r <= 1``), so the gradient stays finite for logits of any size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


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


def _voxel_stats(xs: list[jax.Array]):
    """Per voxel: max logit m, log-sum-exp offset ls (log sum exp(x - m)), argmax a, log(1 - p_a).

    Exact for any logit gap: with m2 the largest logit but the maximum one (equal to m on ties),
    rest = sum_{j != a} exp(x_j - m) = exp(m2 - m) r2 with r2 = sum_{j != a} exp(x_j - m2) >= 1, so
    log(rest) = m2 - m + log r2 never underflows, s = 1 + rest gives ls = softplus(log rest), and
    log(1 - p_a) = log(rest) - ls.
    """
    m = functools.reduce(jnp.maximum, xs)
    argmax = jnp.zeros(m.shape, jnp.int32)
    for k in range(len(xs) - 1, -1, -1):
        argmax = jnp.where(xs[k] == m, k, argmax)
    others = [jnp.where(argmax == k, -jnp.inf, xk) for k, xk in enumerate(xs)]
    m2 = functools.reduce(jnp.maximum, others)
    r2 = functools.reduce(jnp.add, [jnp.exp(o - m2) for o in others])
    log_rest = m2 - m + jnp.log(r2)
    ls = jax.nn.softplus(log_rest)
    # Materialize the per-voxel statistics: fused into each channel's consumer they would be recomputed.
    return jax.lax.optimization_barrier((m, ls, argmax, log_rest - ls))


def _forward(x, labels, mask, weights, options: ComboOptions):
    alpha, beta, smooth, c0, batch_dice = options
    batch, n, k_all = x.shape
    num_organs = k_all - c0
    xs = [x[..., k] for k in range(k_all)]
    m, ls, argmax, log1m_a = _voxel_stats(xs)

    # With integer labels and no class weights, sum_k (1 - t_k) log(1 - p_k) over the channels below the
    # maximum is the log of a product whose factors are all >= 1/2: one logarithm per voxel instead of one
    # per channel. The most likely channel contributes log1m_a.
    product_form = labels.ndim == 2 and weights is None
    ce = jnp.zeros_like(m)
    product = jnp.ones_like(m)
    inter, psum, tsum = [], [], []
    for k in range(c0, k_all):
        lp = xs[k] - m - ls
        p = jnp.exp(lp)
        t = _channel_target(labels, k)
        if product_form:
            ce = ce + jnp.where(t, lp, 0.0)
            product = product * jnp.where(t | (argmax == k), 1.0, 1.0 - p)
        else:
            # For every channel but the most likely one p <= 1/2, so log1p(-p) is exact.
            log1m = jnp.where(argmax == k, log1m_a, jnp.log1p(-p))
            term = _mix(t, beta * lp, (1.0 - beta) * log1m)
            ce = ce + (term if weights is None else weights[k] * term)
        if mask is not None:
            p = p * mask
        inter.append(jnp.sum(_mix(t, p, 0.0), axis=1))
        psum.append(jnp.sum(p, axis=1))
        tsum.append(jnp.sum(_mix(t, 1.0 if mask is None else mask, 0.0), axis=1))
    if product_form:
        max_is_negative_organ = (argmax >= c0) & (labels != argmax)
        ce = beta * ce + (1.0 - beta) * (jnp.log(product) + jnp.where(max_is_negative_organ, log1m_a, 0.0))
    if mask is not None:
        ce = ce * mask
        count = jnp.maximum(jnp.sum(mask), 1.0)
    else:
        count = jnp.asarray(batch * n, x.dtype)
    inter, psum, tsum = (jnp.stack(v, axis=-1) for v in (inter, psum, tsum))  # (B, |C|)
    if batch_dice:
        inter, psum, tsum = (jnp.sum(v, axis=0) for v in (inter, psum, tsum))  # (|C|,)
    num = 2.0 * inter + smooth
    den = psum + tsum + smooth
    dice = num / den
    organ_w = None if weights is None else weights[c0:]
    if organ_w is not None:
        dice = dice * organ_w
    ce_mean = -jnp.sum(ce) / (count * num_organs)
    loss = alpha * ce_mean - (1.0 - alpha) * jnp.mean(dice)
    return loss, (m, ls, argmax, log1m_a, num, den, count)


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
    x, labels, mask, weights, (m, ls, argmax, log1m_a, num, den, count) = residuals
    batch, _, k_all = x.shape
    num_organs = k_all - c0
    a_ce = alpha / (count * num_organs)
    n_dice = num_organs * (1 if batch_dice else batch)
    organ_w = jnp.ones((num_organs,), x.dtype) if weights is None else weights[c0:]
    u = -(1.0 - alpha) * organ_w * 2.0 / den / n_dice  # (B, |C|) or (|C|,)
    v = -(1.0 - alpha) * organ_w * num / (den * den) / n_dice
    if batch_dice:
        u, v = jnp.broadcast_to(u, (batch, num_organs)), jnp.broadcast_to(v, (batch, num_organs))

    # The gradient as one elementwise expression over (B, N, K): per-voxel statistics broadcast along the
    # channel axis, per-class Dice coefficients along the voxel axis. (Per-channel arrays stacked at the
    # end would be a concatenation, which XLA:CPU does not vectorize.) It needs one per-voxel sum over the
    # channels, s1 = sum_k (h_reg_k + q_k o_k), computed first from per-channel slices.
    def voxel(a):
        return a[..., None]

    def organ_weight(k):
        return 1.0 if weights is None else weights[k]

    xs = [x[..., k] for k in range(k_all)]
    s1 = jnp.zeros_like(m)
    q_a = jnp.zeros_like(m)
    for k in range(c0, k_all):
        lp_k = xs[k] - m - ls
        p_k = jnp.exp(lp_k)
        t_k = _channel_target(labels, k)
        uk, vk = u[:, k - c0, None], v[:, k - c0, None]
        h_k = _mix(t_k, p_k * (uk - vk) - a_ce * organ_weight(k) * beta, -p_k * vk)
        q_k = _mix(t_k, 0.0, a_ce * organ_weight(k) * (1.0 - beta))
        odds_k = jnp.where(argmax == k, 0.0, p_k / (1.0 - p_k))
        s1 = s1 + h_k + q_k * odds_k
        q_a = q_a + jnp.where(argmax == k, q_k, 0.0)
    if mask is not None:
        s1, q_a = s1 * mask, q_a * mask
    p_a = jnp.exp(-ls)
    q_a_p_a = q_a * p_a
    s1, q_a_p_a = jax.lax.optimization_barrier((s1, q_a_p_a))

    classes = jnp.arange(k_all)
    t = labels[..., None] == classes if labels.ndim == 2 else labels
    cw = jnp.where(classes >= c0, 1.0 if weights is None else weights, 0.0).astype(x.dtype)
    u_full = jnp.pad(u, ((0, 0), (c0, 0)))[:, None, :]
    v_full = jnp.pad(v, ((0, 0), (c0, 0)))[:, None, :]
    lp = x - voxel(m) - voxel(ls)
    p = jnp.exp(lp)
    h = _mix(t, p * (u_full - v_full) - a_ce * cw * beta, -p * v_full)
    qk = _mix(t, 0.0, a_ce * cw * (1.0 - beta))
    if mask is not None:
        h, qk = h * voxel(mask), qk * voxel(mask)
    is_max = voxel(argmax) == classes
    odds = p / (1.0 - jnp.where(is_max, 0.0, p))
    at_max = voxel(q_a_p_a)
    # p_j / (1 - p_a) <= 1 for j != a, as exp(log p_j - log(1 - p_a)): no overflow for any logit gap.
    elsewhere = qk * odds - voxel(q_a_p_a) * jnp.exp(lp - voxel(log1m_a))
    dx = g * (h - p * voxel(s1) + jnp.where(is_max, at_max, elsewhere))
    return dx, None, None, None


combo_softmax.defvjp(_combo_fwd, _combo_bwd)
