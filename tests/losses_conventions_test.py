"""README's "Coming from optax / MONAI": each name mapping is an equivalence checked here.

optax: ``dice_loss`` (per-example, mean over classes; its ``alpha``/``beta`` weigh false positives and
negatives; ``smooth`` on both sides of ``(I + s) / (I + a FP + b FN + s)``; ``ignore_background``;
``reduction="none"`` per class), ``softmax_cross_entropy_with_integer_labels`` (per voxel). MONAI:
``DiceLoss``, ``DiceCELoss`` with ``reduction="none"`` (per sample and class, spatial axes kept as ones).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from combo_jax import losses

K = 4


def _inputs(seed=0, shape=(3, 5, 4)):
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal((*shape, K))).astype(np.float32)
    y = rng.integers(0, K, shape).astype(np.int32)
    return x, y


@pytest.mark.parametrize("ignore_background", [False, True])
@pytest.mark.parametrize("smooth", [1.0, 1e-3])
def test_optax_dice_loss_is_dice_loss_per_sample_with_twice_the_smoothing(ignore_background, smooth):
    x, y = _inputs()
    theirs = optax.losses.dice_loss(x, jax.nn.one_hot(y, K), smooth=smooth, ignore_background=ignore_background)
    ours = losses.dice_loss(x, y, smooth_nr=2 * smooth, smooth_dr=2 * smooth,
                            include_background=not ignore_background, reduction="none")
    assert theirs.shape == (x.shape[0],)
    np.testing.assert_allclose(jnp.mean(ours, axis=-1), theirs, rtol=1e-5)


def test_optax_dice_loss_per_class_is_reduction_none():
    x, y = _inputs(seed=1)
    theirs = optax.losses.dice_loss(x, jax.nn.one_hot(y, K), reduction="none")
    ours = losses.dice_loss(x, y, smooth_nr=2.0, smooth_dr=2.0, reduction="none")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_optax_dice_alpha_beta_are_tversky_weights_not_combo_alpha():
    x, y = _inputs(seed=2)
    theirs = optax.losses.dice_loss(x, jax.nn.one_hot(y, K), alpha=0.3, beta=0.7, smooth=0.5)
    ours = losses.tversky_loss(x, y, alpha=0.3, beta=0.7, smooth_nr=0.5, smooth_dr=0.5, reduction="none")
    np.testing.assert_allclose(jnp.mean(ours, axis=-1), theirs, rtol=1e-5)


def test_optax_softmax_cross_entropy_is_cross_entropy():
    x, y = _inputs(seed=3)
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(x, y)
    np.testing.assert_allclose(losses.cross_entropy(x, y, reduction="none").reshape(theirs.shape), theirs,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(x, y), jnp.mean(theirs), rtol=1e-5)
    # The Combo loss's cross-entropy term at beta = 1 over all channels is the same mean divided by K.
    np.testing.assert_allclose(losses.weighted_cross_entropy(x, y, beta=1.0, include_background=True),
                               jnp.mean(theirs) / K, rtol=1e-5)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_monai_reduction_none_is_ours_without_the_spatial_ones(include_background, batch):
    monai = pytest.importorskip("monai.losses")
    import torch

    x, y = _inputs(seed=4)
    xt = torch.tensor(np.moveaxis(x, -1, 1).copy())
    yt = torch.tensor(y).long().unsqueeze(1)
    theirs = monai.DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background, batch=batch,
                            reduction="none")(xt, yt)
    ours = losses.dice_loss(x, y, include_background=include_background, batch_dice=batch, reduction="none")
    np.testing.assert_allclose(ours, theirs.numpy().reshape(ours.shape), rtol=1e-5)


def test_monai_dice_ce_default_is_dice_ce_loss_default():
    monai = pytest.importorskip("monai.losses")
    import torch

    x, y = _inputs(seed=5)
    theirs = monai.DiceCELoss(softmax=True, to_onehot_y=True)(torch.tensor(np.moveaxis(x, -1, 1).copy()),
                                                               torch.tensor(y).long().unsqueeze(1))
    np.testing.assert_allclose(losses.dice_ce_loss(x, y), float(theirs), rtol=1e-5)


def test_defaults_stated_in_the_readme():
    """The conventions table in README: background and smoothing defaults per loss."""
    import inspect

    def default(fn, name):
        return inspect.signature(getattr(losses, fn)).parameters[name].default

    assert default("combo_loss", "include_background") is False
    assert default("weighted_cross_entropy", "include_background") is False
    assert default("combo_loss", "smooth") == 1.0
    for fn in ("dice_loss", "dice_ce_loss", "generalized_dice_loss", "tversky_loss"):
        assert default(fn, "include_background") is True
        assert default(fn, "smooth_nr") == default(fn, "smooth_dr") == 1e-5
    assert default("focal_loss", "include_background") is True
