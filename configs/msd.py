"""Your own data: a Medical Segmentation Decathlon task folder (dataset.json, imagesTr/, labelsTr/).

    python -m combo_jax.train --config configs/msd.py --workdir runs/spleen \
        --config.data.root=/data/Task09_Spleen --config.data.organs='("spleen",)' \
        --config.data.label_ids='(1,)'

``organs`` names the classes to learn and ``label_ids`` the dataset's label value of each (class k + 1 is
``label_ids[k]``; every other label value becomes background). The last ``num_val`` cases (in dataset.json order)
are held out for validation. Volumes are resampled to ``spacing`` (None keeps each file's own), normalized by
``modality`` and cached under ``cache_dir``; training draws ``shape``-sized patches, a third of them forced to
contain an organ chosen uniformly over the organs present (``class_balanced``); validation predicts whole
volumes by sliding-window inference (``config.eval.window``, ``config.eval.overlap``). The number of classes
is background plus the organs.
Runtime and result depend on the task; on a GPU, expect minutes per 1000 steps of this 3D configuration.
"""

import os

import ml_collections
from ml_collections import config_dict

from combo_jax.configs import default


def sample_root(name: str) -> str:
    """The folder of a real sample that ships beside the repository (``../shared/data/<name>``), or "" when this
    copy of the configs has none beside it (an installed package): then set ``--config.data.root``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", name)
    return os.path.normpath(path) if os.path.isdir(path) else ""


def get_config(loss: str = "combo") -> ml_collections.ConfigDict:
    config = default.get_config(loss)
    d = config.data
    d.name = "nifti"
    d.root = ""  # the task folder (required)
    d.cases = ()  # ((image, label), ...) paths relative to root; empty: read root/dataset.json
    d.organs = ("organ",)
    d.label_ids = (1,)
    d.modality = "CT"  # "CT": clip to ct_window then z-score; "MRI": per-volume z-score
    d.ct_window = (-175.0, 250.0)
    d.spacing = ()  # target voxel size in mm, e.g. (1.5, 1.5, 1.5); empty: keep each file's own
    d.cache_dir = ""  # preprocessed arrays; empty: $XDG_CACHE_HOME/combo_jax (or ~/.cache/combo_jax)
    d.num_val = 1  # cases held out for validation (the last ones)
    d.val_slab = ()  # (start, stop): validate on these slices along slice_axis of a single case instead
    d.spatial_dims = 3
    d.shape = (96, 96, 32)  # training patch
    d.slice_axis = 2  # a 2D model's slicing axis; the axis shown in predictions.png
    d.num_train = 256  # patches per epoch (the sampler's virtual dataset size)
    d.foreground_fraction = 1 / 3
    d.class_balanced = True
    # combo_jax.data.pipeline.Augment's options (nnU-Net-like intensity transforms; no flips or rotations by
    # default, since they would swap left and right organs; set flip_axes where a mirror image is still valid).
    d.augment = ml_collections.ConfigDict(dict(
        flip_axes=(), flip_probability=0.5, rotate90_axes=config_dict.placeholder(tuple), rotate90_probability=0.5,
        scale_range=(0.75, 1.25), scale_probability=0.15, shift_range=(-0.1, 0.1), shift_probability=0.15,
        gamma_range=(0.7, 1.5), gamma_probability=0.3, noise_std_range=(0.0, 0.1), noise_probability=0.1,
    ))

    config.model.features = (16, 32, 64, 128)
    config.train.batch_size = 2
    config.train.eval_batch_size = 2
    config.train.num_steps = 5000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500

    config.eval.window = (96, 96, 32)
    config.eval.overlap = 0.5
    config.eval.num_predictions = 2
    return config
