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
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from combo_jax import _fused, _sums

__all__ = [
    "ClassSums",
    "check_labels",
    "class_sums",
    "combo_loss",
    "combo_loss_from_sums",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "focal_loss",
    "frequency_weights",
    "generalized_dice_loss",
    "pool_batch",
    "soft_dice",
    "tversky_loss",
    "weighted_cross_entropy",
]

ACTIVATIONS = ("softmax", "sigmoid", "none")
REDUCTIONS = ("mean", "sum", "none")
_PROB_EPS = 1e-7  # clip for log(p) and log(1 - p) on the activation="none" path only

ArrayLike = Any


# --------------------------------------------------------------------------------------------------
# Input checking (static: shapes, dtypes, choices; hyperparameter ranges where concrete)
# --------------------------------------------------------------------------------------------------


def _check_scalar(fn: str, name: str, value, low: float, high: float | None) -> None:
    """Checks a hyperparameter: a real, finite scalar (a Python number or an array of shape ()) in ``[low, high]``.

    The range is checked where the value is concrete. A traced value (a jit argument, a vmapped grid, a
    schedule) cannot be checked under ``jit`` and is used as given: a NaN or infinite one makes the loss NaN
    or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.ndarray, np.generic, jax.Array)):
        raise TypeError(f"{fn}: {name} must be a real number or a scalar array, got {type(value).__name__}")
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.floating) and not jnp.issubdtype(
        jnp.result_type(value), jnp.integer
    ):
        raise TypeError(f"{fn}: {name} must be a real scalar, got shape {jnp.shape(value)} and dtype "
                        f"{jnp.result_type(value)}")
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if high is None and not v >= low:
        raise ValueError(f"{fn}: {name} must be >= {low:g}, got {v}")
    if high is None and not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {v}")
    if high is not None and not low <= v <= high:
        raise ValueError(f"{fn}: {name} must lie in [{low:g}, {high:g}], got {v}")


def _check_unit_interval(fn: str, name: str, value) -> None:
    _check_scalar(fn, name, value, 0.0, 1.0)


def _check_nonnegative(fn: str, name: str, value) -> None:
    _check_scalar(fn, name, value, 0.0, None)


def _equals(value, constant: float) -> bool:
    """Whether a hyperparameter is concretely ``constant`` (a term it weighs by 0 can then be left out)."""
    return not isinstance(value, jax.core.Tracer) and float(value) == constant


def _check_not_empty(fn: str, name: str, shape) -> None:
    """Rejects a batch or spatial axis of size 0 (a loss over no voxels), before any computation."""
    if 0 in tuple(shape)[:-1]:
        raise ValueError(f"{fn}: {name} must hold at least one sample and one voxel per sample, got shape {shape} "
                         "(a batch or spatial axis of size 0)")


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
    _check_not_empty(fn, "logits", logits.shape)
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
    """Returns the per-channel weights as a ``(K,)`` array, checking the length (and values when concrete).

    Concrete weights must be finite and >= 0; traced ones cannot be checked under ``jit`` (a NaN among them
    makes the loss NaN).
    """
    if class_weights is None:
        return None
    if not isinstance(class_weights, jax.core.Tracer):
        # Checked on the host value, which stays concrete under jit (a traced array cannot be checked).
        host = np.asarray(class_weights)
        if np.issubdtype(host.dtype, np.number) and not np.all(np.isfinite(host)):
            raise ValueError(f"{fn}: class_weights must be finite, got {host.tolist()}")
        if np.any(host < 0):
            raise ValueError(f"{fn}: class_weights must be >= 0, got {host.tolist()}")
    w = jnp.asarray(class_weights, dtype=dtype)
    if w.ndim != 1 or w.shape[0] != num_classes:
        raise ValueError(
            f"{fn}: class_weights must have one entry per channel of logits, shape ({num_classes},), got "
            f"shape {w.shape}"
        )
    return w


def frequency_weights(frequencies: ArrayLike, *, power: float = 0.5) -> np.ndarray:
    """Per-class weights ``w_k`` proportional to ``f_k ** -power`` with mean 1, for ``class_weights``.

    ``frequencies``: the fraction (or count) of the training voxels in each class, shape ``(K,)``, background
    included. ``power=1`` is inverse frequency, ``0.5`` its square root; the trainer uses its
    ``config.loss.frequency_power`` (for the Combo loss 0.25 by default there, docs/collapse.md).
    With mean 1 the loss keeps its scale: a rare organ's terms weigh more, the background's less. Computed on
    the host (NumPy), once, from the data.
    """
    f = np.asarray(frequencies, dtype=np.float64)
    if f.ndim != 1 or f.shape[0] < 1:
        raise ValueError(f"frequency_weights: frequencies must have shape (K,), one entry per class, got {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError(f"frequency_weights: every class needs a frequency > 0 (a class absent from the data cannot "
                         f"be weighted by it), got {f.tolist()}")
    if not np.isfinite(power) or power < 0:
        raise ValueError(f"frequency_weights: power must be finite and >= 0, got {power}")
    w = (f / f.sum()) ** -float(power)
    return (w / w.mean()).astype(np.float32)


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


def _squared_sums(p, t, mask):
    """MONAI's ``squared_pred`` sums of p t, p^2 and t^2 over voxels, (B, K) each (the plain path)."""
    if mask is not None:
        p, t = p * mask, t * mask
    return jnp.sum(p * t, axis=1), jnp.sum(p * p, axis=1), jnp.sum(t * t, axis=1)


