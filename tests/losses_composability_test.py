"""The losses compose like any JAX function.

* Higher-order and forward-mode derivatives (``jax.hessian``, ``jax.jvp``, ``jax.jacfwd``) of the softmax
  losses, whose per-class sums carry a hand-derived ``custom_jvp`` rule, equal autodiff of the plain formula
  written here independently (float64).
* Hyperparameters (alpha, beta, smooth, class weights) may be traced: jit arguments, a vmapped grid, and
  derivatives with respect to them.
* ``reduction="none"`` gives per-sample, per-organ terms whose mean is the loss.
* Program size is bounded in the number of classes (the per-class work is vectorized above a few classes).
* The loss of a batch sharded with ``shard_map`` equals the unsharded loss with one ``psum`` of the sums.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from combo_jax import _fused, losses


def _inputs(shape=(2, 3, 2), k=4, seed=0, scale=2.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((*shape, k))).astype(dtype)
    y = rng.integers(0, k, shape).astype(np.int32)
    return x, y


# --------------------------------------------------------------------------------------------------
# Plain formulas (softmax, integer labels, no mask), written from the papers' definitions
# --------------------------------------------------------------------------------------------------


def _plain_parts(x, y):
    k = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1)
    p = jnp.exp(logp)
    t = jax.nn.one_hot(y, k, dtype=x.dtype)
    axes = tuple(range(1, x.ndim - 1))
    return p, logp, t, axes


def _log1m_softmax(x):
    """log(1 - p_k) = log sum_{j != k} exp(x_j) - log sum_j exp(x_j), exact for any logit gap."""
    k = x.shape[-1]
    others = jnp.where(jnp.eye(k, dtype=bool), -jnp.inf, x[..., None, :])
    return jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def plain_combo(x, y, alpha=0.5, beta=0.5, smooth=1.0, weights=None, dice_include_background=True):
    p, logp, t, axes = _plain_parts(x, y)
    w = jnp.ones(x.shape[-1], x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
    ce = -(beta * t * logp + (1 - beta) * (1 - t) * _log1m_softmax(x))[..., 1:] * w[1:]
    ce = jnp.sum(ce) / (np.prod(x.shape[:-1]) * (x.shape[-1] - 1))
    dice = (2 * jnp.sum(p * t, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(t, axes) + smooth)
    dice_first = 0 if dice_include_background else 1  # the Dice term over the background too, or organs only
    return alpha * ce - (1 - alpha) * jnp.mean((dice * w)[:, dice_first:])


def plain_dice_ce(x, y):
    p, logp, t, axes = _plain_parts(x, y)
    dice = (2 * jnp.sum(p * t, axes) + 1e-5) / (jnp.sum(p, axes) + jnp.sum(t, axes) + 1e-5)
    return jnp.mean(1 - dice) - jnp.mean(jnp.sum(t * logp, -1))


def plain_dice(x, y):
    p, _, t, axes = _plain_parts(x, y)
    return jnp.mean(1 - (2 * jnp.sum(p * t, axes) + 1e-5) / (jnp.sum(p, axes) + jnp.sum(t, axes) + 1e-5))


PAIRS = [
    ("combo_loss beta=0.3", functools.partial(losses.combo_loss, beta=0.3), functools.partial(plain_combo, beta=0.3)),
    ("combo_loss weighted", functools.partial(losses.combo_loss, alpha=0.7, class_weights=[1.0, 2.0, 0.5, 1.5]),
     functools.partial(plain_combo, alpha=0.7, weights=[1.0, 2.0, 0.5, 1.5])),
    ("combo_loss organ-only Dice", functools.partial(losses.combo_loss, dice_include_background=False),
     functools.partial(plain_combo, dice_include_background=False)),
    ("dice_ce_loss", losses.dice_ce_loss, plain_dice_ce),
    ("dice_loss", losses.dice_loss, plain_dice),
]
PAIR_IDS = [name for name, _, _ in PAIRS]


@pytest.mark.parametrize(("name", "ours", "plain"), PAIRS, ids=PAIR_IDS)
def test_hessian_equals_autodiff_of_the_plain_formula(name, ours, plain):
    with jax.enable_x64(True):
        x, y = _inputs()
        h = jax.jit(jax.hessian(lambda v: ours(v, y)))(x)
        expected = jax.hessian(lambda v: plain(v, y))(x)
        assert np.all(np.isfinite(h)), f"{name}: non-finite Hessian entries"
        np.testing.assert_allclose(h, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize(("name", "ours", "plain"), PAIRS, ids=PAIR_IDS)
def test_jvp_and_jacfwd_equal_the_plain_formula(name, ours, plain):
    with jax.enable_x64(True):
        x, y = _inputs(seed=1)
        v = np.random.default_rng(2).standard_normal(x.shape)
        value, tangent = jax.jvp(lambda a: ours(a, y), (x,), (v,))
        plain_value, plain_tangent = jax.jvp(lambda a: plain(a, y), (x,), (v,))
        np.testing.assert_allclose(value, plain_value, rtol=1e-12)
        np.testing.assert_allclose(tangent, plain_tangent, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(jax.jacfwd(lambda a: ours(a, y))(x), jax.grad(lambda a: plain(a, y))(x),
                                   rtol=1e-9, atol=1e-12)


def test_hessian_is_finite_for_confident_logits():
    """Channels above 1/2 take the complement's log-sum-exp path; its second derivatives stay finite."""
    with jax.enable_x64(True):
        x, y = _inputs(scale=15.0, seed=3)
        h = jax.hessian(lambda v: losses.combo_loss(v, y, beta=0.2))(x)
        assert np.all(np.isfinite(h))
        np.testing.assert_allclose(h, jax.hessian(lambda v: plain_combo(v, y, beta=0.2))(x), rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Traced hyperparameters
# --------------------------------------------------------------------------------------------------


def test_hyperparameters_as_jit_arguments_equal_python_numbers():
    x, y = _inputs(dtype=np.float32)
    weights = np.array([1.0, 2.0, 0.5, 1.5], np.float32)

    @jax.jit
    def traced(x, alpha, beta, smooth, w):
        return losses.combo_loss(x, y, alpha=alpha, beta=beta, smooth=smooth, class_weights=w)

    expected = losses.combo_loss(x, y, alpha=0.3, beta=0.7, smooth=0.5, class_weights=weights)
    np.testing.assert_allclose(traced(x, 0.3, 0.7, 0.5, weights), expected, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x, b: losses.combo_loss(x, y, beta=b)))(x, 0.7)
    np.testing.assert_allclose(grad, jax.grad(lambda x: losses.combo_loss(x, y, beta=0.7))(x), rtol=1e-5, atol=1e-8)


