"""Scalar softmax losses evaluated in two passes over the logits, composable with every JAX transformation.

A scalar loss of the family is ``L(x) = F(S(x), h)``: ``S`` the per-class sums of :mod:`combo_jax._sums`
(``(B, K)`` arrays), ``F`` a small function of them and of the hyperparameters ``h`` (alpha, beta, smoothing,
class weights; arrays, possibly traced). Its gradient is ``J_S(x)^T grad_S F``: one pass over the logits for
the sums, then ``F`` and its gradient on the small arrays, then one elementwise pass writing the gradient.

How the pieces compose:

* :func:`loss` is a ``jax.custom_jvp`` function. Its rule returns ``(L, <g, dx> + <dF/dh, dh>)`` where
  ``(L, g)`` come from a fast value-and-gradient routine. Under ``jax.grad`` JAX linearizes the rule: the
  value and ``g`` are computed in the forward part and the transpose is ``ct * g``, so reverse mode costs the
  two passes and nothing more. Forward mode (``jax.jvp``) costs the same plus one dot product.
* ``g`` itself comes from :func:`_value_and_grad`, another ``jax.custom_jvp`` function whose rule is the JVP
  of ``jax.value_and_grad`` of the plain formula (``F`` of :func:`combo_jax._sums.softmax_sums`). Second and
  higher derivatives (``jax.hessian``, ``jacfwd`` of ``grad``) therefore equal autodiff of the stable plain
  formula; only first derivatives take the fast route.
* The fast routine is chosen per platform with ``jax.lax.platform_dependent`` (decided when the program is
  lowered, so an ahead-of-time compile for a GPU or TPU gets that platform's kernels): Pallas kernels on GPUs
  (Triton) and TPUs (Mosaic), XLA code tuned for XLA:CPU on CPUs, vectorized XLA code elsewhere.
* Tangents that are symbolically zero are skipped: ``jax.grad`` with respect to the logits computes no
  hyperparameter derivative, and a derivative with respect to the hyperparameters alone needs no gradient
  pass over the logits.

``F`` must be linear in ``ce_positive`` and ``ce_negative`` with coefficients that depend on ``target``,
``voxels`` and ``h`` only (true of every loss in :mod:`combo_jax.losses`): the CPU routine uses it to add up
the cross-entropy of all channels per voxel instead of keeping one sum per class.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax._src.lib.mlir import ir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from combo_jax import _fused_cpu, _fused_xla
from combo_jax import _sums
from combo_jax._sums import ClassSums

try:  # Pallas' Triton and Mosaic front ends; a jax without them takes the XLA routines everywhere
    from combo_jax import _fused_mosaic, _fused_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    _fused_mosaic = _fused_triton = None

# COMBO_JAX_PALLAS=0 in the environment turns the Pallas kernels off (the vectorized XLA routine runs on GPUs
# and TPUs instead): a way around a kernel that a newer jax or another device fails to compile.
KERNELS = os.environ.get("COMBO_JAX_PALLAS", "1").strip().lower() not in ("0", "false", "no", "off")

# Above this many classes the CPU routine reduces over the channel axis as an array axis; at or below, it
# writes each channel as its own (B, N) array (see _fused_cpu). Program size stops growing with K here.
CPU_SLICED_MAX_CLASSES = 16


class Spec(NamedTuple):
    """Static description of a scalar loss ``objective(sums, hyper)``.

    objective: ``(ClassSums, hyper) -> scalar``, linear in ``ce_positive`` and ``ce_negative`` (see the module
      docstring); ``hyper`` is a pytree of arrays.
    cross_entropy: whether the objective reads ``ce_positive`` or ``ce_negative`` at all.
    complement: whether it reads ``ce_negative`` (the ``log(1 - p)`` terms).
    first_channel: the objective reads the sums of channels ``first_channel:`` only.
    uniform_complement: the coefficient of ``ce_negative`` in the objective is the same for every channel it
      reads (no class weights). The CPU routine then adds up the ``log(1 - p)`` terms of a voxel as the
      logarithm of one product.
    complement_first_channel: with ``uniform_complement``, the first channel whose ``ce_negative`` has that
      coefficient; the channels before it (from ``first_channel``) have coefficient 0. None: ``first_channel``.
      (The Combo loss with the background in its Dice term only reads every channel's region sums and the
      organs' cross-entropy.)
    """

    objective: Callable[[ClassSums, Any], jax.Array]
    cross_entropy: bool
    complement: bool
    first_channel: int = 0
    uniform_complement: bool = False
    complement_first_channel: int | None = None

    @property
    def complement_channel(self) -> int:
        """The first channel of the uniform ``ce_negative`` coefficient."""
        return self.first_channel if self.complement_first_channel is None else self.complement_first_channel


def compute_dtype(x: jax.Array):
    """The dtype the sums and the arithmetic use: at least float32 (float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def loss(spec: Spec, x: jax.Array, labels: jax.Array, mask: jax.Array | None, hyper) -> jax.Array:
    """``spec.objective(class sums of softmax(x), hyper)``, a scalar.

    Args:
      spec: the static :class:`Spec`.
      x: logits ``(B, *spatial, K)`` of any float dtype (bf16 logits are read as they are; the gradient has x's
        dtype). The spatial axes are kept: a routine may prefer a view of its own (the TPU kernels do).
      labels: integer ids ``(B, *spatial)`` or one-hot/soft labels ``(B, *spatial, K)``; constants (no
        derivative).
      mask: ``(B, *spatial)`` voxel weights of the compute dtype, or None.
      hyper: a pytree of arrays (scalars or per-class vectors) passed to the objective; differentiable.
    """
    labels = jax.lax.stop_gradient(labels)
    if mask is not None:
        mask = jax.lax.stop_gradient(mask)
    return _loss(spec, x, labels, mask, hyper)


def _flat(x, labels, mask):
    """``(B, N, K)`` logits, ``(B, N)`` or ``(B, N, K)`` labels and ``(B, N)`` mask (reshapes, no copies)."""
    batch, num_classes = x.shape[0], x.shape[-1]
    labels = labels.reshape(batch, -1) if labels.ndim == x.ndim - 1 else labels.reshape(batch, -1, num_classes)
    return x.reshape(batch, -1, num_classes), labels, None if mask is None else mask.reshape(batch, -1)


def _class_sums(x, labels, mask, complement):
    """:func:`_sums.softmax_sums` of inputs with spatial axes, in the compute dtype."""
    x, labels, mask = _flat(x, labels, mask)
    dtype = compute_dtype(x)
    if labels.ndim == 3:
        labels = labels.astype(dtype)
    return _sums.softmax_sums(x.astype(dtype), labels, None if mask is None else mask.astype(dtype), complement)


def _plain_value(spec: Spec, x, labels, mask, hyper):
    """The loss through the plain formula (autodiff of :func:`_sums.softmax_sums`)."""
    return spec.objective(_class_sums(x, labels, mask, spec.complement), hyper)


def _plain_value_and_grad(spec: Spec, x, labels, mask, hyper):
    return jax.value_and_grad(_plain_value, argnums=1)(spec, x, labels, mask, hyper)


# --------------------------------------------------------------------------------------------------
# Choosing the routine
# --------------------------------------------------------------------------------------------------


def _routines(spec: Spec, x: jax.Array, labels: jax.Array, mask: jax.Array | None):
    """``{platform: (value, value_and_grad)}`` for ``jax.lax.platform_dependent``, each taking the arrays."""
    routines = {"cpu": _cpu(spec, sliced=x.shape[-1] <= CPU_SLICED_MAX_CLASSES),
                "default": _two_pass(spec, _fused_xla.sums, _fused_xla.sums_vjp, flatten=True)}
    batch_axes = _batch_axes(x, labels, mask)
    kernels = (KERNELS and _fused_triton is not None and batch_axes is not None
               and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16))
    if kernels and _fused_triton.supports(x, labels, mask):
        routines["cuda"] = _two_pass(spec, *_per_shard(_fused_triton, x, batch_axes), flatten=True)
    if kernels and _fused_mosaic.supports(x, labels, mask):
        routines["tpu"] = _two_pass(spec, *_per_shard(_fused_mosaic, x, batch_axes), flatten=False)
    return routines


def _batch_axes(*arrays):
    """How explicitly sharded arrays are split: ``()`` not at all, the mesh axes of the batch axis when only it
    is split (the same for every array), None otherwise (the kernels then stay out: the XLA routines run)."""
    specs = []
    for a in arrays:
        if a is not None:
            spec = tuple(getattr(jax.typeof(a).sharding, "spec", ()) or ())
            specs.append((spec + (None,) * a.ndim)[:a.ndim])
    if all(entry is None for spec in specs for entry in spec):
        return ()
    first = specs[0][0]
    if first is not None and all(spec[0] == first and all(e is None for e in spec[1:]) for spec in specs):
        return first
    return None


def _per_shard(kernels, x, batch_axes):
    """The kernels' ``(sums, sums_vjp)``, run per shard of a batch split across devices.

    Both are per sample (sums of each sample's voxels, each voxel's gradient from its sample's coefficients),
    so each device runs them on its samples and the loss, a function of the ``(B, K)`` sums, stays global.
    Explicitly sharded arrays go through ``shard_map``; for arrays that XLA's partitioner shards (automatic
    sharding) the calls are ``custom_partitioning`` functions that keep the batch split and the other axes
    whole (a Pallas call is otherwise refused, or gathered onto every device).
    """
    if batch_axes == ():
        def sums(x, labels, mask, complement):
            fn = _batch_partitioned(lambda *a: tuple(kernels.sums(*_with_mask(a, mask), complement)))
            return ClassSums(*fn(*_arrays(x, labels, mask)))

        def sums_vjp(x, labels, mask, cot, complement):
            def fn(*a):
                return kernels.sums_vjp(*_with_mask(a[:-len(cot)], mask), ClassSums(*a[-len(cot):]), complement)

            return _batch_partitioned(fn)(*_arrays(x, labels, mask), *cot)

        return sums, sums_vjp
    shard = functools.partial(jax.shard_map, mesh=jax.typeof(x).sharding.mesh, in_specs=P(batch_axes),
                              out_specs=P(batch_axes), check_vma=False)

    def sums(x, labels, mask, complement):
        return shard(lambda *a: kernels.sums(*a, complement))(x, labels, mask)

    def sums_vjp(x, labels, mask, cot, complement):
        return shard(lambda *a: kernels.sums_vjp(*a, complement))(x, labels, mask, cot)

    return sums, sums_vjp


def _arrays(x, labels, mask):
    return (x, labels) if mask is None else (x, labels, mask)


def _with_mask(arrays, mask):
    """``(x, labels, mask)`` from :func:`_arrays`' tuple (the mask None where it was left out)."""
    return (*arrays, None) if mask is None else arrays


def _batch_partitioned(fn):
    """``fn(*arrays)``, every input and output per sample along axis 0, as a ``custom_partitioning`` function.

    Under XLA's partitioner it keeps each argument's batch split (the first argument's) and makes every
    other axis whole, and runs ``fn`` on each device's samples. On one device it is ``fn``.
    """
    partitioned = custom_partitioning(fn)

    def batch_sharding(mesh, sharding, ndim):
        spec = tuple(getattr(sharding, "spec", ()) or ())
        return NamedSharding(mesh, P(spec[0] if spec else None, *(None,) * (ndim - 1)))

    def infer(mesh, arg_shapes, result_shape):
        sharding = arg_shapes[0].sharding
        return jax.tree.map(lambda r: batch_sharding(mesh, sharding, len(r.shape)), result_shape)

    def partition(mesh, arg_shapes, result_shape):
        sharding = arg_shapes[0].sharding
        args = tuple(batch_sharding(mesh, sharding, len(a.shape)) for a in arg_shapes)
        results = jax.tree.map(lambda r: batch_sharding(mesh, sharding, len(r.shape)), result_shape)
        return mesh, fn, results, args

    def rule(mesh, operand_types, result_types):  # Shardy: the batch factor shared, every other one whole
        names = []

        def dims(ir_type, tag):
            factors = [f"{tag}{i}" for i in range(1, len(ir.RankedTensorType(ir_type).shape))]
            names.extend(factors)
            return " ".join(["b", *factors])

        operands = ", ".join(dims(t, f"a{i}_") for i, t in enumerate(operand_types))
        results = ", ".join(dims(t, f"r{i}_") for i, t in enumerate(result_types))
        return f"{operands} -> {results}", {"need_replication_factors": tuple(names)}

    partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)

    # custom_partitioning has no batching rule: under vmap (a vmapped loss, a grid of hyperparameters) the
    # call is ``fn`` vmapped, unpartitioned.
    @custom_vmap
    def call(*arrays):
        return partitioned(*arrays)

    @call.def_vmap
    def _(axis_size, in_batched, *arrays):
        out = jax.vmap(fn, in_axes=tuple(0 if batched else None for batched in in_batched))(*arrays)
        return out, jax.tree.map(lambda _: True, out)

    return call


