"""Every fast value-and-gradient routine of combo_jax._fused against autodiff of the plain formula.

The routines: the XLA:CPU one (channels written out, and vectorized for many classes), the vectorized XLA
one, and the Pallas kernels for GPUs (Triton) and TPUs (Mosaic), the last two run by the Pallas interpreter
on this CPU (``interpret=True``; their compiled form is checked by ``benchmarks/aot.py`` and, on a GPU, by
``benchmarks/losses.py``). Cases: integer and one-hot/soft labels, a voxel mask, the ``log(1 - p)`` terms on
and off, confident logits (a channel above 1/2, logit gaps beyond exp's range), bf16 logits, partial blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from combo_jax import _fused, _fused_mosaic, _fused_triton, _fused_xla, losses


def _combo_spec(first_channel=1, complement=True, weights=False, dice_first_channel=None):
    """The Spec combo_loss builds: the cross-entropy over ``first_channel:``, the Dice term over
    ``dice_first_channel:`` (by default the same channels)."""
    dice_first = first_channel if dice_first_channel is None else dice_first_channel
    objective = functools.partial(losses._combo_objective, first_channel=first_channel,
                                  dice_first_channel=dice_first, batch_dice=False, use_ce=True, use_dice=True,
                                  reduction="mean")
    return _fused.Spec(objective, cross_entropy=True, complement=complement,
                       first_channel=min(first_channel, dice_first), uniform_complement=not weights,
                       complement_first_channel=first_channel)


def _dice_ce_spec():
    objective = functools.partial(losses._dice_ce_objective, first_channel=0, batch_dice=False, jaccard=False,
                                  activation="softmax", integer_labels=True, reduction="mean")
    return _fused.Spec(objective, cross_entropy=True, complement=False)


def _hyper(k, dtype, weights=False, beta=0.3):
    w = jnp.asarray(np.linspace(0.5, 2.0, k), dtype) if weights else None
    return dict(alpha=jnp.asarray(0.6, dtype), beta=jnp.asarray(beta, dtype), smooth=jnp.asarray(1.0, dtype),
                class_weights=w)


def _routines(spec, num_classes):
    kernels = dict(
        triton=_fused._two_pass(spec, functools.partial(_fused_triton.sums, interpret=True),
                                functools.partial(_fused_triton.sums_vjp, interpret=True), flatten=True),
        mosaic=_fused._two_pass(spec, functools.partial(_fused_mosaic.sums, interpret=True),
                                functools.partial(_fused_mosaic.sums_vjp, interpret=True), flatten=False),
    )
    return dict(cpu_sliced=_fused._cpu(spec, sliced=True), cpu_vectorized=_fused._cpu(spec, sliced=False),
                xla=_fused._two_pass(spec, _fused_xla.sums, _fused_xla.sums_vjp, flatten=True), **kernels)


def _inputs(shape, seed, scale=3.0, labels="int", masked=False, dtype=np.float32):
    rng = np.random.default_rng(seed)
    k = shape[-1]
    x = (scale * rng.standard_normal(shape)).astype(np.float32)
    ids = rng.integers(0, k, shape[:-1]).astype(np.int32)
    if labels == "int":
        y = ids
    elif labels == "onehot":
        y = np.eye(k, dtype=np.float32)[ids]
    else:  # soft labels
        y = rng.dirichlet(np.ones(k), shape[:-1]).astype(np.float32)
    mask = (rng.random(shape[:-1]) > 0.3).astype(np.float32) if masked else None
    compute = jnp.promote_types(dtype, jnp.float32)
    y = y if labels == "int" else y.astype(compute)
    return jnp.asarray(x, dtype), jnp.asarray(y), None if mask is None else jnp.asarray(mask, compute)


def _check(routine, spec, x, y, mask, hyper, rtol):
    value, grad = routine[1](x, y, mask, hyper)
    # The reference takes the same (possibly bf16) logits, so the comparison sees only the routine's error.
    want, want_grad = _fused.reference_value_and_grad(spec, x, y, mask, hyper)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    np.testing.assert_allclose(value, want, rtol=rtol, atol=rtol * 1e-2)
    g, wg = np.asarray(grad, np.float32), np.asarray(want_grad, np.float32)
    np.testing.assert_allclose(g, wg, rtol=rtol, atol=rtol * np.abs(wg).max())
    np.testing.assert_allclose(routine[0](x, y, mask, hyper), value, rtol=rtol, atol=rtol * 1e-2)


ROUTINES = ["cpu_sliced", "cpu_vectorized", "xla", "triton", "mosaic"]
CASES = [
    # shape, labels, masked, options
    ((2, 5, 6, 7, 6), "int", False, dict()),
    ((2, 9, 10, 4), "int", True, dict(weights=True)),
    ((2, 40, 3), "onehot", True, dict()),
    ((1, 3, 5, 130, 5), "soft", False, dict(first_channel=0)),
    ((2, 6, 7, 2), "int", False, dict(complement=False)),
    # combo_loss's default: the Dice term over the background too, the cross-entropy over the organs.
    ((2, 5, 6, 7, 6), "int", True, dict(dice_first_channel=0)),
    ((2, 40, 3), "onehot", False, dict(dice_first_channel=0)),
    ((2, 9, 10, 4), "int", False, dict(dice_first_channel=0, weights=True)),
]


@pytest.mark.parametrize("routine", ROUTINES)
@pytest.mark.parametrize(("shape", "labels", "masked", "options"), CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}{'-masked' if c[2] else ''}" for c in CASES])
def test_routine_equals_autodiff_of_the_plain_formula(routine, shape, labels, masked, options):
    spec = _combo_spec(**options)
    x, y, mask = _inputs(shape, seed=len(shape) + shape[-1], labels=labels, masked=masked)
    hyper = _hyper(shape[-1], jnp.float32, weights=options.get("weights", False))
    _check(_routines(spec, shape[-1])[routine], spec, x, y, mask, hyper, rtol=2e-5)


@pytest.mark.parametrize("routine", ROUTINES)
def test_confident_logits_take_the_exact_complement(routine):
    """Logit gaps of 30 to 300: a channel above 1/2 in most voxels, 1 - p below float32's resolution."""
    spec = _combo_spec()
    x, y, _ = _inputs((2, 4, 5, 6, 5), seed=3, scale=80.0)
    hyper = _hyper(5, jnp.float32, beta=0.2)
    _check(_routines(spec, 5)[routine], spec, x, y, None, hyper, rtol=2e-5)


