"""Segmentation losses for imbalanced multi-organ data: Combo, Dice and their family.

Every function here is pure and works under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and sharding.

Layout is channels-last:

* ``logits``: float array of shape ``(B, *spatial, K)`` with one or more spatial axes.
* ``labels``: either integer class ids of shape ``(B, *spatial)``, or float one-hot / soft labels of shape
  ``(B, *spatial, K)``.
* ``where``: optional boolean mask of shape ``(B, *spatial)``; voxels where it is ``False`` contribute to no
  term of any loss (neither to sums nor to voxel counts).
* ``ignore_index``: with integer labels, voxels whose label equals it are masked out as if ``where`` were
  ``False`` there.

``activation`` says how ``logits`` become probabilities:

* ``"softmax"``: exclusive classes, channel 0 is the background (needs ``K >= 2``);
* ``"sigmoid"``: multi-label, each channel an independent binary problem;
* ``"none"``: the inputs are already probabilities in ``[0, 1]``; logarithms then use probabilities clipped
  to ``[1e-7, 1]`` since there are no logits to derive them from.

Numerics: inputs of any float dtype are promoted to at least float32 before any arithmetic, so bf16/fp16
logits reduce in float32; float64 stays float64 (with ``jax_enable_x64``). Log-probabilities come from the
logits (log-sum-exp, ``log_sigmoid``), never from the log of a clipped probability.

Integer labels outside ``[0, K)`` (and not ``ignore_index``) cannot be checked under ``jit``: such a voxel
one-hot encodes to all zeros, i.e. it belongs to no class. It then still counts in every probability sum and
as a negative for every class. One exception: the softmax cross-entropy of integer labels (``cross_entropy``,
and the cross-entropy term of ``dice_ce_loss``) follows torch, weighting each voxel by its class's weight and
dividing the mean by the summed weights, so there such a voxel weighs 0 and is left out entirely. Call
:func:`check_labels` on concrete labels to reject them eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from combo_jax import _fused

__all__ = [
    "check_labels",
    "combo_loss",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "focal_loss",
    "generalized_dice_loss",
    "soft_dice",
    "tversky_loss",
    "weighted_cross_entropy",
]

ACTIVATIONS = ("softmax", "sigmoid", "none")
REDUCTIONS = ("mean", "sum", "none")
_PROB_EPS = 1e-7  # clip for log(p) and log(1 - p) on the activation="none" path only

ArrayLike = Any


# --------------------------------------------------------------------------------------------------
# Input checking (static: shapes, dtypes and Python-scalar options; never array values)
# --------------------------------------------------------------------------------------------------


def _check_unit_interval(fn: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a Python number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got {value}")


def _check_nonnegative(fn: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a Python number, got {type(value).__name__}")
    if not value >= 0.0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")


def _check_choice(fn: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def _prepare(
    fn: str,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    activation: str,
    where: ArrayLike | None,
    ignore_index: int | None,
):
    """Validates the arrays and returns ``(x, target, mask, ids)`` flattened to ``(B, N, K)``.

    ``x`` is the logits in the compute dtype (at least float32), ``target`` the one-hot/soft labels in the
    same dtype, ``mask`` a ``(B, N, 1)`` float array of valid voxels or ``None`` when every voxel counts,
    ``ids`` the integer labels as ``(B, N)`` (``None`` for float labels).
    """
    _check_choice(fn, "activation", activation, ACTIVATIONS)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{fn}: logits must be a floating-point array, got dtype {logits.dtype}")
    if logits.ndim < 3:
        raise ValueError(
            f"{fn}: logits must have shape (B, *spatial, K) with at least one spatial axis, got shape "
            f"{logits.shape}"
        )
    num_classes = logits.shape[-1]
    if activation == "softmax" and num_classes < 2:
        raise ValueError(
            f"{fn}: activation='softmax' needs at least 2 channels (background and one class), got logits "
            f"of shape {logits.shape}; use activation='sigmoid' for a single foreground channel"
        )
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    batch, spatial = logits.shape[0], logits.shape[1:-1]
    n = int(np.prod(spatial))
    x = logits.astype(dtype).reshape(batch, n, num_classes)

    valid = ids = None
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"{fn}: integer labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, got "
                f"{labels.shape} (logits {logits.shape})"
            )
        ids = labels.reshape(batch, n)
        if ignore_index is not None:
            valid = ids != ignore_index
        target = (ids[..., None] == jnp.arange(num_classes, dtype=ids.dtype)).astype(dtype)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(
                f"{fn}: float (one-hot or soft) labels must have the shape of logits {logits.shape}, got "
                f"{labels.shape}"
            )
        if ignore_index is not None:
            raise ValueError(f"{fn}: ignore_index needs integer labels; got float labels, use where= instead")
        target = labels.astype(dtype).reshape(batch, n, num_classes)
    else:
        raise TypeError(
            f"{fn}: labels must be integer class ids or float one-hot/soft labels, got dtype {labels.dtype}"
        )

    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"{fn}: where must be a boolean array, got dtype {where.dtype}")
        if where.shape != logits.shape[:-1]:
            raise ValueError(
                f"{fn}: where must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {where.shape}"
            )
        where = where.reshape(batch, n)
        valid = where if valid is None else valid & where
    mask = None if valid is None else valid[..., None].astype(dtype)
    return x, target, mask, ids


def _class_weights(fn: str, class_weights: ArrayLike | None, num_classes: int, dtype) -> jax.Array | None:
    """Returns the per-channel weights as a ``(K,)`` array, checking the length (and sign when concrete)."""
    if class_weights is None:
        return None
    if not isinstance(class_weights, jax.core.Tracer):
        # Checked on the host value, which stays concrete under jit (a traced array cannot be checked).
        host = np.asarray(class_weights)
        if np.any(host < 0):
            raise ValueError(f"{fn}: class_weights must be >= 0, got {host.tolist()}")
    w = jnp.asarray(class_weights, dtype=dtype)
    if w.ndim != 1 or w.shape[0] != num_classes:
        raise ValueError(
            f"{fn}: class_weights must have one entry per channel of logits, shape ({num_classes},), got "
            f"shape {w.shape}"
        )
    return w


def _reduce(fn: str, values: jax.Array, reduction: str) -> jax.Array:
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "sum":
        return jnp.sum(values)
    return values


def _first_channel(activation: str, include_background: bool) -> int:
    """The index of the first channel in the organ set C: background (0) is left out for softmax only."""
    return 0 if include_background or activation == "sigmoid" else 1


def _valid_count(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Number of voxels that count, never below 1 so that a fully masked batch gives 0, not NaN."""
    if mask is None:
        return jnp.asarray(x.shape[0] * x.shape[1], x.dtype)
    return jnp.maximum(jnp.sum(mask), 1.0)