# Region terms as functions of the per-class sums (I, P, T) of the kept channels, (B, |C|) or (|C|,) with
# batch Dice, and of the kept channels' class weights (or None).


def _dice_loss_region(inter, psum, tsum, weights, *, smooth_nr, smooth_dr, jaccard, reduction):
    """``w_k (1 - D_k)``, reduced."""
    loss = 1.0 - _dice_ratio(inter, psum, tsum, smooth_nr, smooth_dr, jaccard)
    return _reduce("dice_loss", loss if weights is None else loss * weights, reduction)


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
    _check_not_empty(fn, "probs", probs.shape)
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
# Per-class sums, and the losses as functions of them
# --------------------------------------------------------------------------------------------------

ClassSums = _sums.ClassSums


def _sums_of(x, t, ids, mask, activation, *, complement: bool = True) -> ClassSums:
    """:class:`ClassSums` of flattened inputs ``(B, N, K)``.

    Softmax goes through :func:`combo_jax._sums.softmax_sums` (vectorized over the channels, a hand-derived
    derivative; labels are constants there), sigmoid and probabilities through the plain formula.
    ``complement=False`` leaves ``ce_negative`` at zero where no loss term needs it.
    """
    if activation == "softmax":
        labels = jax.lax.stop_gradient(ids if ids is not None else t)
        return _sums.softmax_sums(x, labels, None if mask is None else mask[..., 0], complement)
    p, lp, l1m = _log_probs(x, activation)

    def voxel_sum(v):
        return jnp.sum(v if mask is None else v * mask, axis=1)

    voxels = jnp.full(x.shape[:1], x.shape[1], x.dtype) if mask is None else jnp.sum(mask[..., 0], axis=1)
    negative = -voxel_sum((1.0 - t) * l1m) if complement else jnp.zeros(x.shape[::2], x.dtype)
    return ClassSums(voxel_sum(p * t), voxel_sum(p), voxel_sum(t), -voxel_sum(t * lp), negative, voxels)


def _pooled(sums: ClassSums) -> ClassSums:
    """The sums over the whole batch, without the batch axis (batch Dice)."""
    return ClassSums(*(jnp.sum(s, axis=0) for s in sums))


