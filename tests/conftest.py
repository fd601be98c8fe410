"""Shared test setup: fake CPU devices, the hypothesis profile, and layout helpers.

The XLA flag must be set before jax is first imported, so this module sets it at import time, before
anything else (pytest imports conftest.py before the test modules).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis  # noqa: E402
import numpy as np  # noqa: E402

# deadline=None: the first example of every shape pays for an XLA compilation.
hypothesis.settings.register_profile(
    "combo_jax",
    deadline=None,
    max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    print_blob=True,
)
hypothesis.settings.register_profile("combo_jax_thorough", parent=hypothesis.settings.get_profile("combo_jax"),
                                     max_examples=300)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "combo_jax"))


def to_torch(x, *, channels=True, requires_grad=False):
    """A channels-last numpy array as a channels-first torch tensor (``channels=False``: no channel axis).

    Float and integer dtypes are kept (float64 stays float64), so the torch side computes in the dtype the
    JAX side does.
    """
    import torch

    arr = np.asarray(x)
    if channels:
        arr = np.moveaxis(arr, -1, 1)
    tensor = torch.tensor(np.ascontiguousarray(arr))
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def from_torch(tensor, *, channels=True):
    """A channels-first torch tensor as a channels-last numpy array."""
    arr = tensor.detach().cpu().numpy()
    return np.moveaxis(arr, 1, -1) if channels else arr
