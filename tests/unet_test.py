"""The U-Net: shapes in 2D and 3D, dtypes, deep supervision, the matmul up-sampling, and the numerics of the
accelerator-friendly layers against the plain formulation they replace."""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from combo_jax.models import unet
from combo_jax.models.unet import PatchUpsample, UNet, conv3, max_pool, norm_leaky_relu, pad_to_multiple


@pytest.mark.parametrize("spatial", [(32, 48), (16, 8, 24)])
def test_output_shape_and_dtype(spatial):
    model = UNet(spatial_dims=len(spatial), in_channels=2, num_classes=5, features=(4, 8, 16), rngs=nnx.Rngs(0))
    out = model(jnp.ones((3, *spatial, 2)))
    assert out.shape == (3, *spatial, 5)
    assert out.dtype == jnp.float32


def test_bfloat16_compute_gives_float32_logits_and_params():
    model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = model(jnp.ones((1, 16, 16, 1)))
    assert out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 1))
    np.testing.assert_allclose(model(x), ref(x), atol=0.1)


def test_deep_supervision_returns_full_resolution_heads():
    model = UNet(spatial_dims=3, in_channels=1, num_classes=4, features=(4, 8, 16), deep_supervision=True,
                 rngs=nnx.Rngs(0))
    outs = model(jnp.ones((1, 8, 8, 8, 1)))
    assert isinstance(outs, list) and len(outs) == 2
    assert all(o.shape == (1, 8, 8, 8, 4) for o in outs)


@pytest.mark.parametrize("remat", [True, "blocks", "convs"])
def test_remat_gives_the_same_gradients(remat):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))

    def grads(remat):
        model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_policies_keep_less_for_the_backward_pass():
    """Each policy keeps fewer residuals than the one before: none > convs > blocks."""
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))

    def saved_bytes(remat):
        model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        # The function jax.vjp returns holds the residuals as its pytree leaves.
        _, backward = jax.vjp(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)), params)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(backward))

    assert saved_bytes("none") > saved_bytes("convs") > saved_bytes("blocks")
    assert saved_bytes(False) == saved_bytes("none") and saved_bytes(True) == saved_bytes("blocks")
    assert saved_bytes("True") == saved_bytes("blocks")  # a command-line override of model.remat
    with pytest.raises(ValueError, match="remat.*'everything'.*none, convs, blocks"):
        UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), remat="everything", rngs=nnx.Rngs(0))


def test_spatial_size_not_divisible_is_a_clear_error():
    model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8, 16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"divisible by 2\^\(levels-1\) = 4.*\(30, 32\)"):
        model(jnp.ones((1, 30, 32, 1)))
    padded, original = pad_to_multiple(jnp.ones((1, 30, 33, 1)), 4)
    assert padded.shape == (1, 32, 36, 1) and original == (30, 33)
    assert model(padded).shape == (1, 32, 36, 3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(spatial_dims=4, in_channels=1, num_classes=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), norm="batch", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 5, 3, 6)), (3, (1, 3, 4, 2, 6))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_upsample_equals_general_transposed_convolution(spatial_dims, shape, dtype):
    up = PatchUpsample(6, 4, spatial_dims, dtype=dtype, rngs=nnx.Rngs(1))
    up.bias[...] = jax.random.normal(jax.random.key(2), (4,))
    general = nnx.ConvTranspose(6, 4, (2,) * spatial_dims, strides=(2,) * spatial_dims, padding="VALID",
                                dtype=dtype, rngs=nnx.Rngs(3))
    general.kernel[...] = up.kernel[...]
    general.bias[...] = up.bias[...]
    x = jax.random.normal(jax.random.key(0), shape)
    expected = general(x)
    got = up(x)
    assert got.shape == expected.shape == (shape[0], *(2 * s for s in shape[1:-1]), 4)
    tol = 1e-6 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)


# --- The plain formulation: nnx.GroupNorm + jax.nn.leaky_relu, lax.reduce_window max-pool, channels-last
# matmul up-sampling. The model's layers must compute what these compute, in value and gradient.


