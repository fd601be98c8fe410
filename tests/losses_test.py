"""Tests of :mod:`combo_jax.losses`.

* Parity of values and gradients with the PyTorch reference (:mod:`combo_jax.reference`) on
  hypothesis-drawn shapes and options, in float32 and float64, and with MONAI where it has the same loss.
* Properties that need no reference: invariances, the minimum at a perfect prediction, absent classes,
  extreme and bf16 inputs, the meaning of the Combo loss's beta, the documented sum-over-organs form.
* Transformations: jit, vmap, sharding over 8 fake CPU devices (see conftest.py).
* Masks, ``ignore_index``, out-of-range labels, input validation and the API conventions.

Layout: the JAX side is channels-last; the torch side is channels-first and conversions happen only in the
``to_torch``/``from_torch`` helpers of conftest.py.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect

import hypothesis
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import from_torch, to_torch
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import combo_jax
from combo_jax import losses

requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
requires_monai = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None,
    reason="needs torch and monai",
)

# The losses that take (logits, labels); soft_dice takes probabilities and is tested on its own.
LOSS_NAMES = (
    "combo_loss",
    "weighted_cross_entropy",
    "dice_loss",
    "dice_ce_loss",
    "generalized_dice_loss",
    "tversky_loss",
    "focal_loss",
    "cross_entropy",
)
# Activations drawn per loss: "none" (probabilities in) wherever the PyTorch reference supports it with every
# option (its cross_entropy takes "none" with integer labels only, no mask and no smoothing).
_ACTIVATIONS = {name: ("softmax", "sigmoid", "none") for name in LOSS_NAMES}
_ACTIVATIONS["dice_ce_loss"] = _ACTIVATIONS["cross_entropy"] = ("softmax", "sigmoid")
_REDUCTIONS = {
    "dice_loss": ("mean", "sum", "none"),
    "generalized_dice_loss": ("mean", "sum", "none"),
    "tversky_loss": ("mean", "sum", "none"),
    "focal_loss": ("mean", "sum", "none"),
    "cross_entropy": ("mean", "sum", "none"),
    "dice_ce_loss": ("mean", "sum"),
}
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _loss(name):
    return getattr(losses, name)


def assert_close(actual, expected, tol, what=""):
    """Relative tolerance ``tol`` with an absolute floor of ``tol * max(1, max |expected|)``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def _one_hot(ids, k, dtype=np.float32):
    return np.eye(k, dtype=dtype)[ids]


def _jax_value_and_vjp(fn, x, cot):
    """``fn(x)`` and ``d <fn(x), cot> / dx`` under jit."""

    @jax.jit
    def run(x, cot):
        out, pullback = jax.vjp(fn, x)
        return out, pullback(cot.astype(out.dtype))[0]

    out, grad = run(x, cot)
    return np.asarray(out), np.asarray(grad)


def _torch_value_and_vjp(fn, x, cot):
    """The same with a channels-first torch function of a channels-last numpy ``x``."""
    import torch

    xt = to_torch(x, requires_grad=True)
    out = fn(xt)
    out.backward(torch.as_tensor(np.asarray(cot, dtype=x.dtype)))
    return from_torch(out, channels=False), from_torch(xt.grad)


