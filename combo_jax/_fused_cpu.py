"""The two passes of :mod:`combo_jax._fused` arranged for XLA:CPU's fusion passes.

The math is that of :mod:`combo_jax._fused_xla`; the arrangement differs, because of how XLA:CPU compiles
(measured with ``benchmarks/profile_loss.py``, see BENCHMARKS.md):

* Reductions become library kernels (``ynn_fusion``) that are fast over a long contiguous axis and slow over
  a short one: a reduction over the channel axis of ``(B, N, K)`` or over the voxels of a ``(B, N, K)``
  array costs several times a full elementwise pass. With few classes (``sliced``) every channel is its own
  ``(B, N)`` array: per-voxel reductions over channels are chains of elementwise adds and maxima, and every
  per-class sum runs over a contiguous ``(B, N)`` array. With many classes the channel axis stays an array
  axis, so that the program does not grow with K.
* The elementwise producer of a sum is split at every add and multiply into separately stored arrays, so
  each summand ends in a select (:func:`_sum_root`) and stays one kernel.
* Cheap per-voxel statistics (maxima, compares, selects) are fused into, and recomputed by, every kernel
  that reads them; :func:`_computed_once` marks one as expensive (a divide by a runtime one) so that it is
  stored once.
* Sums cost kernels: the cross-entropy of all channels is added up per voxel, weighted by its coefficients
  in the loss (the loss is linear in the cross-entropy sums; the coefficients depend on the label counts
  alone and are taken by autodiff before the pass), so one sum replaces ``2 K``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from combo_jax._sums import LOG_HALF, ClassSums, select


def _ones_like_voxels(x: jax.Array) -> jax.Array:
    """A (B, N) array of ones that XLA cannot fold to a constant (NaN where the first logit is not finite)."""
    return 1.0 + 0.0 * x[..., 0]


def _computed_once(value: jax.Array, ones: jax.Array) -> jax.Array:
    """``value`` itself, marked expensive (a divide by a runtime one) so that XLA stores it once."""
    return value / ones


def _squeeze(stat: jax.Array) -> jax.Array:
    """A per-voxel statistic as (B, N), from (B, N) or (B, N, 1)."""
    return stat[..., 0] if stat.ndim == 3 else stat


def _sum_root(value: jax.Array, nan_if: jax.Array) -> jax.Array:
    """``value`` (NaN where ``nan_if`` is NaN) ending in a select, so a sum over it stays one kernel."""
    return jnp.where(nan_if == nan_if, value, nan_if)


class _Channels:
    """The logits and targets as per-channel ``(B, N)`` arrays (``sliced``) or one ``(B, N, K)`` array.

    Per-voxel reductions over channels and per-class sums over voxels go through these methods, so the rest
    of the module is written once for both layouts. Sliced, only the channels ``first_channel:`` that the
    loss reads are computed (``every=True`` for all): channel arrays are dicts from channel index to array,
    and the sums of the other channels are zeros.
    """

    def __init__(self, x, labels, sliced: bool, first_channel: int):
        self.sliced = sliced
        self.num_classes = x.shape[-1]
        self.first_channel = first_channel
        if sliced:
            self.x = {k: x[..., k] for k in range(self.num_classes)}
            self.t = {k: labels == k if labels.ndim == 2 else labels[..., k] for k in range(self.num_classes)}
        else:
            self.x = x
            self.t = labels[..., None] == jnp.arange(self.num_classes) if labels.ndim == 2 else labels

    def map(self, fn, *channelwise, per_class=(), every=False):
        """``fn`` of each channel's arrays; ``per_class`` (B, K) arrays are passed as that channel's (B, 1)."""
        if not self.sliced:
            return fn(*channelwise, *(c[:, None, :] for c in per_class))
        channels = range(0 if every else self.first_channel, self.num_classes)
        return {k: fn(*(a[k] for a in channelwise), *(c[:, k, None] for c in per_class)) for k in channels}

    def voxel(self, stat):
        """A per-voxel (B, N) statistic, shaped to combine with the channel arrays."""
        return stat if self.sliced else stat[..., None]

    def reduce(self, op, values, neutral=None, first=None):
        """Per voxel over the channels: (B, N). With ``neutral``, over the channels the loss reads only
        (``first:``, by default ``first_channel:``)."""
        first = self.first_channel if first is None else first
        if self.sliced:
            return functools.reduce(op, [v for k, v in values.items() if neutral is None or k >= first])
        if neutral is not None and first:
            values = jnp.where(jnp.arange(self.num_classes) >= first, values, neutral)
        reducer = {jnp.maximum: jnp.max, jnp.add: jnp.sum, jnp.multiply: jnp.prod, jnp.logical_or: jnp.any}[op]
        return reducer(values, axis=-1)

    def class_sums(self, values, mask):
        """Per sample and class over the voxels: (B, K)."""
        if mask is not None:
            mask = self.voxel(mask)
        if not self.sliced:
            return jnp.sum(values if mask is None else values * mask, axis=1)
        sums = {k: jnp.sum(v if mask is None else v * mask, axis=1) for k, v in values.items()}
        zeros = jnp.zeros_like(next(iter(sums.values())))
        return jnp.stack([sums.get(k, zeros) for k in range(self.num_classes)], axis=-1)


def _cross_entropy_coefficients(spec, target, voxels, hyper):
    """The loss's coefficients of ``ce_positive`` and ``ce_negative`` (it is linear in them), ``(B, K)`` each."""
    zeros = jnp.zeros_like(target)
    if not spec.cross_entropy:
        return zeros, zeros

    def cross_entropy_part(pos, neg):
        return spec.objective(ClassSums(zeros, zeros, target, pos, neg, voxels), hyper)

    return jax.grad(cross_entropy_part, argnums=(0, 1))(zeros, zeros)