def test_vmap_over_a_beta_grid_equals_a_loop():
    x, y = _inputs(dtype=np.float32)
    betas = jnp.linspace(0.0, 1.0, 5)
    grid = jax.vmap(lambda b: losses.combo_loss(x, y, beta=b))(betas)
    loop = [losses.combo_loss(x, y, beta=float(b)) for b in betas]
    np.testing.assert_allclose(grid, loop, rtol=1e-6)
    grads = jax.vmap(lambda b: jax.grad(losses.weighted_cross_entropy)(x, y, beta=b))(betas)
    np.testing.assert_allclose(grads[2], jax.grad(losses.weighted_cross_entropy)(x, y, beta=0.5), rtol=1e-5)


def test_derivatives_with_respect_to_hyperparameters():
    with jax.enable_x64(True):
        x, y = _inputs()
        weights = np.array([1.0, 2.0, 0.5, 1.5])
        args = (0.3, 0.6, 0.8, weights)

        def ours(alpha, beta, smooth, w):
            return losses.combo_loss(x, y, alpha=alpha, beta=beta, smooth=smooth, class_weights=w)

        def plain(alpha, beta, smooth, w):
            return plain_combo(x, y, alpha=alpha, beta=beta, smooth=smooth, weights=w)

        for got, want in zip(jax.grad(ours, argnums=(0, 1, 2, 3))(*args), jax.grad(plain, argnums=(0, 1, 2, 3))(*args)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


def test_gradient_with_respect_to_logits_and_hyperparameters_together():
    """Both tangents at once: the fast gradient pass and the hyperparameter derivative in one rule."""
    with jax.enable_x64(True):
        x, y = _inputs(seed=12)
        weights = np.array([1.0, 2.0, 0.5, 1.5])

        def ours(x, beta, w):
            return losses.combo_loss(x, y, alpha=0.4, beta=beta, class_weights=w)

        def plain(x, beta, w):
            return plain_combo(x, y, alpha=0.4, beta=beta, weights=w)

        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, 0.35, weights)
        want = jax.grad(plain, argnums=(0, 1, 2))(x, 0.35, weights)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


