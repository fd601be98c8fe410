"""A tiny run for tests: 32 x 32 phantom slices, a two-level U-Net, a few steps (seconds on a CPU).

    python -m combo_jax.train --config tiny --workdir runs/tiny

The default config with: 32 x 32 slices, 32 training and 8 validation cases, U-Net (4, 8), 12 steps.
"""

from combo_jax.configs import default


def get_config(loss: str = "combo"):
    config = default.get_config(loss)
    config.data.shape = (32, 32)
    config.data.num_train = 32
    config.data.num_val = 8
    config.model.features = (4, 8)
    config.optimizer.warmup_steps = 2
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.num_steps = 12
    config.train.log_every = 2
    config.train.eval_every = 6
    config.train.checkpoint_every = 4
    config.eval.num_predictions = 2
    return config
