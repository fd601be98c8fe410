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


# ---------------------------------------------------------------------------------------------------------------
# Surface-distance metrics.


def _blob(rng, shape, *, threshold=0.55, sigma=2.0):
    """A random smooth blob (possibly several pieces, possibly touching the array border)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    return noise > np.quantile(noise, threshold)


def _ball(shape, centre, radius, spacing):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_boundary_length_and_area_of_a_square_and_a_cube_by_hand():
    # 3 x 3 square: along each side two cells hold a straight unit segment, each corner cell a diagonal one.
    square = np.zeros((7, 7), bool)
    square[2:5, 2:5] = True
    for s0, s1 in [(1.0, 1.0), (1.0, 2.0), (0.3, 1.7)]:
        sd = metrics.surface_distances(square, square, (s0, s1))
        expected = 4 * s0 + 4 * s1 + 4 * np.hypot(0.5 * s0, 0.5 * s1)
        assert sd.pred_areas.sum() == pytest.approx(expected) and sd.pred_areas.size == 12
    # k^3 cube (isotropic): flat faces 6 (k-1)^2, edges bevelled by 12 (k-1) strips of area sqrt(2)/2, and 8
    # corner triangles of area sqrt(3)/8.
    for k in (2, 3, 5):
        cube = np.zeros((k + 2,) * 3, bool)
        cube[1:-1, 1:-1, 1:-1] = True
        area = metrics.surface_distances(cube, cube, (1.0, 1.0, 1.0)).true_areas.sum()
        assert area == pytest.approx(6 * (k - 1) ** 2 + 12 * (k - 1) * np.sqrt(2) / 2 + 8 * np.sqrt(3) / 8)
    # A stretched cube: the faces normal to axis 0 scale by s1 s2, and so on.
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    flat = metrics.surface_distances(cube, cube, (2.0, 1.0, 1.0))
    iso = metrics.surface_distances(cube, cube, (1.0, 1.0, 1.0))
    assert flat.true_areas.sum() > iso.true_areas.sum()


def test_square_shifted_by_two_voxels():
    # The boundary of a 3 x 3 square and of the same square two columns to the right: the shared straight
    # segments (top and bottom of the middle column) are 0 apart; the far sides 2.
    pred = np.zeros((9, 9), bool)
    pred[2:5, 2:5] = True
    true = np.roll(pred, 2, axis=1)
    sd = metrics.surface_distances(pred, true, (1.0, 1.0))
    assert sd.pred_to_true.min() == 0.0 and sd.pred_to_true.max() == 2.0
    assert metrics.hausdorff95(pred, true, (1.0, 1.0)) == 2.0
    assert metrics.hausdorff95(pred, true, (1.0, 2.0)) == 4.0  # columns 2 mm wide: every distance doubles
    assert metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 3.0) == 1.0
    assert 0 < metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 1.0) < 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package uses scipy's old ndimage namespaces
@pytest.mark.parametrize("case", ["balls_2d", "balls_3d", "blobs_2d", "blobs_3d"])
def test_agrees_with_deepmind_surface_distance(case):
    """HD95 (and other percentiles), the mean surface distance and the surface Dice equal those of DeepMind's
    ``surface-distance`` package (Nikolov et al.), on anisotropic grids, for balls and for random blobs with several
    pieces that touch the array border."""
    reference = pytest.importorskip("surface_distance", reason="surface-distance (test extra) is not installed")
    rng = np.random.default_rng(7)
    if case == "balls_2d":
        spacing = (0.7, 1.3)
        pairs = [(_ball((60, 50), (20, 20), 12, spacing), _ball((60, 50), (22, 21), 11, spacing))]
    elif case == "balls_3d":
        spacing = (0.8, 1.2, 3.0)
        pairs = [(_ball((40, 40, 20), (16, 20, 25), 10, spacing), _ball((40, 40, 20), (18, 21, 27), 9.5, spacing))]
    else:
        shape, spacing = ((40, 33), (0.7, 1.9)) if case == "blobs_2d" else ((18, 22, 15), (2.3, 0.8, 1.4))
        pairs = [(_blob(rng, shape), _blob(rng, shape)) for _ in range(3)]
    for pred, true in pairs:
        ref = reference.compute_surface_distances(true, pred, spacing)  # (ground truth, prediction)
        for percentile in (95, 100, 50):
            assert metrics.hausdorff95(pred, true, spacing, percentile=percentile) == pytest.approx(
                reference.compute_robust_hausdorff(ref, percentile), rel=1e-9)
        true_to_pred, pred_to_true = reference.compute_average_surface_distance(ref)
        a_true, a_pred = ref["surfel_areas_gt"].sum(), ref["surfel_areas_pred"].sum()
        pooled = (true_to_pred * a_true + pred_to_true * a_pred) / (a_true + a_pred)
        assert metrics.mean_surface_distance(pred, true, spacing) == pytest.approx(pooled, rel=1e-9)
        for tolerance in (0.5, 1.5, 3.0):
            nsd = reference.compute_surface_dice_at_tolerance(ref, tolerance)
            assert metrics.normalized_surface_dice(pred, true, spacing, tolerance) == pytest.approx(nsd, abs=1e-9)
    assert 0.05 < nsd < 0.999 or case.startswith("balls")  # the tolerance splits the surfaces


def test_identical_masks():
    mask = _blob(np.random.default_rng(2), (10, 11, 12))
    assert metrics.hausdorff95(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert metrics.mean_surface_distance(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert metrics.normalized_surface_dice(mask, mask, (1.0, 2.0, 3.0), 0.0) == 1.0


def test_empty_mask_conventions():
    empty, organ = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
    organ[2:4, 1:5] = True
    assert metrics.hausdorff95(empty, empty, (1.0, 1.0)) == 0.0
    assert metrics.mean_surface_distance(empty, empty, (1.0, 1.0)) == 0.0
    assert metrics.normalized_surface_dice(empty, empty, (1.0, 1.0), 2.0) == 1.0
    for pred, true in [(empty, organ), (organ, empty)]:
        assert metrics.hausdorff95(pred, true, (1.0, 1.0)) == np.inf
        assert metrics.mean_surface_distance(pred, true, (1.0, 1.0)) == np.inf
        assert metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 100.0) == 0.0
    sd = metrics.surface_distances(empty, organ, (1.0, 1.0))
    assert sd.pred_to_true.shape == (0,) and sd.pred_areas.shape == (0,)
    assert sd.true_to_pred.size == sd.true_areas.size > 0 and np.all(np.isinf(sd.true_to_pred))


def test_surface_metrics_per_organ_of_label_maps():
    labels = np.zeros((9, 9), np.int32)
    labels[2:5, 2:5] = 1
    labels[6:8, 6:8] = 2
    pred = np.zeros_like(labels)
    pred[2:5, 4:7] = 1  # organ 1 shifted by two columns; organ 2 missed; organ 3 absent from both
    table = metrics.surface_metrics(pred, labels, 4, spacing=(1.0, 1.0), tolerance_mm=1.0)
    assert set(table) == {1, 2, 3}
    assert table[1]["hd95_mm"] == metrics.hausdorff95(pred == 1, labels == 1, (1.0, 1.0)) == 2.0
    assert table[1]["msd_mm"] == metrics.mean_surface_distance(pred == 1, labels == 1, (1.0, 1.0))
    assert table[1]["nsd"] == metrics.normalized_surface_dice(pred == 1, labels == 1, (1.0, 1.0), 1.0)
    assert table[2] == {"hd95_mm": np.inf, "msd_mm": np.inf, "nsd": 0.0}
    assert table[3] == {"hd95_mm": 0.0, "msd_mm": 0.0, "nsd": 1.0}
    assert set(metrics.surface_metrics(pred, labels, 4, spacing=(1.0, 1.0), first_organ=0)) == {0, 1, 2, 3}


def test_mean_finite():
    assert metrics.mean_finite([1.0, np.inf, 3.0]) == (2.0, 1)
    assert metrics.mean_finite([np.inf, np.inf]) == (np.inf, 2)
    mean, inf_cases = metrics.mean_finite([])
    assert np.isnan(mean) and inf_cases == 0
    with pytest.raises(ValueError, match="nan"):
        metrics.mean_finite([1.0, np.nan])


def test_surface_metric_arguments_are_checked():
    a = np.zeros((4, 5), bool)
    with pytest.raises(ValueError, match=r"pred_mask \(4, 5\) and true_mask \(4, 4\)"):
        metrics.hausdorff95(a, np.zeros((4, 4), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        metrics.mean_surface_distance(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        metrics.surface_distances(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        metrics.surface_metrics(a.astype(int), a.astype(int), 2, spacing=1.0)
    with pytest.raises(ValueError, match="tolerance_mm"):
        metrics.normalized_surface_dice(a, a, (1.0, 1.0), -1.0)
    with pytest.raises(ValueError, match="percentile"):
        metrics.hausdorff95(a, a, (1.0, 1.0), percentile=101)
    with pytest.raises(ValueError, match=r"pred \(4, 5\) and labels \(5, 4\)"):
        metrics.surface_metrics(a.astype(int), a.T.astype(int), 2, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="masks must have 2 or 3 axes"):
        metrics.surface_distances(np.ones(5, bool), np.ones(5, bool), (1.0,))
    with pytest.raises(ValueError, match="first_organ"):
        metrics.surface_metrics(a.astype(int), a.astype(int), 2, spacing=(1.0, 1.0), first_organ=3)