# --------------------------------------------------------------------------------------------------
# a. Parity with the PyTorch reference
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn comparison; the arrays are built from ``seed`` so hypothesis shrinks the description."""

    name: str
    activation: str
    batch: int
    spatial: tuple[int, ...]
    k: int
    label_kind: str  # "int", "onehot" or "soft"
    ignore_index: int | None
    masked: bool
    dtype: str
    seed: int
    options: dict

    def arrays(self):
        """Returns ``(x, labels, where, ignore_index, rng)``; at least one voxel is left to count."""
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, *self.spatial)
        if self.activation == "none":
            x = rng.uniform(0.02, 0.98, (*shape, self.k))
        else:
            x = 2.0 * rng.standard_normal((*shape, self.k))
        x = x.astype(self.dtype)
        ignore_index = self.ignore_index
        high = self.k + 1 if ignore_index == self.k else self.k
        ids = rng.integers(0, high, shape)
        where = rng.random(shape) > 0.3 if self.masked else None
        valid = np.ones(shape, bool) if where is None else where.copy()
        if ignore_index is not None:
            valid &= ids != ignore_index
        if not valid.any():
            # torch's cross-entropy is 0/0 when every voxel is ignored; keep one voxel.
            if where is not None:
                where.flat[0] = True
            if ignore_index is not None and ids.flat[0] == ignore_index:
                ids.flat[0] = (ignore_index + 1) % self.k
        if self.label_kind == "int":
            labels = ids
        elif self.label_kind == "onehot":
            labels = _one_hot(np.minimum(ids, self.k - 1), self.k, self.dtype)
        elif self.activation == "softmax":
            labels = rng.dirichlet(np.ones(self.k), shape).astype(self.dtype)
        else:
            labels = rng.uniform(0.0, 1.0, (*shape, self.k)).astype(self.dtype)
        return x, labels, where, ignore_index, rng


_UNIT = st.floats(0.0, 1.0)
_SMOOTH = st.sampled_from((1e-5, 0.5, 1.0))


def _class_weights(k):
    # Bounded away from 0: torch's weighted cross-entropy is 0/0 (NaN) when every voxel's class weighs 0,
    # where ours returns 0 (as for a fully masked batch).
    return st.one_of(st.none(), st.lists(st.floats(0.05, 2.0), min_size=k, max_size=k))


@st.composite
def _options(draw, name, k, activation):
    bg = draw(st.booleans()) if k >= 2 else True
    if name == "combo_loss":
        return dict(
            alpha=draw(_UNIT),
            beta=draw(_UNIT),
            smooth=draw(_SMOOTH),
            include_background=bg,
            batch_dice=draw(st.booleans()),
            class_weights=draw(_class_weights(k)),
        )
    if name == "weighted_cross_entropy":
        return dict(beta=draw(_UNIT), include_background=bg, class_weights=draw(_class_weights(k)))
    if name == "cross_entropy":
        return dict(
            class_weights=draw(_class_weights(k)),
            label_smoothing=draw(st.sampled_from((0.0, 0.1, 1.0)) | _UNIT),
            reduction=draw(st.sampled_from(_REDUCTIONS[name])),
        )
    if name == "focal_loss":
        kept = k - (0 if bg else 1)
        alpha = draw(st.one_of(st.none(), _UNIT, st.lists(_UNIT, min_size=kept, max_size=kept)))
        return dict(
            gamma=draw(st.sampled_from((0.0, 0.5, 1.0, 2.0, 3.5))),
            alpha=alpha,
            include_background=bg,
            class_weights=draw(_class_weights(k)),
            reduction=draw(st.sampled_from(_REDUCTIONS[name])),
        )
    region = dict(
        smooth_nr=draw(_SMOOTH),
        smooth_dr=draw(_SMOOTH),
        batch_dice=draw(st.booleans()),
        include_background=bg,
        reduction=draw(st.sampled_from(_REDUCTIONS[name])),
    )
    if name in ("dice_loss", "dice_ce_loss"):
        region.update(
            squared_pred=draw(st.booleans()), jaccard=draw(st.booleans()), class_weights=draw(_class_weights(k))
        )
    if name == "dice_ce_loss":
        region.update(
            label_smoothing=draw(st.sampled_from((0.0, 0.1))),
            lambda_dice=draw(st.floats(0.0, 2.0)),
            lambda_ce=draw(st.floats(0.0, 2.0)),
        )
    if name == "generalized_dice_loss":
        region.update(w_type=draw(st.sampled_from(losses.GDL_WEIGHT_TYPES)))
    if name == "tversky_loss":
        region.update(alpha=draw(st.floats(0.0, 1.5)), beta=draw(st.floats(0.0, 1.5)))
    return region


@st.composite
def cases(draw, name):
    activation = draw(st.sampled_from(_ACTIVATIONS[name]))
    k = draw(st.integers(2 if activation == "softmax" else 1, 7))
    label_kind = draw(st.sampled_from(("int", "onehot", "soft")))
    ignore_index = None
    if label_kind == "int" and k >= 2:
        ignore_index = draw(st.one_of(st.none(), st.integers(0, k)))
    return Case(
        name=name,
        activation=activation,
        batch=draw(st.integers(1, 3)),
        spatial=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))),
        k=k,
        label_kind=label_kind,
        ignore_index=ignore_index,
        masked=draw(st.booleans()),
        dtype=draw(st.sampled_from(("float32", "float64"))),
        seed=draw(st.integers(0, 2**32 - 1)),
        options=draw(_options(name, k, activation)),
    )


def _check_against_reference(name, activation, x, labels, where, ignore_index, options, rng, dtype):
    from combo_jax import reference

    extra = dict(activation=activation, ignore_index=ignore_index, **options)
    with jax.enable_x64(dtype == "float64"):

        def ours(logits):
            return _loss(name)(logits, labels, where=where, **extra)

        out_shape = jax.eval_shape(ours, jnp.asarray(x)).shape
        cot = rng.standard_normal(out_shape).astype(dtype)
        value, grad = _jax_value_and_vjp(ours, x, cot)
    labels_t = to_torch(labels, channels=labels.ndim == x.ndim)
    where_t = None if where is None else to_torch(where, channels=False)
    ref_value, ref_grad = _torch_value_and_vjp(
        lambda xt: getattr(reference, name)(xt, labels_t, where=where_t, **extra), x, cot
    )
    assert value.dtype == np.dtype(dtype)
    assert_close(value, ref_value, TOLERANCE[dtype], f"{name} value")
    assert_close(grad, ref_grad, TOLERANCE[dtype], f"{name} gradient")


@requires_torch
@pytest.mark.parametrize("name", LOSS_NAMES)
@hypothesis.given(data=st.data())
def test_value_and_gradient_match_torch_reference(name, data):
    case = data.draw(cases(name), label="case")
    x, labels, where, ignore_index, rng = case.arrays()
    _check_against_reference(name, case.activation, x, labels, where, ignore_index, case.options, rng, case.dtype)


@requires_torch
@pytest.mark.parametrize("name", ["dice_loss", "dice_ce_loss", "tversky_loss", "generalized_dice_loss"])
@hypothesis.given(data=st.data())
def test_fused_region_losses_match_torch_reference(name, data):
    """With softmax and a scalar reduction these losses take the fused path (their region term as a function
    of the per-class sums, differentiated by autodiff, the rest hand-derived): that path against the reference
    on every label kind, mask, ignore_index, batch Dice and background choice."""
    case = data.draw(cases(name), label="case")
    hypothesis.assume(case.activation == "softmax")
    options = dict(case.options)
    options["reduction"] = data.draw(st.sampled_from(("mean", "sum")), label="reduction")
    if name in ("dice_loss", "dice_ce_loss"):
        options["squared_pred"] = False
    if name == "dice_ce_loss":  # torch's class-weighted mean and sums have their own normalizers
        options.update(label_smoothing=0.0, class_weights=None, reduction="mean")
    x, labels, where, ignore_index, rng = case.arrays()
    _check_against_reference(name, case.activation, x, labels, where, ignore_index, options, rng, case.dtype)


@requires_torch
@hypothesis.given(
    batch=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    k=st.integers(1, 7),
    smooth=_SMOOTH,
    squared_pred=st.booleans(),
    jaccard=st.booleans(),
    batch_dice=st.booleans(),
    masked=st.booleans(),
    dtype=st.sampled_from(("float32", "float64")),
    seed=st.integers(0, 2**32 - 1),
)
def test_soft_dice_matches_torch_reference(batch, spatial, k, smooth, squared_pred, jaccard, batch_dice, masked,
                                           dtype, seed):
    from combo_jax import reference

    rng = np.random.default_rng(seed)
    shape = (batch, *spatial)
    probs = rng.uniform(0.0, 1.0, (*shape, k)).astype(dtype)
    onehot = rng.uniform(0.0, 1.0, (*shape, k)).astype(dtype)
    where = rng.random(shape) > 0.3 if masked else None
    opts = dict(smooth_nr=smooth, smooth_dr=smooth, squared_pred=squared_pred, jaccard=jaccard,
                batch_dice=batch_dice)
    with jax.enable_x64(dtype == "float64"):
        cot = rng.standard_normal((k,) if batch_dice else (batch, k)).astype(dtype)
        value, grad = _jax_value_and_vjp(lambda p: losses.soft_dice(p, onehot, where=where, **opts), probs, cot)
    onehot_t = to_torch(onehot)
    where_t = None if where is None else to_torch(where, channels=False)
    ref_value, ref_grad = _torch_value_and_vjp(
        lambda pt: reference.soft_dice(pt, onehot_t, where=where_t, **opts), probs, cot
    )
    assert_close(value, ref_value, TOLERANCE[dtype], "soft_dice value")
    assert_close(grad, ref_grad, TOLERANCE[dtype], "soft_dice gradient")


# --------------------------------------------------------------------------------------------------
# b. Parity with MONAI
# --------------------------------------------------------------------------------------------------


def _monai_case(k=4, shape=(2, 5, 4), seed=0, dtype="float64", absent_class=False):
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal((*shape, k))).astype(dtype)
    labels = rng.integers(0, k - 1 if absent_class else k, shape)
    weights = rng.uniform(0.5, 2.0, k)
    return x, labels, weights


def _check_against_monai(ours, module, x, labels, dtype, target="ids"):
    """``ours(x)`` against MONAI's ``module``, value and gradient.

    ``target="ids"`` passes MONAI the integer labels as ``(B, 1, *spatial)`` (``to_onehot_y=True``);
    ``"onehot"`` passes one-hot labels of x's dtype (MONAI's own one-hot is float32, which costs squared_pred
    its float64 accuracy).
    """
    import torch

    with jax.enable_x64(dtype == "float64"):
        value, grad = _jax_value_and_vjp(ours, x, np.ones((), dtype))
    if target == "ids":
        target_t = torch.as_tensor(labels[:, None])
    else:
        target_t = to_torch(_one_hot(labels, x.shape[-1], x.dtype))
    monai_value, monai_grad = _torch_value_and_vjp(lambda xt: module(xt, target_t), x, np.ones((), dtype))
    assert_close(value, monai_value, TOLERANCE[dtype], "value")
    assert_close(grad, monai_grad, TOLERANCE[dtype], "gradient")


@requires_monai
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("include_background", "batch_dice"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("variant", ["plain", "squared_pred", "jaccard", "weighted"])
def test_dice_loss_matches_monai(activation, include_background, batch_dice, variant):
    import torch
    from monai.losses import DiceLoss

    x, labels, weights = _monai_case(shape=(2, 3, 2, 3) if batch_dice else (2, 5, 4))
    kept = weights if include_background else weights[1:]  # MONAI: one weight per kept channel
    target = "ids" if variant in ("plain", "jaccard") else "onehot"
    module = DiceLoss(
        include_background=include_background,
        to_onehot_y=target == "ids",
        softmax=activation == "softmax",
        sigmoid=activation == "sigmoid",
        squared_pred=variant == "squared_pred",
        jaccard=variant == "jaccard",
        batch=batch_dice,
        weight=torch.as_tensor(kept) if variant == "weighted" else None,  # float64: a list would be float32
        smooth_nr=1e-5,
        smooth_dr=1e-5,
    )
    ours = functools.partial(
        losses.dice_loss,
        labels=labels,
        activation=activation,
        include_background=include_background,
        batch_dice=batch_dice,
        squared_pred=variant == "squared_pred",
        jaccard=variant == "jaccard",
        class_weights=weights if variant == "weighted" else None,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
    )
    _check_against_monai(ours, module, x, labels, "float64", target)


@requires_monai
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dice_ce_loss_matches_monai(include_background, batch_dice, weighted):
    import torch
    from monai.losses import DiceCELoss

    x, labels, weights = _monai_case()
    module = DiceCELoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        batch=batch_dice,
        weight=torch.as_tensor(weights) if weighted else None,  # MONAI gives Dice weight[1:] itself
        lambda_dice=0.7,
        lambda_ce=1.3,
    )
    ours = functools.partial(
        losses.dice_ce_loss,
        labels=labels,
        activation="softmax",
        include_background=include_background,
        batch_dice=batch_dice,
        class_weights=weights if weighted else None,
        lambda_dice=0.7,
        lambda_ce=1.3,
    )
    _check_against_monai(ours, module, x, labels, "float64")


def _power_of_two_counts(batch=2, counts=(4, 8, 8, 0), seed=0):
    """Labels (batch, 5, 4) with the given voxel count per class in each sample (the last class absent).

    MONAI computes the generalized Dice weights 1/count and 1/count^2 in float32; with counts that are powers
    of two (also pooled over the batch) they are exact, so the comparison can stay at float64 accuracy.
    """
    rng = np.random.default_rng(seed)
    flat = np.repeat(np.arange(len(counts)), counts)
    return np.stack([rng.permutation(flat).reshape(5, 4) for _ in range(batch)])


@requires_monai
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_generalized_dice_loss_matches_monai(activation, w_type, batch_dice, include_background):
    from monai.losses import GeneralizedDiceLoss

    # The last class is absent from every sample: MONAI replaces its infinite weight by the largest finite one.
    x, _, _ = _monai_case()
    labels = _power_of_two_counts()
    module = GeneralizedDiceLoss(
        include_background=include_background,
        to_onehot_y=False,
        softmax=activation == "softmax",
        sigmoid=activation == "sigmoid",
        w_type=w_type,
        batch=batch_dice,
    )
    ours = functools.partial(
        losses.generalized_dice_loss,
        labels=labels,
        activation=activation,
        w_type=w_type,
        batch_dice=batch_dice,
        include_background=include_background,
    )
    _check_against_monai(ours, module, x, labels, "float64", target="onehot")


@requires_monai
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.7), (0.7, 0.3), (0.5, 0.5), (1.0, 0.0)])
@pytest.mark.parametrize(("include_background", "batch_dice"), [(True, False), (False, True)])
def test_tversky_loss_matches_monai(activation, alpha, beta, include_background, batch_dice):
    from monai.losses import TverskyLoss

    x, labels, _ = _monai_case()
    module = TverskyLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=activation == "softmax",
        sigmoid=activation == "sigmoid",
        alpha=alpha,
        beta=beta,
        batch=batch_dice,
    )
    ours = functools.partial(
        losses.tversky_loss,
        labels=labels,
        activation=activation,
        alpha=alpha,
        beta=beta,
        include_background=include_background,
        batch_dice=batch_dice,
    )
    _check_against_monai(ours, module, x, labels, "float64")


@requires_monai
@pytest.mark.parametrize(
    ("activation", "include_background"), [("sigmoid", True), ("sigmoid", False), ("softmax", True)]
)
@pytest.mark.parametrize(("gamma", "alpha", "weighted"), [(0.0, None, False), (2.0, None, True), (1.5, 0.25, False),
                                                      (2.0, 0.25, True)])
def test_focal_loss_matches_monai(activation, include_background, gamma, alpha, weighted):
    from monai.losses import FocalLoss

    # MONAI's FocalLoss computes in float32 whatever the input dtype, so compare in float32.
    x, labels, weights = _monai_case(dtype="float32")
    kept = weights if include_background else weights[1:]
    module = FocalLoss(
        include_background=include_background,
        to_onehot_y=True,
        gamma=gamma,
        alpha=alpha,
        use_softmax=activation == "softmax",
        weight=kept.tolist() if weighted else None,
    )
    ours = functools.partial(
        losses.focal_loss,
        labels=labels,
        activation=activation,
        gamma=gamma,
        alpha=alpha,
        include_background=include_background,
        class_weights=weights if weighted else None,
    )
    _check_against_monai(ours, module, x, labels, "float32")


@requires_monai
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_loss_with_soft_labels_matches_monai(include_background, alpha):
    from monai.losses import FocalLoss

    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((2, 5, 4, 3))).astype(np.float32)
    soft = rng.uniform(0.0, 1.0, x.shape).astype(np.float32)
    module = FocalLoss(include_background=include_background, gamma=2.0, alpha=alpha, use_softmax=False)
    soft_t = to_torch(soft)
    ours = functools.partial(losses.focal_loss, labels=soft, activation="sigmoid", gamma=2.0, alpha=alpha,
                             include_background=include_background)
    value, grad = _jax_value_and_vjp(ours, x, np.ones((), np.float32))
    monai_value, monai_grad = _torch_value_and_vjp(lambda xt: module(xt, soft_t), x, np.ones((), np.float32))
    assert_close(value, monai_value, TOLERANCE["float32"], "value")
    assert_close(grad, monai_grad, TOLERANCE["float32"], "gradient")


# --------------------------------------------------------------------------------------------------
# Configurations shared by the property tests below: every loss, softmax and sigmoid, each compiled once
# (value and gradient) for inputs of shape (2, 4, 3, K) and reused by every test that can.
# --------------------------------------------------------------------------------------------------

K = 4
SHAPE = (2, 4, 3)
_WEIGHTS = (0.5, 1.0, 2.0, 1.5)


def _configs():
    for act in ("softmax", "sigmoid"):
        yield "combo_loss", dict(activation=act, alpha=0.6, beta=0.3)
        yield "combo_loss", dict(activation=act, batch_dice=True, class_weights=_WEIGHTS)
        yield "weighted_cross_entropy", dict(activation=act, beta=0.7, class_weights=_WEIGHTS)
        yield "dice_loss", dict(activation=act, include_background=False, class_weights=_WEIGHTS)
        yield "dice_ce_loss", dict(activation=act, label_smoothing=0.1, class_weights=_WEIGHTS)
        yield "generalized_dice_loss", dict(activation=act, w_type="simple")
        yield "tversky_loss", dict(activation=act, alpha=0.3, beta=0.7)
        yield "focal_loss", dict(activation=act, gamma=2.0, alpha=0.25, class_weights=_WEIGHTS)
        yield "cross_entropy", dict(activation=act, class_weights=_WEIGHTS)


CONFIGS = list(_configs())
CONFIG_IDS = [f"{name}-{opts['activation']}-{i}" for i, (name, opts) in enumerate(CONFIGS)]
by_config = pytest.mark.parametrize("config", range(len(CONFIGS)), ids=CONFIG_IDS)


def _loss_of_config(config, **overrides):
    """The loss of CONFIGS[config] as ``f(x, labels, where, class_weights)``; the weights are an argument."""
    name, options = CONFIGS[config]
    options = {**{k: v for k, v in options.items() if k != "class_weights"}, **overrides}
    takes_weights = "class_weights" in CONFIGS[config][1]

    def loss(x, labels, where, class_weights):
        extra = dict(class_weights=class_weights) if takes_weights else {}
        return _loss(name)(x, labels, where=where, **extra, **options)

    return loss


@functools.cache
def _compiled(config):
    return jax.jit(jax.value_and_grad(_loss_of_config(config)))


def value_and_grad(config, x, labels, where=None, class_weights=None):
    """Value and gradient of config's loss; ``where=None`` keeps every voxel (as an all-true mask)."""
    where = np.ones(np.shape(labels)[: np.ndim(x) - 1], bool) if where is None else where
    value, grad = _compiled(config)(x, labels, where, _weights_argument(config, class_weights))
    return np.asarray(value), np.asarray(grad, np.float32)


