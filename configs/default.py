"""The demo: a 2D U-Net on the embedded phantom (128 x 128 slices, six organs from 10% to 0.09% of voxels).

    python train.py --config configs/default.py --workdir runs/demo
    python train.py --config configs/default.py:dice --workdir runs/dice     # another loss by name
    python train.py --config configs/default.py --workdir runs/b3 --config.loss.beta=0.3

Runtime: about 4 minutes on a 2-core CPU (make demo), 900 steps at about 4.3 steps/s. Expected result: mean
foreground Dice about 0.89 on the 32 validation cases (>= 0.85; the adrenal, 0.09% of voxels, near 0.6).
"""

import ml_collections

from combo_jax.training import loss_options


def get_config(loss: str = "combo") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "phantom"
    config.data.spatial_dims = 2
    config.data.shape = (128, 128)
    config.data.seed = 0
    config.data.num_train = 512
    config.data.num_val = 32
    config.data.worker_count = 0

    config.model = ml_collections.ConfigDict()
    config.model.num_classes = 7
    config.model.features = (8, 16, 32, 64)
    config.model.norm = "instance"
    config.model.deep_supervision = False
    config.model.dtype = "float32"
    # What each block keeps for the backward pass: "none", "convs" or "blocks" (combo_jax.models.unet
    # .REMAT_POLICIES; True and False still mean "blocks" and "none"). Less kept, more recomputed.
    config.model.remat = "none"

    config.loss = ml_collections.ConfigDict({"name": loss, **loss_options(loss)})

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.final_lr_fraction = 0.01
    config.optimizer.weight_decay = 1e-4
    config.optimizer.clip_norm = 1.0
    config.optimizer.momentum = 0.99  # sgd
    config.optimizer.poly_power = 0.9  # sgd

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.num_steps = 900
    config.train.log_every = 25
    config.train.eval_every = 300
    config.train.checkpoint_every = 300
    config.train.keep_checkpoints = 2
    config.train.on_nonfinite = "stop"

    config.eval = ml_collections.ConfigDict()
    config.eval.num_predictions = 4
    config.eval.nsd_tolerance_mm = 2.0  # normalized surface Dice tolerance
    return config