def _cpu(spec: Spec, sliced: bool):
    def value(x, labels, mask, hyper):
        return _fused_cpu.value_and_grad(spec, *_flat(x, labels, mask), hyper, sliced=sliced, grad=False)

    def value_and_grad(x, labels, mask, hyper):
        value, g = _fused_cpu.value_and_grad(spec, *_flat(x, labels, mask), hyper, sliced=sliced)
        return value, g.reshape(x.shape)

    return value, value_and_grad


def _two_pass(spec: Spec, sums_fn, sums_vjp_fn, *, flatten: bool):
    """``(value, value_and_grad)`` from a sums routine and its explicit vector-Jacobian product."""

    def value(x, labels, mask, hyper):
        if flatten:
            x, labels, mask = _flat(x, labels, mask)
        return spec.objective(sums_fn(x, labels, mask, spec.complement), hyper)

    def value_and_grad(x, labels, mask, hyper):
        shape = x.shape
        if flatten:
            x, labels, mask = _flat(x, labels, mask)
        sums = sums_fn(x, labels, mask, spec.complement)
        value, cot = jax.value_and_grad(spec.objective)(sums, hyper)
        return value, sums_vjp_fn(x, labels, mask, cot, spec.complement).reshape(shape)

    return value, value_and_grad


def _dispatch(which: int, spec: Spec, x, labels, mask, hyper):
    routines = _routines(spec, x, labels, mask)
    branches = {platform: pair[which] for platform, pair in routines.items() if platform != "default"}
    return jax.lax.platform_dependent(x, labels, mask, hyper, default=routines["default"][which], **branches)