def _kept(sums: ClassSums, first_channel: int, batch_dice: bool):
    """``(I, P, T)`` of the channels ``first_channel:``, per sample or pooled over the batch."""
    region = _pooled(sums) if batch_dice else sums
    return tuple(v[..., first_channel:] for v in region[:3])


def _check_sums(fn: str, sums) -> ClassSums:
    if not isinstance(sums, ClassSums):
        raise TypeError(f"{fn}: sums must be a ClassSums (from class_sums), got {type(sums).__name__}")
    shape = jnp.shape(sums.intersection)
    if len(shape) != 2 or any(jnp.shape(v) != shape for v in sums[:5]) or jnp.shape(sums.voxels) != shape[:1]:
        raise ValueError(
            f"{fn}: sums must hold (B, K) arrays and (B,) voxels, got shapes {[jnp.shape(v) for v in sums]}"
        )
    return sums


def _wce_terms(sums: ClassSums, weights, *, beta, first_channel: int) -> jax.Array:
    """``(B, |C|)`` terms whose mean is :math:`L_{wce}`: each sample's weighted sums times ``B / N``."""
    kept = slice(first_channel, None)
    ce = beta * sums.ce_positive[:, kept] + (1.0 - beta) * sums.ce_negative[:, kept]
    if weights is not None:
        ce = ce * weights[kept]
    return ce * (sums.voxels.shape[0] / jnp.maximum(jnp.sum(sums.voxels), 1.0))


def _combo_terms(sums: ClassSums, weights, *, alpha, beta, smooth, first_channel: int, batch_dice: bool,
                 dice_first_channel: int | None = None, use_ce: bool = True, use_dice: bool = True):
    """``(B, |D|)`` per-sample, per-channel Combo terms whose mean is the loss, over the Dice term's channels D
    (``dice_first_channel:``, by default C). When D holds the background besides C, its column has no
    cross-entropy part and the organs' cross-entropy parts are scaled by ``|D| / |C|``, so that the mean is
    still ``alpha`` times the mean over C.

    ``use_ce``/``use_dice`` leave out a term whose weight is concretely 0 (so that a term that is undefined
    there, such as a Dice of 0 / 0 with ``smooth = 0``, cannot make the loss NaN).
    """
    dice_first = first_channel if dice_first_channel is None else dice_first_channel
    batch, num_classes = sums.intersection.shape
    width = num_classes - dice_first
    terms = jnp.zeros((batch, width), sums.intersection.dtype)
    if use_ce:
        ce = _wce_terms(sums, weights, beta=beta, first_channel=first_channel)
        if dice_first != first_channel:
            ce = jnp.pad(ce, ((0, 0), (first_channel - dice_first, 0))) * (width / (num_classes - first_channel))
        terms = terms + alpha * ce
    if use_dice:
        dice = _dice_ratio(*_kept(sums, dice_first, batch_dice), smooth, smooth, False)
        terms = terms - (1.0 - alpha) * (dice if weights is None else dice * weights[dice_first:])
    return terms


def _evaluate(logits, x, t, ids, mask, activation: str, reduction: str, objective, hyper, *,
              cross_entropy: bool, complement: bool, first_channel: int = 0,
              uniform_complement: bool = False, complement_first_channel: int | None = None) -> jax.Array:
    """``objective(class sums, hyper)``.

    A scalar softmax loss takes the two-pass evaluation of :mod:`combo_jax._fused` (the logits read in their
    own dtype, a hand-derived gradient, higher derivatives by autodiff of the plain formula); the other cases
    compute the sums and apply the objective. ``hyper`` holds the numeric hyperparameters (numbers, arrays or
    traced values; None for an absent option), so that they may be traced and differentiated.
    ``cross_entropy`` and ``complement`` say whether the objective reads the cross-entropy sums and the
    ``log(1 - p)`` ones; it must be linear in those sums. ``first_channel``, ``uniform_complement`` and
    ``complement_first_channel``: see :class:`combo_jax._fused.Spec`.
    """
    hyper = jax.tree.map(lambda v: jnp.asarray(v, x.dtype), hyper)
    if activation == "softmax" and reduction != "none":
        spec = _fused.Spec(objective, cross_entropy=cross_entropy, complement=complement,
                           first_channel=first_channel, uniform_complement=uniform_complement,
                           complement_first_channel=complement_first_channel)
        logits = jnp.asarray(logits)
        labels = ids.reshape(logits.shape[:-1]) if ids is not None else t.reshape(logits.shape)
        # mask[..., 0] first: a reshape that drops the trailing 1 and splits the voxel axis at once is refused
        # for arrays with an explicit sharding.
        mask = None if mask is None else mask[..., 0].reshape(logits.shape[:-1])
        return _fused.loss(spec, logits, labels, mask, hyper)
    return objective(_sums_of(x, t, ids, mask, activation, complement=complement), hyper)


