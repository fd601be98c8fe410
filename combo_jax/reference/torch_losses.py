"""PyTorch reference implementations of the losses in :mod:`combo_jax.losses`.

Channels-first, as PyTorch code is: ``logits`` of shape ``(B, K, *spatial)``, ``labels`` either integer ids
``(B, *spatial)`` or float one-hot/soft labels ``(B, K, *spatial)``, ``where`` a boolean ``(B, *spatial)``.
Same names, options and defaults as the JAX functions. They are written for clarity, not speed: plain
formulas on the whole tensor, with ``log(1 - p)`` of a softmax computed as a log-sum-exp over the other
channels. Use them to check a JAX port against a PyTorch pipeline; the tests use them as ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PROB_EPS = 1e-7


def _target_and_mask(logits, labels, where, ignore_index):
    k = logits.shape[1]
    valid = None
    if labels.dtype.is_floating_point:
        target = labels.to(logits.dtype)
    else:
        ids = labels.long()
        if ignore_index is not None:
            valid = ids != ignore_index
        in_range = (ids >= 0) & (ids < k)
        target = F.one_hot(torch.where(in_range, ids, 0), k).movedim(-1, 1).to(logits.dtype)
        target = target * in_range.unsqueeze(1).to(logits.dtype)  # out-of-range ids belong to no class
    if where is not None:
        valid = where if valid is None else valid & where
    mask = None if valid is None else valid.unsqueeze(1).to(logits.dtype)
    return target, mask


def _promote(logits):
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _probs(logits, activation):
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _logs(logits, activation):
    """(log p, log(1 - p)) per channel."""
    if activation == "sigmoid":
        return F.logsigmoid(logits), F.logsigmoid(-logits)
    if activation == "none":
        return torch.log(logits.clamp(_PROB_EPS, 1.0)), torch.log((1.0 - logits).clamp(_PROB_EPS, 1.0))
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    k = logits.shape[1]
    others = []
    for c in range(k):
        keep = [j for j in range(k) if j != c]
        others.append(torch.logsumexp(logits[:, keep], dim=1))
    return logits - lse, torch.stack(others, dim=1) - lse


def _spatial_sum(x, batch_dice):
    dims = list(range(2, x.ndim))
    if batch_dice:
        dims = [0] + dims
    return x.sum(dim=dims)


def _reduce(x, reduction):
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _first(activation, include_background):
    return 0 if include_background or activation == "sigmoid" else 1


def _count(mask, logits):
    if mask is None:
        return logits.shape[0] * logits[0, 0].numel()
    return mask.sum().clamp(min=1.0)


def soft_dice(probs, onehot, *, smooth_nr=1.0, smooth_dr=1.0, squared_pred=False, jaccard=False,
              batch_dice=False, where=None):
    if where is not None:
        m = where.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * m, onehot * m
    inter = _spatial_sum(probs * onehot, batch_dice)
    if squared_pred:
        denom = _spatial_sum(probs**2, batch_dice) + _spatial_sum(onehot**2, batch_dice)
    else:
        denom = _spatial_sum(probs, batch_dice) + _spatial_sum(onehot, batch_dice)
    if jaccard:
        return (2 * inter + smooth_nr) / (2 * (denom - inter) + smooth_dr)
    return (2 * inter + smooth_nr) / (denom + smooth_dr)


def _wce_per_organ(logits, labels, beta, activation, include_background, class_weights, where, ignore_index):
    """(B, C) per-sample, per-organ weighted cross-entropy terms whose mean is the loss."""
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    lp, l1m = _logs(logits, activation)
    c0 = _first(activation, include_background)
    term = beta * t * lp + (1 - beta) * (1 - t) * l1m
    term = term[:, c0:]
    if class_weights is not None:
        w = torch.as_tensor(class_weights, dtype=logits.dtype)[c0:]
        term = term * w.view(1, -1, *([1] * (logits.ndim - 2)))
    if mask is not None:
        term = term * mask
    per_sample = -term.sum(dim=tuple(range(2, term.ndim)))  # (B, C)
    return per_sample * logits.shape[0] / _count(mask, logits)


def weighted_cross_entropy(logits, labels, *, beta=0.5, activation="softmax", include_background=False,
                           class_weights=None, where=None, ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    terms = _wce_per_organ(logits, labels, beta, activation, include_background, class_weights, where,
                           ignore_index)
    return _reduce(terms, reduction)


def combo_loss(logits, labels, *, alpha=0.5, beta=0.5, smooth=1.0, activation="softmax",
               include_background=False, dice_include_background=True, batch_dice=False, class_weights=None,
               where=None, ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    c0 = _first(activation, include_background)
    dice_c0 = _first(activation, include_background or dice_include_background)
    ce = _wce_per_organ(logits, labels, beta, activation, include_background, class_weights, where, ignore_index)
    p = _probs(logits, activation)
    if mask is not None:
        p, t = p * mask, t * mask
    d = soft_dice(p[:, dice_c0:], t[:, dice_c0:], smooth_nr=smooth, smooth_dr=smooth, batch_dice=batch_dice)
    if class_weights is not None:
        d = d * torch.as_tensor(class_weights, dtype=logits.dtype)[dice_c0:]
    if dice_c0 != c0:  # the background's column has no cross-entropy part; the mean over the columns keeps
        width = logits.shape[1] - dice_c0  # alpha times the organs' mean cross-entropy
        ce = torch.nn.functional.pad(ce, (c0 - dice_c0, 0)) * (width / (logits.shape[1] - c0))
    return _reduce(alpha * ce - (1 - alpha) * d.expand(ce.shape[0], -1), reduction)


def dice_loss(logits, labels, *, activation="softmax", smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=False,
              jaccard=False, batch_dice=False, include_background=True, class_weights=None, where=None,
              ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    p = _probs(logits, activation)
    if mask is not None:
        p, t = p * mask, t * mask
    c0 = 0 if include_background else 1
    d = soft_dice(p[:, c0:], t[:, c0:], smooth_nr=smooth_nr, smooth_dr=smooth_dr, squared_pred=squared_pred,
                  jaccard=jaccard, batch_dice=batch_dice)
    loss = 1 - d
    if class_weights is not None:
        loss = loss * torch.as_tensor(class_weights, dtype=logits.dtype)[c0:]
    return _reduce(loss, reduction)


def generalized_dice_loss(logits, labels, *, w_type="square", activation="softmax", smooth_nr=1e-5,
                          smooth_dr=1e-5, batch_dice=False, include_background=True, where=None,
                          ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    p = _probs(logits, activation)
    if mask is not None:
        p, t = p * mask, t * mask
    c0 = 0 if include_background else 1
    p, t = p[:, c0:], t[:, c0:]
    inter = _spatial_sum(p * t, batch_dice)
    denom = _spatial_sum(p, batch_dice) + _spatial_sum(t, batch_dice)
    ground = _spatial_sum(t, batch_dice)
    w = {"square": 1 / ground**2, "simple": 1 / ground, "uniform": torch.ones_like(ground)}[w_type]
    rows = w if w.ndim == 2 else w.unsqueeze(0)
    fixed = []
    for row in rows:
        finite = torch.isfinite(row)
        top = row[finite].max() if finite.any() else torch.zeros((), dtype=row.dtype)
        fixed.append(torch.where(finite, row, top))
    w = torch.stack(fixed).reshape(w.shape)
    loss = 1 - (2 * (inter * w).sum(-1) + smooth_nr) / ((denom * w).sum(-1) + smooth_dr)
    return _reduce(loss.reshape(-1), reduction)


def tversky_loss(logits, labels, *, alpha=0.5, beta=0.5, activation="softmax", smooth_nr=1e-5, smooth_dr=1e-5,
                 batch_dice=False, include_background=True, where=None, ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    p = _probs(logits, activation)
    if mask is not None:
        p, t = p * mask, t * mask
    c0 = 0 if include_background else 1
    p, t = p[:, c0:], t[:, c0:]
    tp = _spatial_sum(p * t, batch_dice)
    fp = _spatial_sum(p * (1 - t), batch_dice)
    fn = _spatial_sum((1 - p) * t, batch_dice)
    return _reduce(1 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr), reduction)


def cross_entropy(logits, labels, *, activation="softmax", class_weights=None, label_smoothing=0.0, where=None,
                  ignore_index=None, reduction="mean"):
    """Delegates to torch's own losses wherever they have the option, so it is a reference by construction."""
    logits = _promote(logits)
    w = None if class_weights is None else torch.as_tensor(class_weights, dtype=logits.dtype)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    if activation == "sigmoid":
        tt = t * (1 - label_smoothing) + 0.5 * label_smoothing
        wb = None if w is None else w.view(1, -1, *([1] * (logits.ndim - 2)))
        per = F.binary_cross_entropy_with_logits(logits, tt, weight=wb, reduction="none")
        if mask is not None:
            per = per * mask
        if reduction == "mean":
            return per.sum() / (_count(mask, logits) * logits.shape[1])
        return per.movedim(1, -1).reshape(-1) if reduction == "none" else per.sum()
    if activation == "none":
        logp = torch.log(logits.clamp(_PROB_EPS, 1.0))
        return F.nll_loss(logp, labels.long(), weight=w, reduction=reduction)
    if labels.dtype.is_floating_point:
        per = F.cross_entropy(logits, t, weight=w, reduction="none", label_smoothing=label_smoothing)
        if mask is not None:
            per = per * mask[:, 0]
            if reduction == "mean":
                return per.sum() / mask.sum().clamp(min=1)
        if reduction == "none":
            return per.reshape(per.shape[0], -1)
        return _reduce(per, reduction)
    ids = labels.long()
    if mask is not None:
        ids = torch.where(mask[:, 0] > 0, ids, -100)
    out = F.cross_entropy(logits, ids, weight=w, reduction=reduction, label_smoothing=label_smoothing,
                          ignore_index=-100)
    return out.reshape(out.shape[0], -1) if reduction == "none" else out