def test_concrete_out_of_range_values_are_rejected_and_traced_ones_pass():
    x, y = _inputs(dtype=np.float32)
    with pytest.raises(ValueError, match="beta"):
        losses.combo_loss(x, y, beta=np.float32(1.5))
    with pytest.raises(TypeError, match="alpha"):
        losses.combo_loss(x, y, alpha=np.array([0.5, 0.5]))
    # A schedule: alpha computed from a traced step count; unchecked under jit, used as given.
    schedule = jax.jit(lambda step: losses.combo_loss(x, y, alpha=jnp.minimum(step / 10.0, 1.0)))
    np.testing.assert_allclose(schedule(5), losses.combo_loss(x, y, alpha=0.5), rtol=1e-6, atol=1e-7)  # the value is near 0 here


# --------------------------------------------------------------------------------------------------
# reduction="none"
# --------------------------------------------------------------------------------------------------

PER_ORGAN = [
    ("combo_loss", dict(beta=0.3), 4),  # the Dice term's channels: background and organs
    ("combo_loss", dict(beta=0.3, dice_include_background=False), 3),
    ("combo_loss", dict(batch_dice=True, class_weights=[1.0, 2.0, 0.5, 1.5]), 4),
    ("combo_loss", dict(activation="sigmoid"), 4),
    ("weighted_cross_entropy", dict(beta=0.2), 3),
    ("dice_loss", dict(), 4),
    ("dice_loss", dict(include_background=False, jaccard=True), 3),
    ("dice_ce_loss", dict(), 4),
    ("dice_ce_loss", dict(include_background=False, class_weights=[1.0, 2.0, 0.5, 1.5]), 3),
    ("dice_ce_loss", dict(activation="sigmoid"), 4),
    ("tversky_loss", dict(alpha=0.3, beta=0.7), 4),
]


@pytest.mark.parametrize(("name", "options", "organs"), PER_ORGAN,
                         ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o, _ in PER_ORGAN])
@pytest.mark.parametrize("masked", [False, True])
def test_reduction_none_gives_per_organ_terms_whose_mean_is_the_loss(name, options, organs, masked):
    x, y = _inputs(dtype=np.float32, seed=4)
    where = np.random.default_rng(5).random(y.shape) > 0.3 if masked else None
    fn = getattr(losses, name)
    terms = fn(x, y, where=where, reduction="none", **options)
    assert terms.shape == (x.shape[0], organs)
    np.testing.assert_allclose(jnp.mean(terms), fn(x, y, where=where, **options), rtol=1e-5, atol=1e-7)


def test_combo_per_organ_terms_match_the_torch_reference():
    torch_losses = pytest.importorskip("combo_jax.reference.torch_losses")
    import torch

    x, y = _inputs(seed=6)
    with jax.enable_x64(True):
        ours = losses.combo_loss(x, y, beta=0.3, reduction="none")
    theirs = torch_losses.combo_loss(torch.tensor(np.moveaxis(x, -1, 1).copy()), torch.tensor(y), beta=0.3,
                                     reduction="none")
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# Many classes: vectorized per-class work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["combo_loss", "dice_ce_loss", "dice_loss", "weighted_cross_entropy"])
def test_program_size_does_not_grow_with_the_number_of_classes(name):
    """Bounded in K: the CPU routine writes each channel out up to a threshold, vectorizes above it.

    The program holds the routine of every platform; the TPU kernels take up to 32 classes. Above both
    thresholds its size is constant, below them no larger than at the CPU threshold.
    """
    def size(k):
        x = jax.ShapeDtypeStruct((2, 4, 4, 4, k), jnp.float32)
        y = jax.ShapeDtypeStruct((2, 4, 4, 4), jnp.int32)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(getattr(losses, name)))(x, y)
        return str(jaxpr).count(" = ")  # equations, nested ones included

    threshold = _fused.CPU_SLICED_MAX_CLASSES
    many = {k: size(k) for k in (65, 105, 500)}
    assert len(set(many.values())) == 1, many
    assert max(size(k) for k in (2, 6, threshold + 1, 32)) <= size(threshold)


def test_many_classes_match_the_plain_formula():
    with jax.enable_x64(True):
        x, y = _inputs(shape=(2, 6, 5), k=105, seed=7)
        value, grad = jax.value_and_grad(functools.partial(losses.combo_loss, beta=0.4))(x, y)
        want, want_grad = jax.value_and_grad(lambda v: plain_combo(v, y, beta=0.4))(x)
        np.testing.assert_allclose(value, want, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-14)