def _kept_weights(hyper, first_channel: int):
    weights = hyper.get("class_weights")
    return None if weights is None else weights[first_channel:]


def _combo_objective(sums, hyper, *, first_channel, dice_first_channel, batch_dice, use_ce, use_dice, reduction):
    terms = _combo_terms(sums, hyper["class_weights"], alpha=hyper["alpha"], beta=hyper["beta"],
                         smooth=hyper["smooth"], first_channel=first_channel, dice_first_channel=dice_first_channel,
                         batch_dice=batch_dice, use_ce=use_ce, use_dice=use_dice)
    return _reduce("combo_loss", terms, reduction)


def _wce_objective(sums, hyper, *, first_channel, reduction):
    terms = _wce_terms(sums, hyper["class_weights"], beta=hyper["beta"], first_channel=first_channel)
    return _reduce("weighted_cross_entropy", terms, reduction)


def _dice_objective(sums, hyper, *, first_channel, batch_dice, jaccard, reduction):
    return _dice_loss_region(*_kept(sums, first_channel, batch_dice), _kept_weights(hyper, first_channel),
                             smooth_nr=hyper["smooth_nr"], smooth_dr=hyper["smooth_dr"], jaccard=jaccard,
                             reduction=reduction)


def _generalized_dice_objective(sums, hyper, *, first_channel, batch_dice, w_type, reduction):
    return _generalized_dice_region(*_kept(sums, first_channel, batch_dice), None, w_type=w_type,
                                    smooth_nr=hyper["smooth_nr"], smooth_dr=hyper["smooth_dr"], reduction=reduction)


def _tversky_objective(sums, hyper, *, first_channel, batch_dice, reduction):
    return _tversky_region(*_kept(sums, first_channel, batch_dice), None, alpha=hyper["alpha"], beta=hyper["beta"],
                           smooth_nr=hyper["smooth_nr"], smooth_dr=hyper["smooth_dr"], reduction=reduction)


def _dice_ce_objective(sums, hyper, *, first_channel, batch_dice, jaccard, activation, integer_labels, reduction):
    return _dice_ce_from_sums(sums, _kept_weights(hyper, first_channel), hyper["class_weights"],
                              lambda_dice=hyper["lambda_dice"], lambda_ce=hyper["lambda_ce"], activation=activation,
                              first_channel=first_channel, batch_dice=batch_dice, integer_labels=integer_labels,
                              reduction=reduction, smooth_nr=hyper["smooth_nr"], smooth_dr=hyper["smooth_dr"],
                              jaccard=jaccard)