def _weights_argument(config, class_weights=None):
    """The class weights to pass (an empty array, always the same, for a loss configured without them)."""
    if "class_weights" not in CONFIGS[config][1]:
        return np.zeros((0,), np.float32)
    return np.asarray(_WEIGHTS if class_weights is None else class_weights, np.float32)


def _random_inputs(shape=SHAPE, k=K, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal((*shape, k))).astype(dtype)
    labels = rng.integers(0, k, shape)
    where = rng.random(shape) > 0.3
    return x, labels, where


# --------------------------------------------------------------------------------------------------
# c. Invariances
# --------------------------------------------------------------------------------------------------


@by_config
@pytest.mark.parametrize("masked", [False, True])
def test_batch_permutation_leaves_loss_unchanged(config, masked):
    x, labels, where = _random_inputs()
    where = where if masked else None
    expected, _ = value_and_grad(config, x, labels, where)
    perm = np.array([1, 0])
    actual, _ = value_and_grad(config, x[perm], labels[perm], None if where is None else where[perm])
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def _permute_classes(perm, x, labels):
    """Channel j of the result is channel perm[j] of the input; labels are renamed accordingly."""
    return x[..., perm], np.argsort(perm)[labels]


@by_config
def test_permuting_organ_classes_leaves_loss_unchanged(config):
    x, labels, where = _random_inputs()
    weights = _weights_argument(config)
    expected, grad = value_and_grad(config, x, labels, where, weights)
    perm = np.array([0, 3, 1, 2])  # the background channel 0 stays first
    px, plabels = _permute_classes(perm, x, labels)
    pweights = weights[perm] if weights.size else weights
    actual, pgrad = value_and_grad(config, px, plabels, where, pweights)
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(pgrad, grad[..., perm], rtol=1e-5, atol=1e-8)
    # An inconsistent permutation (logits permuted, labels not) does change the loss.
    wrong, _ = value_and_grad(config, px, labels, where, pweights)
    assert abs(float(wrong) - float(expected)) > 1e-4


