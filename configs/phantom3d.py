"""A 3D U-Net on 64^3 phantom volumes (organs from 8% to 0.04% of voxels).

    python -m combo_jax.train --config configs/phantom3d.py --workdir runs/phantom3d

Sized for a GPU: about 2000 steps of batch 4; on a 2-core CPU a step takes seconds.
"""

from combo_jax.configs import default


def get_config(loss: str = "combo"):
    config = default.get_config(loss)
    config.data.spatial_dims = 3
    config.data.shape = (64, 64, 64)
    config.data.num_train = 128
    config.data.num_val = 8
    config.model.features = (16, 32, 64, 128)
    config.train.batch_size = 4
    config.train.eval_batch_size = 4
    config.train.num_steps = 2000
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    return config
