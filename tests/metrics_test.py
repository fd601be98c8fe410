"""Confusion-count metrics against direct numpy counting, and the empty-organ conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from combo_jax import metrics


def test_confusion_counts_match_numpy():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (3, 7, 5))
    labels = rng.integers(0, 4, (3, 7, 5))
    tp, fp, fn = jax.jit(metrics.confusion_counts, static_argnums=2)(pred, labels, 4)
    for k in range(4):
        assert tp[k] == np.sum((pred == k) & (labels == k))
        assert fp[k] == np.sum((pred == k) & (labels != k))
        assert fn[k] == np.sum((pred != k) & (labels == k))


def test_where_mask_excludes_voxels():
    pred = jnp.array([[1, 1, 0, 2]])
    labels = jnp.array([[1, 0, 0, 2]])
    tp, fp, fn = metrics.confusion_counts(pred, labels, 3, where=jnp.array([[True, False, True, True]]))
    np.testing.assert_array_equal(tp, [1, 1, 1])
    np.testing.assert_array_equal(fp, [0, 0, 0])
    np.testing.assert_array_equal(fn, [0, 0, 0])


def test_ratios_and_empty_organs():
    tp, fp, fn = jnp.array([5, 0, 0, 0]), jnp.array([5, 0, 3, 0]), jnp.array([0, 0, 0, 4])
    np.testing.assert_allclose(metrics.dice_from_counts(tp, fp, fn), [10 / 15, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(metrics.precision_from_counts(tp, fp, fn), [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(metrics.recall_from_counts(tp, fp, fn), [1.0, 1.0, 0.0, 0.0])
    summary = metrics.summarize(np.asarray(tp), np.asarray(fp), np.asarray(fn))
    assert set(summary["organs"]) == {1, 2, 3}
    assert summary["mean_fg_dice"] == pytest.approx(1 / 3)
    assert summary["organs"][2]["fp_voxels"] == 3 and summary["organs"][3]["fn_voxels"] == 4


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion_counts(jnp.zeros((1, 4), int), jnp.zeros((1, 5), int), 2)