# --------------------------------------------------------------------------------------------------
# The loss and its derivatives
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loss(spec: Spec, x, labels, mask, hyper):
    return _dispatch(0, spec, x, labels, mask, hyper)


def _is_zero(tangent) -> bool:
    return all(isinstance(t, SymbolicZero) for t in
               jax.tree.leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero)))


def _instantiate(tangent):
    return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype) if isinstance(t, SymbolicZero) else t, tangent,
                        is_leaf=lambda t: isinstance(t, SymbolicZero))


@functools.partial(_loss.defjvp, symbolic_zeros=True)
def _loss_jvp(spec: Spec, primals, tangents):
    x, labels, mask, hyper = primals
    dx, _, _, dhyper = tangents
    value = tangent = None
    if not _is_zero(dx):
        value, g = _value_and_grad(spec, x, labels, mask, hyper)
        dtype = compute_dtype(x)
        tangent = jnp.sum(g.astype(dtype) * dx.astype(dtype))
    if not _is_zero(dhyper):
        sums = _class_sums(x, labels, mask, spec.complement)
        value_h, tangent_h = jax.jvp(lambda h: spec.objective(sums, h), (hyper,), (_instantiate(dhyper),))
        value = value_h if value is None else value
        tangent = tangent_h if tangent is None else tangent + tangent_h
    if value is None:
        value = _loss(spec, x, labels, mask, hyper)
        tangent = jnp.zeros_like(value)
    return value, tangent.astype(value.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _value_and_grad(spec: Spec, x, labels, mask, hyper):
    """``(loss, d loss / d x)`` by the fast routine; its derivatives are those of the plain formula."""
    return _dispatch(1, spec, x, labels, mask, hyper)


@_value_and_grad.defjvp
def _value_and_grad_jvp(spec: Spec, primals, tangents):
    return jax.jvp(functools.partial(_plain_value_and_grad, spec), primals, tangents)


def reference_value_and_grad(spec: Spec, x, labels, mask, hyper):
    """``(loss, gradient)`` by autodiff of the plain formula, for checks against the fast routines."""
    return _plain_value_and_grad(spec, x, jax.lax.stop_gradient(labels), mask, hyper)