# --------------------------------------------------------------------------------------------------
# Probabilities and log-probabilities from logits
# --------------------------------------------------------------------------------------------------


def check_labels(labels: ArrayLike, num_classes: int, *, ignore_index: int | None = None) -> None:
    """Eagerly checks that concrete integer ``labels`` lie in ``[0, num_classes)`` (or equal ``ignore_index``).

    Losses cannot check array values under ``jit``; call this on the host before training (for example on
    each loaded volume). Raises ``ValueError`` naming the offending values and how many voxels carry them.
    """
    if isinstance(labels, jax.core.Tracer):
        raise TypeError("check_labels: labels must be a concrete array, not a traced value inside jit")
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"check_labels: labels must be integer class ids, got dtype {arr.dtype}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"check_labels: num_classes must be a positive integer, got {num_classes!r}")
    bad = (arr < 0) | (arr >= num_classes)
    if ignore_index is not None:
        bad &= arr != ignore_index
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(map(str, values[:10].tolist())) + (", ..." if values.size > 10 else "")
        raise ValueError(
            f"check_labels: labels must lie in [0, {num_classes}) (num_classes={num_classes}); found value(s) "
            f"{shown} in {int(bad.sum())} voxel(s)"
        )


def _probs(x: jax.Array, activation: str) -> jax.Array:
    if activation == "softmax":
        return jax.nn.softmax(x, axis=-1)
    if activation == "sigmoid":
        return jax.nn.sigmoid(x)
    return x


