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


def _brute_force_distances(pred, true, spacing):
    """Independent reference: face-neighbour surfaces by padding and shifting, then all pairwise distances."""

    def surface(mask):
        padded = np.pad(mask, 1)
        inner = tuple(slice(1, -1) for _ in range(mask.ndim))
        outside_neighbour = np.zeros_like(mask)
        for axis in range(mask.ndim):
            for shift in (-1, 1):
                outside_neighbour |= ~np.roll(padded, shift, axis=axis)[inner]
        return mask & outside_neighbour

    ps, ts = np.argwhere(surface(pred)) * spacing, np.argwhere(surface(true)) * spacing
    pairwise = np.linalg.norm(ps[:, None, :] - ts[None, :, :], axis=-1)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def _blob(rng, shape, *, threshold=0.55, sigma=2.0):
    """A random smooth blob (possibly several pieces, possibly touching the array border)."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    return noise > np.quantile(noise, threshold)


def test_two_points_at_a_known_distance_in_1d_2d_3d():
    cases = [  # (shape, pred point, true point, spacing, distance by hand)
        ((12,), (2,), (9,), (0.5,), 3.5),
        ((6, 9), (1, 2), (4, 6), (2.0, 0.5), np.sqrt(6.0**2 + 2.0**2)),
        ((5, 8, 7), (1, 2, 3), (4, 6, 1), (2.0, 0.5, 3.0), np.sqrt(6.0**2 + 2.0**2 + 6.0**2)),
    ]
    for shape, p, t, spacing, distance in cases:
        pred, true = np.zeros(shape, bool), np.zeros(shape, bool)
        pred[p], true[t] = True, True
        d_pt, d_tp = metrics.surface_distances(pred, true, spacing)
        np.testing.assert_allclose(d_pt, [distance], rtol=1e-12)
        np.testing.assert_allclose(d_tp, [distance], rtol=1e-12)
        assert metrics.hausdorff95(pred, true, spacing) == pytest.approx(distance)
        assert metrics.mean_surface_distance(pred, true, spacing) == pytest.approx(distance)
        assert metrics.normalized_surface_dice(pred, true, spacing, distance - 0.01) == 0.0
        assert metrics.normalized_surface_dice(pred, true, spacing, distance + 0.01) == 1.0


def test_square_shifted_by_two_voxels():
    # A 3 x 3 square and the same square two columns to the right. Surfaces are the 8-voxel rings; from the left
    # ring to the right one: the left column is 2 away, the top and bottom middles 1, the shared column 0.
    pred = np.zeros((9, 9), bool)
    pred[2:5, 2:5] = True
    true = np.roll(pred, 2, axis=1)
    d_pt, d_tp = metrics.surface_distances(pred, true, (1.0, 1.0))
    np.testing.assert_array_equal(np.sort(d_pt), [0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(np.sort(d_tp), [0, 0, 0, 1, 1, 2, 2, 2])
    assert metrics.hausdorff95(pred, true, (1.0, 1.0)) == 2.0  # P95 of [0,0,0,1,1,2,2,2] is 2
    assert metrics.mean_surface_distance(pred, true, (1.0, 1.0)) == 1.0  # (8 + 8) / 16
    assert metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 1.0) == 10 / 16  # five of each ring within 1
    assert metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 3.0) == 1.0
    # Columns 2 mm wide: every distance doubles, and only the shared column is within 1 mm.
    assert metrics.hausdorff95(pred, true, (1.0, 2.0)) == 4.0
    assert metrics.mean_surface_distance(pred, true, (1.0, 2.0)) == 2.0
    assert metrics.normalized_surface_dice(pred, true, (1.0, 2.0), 1.0) == 6 / 16
    assert metrics.normalized_surface_dice(pred, true, (1.0, 2.0), 3.0) == 10 / 16


def test_segments_in_1d_use_each_directed_percentile():
    # pred = voxels 0..9 (surface {0, 9}), true = voxels 3..20 (surface {3, 20}), 0.5 mm voxels.
    pred, true = np.zeros(30, bool), np.zeros(30, bool)
    pred[0:10], true[3:21] = True, True
    # pred -> true: [3, 6] voxels; true -> pred: [3, 11] voxels. Linear P95: 3 + 0.95 * 3 and 3 + 0.95 * 8.
    assert metrics.hausdorff95(pred, true, (0.5,)) == pytest.approx(0.5 * max(5.85, 10.6))
    assert metrics.hausdorff95(pred, true, (0.5,), percentile=100) == pytest.approx(5.5)
    assert metrics.mean_surface_distance(pred, true, (0.5,)) == pytest.approx(0.5 * (3 + 6 + 3 + 11) / 4)
    # In mm: [1.5, 3] and [1.5, 5.5]; two of four within 2 mm.
    assert metrics.normalized_surface_dice(pred, true, (0.5,), 2.0) == 0.5


def test_surface_is_face_connected_and_the_array_border_is_outside():
    # A 3 x 3 square without its top-left corner: the centre has all four face neighbours inside (only a
    # diagonal one outside), so it is not on the surface; the other 7 voxels are.
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    mask[1, 1] = False
    d_pt, d_tp = metrics.surface_distances(mask, mask, (1.0, 1.0))
    assert d_pt.shape == (7,) and d_tp.shape == (7,)
    # A mask filling the array: its surface is the 12 border voxels of a 4 x 4 array.
    full = np.ones((4, 4), bool)
    assert metrics.surface_distances(full, full, (1.0, 1.0))[0].shape == (12,)
    # Full 4 x 4 against its central 2 x 2 (each of whose voxels has two face neighbours outside it, so all 4
    # are surface): the 8 edge-middle border voxels are 1 from the centre block, the 4 corners sqrt(2).
    centre = np.zeros((4, 4), bool)
    centre[1:3, 1:3] = True
    d_pt, d_tp = metrics.surface_distances(full, centre, (1.0, 1.0))
    np.testing.assert_allclose(np.sort(d_pt), [1.0] * 8 + [np.sqrt(2)] * 4)
    np.testing.assert_allclose(d_tp, [1.0] * 4)


def test_random_blobs_match_brute_force_distances():
    rng = np.random.default_rng(1)
    for shape, spacing in [((23, 17), (0.8, 1.7)), ((9, 12, 10), (2.5, 0.7, 1.1))]:
        pred, true = _blob(rng, shape), _blob(rng, shape)
        d_pt, d_tp = metrics.surface_distances(pred, true, spacing)
        ref_pt, ref_tp = _brute_force_distances(pred, true, np.asarray(spacing))
        np.testing.assert_allclose(d_pt, ref_pt, rtol=1e-12)
        np.testing.assert_allclose(d_tp, ref_tp, rtol=1e-12)


def test_identical_masks():
    mask = _blob(np.random.default_rng(2), (10, 11, 12))
    assert metrics.hausdorff95(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert metrics.mean_surface_distance(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert metrics.normalized_surface_dice(mask, mask, (1.0, 2.0, 3.0), 0.0) == 1.0


def test_empty_mask_conventions():
    empty, organ = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
    organ[2:4, 1:5] = True  # 8 voxels, all on the surface
    assert metrics.hausdorff95(empty, empty, (1.0, 1.0)) == 0.0
    assert metrics.mean_surface_distance(empty, empty, (1.0, 1.0)) == 0.0
    assert metrics.normalized_surface_dice(empty, empty, (1.0, 1.0), 2.0) == 1.0
    for pred, true in [(empty, organ), (organ, empty)]:
        assert metrics.hausdorff95(pred, true, (1.0, 1.0)) == np.inf
        assert metrics.mean_surface_distance(pred, true, (1.0, 1.0)) == np.inf
        assert metrics.normalized_surface_dice(pred, true, (1.0, 1.0), 100.0) == 0.0
    d_pt, d_tp = metrics.surface_distances(empty, organ, (1.0, 1.0))
    assert d_pt.shape == (0,)
    np.testing.assert_array_equal(d_tp, [np.inf] * 8)


def test_surface_metrics_per_organ_of_label_maps():
    labels = np.zeros((9, 9), np.int32)
    labels[2:5, 2:5] = 1
    labels[6:8, 6:8] = 2
    pred = np.zeros_like(labels)
    pred[2:5, 4:7] = 1  # organ 1 shifted by two columns; organ 2 missed; organ 3 absent from both
    table = metrics.surface_metrics(pred, labels, 4, spacing=(1.0, 1.0), tolerance_mm=1.0)
    assert set(table) == {1, 2, 3}
    assert table[1] == {"hd95_mm": 2.0, "msd_mm": 1.0, "nsd": 10 / 16}
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
    with pytest.raises(ValueError, match="first_organ"):
        metrics.surface_metrics(a.astype(int), a.astype(int), 2, spacing=(1.0, 1.0), first_organ=3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice from inside get_mask_edges
@pytest.mark.parametrize(
    "shape, spacing, tolerance",
    [((40, 33), (0.7, 1.9), 2.2), ((18, 22, 15), (2.3, 0.8, 1.4), 3.1)],
)
def test_agrees_with_monai(shape, spacing, tolerance):
    """HD95, symmetric mean surface distance and surface Dice equal MONAI's on non-empty random blobs.

    The blobs have several pieces and touch the array border. On them the pooled 95th percentile and the mean of
    the two directed means differ from MONAI's definitions by more than the tolerance used here.
    """
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (test extra) is not installed")
    import torch

    rng = np.random.default_rng(3)
    for _ in range(3):
        pred, true = _blob(rng, shape), _blob(rng, shape)
        # MONAI wants one-hot (B, C, *spatial); one channel, kept with include_background=True.
        y_pred = torch.tensor(pred[None, None], dtype=torch.float32)
        y = torch.tensor(true[None, None], dtype=torch.float32)
        hd95 = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                        spacing=list(spacing))
        msd = monai_metrics.compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                                             spacing=list(spacing))
        nsd = monai_metrics.compute_surface_dice(y_pred, y, [tolerance], include_background=True,
                                                 spacing=list(spacing))
        assert metrics.hausdorff95(pred, true, spacing) == pytest.approx(float(hd95), rel=1e-5)
        assert metrics.mean_surface_distance(pred, true, spacing) == pytest.approx(float(msd), rel=1e-5)
        assert metrics.normalized_surface_dice(pred, true, spacing, tolerance) == pytest.approx(float(nsd), rel=1e-6)
        assert 0.05 < float(nsd) < 0.95  # a case where the tolerance splits both surfaces