def _cross_entropy_total(ce, mask, lse):
    """The weighted cross-entropy of all voxels from its per-voxel sums ``(B, N)``."""
    if mask is not None:
        ce = ce * mask
    return jnp.sum(_sum_root(ce, lse))


def _region_value(spec, intersection, predicted, target, voxels, hyper, grad: bool):
    """The loss without its cross-entropy terms, and (with ``grad``) its cotangents of I and P."""
    zeros = jnp.zeros_like(target)

    def region_part(inter, pred):
        return spec.objective(ClassSums(inter, pred, target, zeros, zeros, voxels), hyper)

    if not grad:
        return region_part(intersection, predicted), None
    return jax.value_and_grad(region_part, argnums=(0, 1))(intersection, predicted)


def value_and_grad(spec, x, labels, mask, hyper, *, sliced: bool, grad: bool = True):
    """``(loss, d loss / d x)`` of a :class:`combo_jax._fused.Spec` (just the loss with ``grad=False``)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x_in = x
    x = x.astype(dtype)
    if labels.ndim == 3:
        labels = labels.astype(dtype)
    if mask is not None:
        mask = mask.astype(dtype)
    if not sliced and labels.ndim == 2:
        out = _many_classes(spec, x, labels, mask, hyper, grad=grad)
        return out if not grad else (out[0], out[1].astype(x_in.dtype))
    batch, n, num_classes = x.shape
    ch = _Channels(x, labels, sliced, spec.first_channel)
    ones = _ones_like_voxels(x)
    weight = 1.0 if mask is None else ch.voxel(mask)

    # Label counts, voxel counts, and the loss's coefficients of the cross-entropy sums.
    target = ch.class_sums(ch.map(lambda t: select(t, 1.0, 0.0), ch.t), mask).astype(dtype)
    voxels = jnp.full((batch,), n, dtype) if mask is None else jnp.sum(mask, axis=1)
    c_pos, c_neg = _cross_entropy_coefficients(spec, target, voxels, hyper)

    # Pass one: per-voxel log-sum-exps, then the per-class sums of p t and p, and the weighted cross-entropy.
    m = ch.reduce(jnp.maximum, ch.x)
    exps = ch.map(lambda x_k: jnp.exp(x_k - ch.voxel(m)), ch.x, every=True)
    lse = _computed_once(m + jnp.log(ch.reduce(jnp.add, exps)), ones)
    lse_v = ch.voxel(lse)
    lp = ch.map(lambda x_k: x_k - lse_v, ch.x, every=spec.complement)
    p = ch.map(jnp.exp, lp)
    lse_rest = None
    if spec.complement:
        # log(1 - p_k): log1p(-p_k) below 1/2; for the one channel above, the log-sum-exp of the other channels
        # (shifted by their own maximum, exact for any logit gap) minus lse.
        others = ch.map(lambda x_k, lp_k: jnp.where(lp_k > LOG_HALF, -jnp.inf, x_k), ch.x, lp, every=True)
        m2 = ch.reduce(jnp.maximum, others)
        rest = ch.reduce(jnp.add, ch.map(lambda o: jnp.exp(o - ch.voxel(m2)), others, every=True))
        lse_rest = ch.voxel(_computed_once(m2 + jnp.log(rest), ones))
    pw = p if mask is None else ch.map(lambda p_k: p_k * weight, p)
    intersection = ch.class_sums(ch.map(lambda t, p_k: select(t, p_k, 0.0), ch.t, pw), None)
    predicted = ch.class_sums(pw, None)
    ce_total = jnp.zeros((), dtype)
    if spec.cross_entropy:
        def voxel_cross_entropy(t, lp_k, c_pos_k, c_neg_k):
            if not spec.complement:
                return select(t, -c_pos_k * lp_k, 0.0)
            hi = lp_k > LOG_HALF
            log1m = jnp.where(hi, lse_rest - lse_v, jnp.log1p(-jnp.exp(jnp.where(hi, LOG_HALF, lp_k))))
            return select(t, -c_pos_k * lp_k, -c_neg_k * log1m)

        if spec.complement and labels.ndim == 2 and spec.uniform_complement:
            # With one coefficient for every channel read (integer labels), sum_k (1 - t_k) log(1 - p_k) is the
            # log of a product of factors 1 - p_k >= 1/2 (the channels below 1/2 that are not the target; the
            # product is >= exp(-2) since sum p_k <= 1) plus the log-sum-exp form for the channel above 1/2 if
            # it is not the target: one logarithm per voxel instead of one per channel.
            def factor(t, lp_k, p_k):
                return jnp.where(t | (lp_k > LOG_HALF), 1.0, 1.0 - p_k)

            c0 = spec.complement_channel
            product = ch.reduce(jnp.multiply, ch.map(factor, ch.t, lp, p), neutral=1.0, first=c0)
            above = ch.reduce(jnp.logical_or, ch.map(lambda t, lp_k: (lp_k > LOG_HALF) & ~t, ch.t, lp),
                              neutral=False, first=c0)
            negative = jnp.log(product) + jnp.where(above, _squeeze(lse_rest) - lse,
                                                    0.0)
            positive = ch.reduce(jnp.add, ch.map(lambda t, lp_k, c: jnp.where(t, -c * lp_k, 0.0), ch.t, lp,
                                                 per_class=(c_pos,)))
            ce = positive - c_neg[:, c0, None] * negative
        else:
            ce = ch.reduce(jnp.add, ch.map(voxel_cross_entropy, ch.t, lp, per_class=(c_pos, c_neg)))
        ce_total = _cross_entropy_total(ce, mask, lse)
    region_value, cotangents = _region_value(spec, intersection, predicted, target, voxels, hyper, grad)
    if not grad:
        return region_value + ce_total
    c_i, c_p = cotangents

    # Pass two: per voxel S = sum_k A_k and Q (see _fused_xla), stored once; then the gradient as one
    # elementwise expression over (B, N, K) with the per-voxel statistics broadcast along the channel axis.
    def a_term(t, p_k, lp_k, c_i_k, c_p_k, c_pos_k, c_neg_k):
        a = select(t, (c_i_k + c_p_k) * p_k - c_pos_k, c_p_k * p_k)
        if spec.complement:
            hi = lp_k > LOG_HALF
            a = a + select(t, 0.0, jnp.where(hi, 0.0, c_neg_k * p_k / (1.0 - jnp.where(hi, 0.0, p_k))))
        return a

    per_class = (c_i, c_p, c_pos, c_neg)
    s_total = _computed_once(ch.reduce(jnp.add, ch.map(a_term, ch.t, p, lp, per_class=per_class)), ones)
    big_q = None
    if spec.complement:
        def q_term(t, p_k, lp_k, c_neg_k):
            return select(t, 0.0, jnp.where(lp_k > LOG_HALF, c_neg_k * p_k, 0.0))

        big_q = _computed_once(ch.reduce(jnp.add, ch.map(q_term, ch.t, p, lp, per_class=(c_neg,))), ones)

    t_all = labels[..., None] == jnp.arange(num_classes) if labels.ndim == 2 else labels
    lp_all = x - lse[..., None]
    p_all = jnp.exp(lp_all)
    a_all = a_term(t_all, p_all, lp_all, *(c[:, None, :] for c in per_class))
    g = a_all - p_all * s_total[..., None]
    if mask is not None:
        g = g * mask[..., None]
    if spec.complement:
        rest_all = lse_rest if not sliced else lse_rest[..., None]
        q_all = big_q[..., None] if mask is None else (big_q * mask)[..., None]
        g = g + q_all * jnp.where(lp_all > LOG_HALF, 1.0, -jnp.exp(x - rest_all))
    return region_value + ce_total, g.astype(x_in.dtype)


def _per_voxel(table, ids):
    """``table[b, ids[b, v]]``: (B, K) per-class values at each voxel's label, (B, N)."""
    return jnp.take_along_axis(table, ids, axis=1)


