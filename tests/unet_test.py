"""The U-Net: shapes in 2D and 3D, dtypes, deep supervision, and the matmul up-sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from combo_jax.models.unet import PatchUpsample, UNet, pad_to_multiple


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


def test_remat_gives_the_same_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))

    def grads(remat):
        model = UNet(spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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
