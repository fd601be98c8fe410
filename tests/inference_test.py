"""Sliding-window inference: tiling, weighting, padding, slices, against hand-computed and whole-volume results."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from combo_jax import inference
from combo_jax.models.unet import UNet


def _jitted_unet(spatial_dims, in_channels, num_classes):
    """A small combo_jax U-Net as a jitted function of (B, *spatial, C).

    The parameters are drawn with numpy into the model's abstract state: the model's own initializers would
    compile one XLA program per parameter shape, seconds each on a small CPU.
    """
    abstract = nnx.eval_shape(lambda: UNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                           num_classes=num_classes, features=(4, 8), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), a.dtype), abstract_state)
    return jax.jit(lambda x: nnx.merge(graphdef, state)(x))


def _pointwise(in_channels, num_classes, seed=0):
    """A per-voxel affine map (a 1 x 1 convolution) and its weights."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(in_channels, num_classes)).astype(np.float32)
    b = rng.normal(size=(num_classes,)).astype(np.float32)
    return (lambda x: np.asarray(x) @ w + b), w, b


# ----------------------------------------------------------------------------------------------------------------
# Window positions and weights.


def test_window_starts_by_hand():
    assert inference.window_starts((10,), (4,), 0.5) == [(0,), (2,), (4,), (6,)]
    assert inference.window_starts((10,), (4,), 0.0) == [(0,), (3,), (6,)]  # step at most 4: 3 windows, spread
    assert inference.window_starts((3,), (5,), 0.5) == [(0,)]  # window larger than the volume
    # Axis 0: the window fits exactly; axis 1: steps of at most floor(4 * 0.75) = 3 over 7 - 4 = 3.
    assert inference.window_starts((5, 7), (5, 4), 0.25) == [(0, 0), (0, 3)]


def test_window_starts_cover_every_voxel_with_the_requested_overlap():
    for size, w, overlap in itertools.product([1, 5, 16, 37, 100], [1, 3, 8, 16], [0.0, 0.25, 0.5, 0.6, 0.9]):
        starts = [s for (s,) in inference.window_starts((size,), (w,), overlap)]
        if w >= size:
            assert starts == [0]
            continue
        assert starts[0] == 0 and starts[-1] == size - w, (size, w, overlap, starts)
        assert starts == sorted(set(starts))
        covered = np.zeros(size, int)
        for s in starts:
            covered[s : s + w] += 1
        assert covered.min() >= 1
        for a, b in zip(starts, starts[1:]):
            assert (w - (b - a)) >= min(overlap * w, w - 1) - 1e-9, (size, w, overlap, starts)
    # In 2D the starts are every combination of the per-axis ones.
    starts = inference.window_starts((10, 5), (4, 3), 0.5)
    assert starts == [(r, c) for r in (0, 2, 4, 6) for c in (0, 1, 2)]


def test_gaussian_importance():
    # sigma = 5 * 0.2 = 1 around the centre index 2: exp(-d^2 / 2).
    np.testing.assert_allclose(inference.gaussian_importance((5,), sigma_scale=0.2),
                               np.exp(-0.5 * np.array([4.0, 1.0, 0.0, 1.0, 4.0])), rtol=1e-6)
    g = inference.gaussian_importance((7, 5, 4))
    assert g.shape == (7, 5, 4) and g.dtype == np.float32
    assert g.max() == 1.0 and g[3, 2, 1] == 1.0 and g[3, 2, 2] == 1.0  # centre (even axis: two central entries)
    assert g.min() > 0 and g.min() == g[0, 0, 0]
    np.testing.assert_array_equal(g, g[::-1, ::-1, ::-1])
    # Along each axis from the centre outwards the weights decrease.
    assert np.all(np.diff(g[3:, 2, 1]) < 0) and np.all(np.diff(g[3, 2:, 1]) < 0)
    # A separable product: the 2D map is the outer product of the 1D ones.
    np.testing.assert_allclose(inference.gaussian_importance((6, 9)),
                               np.outer(inference.gaussian_importance((6,)), inference.gaussian_importance((9,))),
                               rtol=1e-6)
    # Far tails would underflow to 0; they are held at a positive floor.
    tiny = inference.gaussian_importance((64,), sigma_scale=0.001)
    assert tiny.min() > 0 and tiny.max() == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Whole-volume results.


@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
@pytest.mark.parametrize("shape, window", [((13, 10, 3), (6, 4)), ((9, 7, 5, 2), (4, 4, 3))])
def test_pointwise_model_gives_the_whole_volume_result(shape, window, weighting):
    apply_fn, w, b = _pointwise(shape[-1], 4)
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = inference.sliding_window_inference(apply_fn, image, window=window, overlap=0.5, batch_size=3,
                                             weighting=weighting)
    assert out.shape == (*shape[:-1], 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, image @ w + b, rtol=1e-5, atol=1e-5)