def _log_probs(x: jax.Array, activation: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(p, log p, log(1 - p))`` per channel, each of the shape of ``x``."""
    if activation == "sigmoid":
        # log(1 - sigmoid(x)) = log_sigmoid(-x): exact for large |x|.
        return jax.nn.sigmoid(x), jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
    if activation == "none":
        p = x
        return p, jnp.log(jnp.clip(p, _PROB_EPS, 1.0)), jnp.log(jnp.clip(1.0 - p, _PROB_EPS, 1.0))
    # Softmax, log p_k = x_k - logsumexp(x). For log(1 - p_k): every channel but the most likely one a has
    # p_k <= 1/2, so log1p(-p_k) is exact. For a itself, 1 - p_a = sum_{j != a} p_j is a log-sum-exp over
    # the other channels, shifted by their own maximum m2 so that it never underflows, whatever the gap.
    # The shifts m and m2 are constants for differentiation (the value does not depend on them).
    num_classes = x.shape[-1]
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    is_a = jax.nn.one_hot(jnp.argmax(x, axis=-1), num_classes, dtype=jnp.bool_)
    others = jnp.where(is_a, -jnp.inf, x)
    m2 = jax.lax.stop_gradient(jnp.max(others, axis=-1, keepdims=True))
    log_rest = m2 - m + jnp.log(jnp.sum(jnp.where(is_a, 0.0, jnp.exp(others - m2)), axis=-1, keepdims=True))
    # s = sum_k exp(x_k - m) = exp(x_a - m) + rest; x_a - m is 0 but carries x_a's gradient.
    log_s = jnp.logaddexp(jnp.sum(jnp.where(is_a, x - m, 0.0), axis=-1, keepdims=True), log_rest)
    lp = x - m - log_s
    p = jnp.exp(lp)
    return p, lp, jnp.where(is_a, log_rest - log_s, jnp.log1p(-jnp.where(is_a, 0.0, p)))


# --------------------------------------------------------------------------------------------------
# Dice primitive
# --------------------------------------------------------------------------------------------------


def _dice_one_class(p, t, w, *, smooth_nr, smooth_dr, squared_pred, jaccard, batch_dice):
    """Dice (or Jaccard) of one class. ``p``, ``t``: (B, N); ``w``: (B, N) or None. Returns (B,) or ()."""
    if w is not None:
        p, t = p * w, t * w
    axes = (0, 1) if batch_dice else 1
    inter = jnp.sum(p * t, axis=axes)
    if squared_pred:
        return _dice_ratio(inter, jnp.sum(p * p, axis=axes), jnp.sum(t * t, axis=axes), smooth_nr, smooth_dr, jaccard)
    return _dice_ratio(inter, jnp.sum(p, axis=axes), jnp.sum(t, axis=axes), smooth_nr, smooth_dr, jaccard)


def _dice_ratio(inter, psum, tsum, smooth_nr, smooth_dr, jaccard):
    """Dice (or Jaccard) from the sums over voxels of p t, p (or p^2) and t (or t^2)."""
    if jaccard:
        return (2.0 * inter + smooth_nr) / (2.0 * (psum + tsum - inter) + smooth_dr)
    return (2.0 * inter + smooth_nr) / (psum + tsum + smooth_dr)


def _region_sums_of(p, t, mask, c0, batch_dice, squared=False):
    """Sums over voxels (and the batch with ``batch_dice``) of p t, p and t for the channels ``c0:``.

    With ``squared`` the second and third are the sums of p^2 and t^2 (MONAI's ``squared_pred``).
    """
    p, t = p[..., c0:], t[..., c0:]
    if mask is not None:
        p, t = p * mask, t * mask
    axes = (0, 1) if batch_dice else 1
    inter = jnp.sum(p * t, axis=axes)
    if squared:
        return inter, jnp.sum(p * p, axis=axes), jnp.sum(t * t, axis=axes)
    return inter, jnp.sum(p, axis=axes), jnp.sum(t, axis=axes)


# Region terms as functions of the per-class sums (I, P, T) of the kept channels and the (K,) class weights:
# the plain path computes the sums from probabilities, the fused softmax path (_fused.py) from the logits and
# differentiates these functions with respect to I and P.


def _combo_dice_region(inter, psum, tsum, weights, *, c0, smooth):
    """The Combo loss's region term, ``-mean_k(c_k D_k)``."""
    dice = _dice_ratio(inter, psum, tsum, smooth, smooth, False)
    return -jnp.mean(dice if weights is None else dice * weights[c0:])


def _dice_loss_region(inter, psum, tsum, weights, *, c0, smooth_nr, smooth_dr, jaccard, reduction):
    """``w_k (1 - D_k)``, reduced."""
    loss = 1.0 - _dice_ratio(inter, psum, tsum, smooth_nr, smooth_dr, jaccard)
    return _reduce("dice_loss", loss if weights is None else loss * weights[c0:], reduction)


def _tversky_region(inter, psum, tsum, weights, *, alpha, beta, smooth_nr, smooth_dr, reduction):
    """``1 - (TP + S_nr) / (TP + alpha FP + beta FN + S_dr)`` with FP = P - I and FN = T - I, reduced."""
    tversky = (inter + smooth_nr) / (inter + alpha * (psum - inter) + beta * (tsum - inter) + smooth_dr)
    return _reduce("tversky_loss", 1.0 - tversky, reduction)


def _generalized_dice_region(inter, psum, tsum, weights, *, w_type, smooth_nr, smooth_dr, reduction):
    """Sudre et al.'s generalized Dice loss with class weights from the label volumes T, reduced."""
    if w_type == "square":
        w = 1.0 / (tsum * tsum)
    elif w_type == "simple":
        w = 1.0 / tsum
    else:
        w = jnp.ones_like(tsum)
    finite = jnp.isfinite(w)
    w = jnp.where(finite, w, 0.0)
    w = jnp.where(finite, w, jnp.max(w, axis=-1, keepdims=True))
    numer = 2.0 * jnp.sum(inter * w, axis=-1) + smooth_nr
    loss = 1.0 - numer / (jnp.sum((psum + tsum) * w, axis=-1) + smooth_dr)
    return _reduce("generalized_dice_loss", jnp.atleast_1d(loss), reduction)


def _soft_dice_flat(p, t, mask, **options):
    """Per-class Dice of flattened ``(B, N, K)`` inputs, vmapped over the class axis."""
    w = None if mask is None else mask[..., 0]
    one = functools.partial(_dice_one_class, **options)
    return jax.vmap(one, in_axes=(-1, -1, None), out_axes=-1)(p, t, w)


def soft_dice(
    probs: ArrayLike,
    onehot: ArrayLike,
    *,
    smooth_nr: float = 1.0,
    smooth_dr: float = 1.0,
    squared_pred: bool = False,
    jaccard: bool = False,
    batch_dice: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Soft Dice coefficient of every class.

    .. math::
        D_k = \frac{2 \sum_v p_{vk} t_{vk} + S_{nr}}{\sum_v p_{vk} + \sum_v t_{vk} + S_{dr}}

    with sums over the spatial axes of each sample (and over the batch too when ``batch_dice``). With
    ``squared_pred`` the denominator sums ``p^2`` and ``t^2``. With ``jaccard`` it returns the soft Jaccard
    index in MONAI's scaling, ``(2 I + S_nr) / (2 (P + T - I) + S_dr)``. The coefficient is written for one
    class and ``jax.vmap``-ped over the class axis.

    Args:
      probs: probabilities, shape ``(B, *spatial, K)``.
      onehot: one-hot or soft labels of the same shape.
      smooth_nr, smooth_dr: smoothing added to numerator and denominator (the Combo paper's ``S = 1``).
      squared_pred: square predictions and labels in the denominator.
      jaccard: return the Jaccard index instead of Dice.
      batch_dice: pool the sums over the batch ("batch Dice", as nnU-Net and MONAI ``batch=True``).
      where: optional boolean mask ``(B, *spatial)``; masked voxels are left out of every sum.

    Returns:
      Array of shape ``(B, K)``, or ``(K,)`` with ``batch_dice``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> probs = jax.nn.softmax(jnp.zeros((1, 4, 4, 3)))
      >>> soft_dice(probs, jax.nn.one_hot(jnp.zeros((1, 4, 4), int), 3)).shape
      (1, 3)
    """
    fn = "soft_dice"
    probs, onehot = jnp.asarray(probs), jnp.asarray(onehot)
    if not jnp.issubdtype(probs.dtype, jnp.floating) or not jnp.issubdtype(onehot.dtype, jnp.floating):
        raise TypeError(f"{fn}: probs and onehot must be floating-point, got {probs.dtype} and {onehot.dtype}")
    if probs.ndim < 3 or probs.shape != onehot.shape:
        raise ValueError(
            f"{fn}: probs and onehot must share a shape (B, *spatial, K) with at least one spatial axis, got "
            f"{probs.shape} and {onehot.shape}"
        )
    _check_nonnegative(fn, "smooth_nr", smooth_nr)
    _check_nonnegative(fn, "smooth_dr", smooth_dr)
    p, t, mask, _ = _prepare(fn, probs, onehot, activation="none", where=where, ignore_index=None)
    return _soft_dice_flat(
        p,
        t,
        mask,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        squared_pred=squared_pred,
        jaccard=jaccard,
        batch_dice=batch_dice,
    )


# --------------------------------------------------------------------------------------------------
# The Combo loss and its cross-entropy term
# --------------------------------------------------------------------------------------------------


def _fused_softmax(
    x, t, ids, mask, weights, *, ce_weight, region_weight=0.0, region=None, beta=1.0, c0, ce_c0, batch_dice=False,
    ce_over_valid_labels=False,
):
    """``ce_weight * L_wce + region_weight * region(I, P, T, weights)`` through :mod:`combo_jax._fused`.

    The cross-entropy spans channels ``ce_c0:`` and the region sums channels ``c0:`` (see
    :class:`combo_jax._fused.ComboOptions`). Labels and class weights are constants of the loss: no gradient
    flows to them.
    """
    labels = jax.lax.stop_gradient(ids if ids is not None else t)
    if weights is not None:
        weights = jax.lax.stop_gradient(weights)
    options = _fused.ComboOptions(
        float(ce_weight), float(region_weight), float(beta), c0, ce_c0, bool(batch_dice), region,
        bool(ce_over_valid_labels),
    )
    return _fused.combo_softmax(x, labels, None if mask is None else mask[..., 0], weights, options)


def _weighted_ce_sum(lp, l1m, t, mask, beta, weights):
    """Sum over voxels and channels of -[beta t log p + (1 - beta)(1 - t) log(1 - p)] (times weights)."""
    term = beta * t * lp + (1.0 - beta) * (1.0 - t) * l1m
    if weights is not None:
        term = term * weights
    if mask is not None:
        term = term * mask
    return -jnp.sum(term)


def weighted_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    beta: float = 0.5,
    activation: str = "softmax",
    include_background: bool = False,
    class_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""The Combo paper's beta-weighted cross-entropy over the organ channels C.

    .. math::
        L_{wce} = -\frac{1}{N |C|} \sum_{v} \sum_{k \in C} w_k \left[\beta\, t_{vk} \ln p_{vk}
                  + (1 - \beta)(1 - t_{vk}) \ln(1 - p_{vk})\right]

    N is the number of voxels that count (all of the batch, or those ``where``/``ignore_index`` keep).
    C is every channel but the background channel 0 for ``activation="softmax"`` (all channels with
    ``include_background=True``), and every channel for ``"sigmoid"``. Leaving the background out is what
    makes beta steer the output: with the background channel included in a softmax, a background voxel
    predicted as an organ pays ``beta`` on the background channel and ``1 - beta`` on the organ channel, an
    organ voxel predicted as background pays the mirror pair, and beta's asymmetry cancels. Over organ
    channels only, a false positive pays ``(1 - beta)`` and a false negative ``beta``: ``beta < 0.5``
    penalizes false positives more, ``beta > 0.5`` false negatives.

    Args:
      logits: ``(B, *spatial, K)``.
      labels: integer ids ``(B, *spatial)`` or one-hot/soft labels ``(B, *spatial, K)``.
      beta: weight of the positive (``t = 1``) term, in ``[0, 1]``.
      activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
      include_background: with softmax, keep channel 0 in C.
      class_weights: optional ``(K,)`` per-channel weights ``w_k`` (channels outside C are ignored).
      where: optional boolean mask ``(B, *spatial)``.
      ignore_index: label id to leave out (integer labels only).

    Returns:
      A scalar.
    """
    fn = "weighted_cross_entropy"
    _check_unit_interval(fn, "beta", beta)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    c0 = _first_channel(activation, include_background)
    if activation == "softmax":
        # alpha = 1: the Combo loss is its cross-entropy term alone.
        return _fused_softmax(x, t, ids, mask, weights, ce_weight=1.0, beta=beta, c0=c0, ce_c0=c0)
    _, lp, l1m = _log_probs(x, activation)
    w = None if weights is None else weights[c0:]
    total = _weighted_ce_sum(lp[..., c0:], l1m[..., c0:], t[..., c0:], mask, beta, w)
    return total / (_valid_count(x, mask) * (x.shape[-1] - c0))


def combo_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    activation: str = "softmax",
    include_background: bool = False,
    batch_dice: bool = False,
    class_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""The Combo loss of Taghanaki et al. (arXiv 1805.02798).

    .. math::
        L = \alpha\, L_{wce}(\beta) - (1 - \alpha) \frac{1}{|C|} \sum_{k \in C} w_k D_k

    with :math:`L_{wce}` as in :func:`weighted_cross_entropy` and the soft Dice
    :math:`D_k = (2 \sum p t + S) / (\sum p + \sum t + S)` of :func:`soft_dice`, over the spatial axes of
    each sample and then averaged over the batch (``batch_dice=False``), or pooled over the batch
    (``batch_dice=True``). The loss lies in ``[-(1 - alpha), +inf)``; a perfect prediction of a sample
    with every organ present reaches about ``-(1 - alpha)``.

    Choices the paper leaves open, and ours:

    * The organ set C: background excluded for softmax (see :func:`weighted_cross_entropy` for why beta
      needs this), every channel for sigmoid.
    * Organs are averaged, not summed, so alpha keeps its meaning whatever the number of organs. The
      paper's sum-over-organs form is
      ``alpha * weighted_cross_entropy(...) - (1 - alpha) * soft_dice(p[..., 1:], t[..., 1:]).sum(-1).mean()``.
    * Dice per image, averaged over the batch, by default; ``batch_dice=True`` for the pooled form.
    * An organ absent from a sample with no predicted mass gives ``D = S / S = 1`` (agreement on
      absence); with ``smooth = 0`` such a term is ``0 / 0``, so keep ``smooth > 0`` when organs can be
      absent.

    Args:
      logits: ``(B, *spatial, K)``.
      labels: integer ids ``(B, *spatial)`` or one-hot/soft labels ``(B, *spatial, K)``.
      alpha: weight of the cross-entropy term, in ``[0, 1]``.
      beta: cross-entropy weight of the positive term, in ``[0, 1]``; ``< 0.5`` penalizes false positives,
        ``> 0.5`` false negatives.
      smooth: Dice smoothing ``S`` (numerator and denominator).
      activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
      include_background: with softmax, keep channel 0 in C.
      batch_dice: pool Dice sums over the batch.
      class_weights: optional ``(K,)`` weights multiplying each channel's cross-entropy and Dice terms.
      where: optional boolean mask ``(B, *spatial)``.
      ignore_index: label id to leave out (integer labels only).

    Returns:
      A scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
      >>> labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 4)
      >>> loss, grads = jax.value_and_grad(combo_loss)(logits, labels, beta=0.3)
    """
    fn = "combo_loss"
    _check_unit_interval(fn, "alpha", alpha)
    _check_unit_interval(fn, "beta", beta)
    _check_nonnegative(fn, "smooth", smooth)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    c0 = _first_channel(activation, include_background)
    region = functools.partial(_combo_dice_region, c0=c0, smooth=smooth)
    if activation == "softmax":
        return _fused_softmax(x, t, ids, mask, weights, ce_weight=alpha, region_weight=1.0 - alpha, region=region,
                              beta=beta, c0=c0, ce_c0=c0, batch_dice=batch_dice)
    p, lp, l1m = _log_probs(x, activation)
    w = None if weights is None else weights[c0:]
    ce = _weighted_ce_sum(lp[..., c0:], l1m[..., c0:], t[..., c0:], mask, beta, w)
    ce = ce / (_valid_count(x, mask) * (x.shape[-1] - c0))
    return alpha * ce + (1.0 - alpha) * region(*_region_sums_of(p, t, mask, c0, batch_dice), weights)


# --------------------------------------------------------------------------------------------------
# Region losses: Dice, generalized Dice, Tversky (MONAI semantics)
# --------------------------------------------------------------------------------------------------


def _region_inputs(fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr):
    """Checks and prepares the inputs of a region loss; returns ``(x, p, t, mask, c0, ids)`` over all channels."""
    _check_nonnegative(fn, "smooth_nr", smooth_nr)
    _check_nonnegative(fn, "smooth_dr", smooth_dr)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    c0 = 0 if include_background else 1
    if c0 >= x.shape[-1]:
        raise ValueError(
            f"{fn}: include_background=False leaves no channel with logits of shape {jnp.shape(logits)}"
        )
    return x, _probs(x, activation), t, mask, c0, ids


def _region_fusable(activation: str, reduction: str, squared_pred: bool = False) -> bool:
    """Whether a region loss can take the fused softmax path: a scalar of the sums of p t, p and t."""
    return activation == "softmax" and reduction in ("mean", "sum") and not squared_pred


def dice_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    activation: str = "softmax",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    jaccard: bool = False,
    batch_dice: bool = False,
    include_background: bool = True,
    class_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Soft Dice loss ``1 - D_k`` per sample and class, as MONAI ``DiceLoss``.

    .. math:: L_{bk} = w_k \left(1 - \frac{2 \sum p t + S_{nr}}{\sum p + \sum t + S_{dr}}\right)

    Defaults follow MONAI (``smooth_nr = smooth_dr = 1e-5``, ``include_background=True``) except that the
    activation defaults to softmax, since the inputs are logits. ``include_background=False`` drops
    channel 0 for any activation, as MONAI does. ``class_weights`` has one entry per channel of the logits
    (MONAI's ``weight`` has one per kept channel: pass ``weight=class_weights[1:]`` there when
    ``include_background=False``).

    Args:
      logits: ``(B, *spatial, K)``.
      labels: integer ids ``(B, *spatial)`` or one-hot/soft labels ``(B, *spatial, K)``.
      activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
      smooth_nr, smooth_dr: smoothing of numerator and denominator.
      squared_pred: square predictions and labels in the denominator.
      jaccard: use the soft Jaccard index (MONAI's scaling) instead of Dice.
      batch_dice: pool sums over the batch (MONAI ``batch=True``).
      include_background: keep channel 0.
      class_weights: optional ``(K,)`` weights per channel.
      where: optional boolean mask ``(B, *spatial)``.
      ignore_index: label id to leave out (integer labels only).
      reduction: ``"mean"`` or ``"sum"`` over samples and classes, or ``"none"`` for the ``(B, C)``
        (``(C,)`` with ``batch_dice``) array.
    """
    fn = "dice_loss"
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, p, t, mask, c0, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    region = functools.partial(_dice_loss_region, c0=c0, smooth_nr=smooth_nr, smooth_dr=smooth_dr, jaccard=jaccard,
                               reduction=reduction)
    if _region_fusable(activation, reduction, squared_pred):
        return _fused_softmax(x, t, ids, mask, weights, ce_weight=0.0, region_weight=1.0, region=region, c0=c0,
                              ce_c0=c0, batch_dice=batch_dice)
    return region(*_region_sums_of(p, t, mask, c0, batch_dice, squared_pred), weights)


GDL_WEIGHT_TYPES = ("square", "simple", "uniform")


def generalized_dice_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    w_type: str = "square",
    activation: str = "softmax",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = True,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Generalized Dice loss (Sudre et al. 2017), as MONAI ``GeneralizedDiceLoss``.

    .. math::
        L_b = 1 - \frac{2 \sum_k w_k \sum_v p t + S_{nr}}{\sum_k w_k (\sum_v p + \sum_v t) + S_{dr}},
        \quad w_k = 1 / (\sum_v t_{vk})^2 \;(\text{square}),\; 1 / \sum_v t_{vk} \;(\text{simple}),\; 1

    A class absent from a sample (infinite weight) gets the largest finite weight of that sample (of the
    batch with ``batch_dice``), as MONAI does. Returns a scalar, or ``(B,)`` (``(1,)`` with
    ``batch_dice``) for ``reduction="none"``.
    """
    fn = "generalized_dice_loss"
    _check_choice(fn, "w_type", w_type, GDL_WEIGHT_TYPES)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, p, t, mask, c0, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    region = functools.partial(_generalized_dice_region, w_type=w_type, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                               reduction=reduction)
    if _region_fusable(activation, reduction):
        return _fused_softmax(x, t, ids, mask, None, ce_weight=0.0, region_weight=1.0, region=region, c0=c0,
                              ce_c0=c0, batch_dice=batch_dice)
    return region(*_region_sums_of(p, t, mask, c0, batch_dice), None)


def tversky_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    activation: str = "softmax",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = True,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Tversky loss (Salehi et al. 2017), as MONAI ``TverskyLoss``.

    .. math::
        L_{bk} = 1 - \frac{TP + S_{nr}}{TP + \alpha FP + \beta FN + S_{dr}},\quad
        TP = \sum p t,\; FP = \sum p (1 - t),\; FN = \sum (1 - p) t

    ``alpha`` weighs false positives and ``beta`` false negatives; ``alpha = beta = 0.5`` is Dice.
    ``reduction="none"`` returns ``(B, C)`` (``(C,)`` with ``batch_dice``).
    """
    fn = "tversky_loss"
    _check_nonnegative(fn, "alpha", alpha)
    _check_nonnegative(fn, "beta", beta)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, p, t, mask, c0, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    region = functools.partial(_tversky_region, alpha=alpha, beta=beta, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                               reduction=reduction)
    if _region_fusable(activation, reduction):
        return _fused_softmax(x, t, ids, mask, None, ce_weight=0.0, region_weight=1.0, region=region, c0=c0,
                              ce_c0=c0, batch_dice=batch_dice)
    return region(*_region_sums_of(p, t, mask, c0, batch_dice), None)


# --------------------------------------------------------------------------------------------------
# Voxel losses: cross-entropy, focal; and Dice + cross-entropy
# --------------------------------------------------------------------------------------------------


def _cross_entropy_flat(fn, x, t, mask, int_labels, activation, weights, label_smoothing, reduction):
    """Cross-entropy of flattened inputs with torch ``CrossEntropyLoss`` / ``BCEWithLogitsLoss`` semantics."""
    k = x.shape[-1]
    _, lp, l1m = _log_probs(x, activation)
    if activation == "sigmoid":
        # Multi-label: binary cross-entropy per channel, averaged over voxels and channels.
        tt = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
        per = -(tt * lp + (1.0 - tt) * l1m)
        if weights is not None:
            per = per * weights
        if mask is not None:
            per = per * mask
        if reduction == "mean":
            return jnp.sum(per) / (_valid_count(x, mask) * k)
        return per.reshape(-1) if reduction == "none" else jnp.sum(per)
    w = jnp.ones((k,), x.dtype) if weights is None else weights
    if int_labels:
        # torch: nll weighted by w[y], the smoothing term -sum_k w_k log p_k / K; "mean" divides both by
        # sum_v w[y_v].
        wy = jnp.sum(t * w, axis=-1)
        in_range = jnp.sum(t, axis=-1)  # 0 for a label outside [0, K): that voxel is left out entirely
        per = -(1.0 - label_smoothing) * wy * jnp.sum(t * lp, axis=-1)
        per -= (label_smoothing / k) * in_range * jnp.sum(w * lp, axis=-1)
        norm_w = wy
    else:
        # torch, probability targets: -sum_k w_k t_k log p_k with smoothed targets; "mean" divides by N.
        tt = t * (1.0 - label_smoothing) + label_smoothing / k
        per = -jnp.sum(w * tt * lp, axis=-1)
        norm_w = jnp.ones_like(per)
    if mask is not None:
        per = per * mask[..., 0]
        norm_w = norm_w * mask[..., 0]
    if reduction == "mean":
        denom = jnp.sum(norm_w)
        return jnp.sum(per) / jnp.where(denom > 0, denom, 1.0)
    return per if reduction == "none" else jnp.sum(per)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    activation: str = "softmax",
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Cross-entropy with PyTorch semantics.

    With ``activation="softmax"`` this is ``torch.nn.CrossEntropyLoss``: for integer labels
    :math:`-\sum_v w_{y_v} \ln p_{v y_v} / \sum_v w_{y_v}` (``"mean"``), with label smoothing
    :math:`\epsilon` mixing in :math:`-\frac{\epsilon}{K}\sum_k w_k \ln p_{vk}`; for float (probability)
    labels :math:`-\frac{1}{N}\sum_v \sum_k w_k t_{vk} \ln p_{vk}` with smoothed targets
    :math:`(1-\epsilon) t + \epsilon / K`. With ``"sigmoid"`` it is ``BCEWithLogitsLoss`` per channel
    (``weight=class_weights``), averaged over voxels and channels, smoothing toward 0.5. The ``"none"``
    activation takes probabilities and the logs of their clipped values.

    ``reduction="none"`` returns per-voxel values ``(B, N)`` (per voxel and channel, flattened, for
    sigmoid). Masked voxels give 0 and leave the mean's denominator; a fully masked batch gives 0.
    """
    fn = "cross_entropy"
    _check_unit_interval(fn, "label_smoothing", label_smoothing)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    return _cross_entropy_flat(fn, x, t, mask, ids is not None, activation, weights, label_smoothing, reduction)


def dice_ce_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    activation: str = "softmax",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    jaccard: bool = False,
    batch_dice: bool = False,
    include_background: bool = True,
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""``lambda_dice * dice_loss + lambda_ce * cross_entropy``, as MONAI ``DiceCELoss``.

    The Dice term takes the :func:`dice_loss` options; the cross-entropy always spans all K classes
    (``include_background`` concerns Dice only) and ``class_weights`` weighs both terms, as in MONAI.
    With ``activation="sigmoid"`` the cross-entropy is binary per channel; MONAI uses binary
    cross-entropy only for a single channel and a softmax cross-entropy otherwise, even with
    ``sigmoid=True``, which mixes two incompatible models of the classes. ``reduction`` is ``"mean"`` or
    ``"sum"`` (applied to each term, as MONAI).
    """
    fn = "dice_ce_loss"
    _check_nonnegative(fn, "lambda_dice", lambda_dice)
    _check_nonnegative(fn, "lambda_ce", lambda_ce)
    _check_unit_interval(fn, "label_smoothing", label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: unknown reduction {reduction!r}; expected 'mean' or 'sum'")
    x, p, t, mask, c0, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    region = functools.partial(_dice_loss_region, c0=c0, smooth_nr=smooth_nr, smooth_dr=smooth_dr, jaccard=jaccard,
                               reduction=reduction)
    if label_smoothing == 0.0 and class_weights is None and reduction == "mean" and _region_fusable(
        activation, reduction, squared_pred
    ):
        # lambda_dice mean(1 - D) + lambda_ce CE, with CE = K L_wce at beta = 1 over all K channels (torch's
        # class-weighted mean and "sum" have other normalizers: those take the plain path).
        return _fused_softmax(
            x, t, ids, mask, None, ce_weight=x.shape[-1] * lambda_ce, region_weight=lambda_dice, region=region,
            c0=c0, ce_c0=0, batch_dice=batch_dice, ce_over_valid_labels=True,
        )
    d_loss = region(*_region_sums_of(p, t, mask, c0, batch_dice, squared_pred), weights)
    int_labels = jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer)
    ce = _cross_entropy_flat(fn, x, t, mask, int_labels, activation, weights, label_smoothing, reduction)
    return lambda_dice * d_loss + lambda_ce * ce


def focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    activation: str = "softmax",
    include_background: bool = True,
    class_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Focal loss (Lin et al. 2017), as MONAI ``FocalLoss``.

    Softmax: :math:`-\alpha_k (1 - p_k)^\gamma\, t_k \ln p_k`. Sigmoid: the binary focal loss per channel,
    :math:`-\alpha_t (1 - p_t)^\gamma \ln p_t`. A scalar ``alpha`` weighs the background channel by
    ``1 - alpha`` and the others by ``alpha`` (softmax), or negatives by ``1 - alpha`` and positives by
    ``alpha`` (sigmoid); a sequence gives one weight per channel kept. ``(1 - p)`` comes from
    ``log(1 - p)`` of the logits, so it is exact near ``p = 1``. With soft labels ``t`` the sigmoid
    modulating factor is MONAI's ``sigmoid(x (1 - 2t))^gamma``; for ``activation="none"`` it is
    ``(t (1 - p) + (1 - t) p)^gamma``.

    ``"mean"`` averages over every (voxel, channel) element kept, as MONAI does (so for softmax it is the
    per-voxel focal loss divided by the number of channels), also with a mask (MONAI's ``ignore_index``
    path divides by the valid voxels alone). MONAI's ``FocalLoss(use_softmax=True, include_background=False)`` takes the softmax over
    the foreground channels only; ours takes it over all K channels and then drops channel 0.
    ``reduction="none"`` returns ``(B, N, C)``.
    """
    fn = "focal_loss"
    _check_nonnegative(fn, "gamma", gamma)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    c0 = 0 if include_background else 1
    k_kept = x.shape[-1] - c0
    p, lp, l1m = _log_probs(x, activation)
    p, lp, l1m, t = p[..., c0:], lp[..., c0:], l1m[..., c0:], t[..., c0:]
    if activation == "softmax":
        per = -jnp.exp(gamma * l1m) * lp * t
    else:
        # Binary focal: (1 - p_t)^gamma times the binary cross-entropy, p_t = p where t = 1, 1 - p where t = 0.
        bce = -(t * lp + (1.0 - t) * l1m)
        if activation == "sigmoid":
            # MONAI's form, also for soft labels: 1 - p_t = sigmoid(x (1 - 2t)), in log space for stability.
            log_one_minus_pt = jax.nn.log_sigmoid(x[..., c0:] * (1.0 - 2.0 * t))
        else:
            log_one_minus_pt = jnp.log(jnp.clip(t * (1.0 - p) + (1.0 - t) * p, _PROB_EPS, 1.0))
        per = jnp.exp(gamma * log_one_minus_pt) * bce
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            _check_unit_interval(fn, "alpha", float(alpha))
            if activation == "softmax":
                a = jnp.full((k_kept,), alpha, x.dtype)
                if c0 == 0:
                    a = a.at[0].set(1.0 - alpha)
                per = per * a
            else:
                per = per * (t * alpha + (1.0 - t) * (1.0 - alpha))
        else:
            a = jnp.asarray(alpha, x.dtype)
            if a.shape != (k_kept,):
                raise ValueError(
                    f"{fn}: a sequence alpha must have one entry per kept channel ({k_kept}), got shape {a.shape}"
                )
            per = per * a if activation == "softmax" else per * jnp.where(t == 1, a, 1.0)
    if weights is not None:
        per = per * weights[c0:]
    if mask is not None:
        per = per * mask
        if reduction == "mean":
            return jnp.sum(per) / (_valid_count(x, mask) * k_kept)
    return _reduce(fn, per, reduction)