def class_sums(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    activation: str = "softmax",
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> ClassSums:
    r"""Per-sample, per-class sums over voxels from which every region and Combo loss is computed.

    Returns a :class:`ClassSums` of ``(B, K)`` arrays (``voxels``: ``(B,)``): :math:`\sum w p t`,
    :math:`\sum w p`, :math:`\sum w t`, :math:`-\sum w t \ln p`, :math:`-\sum w (1 - t) \ln(1 - p)` and
    :math:`\sum w` over the voxels of each sample, with ``w`` the mask of ``where``/``ignore_index``. The
    ``*_from_sums`` functions turn them into a loss; sums add, so under ``shard_map`` one ``psum`` of
    :func:`pool_batch` gives the global batch:

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> labels = jax.random.randint(jax.random.key(1), (2, 8, 8), 0, 3)
      >>> sums = class_sums(logits, labels)
      >>> bool(jnp.allclose(combo_loss_from_sums(sums), combo_loss(logits, labels)))
      True
    """
    x, t, mask, ids = _prepare("class_sums", logits, labels, activation=activation, where=where,
                               ignore_index=ignore_index)
    return _sums_of(x, t, ids, mask, activation)


def pool_batch(sums: ClassSums, axis_name=None) -> ClassSums:
    """The sums of the whole batch as one sample, ``(1, K)``; with ``axis_name``, also summed over devices.

    Inside ``shard_map``, ``pool_batch(class_sums(x, y), "data")`` is one ``psum`` and holds the global
    batch's sums; a loss with ``batch_dice=True`` computed from it equals the loss of the whole batch.
    """
    _check_sums("pool_batch", sums)
    pooled = ClassSums(*(jnp.sum(s, axis=0, keepdims=True) for s in sums))
    return pooled if axis_name is None else jax.lax.psum(pooled, axis_name)


def combo_loss_from_sums(
    sums: ClassSums,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    activation: str = "softmax",
    include_background: bool = False,
    dice_include_background: bool = True,
    batch_dice: bool = False,
    class_weights: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """:func:`combo_loss` from the :func:`class_sums` of its inputs (same options and result)."""
    fn = "combo_loss_from_sums"
    _check_combo_options(fn, alpha, beta, smooth, activation, reduction)
    sums = _check_sums(fn, sums)
    weights = _class_weights(fn, class_weights, sums.intersection.shape[-1], sums.intersection.dtype)
    terms = _combo_terms(sums, weights, alpha=alpha, beta=beta, smooth=smooth,
                         first_channel=_first_channel(activation, include_background), batch_dice=batch_dice,
                         dice_first_channel=_first_channel(activation, include_background or dice_include_background),
                         use_ce=not _equals(alpha, 0.0), use_dice=not _equals(alpha, 1.0))
    return _reduce(fn, terms, reduction)


def _check_combo_options(fn, alpha, beta, smooth, activation, reduction):
    _check_unit_interval(fn, "alpha", alpha)
    _check_unit_interval(fn, "beta", beta)
    _check_nonnegative(fn, "smooth", smooth)
    _check_choice(fn, "activation", activation, ACTIVATIONS)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)


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
    reduction: str = "mean",
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
      beta: weight of the positive (``t = 1``) term, in ``[0, 1]``; a number or a traced scalar.
      activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
      include_background: with softmax, keep channel 0 in C.
      class_weights: optional ``(K,)`` per-channel weights ``w_k`` (channels outside C are ignored).
      where: optional boolean mask ``(B, *spatial)``.
      ignore_index: label id to leave out (integer labels only).
      reduction: ``"mean"`` (the formula above), ``"sum"``, or ``"none"`` for per-sample, per-organ terms
        ``(B, |C|)``: ``B / N`` times each sample's weighted sum over its voxels, so that their mean is the
        loss (with equal, unmasked samples, each sample's own mean over its voxels).

    Returns:
      A scalar, or ``(B, |C|)`` for ``reduction="none"``.
    """
    fn = "weighted_cross_entropy"
    _check_unit_interval(fn, "beta", beta)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    first_channel = _first_channel(activation, include_background)
    objective = functools.partial(_wce_objective, first_channel=first_channel, reduction=reduction)
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective,
                     dict(beta=beta, class_weights=weights), cross_entropy=True,
                     complement=not _equals(beta, 1.0),
                     first_channel=first_channel, uniform_complement=weights is None)


def combo_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
    activation: str = "softmax",
    include_background: bool = False,
    dice_include_background: bool = True,
    batch_dice: bool = False,
    class_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""The Combo loss of Taghanaki et al. (arXiv 1805.02798).

    .. math::
        L = \alpha\, L_{wce}(\beta) - (1 - \alpha) \frac{1}{|D|} \sum_{k \in D} w_k D_k

    with :math:`L_{wce}` over the organ channels C as in :func:`weighted_cross_entropy`, the Dice channels
    :math:`D = \{0\} \cup C` (``dice_include_background=True``, the default) or :math:`D = C`, and the soft Dice
    :math:`D_k = (2 \sum p t + S) / (\sum p + \sum t + S)` of :func:`soft_dice`, over the spatial axes of
    each sample and then averaged over the batch (``batch_dice=False``), or pooled over the batch
    (``batch_dice=True``). The loss lies in ``[-(1 - alpha), +inf)``; a perfect prediction of a sample
    with every organ present reaches about ``-(1 - alpha)``.

    Choices the paper leaves open, and ours:

    * The organ set C: background excluded for softmax (see :func:`weighted_cross_entropy` for why beta
      needs this), every channel for sigmoid.
    * The Dice term also averages over the background channel by default (``dice_include_background``);
      the paper's organ-only Dice is ``dice_include_background=False``.
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
      alpha: weight of the cross-entropy term, in ``[0, 1]`` (optax's ``dice_loss`` ``alpha`` is another
        thing, a false-positive weight).
      beta: cross-entropy weight of the positive term, in ``[0, 1]``; ``< 0.5`` penalizes false positives,
        ``> 0.5`` false negatives.
      smooth: Dice smoothing ``S`` (numerator and denominator).
      activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
      include_background: with softmax, keep channel 0 in C (both terms).
      dice_include_background: with softmax, average the Dice term over the background channel and C; the
        cross-entropy term stays over C, so beta keeps its meaning. True by default: with the background in
        no term, nothing rewards the background channel on background tissue, and a small organ's channel can
        take it over (see docs/collapse.md). False gives the paper's organ-only Dice.
      batch_dice: pool Dice sums over the batch.
      class_weights: optional ``(K,)`` weights multiplying each channel's cross-entropy and Dice terms.
      where: optional boolean mask ``(B, *spatial)``.
      ignore_index: label id to leave out (integer labels only).
      reduction: ``"mean"`` (the loss), ``"sum"``, or ``"none"`` for the per-sample, per-channel terms
        ``(B, |D|)`` whose mean is the loss: ``alpha (|D| / |C|) B / N`` times each sample's weighted
        cross-entropy sums (none for the background's column) minus ``(1 - alpha) w_k D_k`` (with
        ``batch_dice``, the pooled ``D_k`` in every row).

    ``alpha``, ``beta``, ``smooth`` and ``class_weights`` may be traced (jit arguments, a vmapped grid, a
    schedule): their ranges are checked only where they are concrete. The loss is a function of the
    per-class sums of :func:`class_sums`; :func:`combo_loss_from_sums` computes it from them (for sums
    added across devices, see the README).

    Returns:
      A scalar, or ``(B, |D|)`` for ``reduction="none"``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
      >>> labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 4)
      >>> loss, grads = jax.value_and_grad(combo_loss)(logits, labels, beta=0.3)
    """
    fn = "combo_loss"
    _check_combo_options(fn, alpha, beta, smooth, activation, reduction)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)  # checked against the logits here
    use_ce, use_dice = not _equals(alpha, 0.0), not _equals(alpha, 1.0)
    first_channel = _first_channel(activation, include_background)
    dice_first = _first_channel(activation, include_background or dice_include_background)
    objective = functools.partial(_combo_objective, first_channel=first_channel, dice_first_channel=dice_first,
                                  batch_dice=batch_dice, use_ce=use_ce, use_dice=use_dice, reduction=reduction)
    # The objective reads the sums of channels min(C, D) onwards, and the cross-entropy sums of C: without class
    # weights their log(1 - p) coefficient is one number from C's first channel.
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective,
                     dict(alpha=alpha, beta=beta, smooth=smooth, class_weights=weights), cross_entropy=use_ce,
                     complement=use_ce and not _equals(beta, 1.0),  # the log(1 - p) terms weigh 0 otherwise
                     first_channel=min(first_channel, dice_first), uniform_complement=weights is None,
                     complement_first_channel=first_channel)


