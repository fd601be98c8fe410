"""The demo: a 2D U-Net on the embedded phantom (128 x 128 slices, six organs from 10% to 0.09% of voxels).

    python -m combo_jax.train --config default --workdir runs/demo           # or: make demo
    python -m combo_jax.train --config default:dice --workdir runs/dice      # another loss by name
    python -m combo_jax.train --config default --workdir runs/b3 --config.loss.beta=0.3

Runtime: about 4 minutes on a 2-core CPU (make demo), 900 steps at about 5 steps/s. Expected result: mean
foreground Dice about 0.88 on the 32 validation cases (>= 0.85; the adrenal, 0.09% of voxels, near 0.6).

Every value is written out here; the other shipped configs start from this one and say what they change.
"""

import ml_collections
from ml_collections import config_dict

# Each loss's options as this config trains it (the functions' own defaults; see README "Losses and options").
LOSS_OPTIONS = {
    "combo": dict(alpha=0.5, beta=0.5, smooth=1.0, include_background=False, dice_include_background=True,
                  batch_dice=False),
    "dice": dict(smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=False, jaccard=False, batch_dice=False,
                 include_background=True),
    "wce": dict(beta=0.5, include_background=False),
    "dice_ce": dict(lambda_dice=1.0, lambda_ce=1.0, smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=False, jaccard=False,
                    batch_dice=False, include_background=True, label_smoothing=0.0),
    "focal": dict(gamma=2.0, include_background=True),
    "tversky": dict(alpha=0.5, beta=0.5, smooth_nr=1e-5, smooth_dr=1e-5, batch_dice=False, include_background=True),
    "generalized_dice": dict(w_type="square", smooth_nr=1e-5, smooth_dr=1e-5, batch_dice=False,
                             include_background=True),
}
# Options that default to None (off) and take a tuple or a number from the command line.
_WEIGHTED = ("combo", "dice", "wce", "dice_ce", "focal")


def loss_config(name: str) -> ml_collections.ConfigDict:
    """config.loss for loss ``name``: its name and every option."""
    if name not in LOSS_OPTIONS:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_OPTIONS)}")
    loss = ml_collections.ConfigDict({"name": name, **LOSS_OPTIONS[name]})
    if name in _WEIGHTED:
        loss.class_weights = config_dict.placeholder(tuple)  # one weight per class, background included
        # Or class weights from the training data's class frequencies f: w ~ f^-p with mean 1 (p = 0: none). The
        # Combo loss trains with p = 0.25: without weights the study's default missed the 0.09% adrenal in 5 of
        # 10 seeds (docs/collapse.md).
        loss.frequency_power = 0.25 if name == "combo" else 0.0
    if name == "focal":
        loss.alpha = config_dict.placeholder(float)
    return loss


def get_config(loss: str = "combo") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # initial parameters and the order of the training batches

    config.data = ml_collections.ConfigDict()
    config.data.name = "phantom"
    config.data.spatial_dims = 2
    config.data.shape = (128, 128)
    config.data.seed = 0  # which phantom cases (the same for every config.seed)
    config.data.num_train = 512
    config.data.num_val = 32
    config.data.worker_count = 0  # grain worker processes (0: load in the training process)

    config.model = ml_collections.ConfigDict()  # the number of classes comes from the data
    config.model.features = (8, 16, 32, 64)
    config.model.norm = "instance"
    config.model.deep_supervision = False
    config.model.dtype = "float32"
    # What each block keeps for the backward pass: "none", "convs" or "blocks" (combo_jax.models.unet
    # .REMAT_POLICIES; True and False still mean "blocks" and "none"). Less kept, more recomputed.
    config.model.remat = "none"

    config.loss = loss_config(loss)

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
    config.train.on_nonfinite = "stop"  # or "skip"

    config.eval = ml_collections.ConfigDict()
    config.eval.num_predictions = 4  # validation cases drawn in predictions.png
    config.eval.nsd_tolerance_mm = 2.0  # normalized surface Dice tolerance
    return config
