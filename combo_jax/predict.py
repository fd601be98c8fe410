"""Predict label maps for NIfTI scans with a trained run, written as NIfTI next to nothing else.

    python -m combo_jax.predict --workdir runs/totalseg_ct --input scan.nii.gz --output predictions/
    python -m combo_jax.predict --workdir runs/task09 --input /data/Task09_Spleen/imagesTs --output preds/

Each input is preprocessed as the run's training data was (resampling to ``config.data.spacing``, intensity
normalization by ``config.data.modality``), predicted whole by sliding-window inference (``config.eval.window``
and ``config.eval.overlap`` unless overridden; a 2D model goes slice by slice along ``config.data.slice_axis``),
brought back to the scan's own grid with nearest-neighbour resampling, and written as
``OUTPUT/<name>.nii.gz`` (uint8 class ids, 0 = background, ``k`` = ``config.data.organs[k - 1]``) with the
scan's affine and header, so it overlays the scan in 3D Slicer or ITK-SNAP. ``OUTPUT/classes.json`` lists the
class names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from combo_jax import training
from combo_jax.data import nifti


def input_cases(path: str) -> tuple[nifti.Case, ...]:
    """The prediction-only cases of a NIfTI file or of every NIfTI file in a folder (sorted by name)."""
    if os.path.isfile(path):
        return nifti.from_pairs([(path, None)])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path!r}: no such file or folder")
    files = sorted(f for f in os.listdir(path) if nifti.is_nifti_file(f))
    if not files:
        raise FileNotFoundError(f"--input {path!r}: the folder holds no .nii or .nii.gz files")
    return nifti.from_pairs([(os.path.join(path, f), None) for f in files])


def predict(workdir: str, inputs: str, output: str, *, checkpoint: str = "best", overlap: float | None = None,
            batch_size: int | None = None) -> list[str]:
    """Writes one label map per input scan into ``output``; returns their paths."""
    config, graphdef, params, step = training.load_run(workdir, checkpoint=checkpoint)
    if config.data.name != "nifti":
        raise ValueError(f"{workdir}: the run was trained on {config.data.name!r} data; predicting NIfTI scans needs a "
                         "run trained on NIfTI volumes (config.data.name = 'nifti'), whose preprocessing it repeats")
    if overlap is not None:
        config.eval.overlap = overlap
    if batch_size is not None:
        config.train.eval_batch_size = batch_size
    if not 0.0 <= config.eval.overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {config.eval.overlap}")
    if config.train.eval_batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {config.train.eval_batch_size}")
    preprocessing = training.volume_preprocessing(config)
    cases = input_cases(inputs)
    os.makedirs(output, exist_ok=True)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    apply = jax.jit(training.make_eval_steps(graphdef)["apply"])
    params = jax.device_put(params, NamedSharding(mesh, P()))
    written = []
    for case in cases:
        started = time.time()
        volume = nifti.load_case(case, preprocessing)  # checks the file first: NaN voxels, 4D, unreadable
        logits = training.predict_volume(config, apply, params, volume.image, sharding)
        labels = np.argmax(logits, axis=-1).astype(np.uint8)
        path = os.path.join(output, f"{case.name}.nii.gz")
        nifti.save_labels(path, labels, volume)
        written.append(path)
        print(f"{case.name}: {volume.original_shape} -> {path} ({time.time() - started:.1f} s)", flush=True)
    with open(os.path.join(output, "classes.json"), "w") as f:
        json.dump({"classes": ["background", *config.data.organs], "workdir": os.path.abspath(workdir),
                   "checkpoint": checkpoint, "step": int(step)}, f, indent=1)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m combo_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir (config.json and checkpoints/)")
    parser.add_argument("--input", required=True, help="a .nii/.nii.gz scan or a folder of them")
    parser.add_argument("--output", required=True, help="folder for the predicted label maps")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                        help="the best validation checkpoint (default) or the latest one")
    parser.add_argument("--overlap", type=float, default=None, help="window overlap (default: the run's config.eval.overlap)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows per forward pass (default: config.train.eval_batch_size)")
    args = parser.parse_args(argv)
    try:
        predict(args.workdir, args.input, args.output, checkpoint=args.checkpoint, overlap=args.overlap,
                batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as err:  # DatasetError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