# --------------------------------------------------------------------------------------------------
# Region losses: Dice, generalized Dice, Tversky (MONAI semantics)
# --------------------------------------------------------------------------------------------------


def _region_inputs(fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr):
    """Checks the inputs of a region loss; returns ``(x, t, mask, first_channel, ids)`` over all channels."""
    _check_nonnegative(fn, "smooth_nr", smooth_nr)
    _check_nonnegative(fn, "smooth_dr", smooth_dr)
    x, t, mask, ids = _prepare(fn, logits, labels, activation=activation, where=where, ignore_index=ignore_index)
    first_channel = 0 if include_background else 1
    if first_channel >= x.shape[-1]:
        raise ValueError(
            f"{fn}: include_background=False leaves no channel with logits of shape {jnp.shape(logits)}"
        )
    return x, t, mask, first_channel, ids


def _squared_region_sums(x, t, mask, activation, first_channel, batch_dice):
    """MONAI's ``squared_pred`` sums ``(I, sum p^2, sum t^2)`` of the kept channels, per sample or pooled."""
    sums = _squared_sums(_probs(x, activation), t, mask)
    return tuple(v[..., first_channel:] for v in (jax.tree.map(lambda v: v.sum(0), sums) if batch_dice else sums))


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
    x, t, mask, first_channel, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    hyper = dict(smooth_nr=smooth_nr, smooth_dr=smooth_dr, class_weights=weights)
    if squared_pred:
        region = _squared_region_sums(x, t, mask, activation, first_channel, batch_dice)
        return _dice_loss_region(*region, _kept_weights(hyper, first_channel), smooth_nr=smooth_nr,
                                 smooth_dr=smooth_dr, jaccard=jaccard, reduction=reduction)
    objective = functools.partial(_dice_objective, first_channel=first_channel, batch_dice=batch_dice,
                                  jaccard=jaccard, reduction=reduction)
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective, hyper, cross_entropy=False,
                     complement=False, first_channel=first_channel)


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
    x, t, mask, first_channel, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    objective = functools.partial(_generalized_dice_objective, first_channel=first_channel, batch_dice=batch_dice,
                                  w_type=w_type, reduction=reduction)
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective,
                     dict(smooth_nr=smooth_nr, smooth_dr=smooth_dr), cross_entropy=False, complement=False,
                     first_channel=first_channel)


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
    x, t, mask, first_channel, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    objective = functools.partial(_tversky_objective, first_channel=first_channel, batch_dice=batch_dice,
                                  reduction=reduction)
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective,
                     dict(alpha=alpha, beta=beta, smooth_nr=smooth_nr, smooth_dr=smooth_dr), cross_entropy=False,
                     complement=False, first_channel=first_channel)


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
    ``"sum"`` (applied to each term, as MONAI), or ``"none"`` for ``(B, |C|)`` per-sample, per-organ terms
    whose mean is the loss (each sample's cross-entropy split over its organ columns; not with label
    smoothing or ``squared_pred``).
    """
    fn = "dice_ce_loss"
    _check_nonnegative(fn, "lambda_dice", lambda_dice)
    _check_nonnegative(fn, "lambda_ce", lambda_ce)
    _check_unit_interval(fn, "label_smoothing", label_smoothing)
    _check_choice(fn, "reduction", reduction, REDUCTIONS)
    x, t, mask, first_channel, ids = _region_inputs(
        fn, logits, labels, activation, include_background, where, ignore_index, smooth_nr, smooth_dr
    )
    weights = _class_weights(fn, class_weights, x.shape[-1], x.dtype)
    kept_weights = None if weights is None else weights[first_channel:]
    dice_options = dict(smooth_nr=smooth_nr, smooth_dr=smooth_dr, jaccard=jaccard)
    if label_smoothing != 0.0 or squared_pred:
        if reduction == "none":
            raise ValueError(f"{fn}: reduction='none' needs label_smoothing=0 and squared_pred=False")
        if squared_pred:
            region = _squared_region_sums(x, t, mask, activation, first_channel, batch_dice)
        else:
            region = _kept(_sums_of(x, t, ids, mask, activation, complement=False), first_channel, batch_dice)
        d_loss = _dice_loss_region(*region, kept_weights, **dice_options, reduction=reduction)
        ce = _cross_entropy_flat(fn, x, t, mask, ids is not None, activation, weights, label_smoothing, reduction)
        return lambda_dice * d_loss + lambda_ce * ce
    # The sigmoid cross-entropy is binary per channel and needs the log(1 - p) terms; softmax needs neither.
    objective = functools.partial(_dice_ce_objective, first_channel=first_channel, batch_dice=batch_dice,
                                  jaccard=jaccard, activation=activation, integer_labels=ids is not None,
                                  reduction=reduction)
    hyper = dict(lambda_dice=lambda_dice, lambda_ce=lambda_ce, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                 class_weights=weights)
    return _evaluate(logits, x, t, ids, mask, activation, reduction, objective, hyper, cross_entropy=True,
                     complement=activation != "softmax")


def _dice_ce_from_sums(sums, kept_weights, weights, *, lambda_dice, lambda_ce, activation, first_channel,
                       batch_dice, integer_labels, reduction, **dice_options):
    """``lambda_dice * dice_loss + lambda_ce * cross_entropy`` from the class sums, reduced.

    The cross-entropy follows torch: softmax, integer labels: ``sum_k w_k ce_k / sum_k w_k T_k`` (a weighted
    mean over the voxels whose label is in range); softmax, float labels: divided by the voxel count;
    sigmoid: binary per channel, divided by voxels times channels. ``"none"`` gives ``(B, |C|)`` terms whose
    mean is the loss: each sample's cross-entropy split over its organ columns (the channels outside C in
    equal parts), scaled by the normalizer.
    """
    num_classes = sums.intersection.shape[-1]
    w = jnp.ones((num_classes,), sums.intersection.dtype) if weights is None else weights
    ce = sums.ce_positive if activation == "softmax" else sums.ce_positive + sums.ce_negative
    ce = ce * w  # (B, K) per-class cross-entropy sums
    if activation == "softmax" and integer_labels:
        norm = jnp.sum(sums.target * w)
        norm = jnp.where(norm > 0, norm, 1.0)
    elif activation == "softmax":
        norm = jnp.maximum(jnp.sum(sums.voxels), 1.0)
    else:
        norm = jnp.maximum(jnp.sum(sums.voxels), 1.0) * num_classes
    dice_terms = _dice_loss_region(*_kept(sums, first_channel, batch_dice), kept_weights, **dice_options,
                                   reduction="none")
    if reduction == "mean":
        return lambda_dice * jnp.mean(dice_terms) + lambda_ce * jnp.sum(ce) / norm
    if reduction == "sum":
        return lambda_dice * jnp.sum(dice_terms) + lambda_ce * jnp.sum(ce)
    batch, kept = ce.shape[0], num_classes - first_channel
    per_organ = ce[:, first_channel:] + jnp.sum(ce[:, :first_channel], axis=1, keepdims=True) / kept
    return lambda_dice * dice_terms + lambda_ce * per_organ * (batch * kept / norm)


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
