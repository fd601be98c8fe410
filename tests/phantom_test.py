"""The embedded phantom: determinism, organ sizes over two orders of magnitude, no threshold solves it."""

import numpy as np
import pytest

from combo_jax.data import phantom


@pytest.mark.parametrize("shape", [(128, 128), (64, 64, 64)])
def test_deterministic_per_seed_and_varied_per_case(shape):
    a_img, a_lab = phantom.make_case(0, 5, shape)
    b_img, b_lab = phantom.make_case(0, 5, shape)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = phantom.make_case(0, 6, shape)
    assert not np.array_equal(a_lab, c_lab)
    assert a_img.shape == (*shape, 1) and a_img.dtype == np.float32
    assert a_lab.shape == shape and a_lab.dtype == np.int32


@pytest.mark.parametrize("shape,num_cases", [((128, 128), 32), ((64, 64, 64), 8)])
def test_organ_sizes_span_two_orders_of_magnitude(shape, num_cases):
    freqs = phantom.class_frequencies(0, shape, num_cases)
    organs = freqs[1:]
    assert organs.max() >= 0.07, organs  # a large organ around 10%
    assert organs.min() <= 0.001, organs  # the smallest at or under 0.1%
    assert organs.max() / organs.min() >= 100
    assert np.all(organs > 0)


def test_every_organ_is_present_in_every_2d_case():
    for index in range(24):
        _, labels = phantom.make_case(3, index, (128, 128))
        assert set(np.unique(labels)) == set(range(phantom.NUM_CLASSES)), index


def test_no_intensity_threshold_segments_the_small_organs():
    images, labels = phantom.make_split(0, (128, 128), 16)
    image = images[..., 0]
    for k in (5, 6):  # pancreas, adrenal
        truth = labels == k
        best = 0.0
        for lo in np.linspace(-0.5, 1.5, 41):
            for hi in np.linspace(lo + 0.05, lo + 0.6, 12):
                pred = (image >= lo) & (image < hi)
                dice = 2 * np.sum(pred & truth) / (pred.sum() + truth.sum())
                best = max(best, dice)
        assert best < 0.3, (phantom.CLASS_NAMES[k], best)


def test_bad_shape():
    with pytest.raises(ValueError, match="2D or 3D"):
        phantom.make_case(0, 0, (8, 8))


def test_phantom_data_shares_are_counted_on_each_split_s_own_cases():
    from combo_jax.configs import default
    from combo_jax.data import datasets

    config = default.get_config("combo")
    config.data.shape, config.data.num_train, config.data.num_val = (32, 32), 20, 12
    data = datasets.make_data(config)

    def counted(source, n):
        counts = sum(np.bincount(source[i]["labels"].ravel(), minlength=phantom.NUM_CLASSES) for i in range(n))
        return counts / counts.sum()

    np.testing.assert_allclose(data.train_shares, counted(data.train_source, 16))  # the first 16 of 20
    np.testing.assert_allclose(data.shares, counted(data.val_source, 12))  # every validation case
    assert not np.allclose(data.shares, data.train_shares)  # different cases, so different counts