# Losses where no channel is special, so any permutation of all K channels (background included) works.
_FULLY_SYMMETRIC = [
    ("combo_loss", dict(activation="softmax", include_background=True, beta=0.3)),
    ("weighted_cross_entropy", dict(activation="softmax", include_background=True, beta=0.8)),
    ("dice_loss", dict(activation="softmax", squared_pred=True)),
    ("generalized_dice_loss", dict(activation="softmax")),
    ("tversky_loss", dict(activation="sigmoid", alpha=0.2, beta=0.8)),
    ("focal_loss", dict(activation="softmax", alpha=(0.1, 0.2, 0.3, 0.4))),
    ("cross_entropy", dict(activation="softmax", label_smoothing=0.2, class_weights=(1.0, 2.0, 3.0, 4.0))),
    ("dice_ce_loss", dict(activation="softmax", jaccard=True)),
]


@pytest.mark.parametrize(("name", "options"), _FULLY_SYMMETRIC, ids=[n for n, _ in _FULLY_SYMMETRIC])
def test_permuting_all_classes_with_background_included_leaves_loss_unchanged(name, options):
    x, labels, _ = _random_inputs()
    perm = np.array([2, 0, 3, 1])
    px, plabels = _permute_classes(perm, x, labels)
    popts = {k: [v[j] for j in perm] if isinstance(v, tuple) else v for k, v in options.items()}
    fn = jax.jit(lambda x, y: _loss(name)(x, y, **options))
    pfn = jax.jit(lambda x, y: _loss(name)(x, y, **popts))
    np.testing.assert_allclose(pfn(px, plabels), fn(x, labels), rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# d, e. The minimum at a perfect prediction; absent classes
# --------------------------------------------------------------------------------------------------


def _every_class_present(batch=2, n=12, k=K, seed=0):
    """Integer labels (batch, n) where every class occurs in every sample."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(n) % k) for _ in range(batch)])


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_perfect_prediction_reaches_the_minimum_of_combo_loss(activation, alpha, batch_dice):
    labels = _every_class_present()
    onehot = _one_hot(labels, K)
    logits = 30.0 * onehot if activation == "softmax" else 30.0 * (2.0 * onehot - 1.0)
    fn = jax.jit(functools.partial(losses.combo_loss, alpha=alpha, activation=activation, batch_dice=batch_dice))
    perfect = float(fn(logits, labels))
    np.testing.assert_allclose(perfect, -(1.0 - alpha), atol=1e-5)
    # Uncertain or wrong predictions cost more.
    rng = np.random.default_rng(1)
    for other in (np.zeros_like(logits), logits[..., ::-1], 3.0 * rng.standard_normal(logits.shape)):
        assert float(fn(other.astype(np.float32), labels)) > perfect + 1e-3


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("include_background", [True, False])
def test_perfect_prediction_gives_zero_dice_loss(activation, include_background):
    labels = _every_class_present()
    onehot = _one_hot(labels, K)
    logits = 30.0 * onehot if activation == "softmax" else 30.0 * (2.0 * onehot - 1.0)
    fn = functools.partial(losses.dice_loss, activation=activation, include_background=include_background)
    np.testing.assert_allclose(fn(logits, labels), 0.0, atol=1e-6)
    assert float(fn(np.zeros_like(logits), labels)) > 0.1


@by_config
def test_absent_and_unpredicted_class_gives_finite_values(config):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, SHAPE)  # classes 2 and 3 absent everywhere
    logits = 2.0 * rng.standard_normal((*SHAPE, K)).astype(np.float32)
    logits[..., 2:] = -30.0  # and predicted with (almost) no mass
    value, grad = value_and_grad(config, logits, labels)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("smooth", [1e-5, 1.0])
@pytest.mark.parametrize("mass", [0.0, 1e-13])
def test_soft_dice_of_absent_unpredicted_class_is_one(smooth, mass):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (2, 5, 4))
    onehot = _one_hot(labels, 3)
    probs = rng.uniform(0.0, 1.0, (2, 5, 4, 3)).astype(np.float32)
    probs[..., 2] = mass
    dice = np.asarray(losses.soft_dice(probs, onehot, smooth_nr=smooth, smooth_dr=smooth))
    np.testing.assert_allclose(dice[:, 2], smooth / (20 * mass + smooth), rtol=1e-6)  # 20 voxels a sample
    np.testing.assert_allclose(dice[:, 2], 1.0, atol=1e-6)
    assert np.all(dice[:, :2] < 1.0)  # present classes with imperfect predictions


def test_soft_dice_of_absent_unpredicted_class_without_smoothing_is_undefined():
    onehot = _one_hot(np.zeros((1, 4), int), 2)
    probs = onehot.copy()  # class 1: absent and unpredicted
    dice = np.asarray(losses.soft_dice(probs, onehot, smooth_nr=0.0, smooth_dr=0.0))
    np.testing.assert_allclose(dice[0, 0], 1.0)
    assert np.isnan(dice[0, 1])  # 0 / 0, as combo_loss's docstring warns


# --------------------------------------------------------------------------------------------------
# f. Extreme inputs and bf16
# --------------------------------------------------------------------------------------------------


def _extreme_logits(seed=0, ties=True):
    rng = np.random.default_rng(seed)
    if not ties:
        return (1e4 * rng.standard_normal((*SHAPE, K))).astype(np.float32)
    x = 1e4 * rng.choice([-1.0, 1.0], (*SHAPE, K)).astype(np.float32)
    x[0, 0, 0] = [1e4, 1e4, -1e4, -1e4]  # a tie at the maximum
    x[0, 0, 1] = -1e4  # all channels equal
    x[0, 0, 2] = [1e4, -1e4, -1e4, -1e4]  # one channel far above the rest (softmax underflows)
    return x


@by_config
def test_extreme_logits_give_finite_values_and_gradients(config):
    x = _extreme_logits()
    labels = np.random.default_rng(1).integers(0, K, SHAPE)
    value, grad = value_and_grad(config, x, labels)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))


def _check_config_against_reference(config, x, labels):
    name, options = CONFIGS[config]
    opts = dict(options)
    activation = opts.pop("activation")
    _check_against_reference(name, activation, x, labels, None, None, opts, np.random.default_rng(2), "float32")


@requires_torch
@by_config
def test_extreme_logits_match_torch_reference(config):
    x = _extreme_logits(ties=False)
    _check_config_against_reference(config, x, np.random.default_rng(1).integers(0, K, SHAPE))


@requires_torch
@by_config
def test_large_logits_match_torch_reference(config):
    """Logit gaps up to ~80: large, but every exp(x_j - max) is still a normal float32."""
    x = np.clip(20.0 * np.random.default_rng(4).standard_normal((*SHAPE, K)), -40.0, 40.0).astype(np.float32)
    _check_config_against_reference(config, x, np.random.default_rng(1).integers(0, K, SHAPE))


@requires_torch
@pytest.mark.parametrize("name", ["weighted_cross_entropy", "combo_loss"])
@pytest.mark.parametrize("gap", [50.0, 80.0, 100.0, 1e3, 1e4])
def test_confident_false_positive_cost_grows_with_the_logit_gap(name, gap):
    """A background voxel called organ 1 with logit gap ``gap``: cost (1 - beta) * gap, gradient -+(1 - beta)."""
    labels = np.array([[0, 1]])
    x = np.array([[[0.0, gap], [0.0, 5.0]]], np.float32)
    _check_against_reference(name, "softmax", x, labels, None, None, dict(beta=0.5), np.random.default_rng(0),
                             "float32")


@requires_torch
@by_config
def test_tied_maximum_logits_match_torch_reference(config):
    """Exact ties at the maximum logit: all-zero logits (a zero-initialized head) and pairwise ties."""
    rng = np.random.default_rng(3)
    x = np.round(2.0 * rng.standard_normal((*SHAPE, K))).astype(np.float32)  # many ties
    x[0] = 0.0
    x[1, 0, 0] = [1.5, 1.5, -2.0, 0.0]
    x[1, 0, 1] = [-3.0, 2.0, 2.0, 2.0]
    _check_config_against_reference(config, x, rng.integers(0, K, SHAPE))


@by_config
def test_bfloat16_logits_match_float32_on_the_same_values(config):
    rng = np.random.default_rng(0)
    x16 = jnp.asarray(3.0 * rng.standard_normal((*SHAPE, K)), jnp.bfloat16)
    labels = rng.integers(0, K, SHAPE)
    value16, grad16 = _compiled(config)(x16, labels, np.ones(SHAPE, bool), _weights_argument(config))
    value32, grad32 = value_and_grad(config, x16.astype(jnp.float32), labels)
    assert value16.dtype == jnp.float32  # reduced in float32
    assert grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(value16, value32, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad16, np.float32), grad32, rtol=8e-3, atol=1e-6 * np.abs(grad32).max())


@by_config
def test_extreme_bfloat16_logits_give_finite_values_and_gradients(config):
    x = jnp.asarray(_extreme_logits(), jnp.bfloat16)
    labels = np.random.default_rng(1).integers(0, K, SHAPE)
    value, grad = _compiled(config)(x, labels, np.ones(SHAPE, bool), _weights_argument(config))
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --------------------------------------------------------------------------------------------------
# g. The meaning of beta (Taghanaki et al.): beta < 0.5 penalizes false positives more
# --------------------------------------------------------------------------------------------------

_CONFIDENCE = 50.0


def _fp_fn_costs(name, activation, k, beta, include_background=False):
    """Extra loss of one false positive and of one false negative, everything else right and confident.

    Softmax: integer labels with background 0 and organs 1..k-1. Sigmoid: k organ channels as multi-label
    float targets, a background voxel being a row of zeros. The same labels serve both mistakes; the organ
    that is mistaken covers two voxels, so it stays present (and partly right) in both.
    """
    organ = k - 1
    if activation == "softmax":
        labels = np.array([[0, 0, 0, *range(1, k), organ]])  # voxel 0 background, the last voxel the organ
        logits = _CONFIDENCE * _one_hot(labels, k)
        fp, fn = logits.copy(), logits.copy()
        fp[0, 0] = _CONFIDENCE * _one_hot(organ, k)  # background voxel called the organ
        fn[0, -1] = _CONFIDENCE * _one_hot(0, k)  # organ voxel called background
    else:
        ids = np.array([[-1, -1, -1, *range(k), organ]])  # -1: background, no positive channel
        labels = np.where(ids[..., None] == np.arange(k), 1.0, 0.0).astype(np.float32)
        logits = _CONFIDENCE * (2.0 * labels - 1.0)
        fp, fn = logits.copy(), logits.copy()
        fp[0, 0, organ] = _CONFIDENCE
        fn[0, -1, organ] = -_CONFIDENCE
    kwargs = dict(beta=beta, activation=activation, include_background=include_background)
    loss = jax.jit(jax.vmap(lambda x: _loss(name)(x, labels, **kwargs)))
    base, fp_loss, fn_loss = np.asarray(loss(np.stack([logits, fp, fn])), np.float64)
    return fp_loss - base, fn_loss - base


@pytest.mark.parametrize("name", ["weighted_cross_entropy", "combo_loss"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("beta", [0.2, 0.45, 0.55, 0.8])
def test_beta_below_half_penalizes_false_positives_more(name, activation, k, beta):
    fp_cost, fn_cost = _fp_fn_costs(name, activation, k, beta)
    assert fp_cost > 0 and fn_cost > 0
    if beta < 0.5:
        assert fp_cost > fn_cost
    else:
        assert fn_cost > fp_cost


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.7, 0.9])
def test_beta_cancels_with_softmax_background_included(beta):
    fp_cost, fn_cost = _fp_fn_costs("weighted_cross_entropy", "softmax", 2, beta, include_background=True)
    np.testing.assert_allclose(fp_cost, fn_cost, rtol=1e-6)
    # ... and the cost no longer depends on beta at all.
    fp_half, _ = _fp_fn_costs("weighted_cross_entropy", "softmax", 2, 0.5, include_background=True)
    np.testing.assert_allclose(fp_cost, fp_half, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_beta_cancels_in_combo_loss_with_background_included_and_balanced_labels(beta):
    labels = np.array([[0, 0, 0, 1, 1, 1]])  # as many background as organ voxels: the Dice terms mirror
    logits = _CONFIDENCE * _one_hot(labels, 2)
    fp, fn = logits.copy(), logits.copy()
    fp[0, 0] = logits[0, 5]
    fn[0, 5] = logits[0, 0]
    loss = jax.jit(jax.vmap(lambda x: losses.combo_loss(x, labels, beta=beta, include_background=True)))
    base, fp_loss, fn_loss = np.asarray(loss(np.stack([logits, fp, fn])), np.float64)
    assert fp_loss - base > 1.0
    np.testing.assert_allclose(fp_loss - base, fn_loss - base, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# h. jit, vmap, activation="none" under jit
# --------------------------------------------------------------------------------------------------


_ONE_CONFIG_PER_LOSS = sorted({name: i for i, (name, _) in reversed(list(enumerate(CONFIGS)))}.values()) + [
    CONFIG_IDS.index("combo_loss-sigmoid-9")
]


@pytest.mark.parametrize("config", _ONE_CONFIG_PER_LOSS, ids=[CONFIG_IDS[i] for i in _ONE_CONFIG_PER_LOSS])
def test_jit_equals_eager(config):
    x, labels, where = _random_inputs()
    weights = _weights_argument(config)
    jit_value, jit_grad = value_and_grad(config, x, labels, where, weights)
    eager_value, eager_grad = jax.value_and_grad(_loss_of_config(config))(x, labels, where, weights)
    np.testing.assert_allclose(jit_value, eager_value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jit_grad, eager_grad, rtol=1e-5, atol=1e-8)


@by_config
def test_vmap_equals_a_loop(config):
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((3, *SHAPE, K))).astype(np.float32)
    labels = rng.integers(0, K, (3, *SHAPE))
    where = rng.random((3, *SHAPE)) > 0.3
    weights = _weights_argument(config)
    mapped_value, mapped_grad = jax.jit(jax.vmap(jax.value_and_grad(_loss_of_config(config)),
                                                 in_axes=(0, 0, 0, None)))(x, labels, where, weights)
    for i in range(3):
        value, grad = value_and_grad(config, x[i], labels[i], where[i], weights)
        np.testing.assert_allclose(mapped_value[i], value, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mapped_grad[i], grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", [*LOSS_NAMES, "soft_dice"])
def test_activation_none_works_under_jit(name):
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.05, 0.95, (2, 4, 3, K)).astype(np.float32)
    labels = rng.integers(0, K, (2, 4, 3))
    if name == "soft_dice":
        fn = lambda p: jnp.mean(losses.soft_dice(p, _one_hot(labels, K)))  # noqa: E731
    else:
        fn = lambda p: jnp.mean(_loss(name)(p, labels, activation="none"))  # noqa: E731
    jit_value, jit_grad = jax.jit(jax.value_and_grad(fn))(probs)
    assert np.isfinite(jit_value) and np.all(np.isfinite(jit_grad)) and np.any(jit_grad != 0)
    eager_value = fn(probs)
    np.testing.assert_allclose(jit_value, eager_value, rtol=1e-6)


@by_config
def test_strict_dtype_promotion(config):
    """No implicit promotion inside the losses (equinox runs its tests this way)."""
    x, labels, where = _random_inputs()
    weights = _weights_argument(config)
    expected_value, expected_grad = value_and_grad(config, x, labels, where, weights)
    with jax.numpy_dtype_promotion("strict"):
        value, grad = jax.jit(jax.value_and_grad(_loss_of_config(config)))(x, labels.astype(np.int32), where, weights)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_fused_combo_gradient_matches_finite_differences():
    """The softmax Combo loss has a hand-derived gradient (combo_jax._fused); check it numerically."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 3, 4))
    labels = rng.integers(0, 4, (2, 3, 3))
    where = rng.random((2, 3, 3)) > 0.2
    with jax.enable_x64(True):
        for batch_dice in (False, True):
            fn = jax.jit(functools.partial(
                losses.combo_loss, labels=labels, where=where, beta=0.3, alpha=0.4, batch_dice=batch_dice,
                class_weights=[0.5, 1.0, 2.0, 3.0],
            ))
            jax.test_util.check_grads(fn, (jnp.asarray(x),), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# i. Sharding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_combo_loss_on_a_sharded_batch_equals_unsharded(activation, batch_dice):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((8, 4, 4, K))).astype(np.float32)
    labels = rng.integers(0, K, (8, 4, 4))
    where = rng.random((8, 4, 4)) > 0.2
    fn = jax.jit(
        jax.value_and_grad(
            lambda x, y, w: losses.combo_loss(x, y, where=w, beta=0.3, activation=activation, batch_dice=batch_dice)
        )
    )
    value, grad = fn(x, labels, where)
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    xs, ys, ws = (jax.device_put(a, sharding) for a in (x, labels, where))
    assert len({shard.device for shard in xs.addressable_shards}) == 8
    sharded_value, sharded_grad = fn(xs, ys, ws)
    np.testing.assert_allclose(sharded_value, value, rtol=1e-6)
    np.testing.assert_allclose(sharded_grad, grad, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# j. Masks and ignore_index
# --------------------------------------------------------------------------------------------------

# batch_dice=True pools the region sums over the batch, so the loss of a masked batch is the loss of its
# kept voxels gathered into one sample.
_POOLED = [
    ("combo_loss", dict(activation="softmax", batch_dice=True, beta=0.3, class_weights=[1.0, 2.0, 0.5, 1.0])),
    ("combo_loss", dict(activation="sigmoid", batch_dice=True, beta=0.7)),
    ("weighted_cross_entropy", dict(activation="sigmoid", beta=0.2)),
    ("dice_loss", dict(activation="softmax", batch_dice=True, squared_pred=True)),
    ("dice_ce_loss", dict(activation="softmax", batch_dice=True, label_smoothing=0.1,
                          class_weights=[1.0, 2.0, 0.5, 1.0])),
    ("generalized_dice_loss", dict(activation="softmax", batch_dice=True)),
    ("tversky_loss", dict(activation="sigmoid", batch_dice=True, alpha=0.3, beta=0.7)),
    ("focal_loss", dict(activation="softmax", alpha=0.25)),
    ("focal_loss", dict(activation="sigmoid", include_background=False)),
    ("cross_entropy", dict(activation="softmax", class_weights=[1.0, 2.0, 0.5, 1.0], label_smoothing=0.1)),
    ("cross_entropy", dict(activation="sigmoid")),
]


@pytest.mark.parametrize(("name", "options"), _POOLED, ids=[f"{n}-{o['activation']}" for n, o in _POOLED])
def test_where_equals_boolean_indexing(name, options):
    x, labels, where = _random_inputs()
    fn = jax.jit(jax.value_and_grad(lambda x, y, w: _loss(name)(x, y, where=w, **options)))
    value, grad = fn(x, labels, where)
    kept_value, kept_grad = fn(x[where][None], labels[where][None], None)
    np.testing.assert_allclose(value, kept_value, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad)[where], np.asarray(kept_grad)[0], rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)


def _ignore_params():
    for config, config_id in enumerate(CONFIG_IDS):
        yield pytest.param(config, 2, id=f"{config_id}-2")
        if CONFIGS[config][1]["activation"] == "softmax":
            yield pytest.param(config, 255, id=f"{config_id}-255")


@pytest.mark.parametrize(("config", "ignore_index"), list(_ignore_params()))
def test_ignore_index_equals_where(config, ignore_index):
    rng = np.random.default_rng(0)
    x = (2.0 * rng.standard_normal((*SHAPE, K))).astype(np.float32)
    labels = rng.integers(0, K, SHAPE)
    labels[rng.random(SHAPE) < 0.2] = ignore_index
    weights = _weights_argument(config)
    ignoring = jax.jit(jax.value_and_grad(_loss_of_config(config, ignore_index=ignore_index)))
    value, grad = ignoring(x, labels, None, weights)
    expected_value, expected_grad = value_and_grad(config, x, labels, labels != ignore_index, weights)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-9)


@by_config
def test_fully_masked_batch(config):
    x, labels, _ = _random_inputs()
    value, grad = value_and_grad(config, x, labels, np.zeros(SHAPE, bool))
    assert np.isfinite(value)
    np.testing.assert_array_equal(grad, 0.0)  # no voxel counts, so nothing depends on the logits
    if CONFIGS[config][0] in ("cross_entropy", "weighted_cross_entropy", "focal_loss"):
        assert float(value) == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fully_masked_cross_entropy_is_zero(reduction, activation):
    x, labels, _ = _random_inputs()
    value = losses.cross_entropy(x, labels, where=np.zeros(labels.shape, bool), reduction=reduction,
                                 activation=activation, label_smoothing=0.1)
    np.testing.assert_array_equal(value, 0.0)


# --------------------------------------------------------------------------------------------------
# k. Out-of-range integer labels; check_labels
# --------------------------------------------------------------------------------------------------

def _follows_zero_row(config):
    """Every loss but the softmax cross-entropy of integer labels (the documented exception)."""
    name, options = CONFIGS[config]
    return not (name in ("cross_entropy", "dice_ce_loss") and options["activation"] == "softmax")


def _out_of_range_labels():
    _, labels, _ = _random_inputs()
    bad = labels.copy()
    bad[0, 0, 0] = K
    bad[1, 2, 1] = K + 7
    bad[1, 0, 2] = -1
    onehot = _one_hot(np.clip(bad, 0, K - 1), K)
    onehot[(bad < 0) | (bad >= K)] = 0.0
    return bad, onehot


@pytest.mark.parametrize("config", [i for i in range(len(CONFIGS)) if _follows_zero_row(i)],
                         ids=[c for i, c in enumerate(CONFIG_IDS) if _follows_zero_row(i)])
def test_out_of_range_label_is_a_zero_one_hot_row_under_jit(config):
    x, _, where = _random_inputs()
    bad, onehot = _out_of_range_labels()
    value, grad = value_and_grad(config, x, bad)
    expected_value, expected_grad = value_and_grad(config, x, onehot)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["cross_entropy", "dice_ce_loss"])