def reference_upsample(up: PatchUpsample, x):
    d, dtype = up.spatial_dims, up.dtype or x.dtype
    kernel = jnp.asarray(up.kernel[...], dtype)[(slice(None, None, -1),) * d]
    c_in, c_out = kernel.shape[-2:]
    y = jnp.asarray(x, dtype) @ jnp.moveaxis(kernel, d, 0).reshape(c_in, -1)
    batch, spatial = y.shape[0], y.shape[1 : 1 + d]
    y = y.reshape(batch, *spatial, *(2,) * d, c_out)
    order = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)] + [1 + 2 * d]
    y = y.transpose(order).reshape(batch, *(2 * s for s in spatial), c_out)
    return y + jnp.asarray(up.bias[...], dtype)


def reference_norm(norm, x):
    features = norm.scale.shape[0]
    ref = nnx.GroupNorm(features, num_groups=features // norm.group_size, epsilon=norm.epsilon, dtype=norm.dtype,
                        rngs=nnx.Rngs(0))
    ref.scale[...], ref.bias[...] = norm.scale[...], norm.bias[...]
    return jax.nn.leaky_relu(ref(x), norm.negative_slope)


def reference_max_pool(x, d):
    window = (1,) + (2,) * d + (1,)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")


def reference_forward(model: UNet, x):
    def block(blk, h):
        h = reference_norm(blk.norm1, blk.conv1(h))
        return reference_norm(blk.norm2, blk.conv2(h))

    d = model.spatial_dims
    h, skips = x.astype(model.dtype), []
    for i, blk in enumerate(model.down):
        h = block(blk, h)
        if i < len(model.down) - 1:
            skips.append(h)
            h = reference_max_pool(h, d)
    for up, blk in zip(model.up, model.up_blocks):
        h = block(blk, jnp.concatenate([reference_upsample(up, h), skips.pop()], axis=-1))
    return model.out(h).astype(jnp.float32)


def _value_and_grads(forward, model, x, labels):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x):
        logits = forward(nnx.merge(graphdef, p), x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, logits, grads


def _assert_model_matches_the_plain_formulation(model, x, labels):
    """float32: logits, loss, the gradient wrt every parameter and wrt the input agree, parameters shared."""
    value, logits, (grads, dx) = _value_and_grads(lambda m, v: m(v), model, x, labels)
    ref_value, ref_logits, (ref_grads, ref_dx) = _value_and_grads(reference_forward, model, x, labels)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(grads)]
    for path, g, r in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        # (atol: the filter gradients are sums over every voxel, which the CPU's planar 3D convolution adds in
        # another order than the plain one; entries near zero differ by ~1e-6 of the largest.)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))) + 1e-12, err_msg=path)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(ref_dx))))


@pytest.mark.parametrize("spatial_dims,norm", [(3, "instance"), (2, "group")])
def test_model_matches_the_plain_formulation(spatial_dims, norm):
    """A 3D model with instance norm and a 2D one with group norm, float32, with this platform's routes."""
    shape = (2, *(16,) * spatial_dims, 1)
    model = UNet(spatial_dims=spatial_dims, in_channels=1, num_classes=3, features=(8, 16, 16), norm=norm,
                 rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 3)
    _assert_model_matches_the_plain_formulation(model, x, labels)


def test_3d_model_with_the_tpu_routes_matches_the_plain_formulation(monkeypatch):
    """The convolutions, up-sampling and max-pool a program lowered for TPUs takes (depth folded into the
    batch), forced on this CPU: the 3D model's logits and gradients are the plain formulation's. Spatial
    sizes differ per axis, so that an axis taken for another shows."""
    shape = (2, 8, 12, 16, 1)
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, features=(4, 8, 8), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 3)
    monkeypatch.setattr(unet, "_conv3d_same", unet._conv3d_folded)
    monkeypatch.setattr(unet, "_upsample_concat_3d", unet._upsample_concat_folded)
    monkeypatch.setattr(unet, "max_pool", lambda h, d: unet._max_pool(h, d, "folded"))
    _assert_model_matches_the_plain_formulation(model, x, labels)