@pytest.mark.parametrize("routine", ROUTINES)
@pytest.mark.parametrize("num_classes", [5, 20])
def test_labels_outside_the_classes_belong_to_no_class(routine, num_classes):
    """An id outside [0, K) is a negative for every class, the background included (integer labels)."""
    spec = _combo_spec(first_channel=0)
    x, y, _ = _inputs((2, 4, 5, 6, num_classes), seed=13)
    y = jnp.where(jnp.asarray(np.random.default_rng(14).random(y.shape) < 0.3), num_classes + 3, y)
    hyper = _hyper(num_classes, jnp.float32, beta=0.4)
    _check(_routines(spec, num_classes)[routine], spec, x, y, None, hyper, rtol=2e-5)


@pytest.mark.parametrize("routine", ["triton", "mosaic"])
def test_kernels_take_bf16_logits_and_return_a_bf16_gradient(routine):
    spec = _dice_ce_spec()
    x, y, _ = _inputs((2, 3, 8, 9, 6), seed=5, dtype=jnp.bfloat16)
    hyper = dict(lambda_dice=jnp.float32(1.0), lambda_ce=jnp.float32(1.0), smooth_nr=jnp.float32(1e-5),
                 smooth_dr=jnp.float32(1e-5), class_weights=None)
    _check(_routines(spec, 6)[routine], spec, x, y, None, hyper, rtol=1e-2)  # bf16 gradient: 8 mantissa bits


def test_kernels_over_many_blocks(monkeypatch):
    """Small blocks: several programs per sample, partial blocks at the ends of rows and columns."""
    monkeypatch.setattr(_fused_triton, "_ELEMENTS_PER_BLOCK", 64)
    monkeypatch.setattr(_fused_triton, "_SUM_STEPS", 3)
    monkeypatch.setattr(_fused_mosaic, "_BLOCK_BYTES", 4 * 4 * 8 * 128)
    spec = _combo_spec()
    x, y, mask = _inputs((2, 3, 20, 300, 4), seed=7, masked=True)
    hyper = _hyper(4, jnp.float32)
    routines = _routines(spec, 4)
    for name in ("triton", "mosaic"):
        _check(routines[name], spec, x, y, mask, hyper, rtol=2e-5)


@pytest.mark.parametrize("sliced", [True, False])
def test_cpu_routine_in_float64(sliced):
    with jax.enable_x64(True):
        spec = _combo_spec(weights=True)
        x, y, mask = _inputs((2, 4, 5, 6, 4), seed=11, masked=True, dtype=np.float64)
        hyper = _hyper(4, jnp.float64, weights=True)
        _check(_fused._cpu(spec, sliced=sliced), spec, x, y, mask, hyper, rtol=1e-11)


def test_batch_partitioned_calls_run_per_shard_under_automatic_sharding():
    """The wrapper that lets XLA's partitioner split a kernel call along the batch: per-sample outputs come
    out split the same way, with no collective (a Pallas call would otherwise be refused or gathered)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest.py)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def per_sample(x, y):
        return jnp.sum(x * y[..., None], axis=1), jnp.sum(y, axis=1)

    rng = np.random.default_rng(15)
    x, y = rng.random((8, 32, 5), np.float32), rng.random((8, 32), np.float32)
    call = jax.jit(_fused._batch_partitioned(per_sample), in_shardings=(sharding, sharding))
    for got, want in zip(call(x, y), per_sample(x, y)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert got.sharding.spec[0] == "data"
    hlo = call.lower(x, y).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"))