@pytest.mark.parametrize("num_classes", [6, 105])
@pytest.mark.parametrize("logits", ["zeros", "two tied maxima, the rest far below",
                                    "zeros, and one voxel with a channel far above the rest"])
def test_tied_maximal_logits_give_the_plain_gradient(num_classes, logits):
    """No channel above 1/2 and no other channel below the maximum: a zero-initialized last layer, or the
    other channels' exponentials underflowing next to a tie. The log(1 - p) of the argmax is then unused, and
    must not turn the gradient into NaN, also where another voxel's gap is beyond exp's range (the routines'
    exact form for it)."""
    with jax.enable_x64(True):
        _, y = _inputs(shape=(2, 6, 5), k=num_classes, seed=11)
        x = np.zeros(y.shape + (num_classes,))
        if logits == "two tied maxima, the rest far below":
            x[...] = -800.0
            x[..., 1] = x[..., 2] = 0.0
        elif logits != "zeros":
            x[0, 0, 0, :] = -800.0
            x[0, 0, 0, 3] = 0.0
        value, grad = jax.value_and_grad(functools.partial(losses.combo_loss, beta=0.4))(x, y)
        want, want_grad = jax.value_and_grad(lambda v: plain_combo(v, y, beta=0.4))(x)
        assert np.isfinite(np.asarray(grad)).all()
        np.testing.assert_allclose(value, want, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Sums across devices
# --------------------------------------------------------------------------------------------------


def test_loss_from_sums_equals_the_loss():
    # float32; the scalar loss adds its cross-entropy terms in another order than the per-class sums, and the
    # Combo value is a difference of two terms of order 0.5: agreement to a few float32 ulps of those terms.
    tolerance = dict(rtol=1e-6, atol=1e-7)
    x, y = _inputs(dtype=np.float32, seed=8)
    where = np.random.default_rng(9).random(y.shape) > 0.3
    sums = losses.class_sums(x, y, where=where)
    for options in (dict(beta=0.3), dict(batch_dice=True, alpha=0.2, class_weights=[1.0, 2.0, 0.5, 1.5])):
        np.testing.assert_allclose(losses.combo_loss_from_sums(sums, **options),
                                   losses.combo_loss(x, y, where=where, **options), **tolerance)
    pooled = losses.pool_batch(sums)
    np.testing.assert_allclose(losses.combo_loss_from_sums(pooled),
                               losses.combo_loss(x, y, where=where, batch_dice=True), **tolerance)


@pytest.mark.parametrize("num_classes", [4, 20])
def test_batch_split_across_devices_equals_the_unsharded_loss(num_classes):
    """Logits sharded explicitly along the batch: the kernels run per shard, the CPU routine on the whole."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest.py)")
    x, y = _inputs(shape=(8, 4, 4), k=num_classes, dtype=np.float32, seed=11)
    where = np.random.default_rng(12).random(y.shape) > 0.2
    fn = jax.jit(jax.value_and_grad(lambda x, y, w: losses.combo_loss(x, y, where=w, beta=0.3)))
    value, grad = fn(x, y, where)
    sharding = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    sharded_value, sharded_grad = fn(*(jax.device_put(a, sharding) for a in (x, y, where)))
    # Sums added across devices in another order; the value is a difference of terms of order 0.5.
    np.testing.assert_allclose(sharded_value, value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sharded_grad, grad, rtol=1e-5, atol=1e-9)


def test_global_batch_dice_under_shard_map_with_one_psum():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest.py)")
    x, y = _inputs(shape=(8, 4, 4), k=5, dtype=np.float32, seed=10)
    mesh = jax.make_mesh((8,), ("data",))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def sharded_loss(x, y):
        return losses.combo_loss_from_sums(losses.pool_batch(losses.class_sums(x, y), "data"), beta=0.3,
                                           batch_dice=True)

    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    value, grad = jax.jit(jax.value_and_grad(sharded_loss))(jax.device_put(x, sharding), jax.device_put(y, sharding))
    want, want_grad = jax.value_and_grad(lambda v: losses.combo_loss(v, y, beta=0.3, batch_dice=True))(x)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    # Dice of the local batch alone differs: the psum is what makes the Dice global.
    local = losses.combo_loss(x[:1], y[:1], beta=0.3, batch_dice=True)
    assert not np.isclose(local, want)