def test_bfloat16_model_is_as_accurate_as_the_plain_formulation():
    """bf16 gradients carry ~10% rounding noise at this size whichever way they are formed: both bf16 versions
    are measured against the float32 plain formulation, and ours must not be the worse one."""
    shape = (2, 16, 16, 16, 1)
    x = jax.random.normal(jax.random.key(1), shape)
    labels = jax.random.randint(jax.random.key(2), shape[:-1], 0, 3)
    kw = dict(spatial_dims=3, in_channels=1, num_classes=3, features=(8, 16, 16), rngs=nnx.Rngs(0))
    _, truth_logits, truth = _value_and_grads(reference_forward, UNet(**kw), x, labels)
    bf16 = UNet(**kw, dtype=jnp.bfloat16)
    _, logits, ours = _value_and_grads(lambda m, v: m(v), bf16, x, labels)
    _, ref_logits, ref = _value_and_grads(reference_forward, bf16, x, labels)

    def rel_err(a, b):
        return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))

    assert rel_err(logits, truth_logits) < 1.1 * rel_err(ref_logits, truth_logits) + 1e-3
    ours_err = [rel_err(a, t) for a, t in zip(jax.tree.leaves(ours), jax.tree.leaves(truth))]
    ref_err = [rel_err(a, t) for a, t in zip(jax.tree.leaves(ref), jax.tree.leaves(truth))]
    assert np.mean(ours_err) < 1.1 * np.mean(ref_err), (ours_err, ref_err)
    assert all(o < 1.5 * r + 0.01 for o, r in zip(ours_err, ref_err)), (ours_err, ref_err)


@pytest.mark.parametrize("group_size", [1, 4])
def test_norm_leaky_relu_matches_group_norm_in_value_and_gradient(group_size):
    x = 3.0 * jax.random.normal(jax.random.key(0), (2, 6, 5, 4, 8)) + 1.5
    scale = jax.random.normal(jax.random.key(1), (8,))
    bias = jax.random.normal(jax.random.key(2), (8,))

    def ref(x, scale, bias):
        norm = nnx.GroupNorm(8, num_groups=8 // group_size, epsilon=1e-5, rngs=nnx.Rngs(0))
        norm.scale[...], norm.bias[...] = scale, bias
        return jax.nn.leaky_relu(norm(x), 0.01)

    def ours(x, scale, bias):
        return norm_leaky_relu(x, scale, bias, group_size, 0.01, 1e-5)

    np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(3), x.shape)
    got = jax.vjp(ours, x, scale, bias)[1](ct)
    want = jax.vjp(ref, x, scale, bias)[1](ct)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
    jax.test_util.check_grads(ours, (x, scale, bias), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("d", [2, 3])
def test_max_pool_gives_the_gradient_to_the_first_maximum_like_reduce_window(d):
    # Small integers: most windows hold tied maxima, where the choice of the element that gets the gradient shows.
    x = jax.random.randint(jax.random.key(0), (2, *(4,) * d, 3), 0, 3).astype(jnp.float32)
    np.testing.assert_array_equal(max_pool(x, d), reference_max_pool(x, d))
    ct = jax.random.normal(jax.random.key(1), (2, *(2,) * d, 3))
    want = jax.vjp(lambda v: reference_max_pool(v, d), x)[1](ct)[0]
    # In 3D also the TPU's route (depth folded into the batch), which a CPU program does not take by itself.
    for route in ("platform", "folded") if d == 3 else ("platform",):
        np.testing.assert_array_equal(unet._max_pool(x, d, route), reference_max_pool(x, d))
        got = jax.vjp(lambda v: unet._max_pool(v, d, route), x)[1](ct)[0]
        np.testing.assert_array_equal(got, want)
        assert int(jnp.sum(got != 0)) == ct.size  # one element per window, ties included


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_upsample_concat_gradients_match_autodiff_of_the_matmul_form(spatial_dims):
    up = PatchUpsample(6, 4, spatial_dims, rngs=nnx.Rngs(1))
    up.bias[...] = jax.random.normal(jax.random.key(2), (4,))
    x = jax.random.normal(jax.random.key(0), (2, *(3,) * spatial_dims, 6))
    skip = jax.random.normal(jax.random.key(3), (2, *(6,) * spatial_dims, 5))
    graphdef, params = nnx.split(up)

    def ours(p, x, skip):
        return nnx.merge(graphdef, p)(x, skip)

    def plain(p, x, skip):
        return jnp.concatenate([reference_upsample(nnx.merge(graphdef, p), x), skip], axis=-1)

    def tpu_route(p, x, skip):  # what a program lowered for TPUs computes in 3D
        return unet._upsample_concat_folded(x, skip, p["kernel"][...], p["bias"][...])

    ct = jax.random.normal(jax.random.key(4), (2, *(6,) * spatial_dims, 9))
    want = jax.vjp(plain, params, x, skip)[1](ct)
    for route in (ours, tpu_route) if spatial_dims == 3 else (ours,):
        np.testing.assert_allclose(route(params, x, skip), plain(params, x, skip), rtol=1e-6, atol=1e-6)
        got = jax.vjp(route, params, x, skip)[1](ct)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_3d_upsampling_is_strided_on_gpus_and_cpus_and_folded_on_tpus():
    """Forward and backward: lowered for a GPU or a CPU, the up-sampling holds 5-D (strided) convolutions
    only; lowered for a TPU, 4-D ones only (the folded route)."""
    up = PatchUpsample(4, 2, 3, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(up)
    x, skip = jnp.zeros((1, 2, 2, 2, 4)), jnp.zeros((1, 4, 4, 4, 2))

    def loss(p, h, s):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(h, s)))

    ranks = {}
    for platform in ("cuda", "tpu", "cpu"):
        for fn, args in [(lambda h, s: up(h, s), (x, skip)), (jax.value_and_grad(loss, argnums=(0, 1)), (params, x, skip))]:
            module = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
            convolutions = [line for line in module.splitlines() if "stablehlo.convolution" in line]
            assert convolutions, platform
            ranks.setdefault(platform, set()).update(
                line.count(",", line.index("dim_numbers"), line.index("]x[")) + 1 for line in convolutions)
    assert ranks == {"cuda": {5}, "tpu": {4}, "cpu": {5}}


