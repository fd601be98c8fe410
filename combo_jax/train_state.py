"""The model, the optimizer and the state a run trains: building them from a config, and the jitted steps.

``TrainState`` is one pytree (step, parameters, optimizer state, first non-finite step) that orbax saves and
restores. The model is split once into a static graph and its parameters (``nnx.split``), and every step
merges them inside a plain ``jax.jit`` (no NNX bookkeeping per step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from combo_jax import metrics
from combo_jax.config import LOSSES, loss_kwargs, num_classes
from combo_jax.models.unet import UNet


def make_model(config, *, rngs: nnx.Rngs) -> UNet:
    m = config.model
    return UNet(
        spatial_dims=config.data.spatial_dims,
        in_channels=1,
        num_classes=num_classes(config),
        features=tuple(m.features),
        norm=m.norm,
        deep_supervision=m.deep_supervision,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        remat=m.remat,
        rngs=rngs,
    )


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o, steps = config.optimizer, config.train.num_steps
    if o.name == "adamw":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, min(o.warmup_steps, steps - 1), steps, end_value=o.learning_rate * o.final_lr_fraction
        )
        core = optax.adamw(schedule, weight_decay=o.weight_decay)
    else:  # nnU-Net: SGD, Nesterov momentum 0.99, lr * (1 - step / steps) ** 0.9
        schedule = optax.polynomial_schedule(o.learning_rate, 0.0, o.poly_power, steps)
        core = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, o.momentum, nesterov=True))
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), core), schedule


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator, as one pytree for orbax."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_step: jax.Array  # first step whose loss or gradients were not finite, or -1
    skipped: jax.Array  # how many updates were skipped for a non-finite loss or gradient


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "opt_state", "nonfinite_step", "skipped"], meta_fields=[])


def init_state(config):
    """The model's graph, a fresh TrainState, the optimizer and its learning-rate schedule."""
    model = make_model(config, rngs=nnx.Rngs(params=config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = make_optimizer(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.full((), -1, jnp.int32),
                       jnp.zeros((), jnp.int32))
    return graphdef, state, tx, schedule


def make_loss_fn(config, class_frequencies=None):
    """``loss_fn(outputs, labels)`` of config.loss; deep supervision weighs full resolution 1, then halves.

    ``class_frequencies``: the training data's fraction of voxels per class (``Data.train_shares``), which
    ``config.loss.frequency_power`` turns into class weights.
    """
    loss = functools.partial(LOSSES[config.loss.name], **loss_kwargs(config, class_frequencies))

    def loss_fn(outputs, labels):
        if isinstance(outputs, list):
            weights = [0.5**i for i in range(len(outputs))]
            return sum(w * loss(o, labels) for w, o in zip(weights, outputs)) / sum(weights)
        return loss(outputs, labels)

    return loss_fn


def make_train_step(graphdef, tx, loss_fn):
    def train_step(state: TrainState, batch: dict):
        def objective(params):
            return loss_fn(nnx.merge(graphdef, params)(batch["image"]), batch["labels"])

        loss, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        # A non-finite step never touches the parameters; with on_nonfinite="stop" the host stops at the
        # next log line, naming the step recorded here.
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                         (state.params, state.opt_state))
        first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(state.step + 1, params, opt_state, first_bad, skipped)
        return new_state, {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_steps(graphdef) -> dict:
    """The model's full-resolution logits (``apply``), and its predicted label map with each case's confusion
    counts ``(B, 3, K)`` (``eval``), unjitted."""

    def apply(params, image):
        outputs = nnx.merge(graphdef, params)(image)
        return (outputs[0] if isinstance(outputs, list) else outputs).astype(jnp.float32)

    def eval_step(params, batch):
        logits = apply(params, batch["image"])
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        counts = jax.vmap(lambda p, t: jnp.stack(metrics.confusion_counts(p, t, logits.shape[-1])))(pred, batch["labels"])
        return pred, counts

    return {"apply": apply, "eval": eval_step}
