"""PyTorch reference implementations of :mod:`combo_jax.losses` (channels-first).

torch is imported only when an attribute of this package is first used, so ``import combo_jax`` never needs
it. Install it with the ``test`` extra (``pip install combo_jax[test]``).
"""

import importlib

_NAMES = (
    "combo_loss",
    "cross_entropy",
    "dice_ce_loss",
    "dice_loss",
    "focal_loss",
    "generalized_dice_loss",
    "soft_dice",
    "tversky_loss",
    "weighted_cross_entropy",
)

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        try:
            module = importlib.import_module("combo_jax.reference.torch_losses")
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "combo_jax.reference needs PyTorch; install the test extra: pip install 'combo_jax[test]'"
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module 'combo_jax.reference' has no attribute {name!r}")