def test_window_sums_average_as_computed_by_hand():
    # A model whose logits are its window's sum, on a 1D image of length 6 with windows of 4 at starts 0 and 2.
    image = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], np.float32)[:, None]
    s1, s2 = 15.0, 60.0  # sums of windows [0, 4) and [2, 6)

    def window_sum(x):
        return np.broadcast_to(x.sum(axis=(1, 2), keepdims=True), x.shape)

    out = inference.sliding_window_inference(window_sum, image, window=(4,), overlap=0.5, weighting="constant")
    np.testing.assert_allclose(out[:, 0], [s1, s1, (s1 + s2) / 2, (s1 + s2) / 2, s2, s2], rtol=1e-6)
    # Gaussian weights of a 4-window, sigma 0.5, offsets +-1.5 and +-0.5: e^-4 at the ends, 1 in the middle.
    e = math.exp(-4.0)
    out = inference.sliding_window_inference(window_sum, image, window=(4,), overlap=0.5, weighting="gaussian")
    np.testing.assert_allclose(out[:, 0], [s1, s1, (s1 + e * s2) / (1 + e), (e * s1 + s2) / (1 + e), s2, s2],
                               rtol=1e-5)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_window_equal_to_the_volume_is_one_forward_pass_of_a_unet(spatial):
    apply = _jitted_unet(len(spatial), 1, 3)
    image = np.random.default_rng(2).normal(size=(*spatial, 1)).astype(np.float32)
    out = inference.sliding_window_inference(apply, image, window=spatial, batch_size=2, num_classes=3)
    np.testing.assert_allclose(out, np.asarray(apply(image[None]))[0], rtol=1e-5, atol=1e-5)


def test_every_call_gets_exactly_batch_size_windows_and_compiles_once():
    traces, shapes = [], []
    apply_fn, w, b = _pointwise(2, 3)

    @jax.jit
    def jitted(x):
        traces.append(x.shape)
        return x @ w + b

    def recording(x):
        shapes.append(x.shape)
        return jitted(x)

    image = np.random.default_rng(3).normal(size=(11, 9, 2)).astype(np.float32)
    out = inference.sliding_window_inference(recording, image, window=(4, 4), overlap=0.5, batch_size=3)
    num_windows = len(inference.window_starts((11, 9), (4, 4), 0.5))
    assert num_windows % 3 != 0  # the last batch is filled up
    assert shapes == [(3, 4, 4, 2)] * math.ceil(num_windows / 3)
    assert len(traces) == 1
    np.testing.assert_allclose(out, image @ w + b, rtol=1e-5, atol=1e-5)


