"""combo_jax: the Combo loss and the imbalance-loss family for JAX segmentation training."""

from combo_jax.losses import (
    ClassSums,
    check_labels,
    class_sums,
    combo_loss,
    combo_loss_from_sums,
    cross_entropy,
    dice_ce_loss,
    dice_loss,
    focal_loss,
    frequency_weights,
    generalized_dice_loss,
    pool_batch,
    soft_dice,
    tversky_loss,
    weighted_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "ClassSums",
    "check_labels",
    "class_sums",
    "combo_loss",
    "combo_loss_from_sums",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "focal_loss",
    "frequency_weights",
    "generalized_dice_loss",
    "pool_batch",
    "soft_dice",
    "tversky_loss",
    "weighted_cross_entropy",
]