@pytest.mark.parametrize("class_weights", [None, _WEIGHTS], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_out_of_range_label_is_left_out_of_softmax_cross_entropy(name, class_weights, label_smoothing):
    """The documented exception: torch-style weighting gives such a voxel weight 0 in the cross-entropy."""
    x, _, _ = _random_inputs()
    bad, onehot = _out_of_range_labels()
    valid = (bad >= 0) & (bad < K)
    options = dict(class_weights=class_weights, label_smoothing=label_smoothing)
    fn = jax.jit(jax.value_and_grad(lambda x, y, w: losses.cross_entropy(x, y, where=w, **options)))
    value, grad = fn(x, bad, None)
    expected_value, expected_grad = fn(x, np.where(valid, bad, 0), valid)
    if name == "dice_ce_loss":  # its Dice term still sees the voxel as a zero row
        dice = jax.jit(jax.value_and_grad(lambda x, y: losses.dice_loss(x, y, class_weights=class_weights)))
        dice_value, dice_grad = dice(x, onehot)
        value, grad = jax.jit(jax.value_and_grad(lambda x, y: losses.dice_ce_loss(x, y, **options)))(x, bad)
        expected_value, expected_grad = expected_value + dice_value, expected_grad + dice_grad
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_out_of_range_label_in_cross_entropy_sum_is_a_zero_row(reduction):
    x, _, _ = _random_inputs()
    bad, onehot = _out_of_range_labels()
    np.testing.assert_allclose(
        losses.cross_entropy(x, bad, reduction=reduction), losses.cross_entropy(x, onehot, reduction=reduction),
        rtol=1e-6,
    )


def test_check_labels_accepts_valid_labels():
    labels = np.array([[0, 1, 2], [3, 3, 0]])
    assert losses.check_labels(labels, 4) is None
    assert losses.check_labels(jnp.asarray(labels), 4) is None
    assert losses.check_labels(np.array([[0, 255]]), 2, ignore_index=255) is None


@pytest.mark.parametrize(
    ("labels", "num_classes", "ignore_index", "named"),
    [
        (np.array([[0, 4, 1, 7]]), 4, None, r"4, 7"),
        (np.array([[0, -1, 1]]), 4, None, r"-1"),
        (np.array([[0, 255, 9]]), 4, 255, r"found value\(s\) 9 in 1 voxel"),
        (np.array([[0, 255]]), 4, 3, r"255"),
    ],
)
def test_check_labels_rejects_out_of_range_values(labels, num_classes, ignore_index, named):
    with pytest.raises(ValueError, match=named):
        losses.check_labels(labels, num_classes, ignore_index=ignore_index)


def test_check_labels_rejects_float_labels_and_tracers():
    with pytest.raises(TypeError, match="integer"):
        losses.check_labels(np.zeros((2, 3), np.float32), 4)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda y: losses.check_labels(y, 4))(np.zeros((2, 3), np.int32))