def dice_ce_loss(logits, labels, *, lambda_dice=1.0, lambda_ce=1.0, activation="softmax", smooth_nr=1e-5,
                 smooth_dr=1e-5, squared_pred=False, jaccard=False, batch_dice=False, include_background=True,
                 class_weights=None, label_smoothing=0.0, where=None, ignore_index=None, reduction="mean"):
    d = dice_loss(logits, labels, activation=activation, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                  squared_pred=squared_pred, jaccard=jaccard, batch_dice=batch_dice,
                  include_background=include_background, class_weights=class_weights, where=where,
                  ignore_index=ignore_index, reduction=reduction)
    ce = cross_entropy(logits, labels, activation=activation, class_weights=class_weights,
                       label_smoothing=label_smoothing, where=where, ignore_index=ignore_index, reduction=reduction)
    return lambda_dice * d + lambda_ce * ce


def focal_loss(logits, labels, *, gamma=2.0, alpha=None, activation="softmax", include_background=True,
               class_weights=None, where=None, ignore_index=None, reduction="mean"):
    logits = _promote(logits)
    t, mask = _target_and_mask(logits, labels, where, ignore_index)
    k = logits.shape[1]
    shape = (1, -1) + (1,) * (logits.ndim - 2)
    if activation == "softmax":
        lp = torch.log_softmax(logits, dim=1)
        per = -((1 - lp.exp()) ** gamma) * lp * t
    else:
        lp, l1m = _logs(logits, activation)
        if activation == "sigmoid":
            modulation = torch.sigmoid(logits * (1 - 2 * t)) ** gamma
        else:
            modulation = (t * (1 - logits) + (1 - t) * logits) ** gamma
        per = -modulation * (t * lp + (1 - t) * l1m)
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            if activation == "softmax":
                a = torch.tensor([1 - alpha] + [alpha] * (k - 1), dtype=logits.dtype).view(shape)
                per = per * a
            else:
                per = per * (t * alpha + (1 - t) * (1 - alpha))
        else:
            a = torch.tensor(list(alpha), dtype=logits.dtype)
            full = torch.cat([torch.ones(k - a.numel(), dtype=logits.dtype), a]).view(shape)
            per = per * full if activation == "softmax" else per * torch.where(t == 1, full, torch.ones_like(full))
    if class_weights is not None:
        per = per * torch.as_tensor(class_weights, dtype=logits.dtype).view(shape)
    c0 = 0 if include_background else 1
    per = per[:, c0:]
    if mask is not None:
        per = per * mask
        if reduction == "mean":
            return per.sum() / (mask.sum().clamp(min=1) * per.shape[1])
    if reduction == "none":
        return per.movedim(1, -1).reshape(per.shape[0], -1, per.shape[1])
    return _reduce(per, reduction)