def test_initial_parameters_are_those_of_the_plain_formulation():
    """A seed gives the parameters the plain layers (nnx.Conv, nnx.GroupNorm) draw in the same order: runs of a
    seed start where they started before the layers were rewritten."""
    rngs = nnx.Rngs(params=3)
    conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
    nnx.GroupNorm(8, num_groups=8, rngs=rngs)
    conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    nnx.GroupNorm(8, num_groups=8, rngs=rngs)
    conv3 = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
    model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(8, 16), rngs=nnx.Rngs(params=3))
    np.testing.assert_array_equal(model.down[0].conv1.kernel[...], conv1.kernel[...])
    np.testing.assert_array_equal(model.down[0].conv2.kernel[...], conv2.kernel[...])
    np.testing.assert_array_equal(model.down[1].conv1.kernel[...], conv3.kernel[...])


@pytest.mark.parametrize("in_features,out_features", [(1, 8), (6, 4)])
def test_planar_route_of_the_3d_convolution_matches_the_native_one(in_features, out_features):
    conv = nnx.Conv(in_features, out_features, (3, 3, 3), use_bias=False, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 7, in_features))
    kernel = conv.kernel[...]

    def native(k, h):
        return jax.lax.conv_general_dilated(h, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                            precision=jax.lax.Precision.HIGHEST)

    np.testing.assert_allclose(conv3(conv, x), conv(x), rtol=1e-5, atol=1e-5)

    def loss(conv_fn):
        return lambda k, h: jnp.sum(jnp.sin(conv_fn(h, k)) * jnp.arange(out_features))

    want = jax.grad(loss(lambda h, k: native(k, h)), argnums=(0, 1))(kernel, x)
    for route in (unet._conv3d_as_2d, unet._conv3d_folded):  # the CPU's and the TPU's
        np.testing.assert_allclose(route(x, kernel), native(kernel, x), rtol=1e-5, atol=1e-5)
        got = jax.grad(loss(route), argnums=(0, 1))(kernel, x)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_tpu_route_in_bfloat16_rounds_about_as_the_native_convolution():
    """With the depth taps stacked on the output side, each tap's contribution is rounded to bf16 before the
    three are added: the error against the float32 convolution stays within a small multiple of the native
    bf16 convolution's own (which rounds once)."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 16, 16)) / 12.0
    exact = unet._conv3d(x, kernel)
    bf = jnp.bfloat16
    native = unet._conv3d(x.astype(bf), kernel.astype(bf)).astype(jnp.float32)
    route = unet._conv3d_folded(x.astype(bf), kernel.astype(bf))
    assert route.dtype == bf
    # Both from the same bf16 inputs: the input rounding is common, the rest is the routes' own.
    exact_bf = unet._conv3d(x.astype(bf).astype(jnp.float32), kernel.astype(bf).astype(jnp.float32))
    native_err = float(jnp.sqrt(jnp.mean((native - exact_bf) ** 2)))
    route_err = float(jnp.sqrt(jnp.mean((route.astype(jnp.float32) - exact_bf) ** 2)))
    assert 0 < route_err < 3 * native_err, (route_err, native_err)
    scale = float(jnp.sqrt(jnp.mean(exact ** 2)))
    assert route_err < 1e-2 * scale


def test_3d_convolution_is_native_on_gpus_and_planar_on_cpus_and_tpus():
    """Forward and backward: the module lowered for each platform holds only that platform's convolutions (the
    forward one and its two transposes), and the conditionals that chose them carry nothing else."""
    conv = nnx.Conv(2, 4, (3, 3, 3), use_bias=False, rngs=nnx.Rngs(0))
    graphdef, kernel = nnx.split(conv)
    x = jnp.zeros((1, 4, 4, 4, 2))

    def loss(k, h):
        return jnp.sum(jnp.sin(conv3(nnx.merge(graphdef, k), h)))

    ranks = {}
    for platform in ("cuda", "tpu", "cpu"):
        for fn, count in [(lambda h: conv3(conv, h), 1), (jax.value_and_grad(loss, argnums=(0, 1)), 3)]:
            args = (x,) if count == 1 else (kernel, x)
            module = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
            convolutions = [line for line in module.splitlines() if "stablehlo.convolution" in line]
            assert len(convolutions) == count, (platform, convolutions)
            ranks.setdefault(platform, set()).update(
                line.count(",", line.index("dim_numbers"), line.index("]x[")) + 1 for line in convolutions)
            # The conditionals return the convolution or the two cotangents; more values would be residuals
            # of the other platform's route carried through this one.
            cases = [line.split("=", 1)[0].strip() for line in module.splitlines() if '"stablehlo.case"' in line]
            assert all(int((name + ":1").split(":")[1]) <= 2 for name in cases), (platform, cases)
    assert ranks == {"cuda": {5}, "tpu": {4}, "cpu": {4}}


def test_cpu_compiler_options_change_the_convolutions_only():
    """On the CPU the U-Net's programs are compiled without the library convolutions: the model's logits are
    unchanged, its program no longer holds a library convolution kernel, and the losses compile to the same
    program as with XLA's defaults."""
    from combo_jax import losses

    options = unet.compiler_options()
    if jax.default_backend() != "cpu":
        assert options == {}
        return
    assert options, "this XLA refused the option: the CPU runs the slower library convolutions"
    model = UNet(spatial_dims=3, in_channels=1, num_classes=3, features=(8, 16), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 32, 1))

    def forward(p, v):
        return nnx.merge(graphdef, p)(v)

    def library_convolutions(compiled_text):
        bodies = compiled_text.split("\n\n")
        library = [b for b in bodies if "ROOT" in b and "convolution(" in b.split("ROOT", 1)[1].split("\n")[0]]
        names = [b.split(" ", 1)[0].lstrip("%") for b in library]
        return [line for line in compiled_text.splitlines()
                if "__ynn_fusion" in line and any(f"calls=%{n}," in line for n in names)]

    default = jax.jit(forward).lower(params, x).compile()
    tuned = jax.jit(forward, compiler_options=options).lower(params, x).compile()
    # (Whether XLA's default hands these convolutions to the library depends on the CPU it compiles for; with
    # the options it never does.)
    assert not library_convolutions(tuned.as_text())
    np.testing.assert_allclose(tuned(params, x), default(params, x), rtol=1e-5, atol=1e-5)

    for shape in [(2, 8, 8, 8, 6), (2, 16, 16, 105)]:
        logits, labels = jnp.zeros(shape), jnp.zeros(shape[:-1], jnp.int32)
        step = jax.value_and_grad(losses.combo_loss)
        plain = jax.jit(step).lower(logits, labels).compile().as_text()
        with_options = jax.jit(step, compiler_options=options).lower(logits, labels).compile().as_text()
        assert plain.split("\n", 1)[1] == with_options.split("\n", 1)[1], shape