# --------------------------------------------------------------------------------------------------
# l. The paper's sum-over-organs form
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "include_background"), [("softmax", False), ("softmax", True),
                                                                ("sigmoid", False)])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dice_include_background", [True, False])
def test_combo_loss_equals_its_documented_decomposition(activation, include_background, batch_dice, masked,
                                                        dice_include_background):
    x, labels, where = _random_inputs(shape=(3, 4, 3))
    where = where if masked else None
    alpha, beta = 0.3, 0.6
    kwargs = dict(beta=beta, activation=activation, include_background=include_background, where=where)
    combo = float(losses.combo_loss(x, labels, alpha=alpha, batch_dice=batch_dice,
                                    dice_include_background=dice_include_background, **kwargs))
    wce = float(losses.weighted_cross_entropy(x, labels, **kwargs))
    probs = jax.nn.softmax(x) if activation == "softmax" else jax.nn.sigmoid(x)
    c0 = 1 if activation == "softmax" and not include_background else 0
    dice_c0 = 0 if activation == "softmax" and dice_include_background else c0  # the Dice term's channels D
    dice = np.asarray(losses.soft_dice(probs, _one_hot(labels, K), batch_dice=batch_dice, where=where))[..., dice_c0:]
    num_channels = K - dice_c0
    # Channels averaged (combo_loss): the cross-entropy over the organs C, the Dice over D ...
    np.testing.assert_allclose(combo, alpha * wce - (1 - alpha) * dice.mean(), rtol=1e-6)
    # ... and the paper's sum over organs, whose Dice term is |D| times larger.
    paper = alpha * wce - (1 - alpha) * dice.sum(-1).mean()
    np.testing.assert_allclose(paper - alpha * wce, num_channels * (combo - alpha * wce), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# m. Bad input
# --------------------------------------------------------------------------------------------------

_X = np.zeros((2, 3, 3, 3), np.float32)
_Y = np.zeros((2, 3, 3), np.int32)
_OPTIONS = {name: set(inspect.signature(_loss(name)).parameters) for name in (*LOSS_NAMES, "soft_dice")}


def _bad_inputs():
    """(loss, logits, labels, where, options, exception, match) for every check that applies to a loss."""
    for name in (*LOSS_NAMES, "soft_dice"):
        opts = _OPTIONS[name]
        first = "probs" if name == "soft_dice" else "logits"
        second = "onehot" if name == "soft_dice" else "labels"
        y = _one_hot(_Y, 3) if name == "soft_dice" else _Y
        yield name, "rank2", _X[:, :, 0, 0], y[:, :, 0], None, {}, ValueError, first
        yield name, "int_logits", _X.astype(np.int32), y, None, {}, TypeError, first
        yield name, "shape", _X, y[:, :2], None, {}, ValueError, second
        yield name, "float_shape", _X, _one_hot(_Y, 4), None, {}, ValueError, second
        yield name, "bool_labels", _X, np.zeros(y.shape, bool), None, {}, TypeError, second
        yield name, "complex_labels", _X, np.zeros(y.shape, np.complex64), None, {}, TypeError, second
        yield name, "where_dtype", _X, y, np.ones(_Y.shape, np.float32), {}, TypeError, "where"
        yield name, "where_shape", _X, y, np.ones((2, 3), bool), {}, ValueError, "where"
        yield name, "no_voxels", _X[:, :0], y[:, :0], None, {}, ValueError, f"{first}.*shape"
        yield name, "no_samples", _X[:0], y[:0], None, {}, ValueError, f"{first}.*shape"
        for option, bad in [("alpha", 1.5), ("alpha", -0.1), ("beta", 1.5), ("beta", -0.5), ("label_smoothing", 1.1),
                            ("label_smoothing", -0.1), ("gamma", -1.0), ("smooth", -1.0), ("smooth_nr", -1.0),
                            ("smooth_dr", -1e-5), ("lambda_dice", -1.0), ("lambda_ce", -1.0), ("smooth", np.inf),
                            ("smooth_nr", np.inf), ("smooth_dr", np.inf), ("gamma", np.inf), ("lambda_ce", np.inf),
                            ("alpha", np.nan), ("smooth", np.nan)]:
            if option in opts and not (name == "tversky_loss" and bad > 1):  # Tversky takes any alpha, beta >= 0
                yield name, f"{option}={bad}", _X, y, None, {option: bad}, ValueError, option
        if "class_weights" in opts:
            yield name, "weights_length", _X, y, None, {"class_weights": [1.0, 1.0]}, ValueError, "class_weights"
            yield name, "weights_sign", _X, y, None, {"class_weights": [1.0, -1.0, 1.0]}, ValueError, "class_weights"
            yield name, "weights_nan", _X, y, None, {"class_weights": [1.0, np.nan, 1.0]}, ValueError, "class_weights"
            yield name, "weights_inf", _X, y, None, {"class_weights": [1.0, np.inf, 1.0]}, ValueError, "class_weights"
        for option in ("activation", "reduction", "w_type"):
            if option in opts:
                yield name, f"{option}=unknown", _X, y, None, {option: "unknown"}, ValueError, option
        if name == "dice_ce_loss":  # per-organ terms are defined without label smoothing only
            yield (name, "reduction=none", _X, y, None, {"reduction": "none", "label_smoothing": 0.1}, ValueError,
                   "reduction")
        if "activation" in opts:
            yield name, "softmax_k1", _X[..., :1], _Y, None, {"activation": "softmax"}, ValueError, "softmax"
        if "ignore_index" in opts:
            yield name, "ignore_float", _X, _one_hot(_Y, 3), None, {"ignore_index": 0}, ValueError, "ignore_index"
        if name == "focal_loss":
            yield name, "alpha_length", _X, y, None, {"alpha": [0.5, 0.5]}, ValueError, "alpha"


def _bad_params():
    for bad in _bad_inputs():
        for jit in (False, True):
            yield pytest.param(*bad, jit, id=f"{bad[0]}-{bad[1]}-{'jit' if jit else 'eager'}")


@pytest.mark.parametrize(("name", "case", "x", "y", "where", "options", "error", "match", "jit"), list(_bad_params()))
def test_bad_input_raises_naming_the_argument(name, case, x, y, where, options, error, match, jit):
    def call(x, y, where):
        return _loss(name)(x, y, where=where, **options)

    if jit:
        call = jax.jit(call)
    with pytest.raises(error, match=match):
        call(x, y, where)


# --------------------------------------------------------------------------------------------------
# n. API conventions
# --------------------------------------------------------------------------------------------------


SUMS_API = ("ClassSums", "class_sums", "combo_loss_from_sums", "pool_batch")  # losses from per-class sums
HELPERS = ("frequency_weights",)  # host-side, from the data
LOSS_API = [n for n in losses.__all__ if n not in SUMS_API + HELPERS]


@pytest.mark.parametrize("name", LOSS_API + ["class_sums"])
def test_api_arrays_positional_options_keyword_only(name):
    fn = getattr(losses, name)
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(positional) == 2, f"{name}: {positional}"
    assert params[:2] == positional
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[2:]), f"{name}: {params[2:]}"
    assert all(p.default is not inspect.Parameter.empty for p in params[2:])
    assert fn.__doc__ and fn.__doc__.strip()
    assert "rng" not in {p.name for p in params}