def _contract(a, v, spec):
    """``jnp.einsum(spec, a, v)`` at full float32 precision."""
    return jnp.einsum(spec, a, v, precision=jax.lax.Precision.HIGHEST)


def _many_classes(spec, x, ids, mask, hyper, *, grad: bool):
    """The vectorized routine for integer labels: what depends on the label is gathered and scattered.

    With many classes a select over the class axis against a one-hot target costs a full pass per use; here
    the target channel's logit is gathered once per voxel, the label counts and the intersections are
    scatter-adds, and the per-voxel cross-entropy reads the coefficient of the voxel's class. ``1 - p_a`` of
    the channel above 1/2 is the sum of the other channels' exponentials (no cancellation); where that
    underflows somewhere (logit gaps beyond exp's range), a ``lax.cond`` takes the log-sum-exp shifted by the
    second largest logit instead, which costs two more passes only then.
    """
    dtype = x.dtype
    batch, n, num_classes = x.shape
    c0 = spec.complement_channel  # (c0 serves the uniform log(1 - p) terms only)
    ones = _ones_like_voxels(x)
    in_range = (ids >= 0) & (ids < num_classes)  # an id outside [0, K) belongs to no class
    weight = in_range.astype(dtype) if mask is None else jnp.where(in_range, mask, 0.0)
    safe_ids = jnp.where(in_range, ids, 0)
    segments = jnp.where(in_range, ids, num_classes)  # an id outside [0, K) is dropped

    def scatter(values):  # per-class sums over the voxels of each sample, (B, K); per sample, so that a batch
        # split across devices stays split
        def one(seg, v):
            return jnp.zeros((num_classes,), dtype).at[seg].add(v, mode="drop")

        return jax.vmap(one)(segments, values)

    target = scatter(weight)
    voxels = jnp.full((batch,), n, dtype) if mask is None else jnp.sum(mask, axis=1)
    c_pos, c_neg = _cross_entropy_coefficients(spec, target, voxels, hyper)
    channel = jnp.arange(num_classes)
    kept = channel >= c0

    # Pass one.
    m = jnp.max(x, axis=-1)
    exps = jnp.exp(x - m[..., None])
    total = jnp.sum(exps, axis=-1)
    lse = _computed_once(m + jnp.log(total), ones)
    x_y = jnp.take_along_axis(x, safe_ids[..., None], axis=-1)[..., 0]
    lp_y = x_y - lse
    p_y = jnp.exp(lp_y)
    lp = x - lse[..., None]
    inv_total = _computed_once(1.0 / total, ones)
    p = exps * inv_total[..., None]  # the exponentials already taken, normalized
    intersection = scatter(p_y * weight)
    # Sums of p over the voxels (per class) and over the classes (per voxel, below) as contractions of the
    # exponentials with a per-voxel or per-class vector: dot kernels, with no (B, N, K) product stored.
    predicted = _contract(exps, inv_total if mask is None else inv_total * mask, "bnk,bn->bk")
    hi_exists = (m - lse) > LOG_HALF  # the argmax a is above 1/2 (then it is the only channel at the max)
    y_is_a = in_range & (x_y == m)
    lse_rest = None
    if spec.complement:
        rest = jnp.sum(jnp.where(x < m[..., None], exps, 0.0), axis=-1)  # sum_{j != a} exp(x_j - m)
        cheap = m + jnp.log(rest)

        def exact(_):
            others = jnp.where(x < m[..., None], x, -jnp.inf)
            m2 = jnp.max(others, axis=-1)
            return m2 + jnp.log(jnp.sum(jnp.exp(others - m2[..., None]), axis=-1))

        underflow = jnp.any(hi_exists & (rest < jnp.finfo(dtype).tiny * 2**20))
        # The log-sum-exp of the channels other than the one above 1/2: where there is none, of all channels
        # (lse), as in _sums.softmax_parts. Both forms above leave out every channel at the maximum, and give
        # -inf or NaN where no channel is below it (all logits equal, say).
        lse_rest = jnp.where(hi_exists, jax.lax.cond(underflow, exact, lambda _: cheap, None), lse)
        lse_rest = _computed_once(lse_rest, ones)
        a_kept = hi_exists if c0 == 0 else hi_exists & (jnp.max(x[..., :c0], axis=-1) < m)  # a >= c0
        above = a_kept & ~y_is_a  # the channel above 1/2 is read by the loss and is not the target
        y_counts = in_range & (safe_ids >= c0) & ~(hi_exists & y_is_a)  # the target is read and below 1/2
    ce_total = jnp.zeros((), dtype)
    if spec.cross_entropy:
        ce = jnp.where(in_range, -_per_voxel(c_pos, safe_ids) * lp_y, 0.0)
        if spec.complement:
            hi = lp > LOG_HALF
            if spec.uniform_complement:
                # sum over the channels read, not the target and below 1/2, of log(1 - p_k): the log of a product
                # of factors >= 1/2, with the target's factor divided out.
                product = jnp.prod(jnp.where(hi | ~kept, 1.0, 1.0 - p), axis=-1)
                negative = jnp.log(product) - jnp.where(y_counts, jnp.log1p(-p_y), 0.0)
                negative = negative + jnp.where(above, lse_rest - lse, 0.0)
                ce = ce - c_neg[:, c0, None] * negative
            else:
                log1m = jnp.where(hi, (lse_rest - lse)[..., None], jnp.log1p(-jnp.where(hi, 0.5, p)))
                others = channel != safe_ids[..., None]
                ce = ce - jnp.sum(jnp.where(others | ~in_range[..., None], c_neg[:, None, :] * log1m, 0.0),
                                  axis=-1)
        ce_total = _cross_entropy_total(ce, mask, lse)
    region_value, cotangents = _region_value(spec, intersection, predicted, target, voxels, hyper, grad)
    if not grad:
        return region_value + ce_total
    c_i, c_p = cotangents

    # Pass two: A_k = cP_k p_k + [k = y] (cI_y p_y - cCE+_y) + [k != y, below 1/2] cCE-_k o_k per voxel; the
    # gradient is A - p sum_k A_k + Q (...) as in _fused_xla.
    label_term = jnp.where(in_range, _per_voxel(c_i, safe_ids) * p_y - _per_voxel(c_pos, safe_ids), 0.0)
    s_total = inv_total * _contract(exps, c_p, "bnk,bk->bn") + label_term
    big_q = None
    if spec.complement:
        hi = lp > LOG_HALF
        not_target = channel != ids[..., None]  # an id outside [0, K) is no channel
        odds = jnp.where(hi | ~not_target, 0.0, c_neg[:, None, :] * p / (1.0 - jnp.where(hi, 0.0, p)))
        s_total = s_total + jnp.sum(odds, axis=-1)
        if spec.uniform_complement:
            c_neg_a = jnp.where(a_kept, c_neg[:, c0, None], 0.0)
        else:
            c_neg_a = jnp.sum(jnp.where(hi, c_neg[:, None, :], 0.0), axis=-1)
        big_q = jnp.where(hi_exists & ~y_is_a, c_neg_a * jnp.exp(m - lse), 0.0)
        if mask is not None:
            big_q = big_q * mask
        big_q = _sum_root(big_q, lse)
    # Ending the per-voxel statistics in a select keeps them out of the library reduction kernels, so the
    # gradient below is one elementwise kernel that reads them.
    s_total = _sum_root(s_total, lse)
    a = c_p[:, None, :] * p + jnp.where(channel == ids[..., None], label_term[..., None], 0.0)
    if spec.complement:
        a = a + odds
    g = a - p * s_total[..., None]
    if mask is not None:
        g = g * mask[..., None]
    if spec.complement:
        # exp(x - lse_rest): on the cheap path the exponentials already taken over the sum of the others.
        inv_rest = jnp.where(hi_exists, 1.0 / rest, 0.0)
        rest_p = jax.lax.cond(underflow, lambda _: jnp.exp(x - lse_rest[..., None]),
                              lambda _: exps * inv_rest[..., None], None)
        g = g + big_q[..., None] * jnp.where(hi, 1.0, -rest_p)
    return region_value + ce_total, _sum_root(g, x)