def test_image_smaller_than_the_window_is_padded_on_both_sides():
    image = np.random.default_rng(4).normal(size=(5, 3, 2)).astype(np.float32)
    seen = []

    def window_sum(x):
        seen.append(x.shape)
        return np.broadcast_to(x.sum(axis=(1, 2, 3))[:, None, None, None], x.shape[:-1] + (1,))

    # One (8, 4) window. Zero padding adds nothing to the sum; edge padding repeats rows 0 and 4 and column 2:
    # rows split 1 before and 2 after, columns 0 before and 1 after.
    out = inference.sliding_window_inference(window_sum, image, window=(8, 4), batch_size=2)
    assert seen == [(2, 8, 4, 2)] and out.shape == (5, 3, 1)
    np.testing.assert_allclose(out, np.full((5, 3, 1), image.sum()), rtol=1e-5)
    edge_sum = image.sum() + image[0].sum() + 2 * image[4].sum() + image[:, 2].sum() + image[0, 2].sum() \
        + 2 * image[4, 2].sum()
    out = inference.sliding_window_inference(window_sum, image, window=(8, 4), pad_mode="edge")
    np.testing.assert_allclose(out, np.full((5, 3, 1), edge_sum), rtol=1e-5)

    # The model sees the image at rows 1..5 of the window: a model that outputs its row index shows the offset.
    def row_index(x):
        return np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None, None], (x.shape[0], 8, 4, 1))

    out = inference.sliding_window_inference(row_index, image, window=(8, 4))
    np.testing.assert_array_equal(out[:, 0, 0], [1, 2, 3, 4, 5])
    # A pointwise model on a padded image still gives the whole-volume result.
    apply_fn, w, b = _pointwise(2, 3)
    np.testing.assert_allclose(inference.sliding_window_inference(apply_fn, image, window=(8, 2)), image @ w + b,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slice_axis", [0, 1, -1])
def test_predict_slices_equals_a_loop_over_slices(slice_axis):
    apply = _jitted_unet(2, 1, 3)
    volume = np.random.default_rng(5).normal(size=(4, 12, 10, 1)).astype(np.float32)
    window = (8, 8)
    options = dict(window=window, overlap=0.5, batch_size=3)
    out = inference.predict_slices(apply, volume, slice_axis=slice_axis, **options)
    assert out.shape == (4, 12, 10, 3)
    axis = slice_axis % 3  # negative axes count from the last spatial axis, not from the channels
    expected = np.stack([inference.sliding_window_inference(apply, np.take(volume, i, axis=axis), **options)
                         for i in range(volume.shape[axis])], axis=axis)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    apply_fn, _, _ = _pointwise(1, 2)
    image = np.zeros((8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"window \(4, 4, 4\) has 3 axes but the image has 2"):
        inference.window_starts((8, 8), (4, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"image must have shape \(\*spatial, C\) with 3 spatial axes"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 4, 4))
    for overlap in (1.0, -0.1):
        with pytest.raises(ValueError, match="overlap must be a fraction in"):
            inference.sliding_window_inference(apply_fn, image, window=(4, 4), overlap=overlap)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 4), batch_size=0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 4), weighting="linear")
    with pytest.raises(ValueError, match="pad_mode must be one of"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 4), pad_mode="reflect")
    with pytest.raises(ValueError, match="window must be a non-empty sequence of positive integers"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 0))
    with pytest.raises(ValueError, match=r"apply_fn returned logits of shape \(4, 4, 4, 2\).*expected \(4, 4, 4, 3\)"):
        inference.sliding_window_inference(apply_fn, image, window=(4, 4), num_classes=3)
    with pytest.raises(ValueError, match=r"apply_fn returned logits of shape \(4, 2, 2, 2\)"):
        inference.sliding_window_inference(lambda x: apply_fn(x[:, ::2, ::2]), image, window=(4, 4))
    with pytest.raises(ValueError, match=r"slice_axis must be a spatial axis of the volume, in \[-3, 3\)"):
        inference.predict_slices(apply_fn, np.zeros((3, 8, 8, 1)), slice_axis=3, window=(4, 4))
    with pytest.raises(ValueError, match="volume must have shape"):
        inference.predict_slices(apply_fn, image, slice_axis=0, window=(4, 4))
    with pytest.raises(ValueError, match="sigma_scale"):
        inference.gaussian_importance((4, 4), sigma_scale=0.0)


# ----------------------------------------------------------------------------------------------------------------
# On the device.


def _unet_apply(spatial_dims, in_channels, num_classes):
    abstract = nnx.eval_shape(lambda: UNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                           num_classes=num_classes, features=(4, 8), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), a.dtype), abstract_state)
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params


@pytest.mark.parametrize("case", ["3d", "2d_slices", "smaller_than_window", "eight_devices"])
def test_device_predictor_equals_the_host_computation(case):
    rng = np.random.default_rng(4)
    mesh = None
    if case == "2d_slices":
        apply, params = _unet_apply(2, 1, 3)
        image, window, slice_axis = rng.normal(size=(12, 7, 10, 1)).astype(np.float32), (8, 8), 1
    else:
        apply, params = _unet_apply(3, 1, 3)
        shape = (6, 5, 7, 1) if case == "smaller_than_window" else (13, 11, 9, 1)
        image, window, slice_axis = rng.normal(size=shape).astype(np.float32), (8, 8, 8), None
    batch = 2
    if case == "eight_devices":
        if jax.device_count() < 8:
            pytest.skip("needs 8 (fake) devices")
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
        batch = 8
    predictor = inference.DevicePredictor(apply, window=window, overlap=0.5, batch_size=batch, mesh=mesh)
    labels, mean = predictor(params, image, slice_axis=slice_axis, logits=True).get()
    host_apply = jax.jit(apply)
    options = dict(window=window, overlap=0.5, batch_size=batch)
    if slice_axis is None:
        expected = inference.sliding_window_inference(lambda w: host_apply(params, w), image, **options)
    else:
        expected = inference.predict_slices(lambda w: host_apply(params, w), image, slice_axis=slice_axis, **options)
    assert labels.shape == image.shape[:-1] and labels.dtype == np.int32
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)
    agree = labels == np.argmax(expected, axis=-1)
    assert agree.mean() > 0.999  # (ties aside) the same label map
    # The label map alone, as evaluation and prediction use it.
    np.testing.assert_array_equal(predictor(params, image, slice_axis=slice_axis).get(), labels)


def test_device_predictor_arguments_are_checked():
    apply, _ = _unet_apply(3, 1, 2)
    with pytest.raises(ValueError, match="batch_size=3 must be a multiple of the mesh's 2 devices"):
        inference.DevicePredictor(apply, window=(8, 8, 8), batch_size=3,
                                  mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",)))
    with pytest.raises(ValueError, match="image must have shape"):
        inference.DevicePredictor(apply, window=(8, 8, 8))(None, np.zeros((8, 8, 1)))