def test_api_package_exports_every_loss():
    assert sorted(combo_jax.__all__) == sorted(losses.__all__)
    for name in losses.__all__:
        assert getattr(combo_jax, name) is getattr(losses, name)


@requires_torch
@pytest.mark.parametrize("name", [n for n in LOSS_API if n != "check_labels"])
def test_api_reference_has_the_same_signature(name):
    from combo_jax import reference

    ours = inspect.signature(getattr(losses, name)).parameters
    theirs = inspect.signature(getattr(reference, name)).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_frequency_weights_values_and_errors():
    # f = (0.81, 0.09, 0.09, 0.01): f^-1/2 = (10/9, 10/3, 10/3, 10), mean 40/9; counts give the same weights.
    np.testing.assert_allclose(losses.frequency_weights([81, 9, 9, 1]), [0.25, 0.75, 0.75, 2.25], rtol=1e-6)
    np.testing.assert_allclose(losses.frequency_weights([0.81, 0.09, 0.09, 0.01], power=0.0), [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"frequency_weights: every class needs a frequency > 0 .*\[0.5, 0.0, 0.5\]"):
        losses.frequency_weights([0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match=r"frequency_weights: frequencies must have shape \(K,\)"):
        losses.frequency_weights([[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"frequency_weights: power must be finite and >= 0, got -1"):
        losses.frequency_weights([0.5, 0.5], power=-1)
