"""Predict label maps for NIfTI scans with a trained run, written as NIfTI beside nothing else.

    python -m combo_jax.predict --workdir runs/totalseg_ct --input scan.nii.gz --output predictions/
    combo-jax-predict --workdir runs/task09 --input /data/Task09_Spleen/imagesTs --output preds/

Each input is preprocessed as the run's training data was (resampling to ``config.data.spacing``, intensity
normalization by ``config.data.modality``), predicted whole by sliding-window inference on every device
(``config.eval.window`` and ``config.eval.overlap`` unless overridden; a 2D model goes slice by slice along
``config.data.slice_axis``), brought back to the scan's own grid with nearest-neighbour resampling, and written
as ``OUTPUT/<name>.nii.gz`` with the scan's affine and header, so it overlays the scan in 3D Slicer or ITK-SNAP.

Label values: the dataset's own label ids by default (``config.data.label_ids``: the organ the run calls
``organs[k]`` is written as ``label_ids[k]``, background 0), so a prediction compares directly with the
dataset's label files; ``--class_indices`` writes class indices 0..K-1 instead. ``OUTPUT/classes.json`` lists
the classes, their values and which output came from which input.

Nothing is overwritten or lost: an output folder that holds the inputs (the input folder or one above it) is
refused; an
existing output file is an error unless ``--overwrite``; every readable scan is written even when others fail,
every failure is reported, and the exit status is 1 if any scan failed (2 for a usage error before any work).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from combo_jax.data import nifti


class PredictError(ValueError):
    """A prediction request that cannot run; raised before any scan is read."""


def input_cases(path: str) -> tuple[nifti.Case, ...]:
    """The prediction-only cases of a NIfTI file or of every NIfTI file in a folder (sorted by name)."""
    if os.path.isfile(path):
        return nifti.from_pairs([(path, None)])
    if not os.path.isdir(path):
        raise PredictError(f"--input {path!r}: no such file or folder")
    files = sorted(f for f in os.listdir(path) if nifti.is_nifti_file(f))
    if not files:
        raise PredictError(f"--input {path!r}: the folder holds no .nii or .nii.gz files")
    return nifti.from_pairs([(os.path.join(path, f), None) for f in files])


def output_names(cases) -> dict[str, str]:
    """``{input path: output file name}``, unique per input.

    A scan's output is ``<name>.nii.gz``; inputs whose names coincide (``x.nii`` and ``x.nii.gz``) are told
    apart by their whole file name instead (``x.nii`` -> ``x_nii.nii.gz``, ``x.nii.gz`` -> ``x_nii_gz.nii.gz``).
    """
    by_name: dict[str, list] = {}
    for case in cases:
        by_name.setdefault(case.name, []).append(case)
    names = {}
    for name, group in by_name.items():
        for case in group:
            base = name if len(group) == 1 else re.sub(r"\W", "_", os.path.basename(case.image))
            names[case.image] = f"{base}.nii.gz"
    if len(set(names.values())) != len(names):
        raise PredictError("two inputs map to one output name: " + ", ".join(sorted(names)))
    return names


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(inputs: str, output: str, cases, names: dict[str, str], *, overwrite: bool) -> None:
    """Refuses an output that would overwrite the scans or, without ``overwrite``, earlier predictions."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise PredictError(f"--output {output!r} exists and is not a folder")
    inside = sorted(c.image for c in cases if _inside(c.image, output))
    if inside:
        raise PredictError(f"--output {output!r} holds the input scans ({', '.join(inside[:3])}"
                           f"{' ...' if len(inside) > 3 else ''}): predictions would sit among (or replace) them; "
                           "choose a folder that does not contain the inputs")
    targets = {os.path.realpath(os.path.join(output, n)) for n in [*names.values(), "classes.json"]}
    clobbered = sorted(c.image for c in cases if os.path.realpath(c.image) in targets)
    if clobbered:
        raise PredictError(f"--output {output!r} would overwrite input scan(s): {', '.join(clobbered)}")
    if not overwrite:
        existing = sorted(n for n in names.values() if os.path.lexists(os.path.join(output, n)))
        if existing:
            shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise PredictError(f"--output {output!r} already holds {len(existing)} of the predictions ({shown}); pass "
                               "--overwrite to replace them, or choose another folder")


def label_values(config, *, class_indices: bool) -> list[int]:
    """The value written for each class: the dataset's label ids (background 0), or 0..K-1."""
    k = len(config.data.organs) + 1
    return list(range(k)) if class_indices else [0, *[int(i) for i in config.data.label_ids]]


def predict(workdir: str, inputs: str, output: str, *, checkpoint: str = "best", overlap: float | None = None,
            batch_size: int | None = None, overwrite: bool = False, class_indices: bool = False,
            log=print) -> dict:
    """Writes one label map per input scan into ``output``.

    Returns ``{"written": [paths], "failed": {input: reason}}``; raises PredictError (before any work) for a
    request that cannot run.
    """
    import jax

    from combo_jax.checkpoints import load_run
    from combo_jax.data.datasets import volume_preprocessing
    from combo_jax.evaluation import predict_volume
    from combo_jax.sharding import data_sharding, make_mesh, replicated
    from combo_jax.train_state import make_eval_steps

    cases = input_cases(inputs)
    names = output_names(cases)
    check_output(inputs, output, cases, names, overwrite=overwrite)
    config, graphdef, params, step = load_run(workdir, checkpoint=checkpoint)
    if config.data.name != "nifti":
        raise PredictError(f"{workdir}: the run was trained on {config.data.name!r} data; predicting NIfTI scans needs "
                           "a run trained on NIfTI volumes (config.data.name = 'nifti'), whose preprocessing it repeats")
    if overlap is not None:
        config.eval.overlap = overlap
    if batch_size is not None:
        config.train.eval_batch_size = batch_size
    if not 0.0 <= config.eval.overlap < 1.0:
        raise PredictError(f"--overlap must be in [0, 1), got {config.eval.overlap}")
    devices = jax.devices()
    size = config.train.eval_batch_size
    if size < 1:
        raise PredictError(f"--batch_size must be positive, got {size}")
    if size % len(devices):  # windows are split over every device: round up to a multiple of the device count
        size += len(devices) - size % len(devices)
        config.train.eval_batch_size = size
    values = np.asarray(label_values(config, class_indices=class_indices))
    preprocessing = volume_preprocessing(config)
    os.makedirs(output, exist_ok=True)
    mesh = make_mesh(devices)
    apply = jax.jit(make_eval_steps(graphdef)["apply"], in_shardings=(replicated(mesh), data_sharding(mesh)),
                    out_shardings=data_sharding(mesh))
    params = jax.device_put(params, replicated(mesh))
    written, failed, outputs = [], {}, {}
    for case in cases:
        started = time.time()
        try:
            volume = nifti.load_case(case, preprocessing)  # checks the file first: NaN voxels, 4D, unreadable
        except (nifti.DatasetError, OSError) as err:
            failed[case.image] = str(err)
            log(f"FAILED {case.image}: {err}")
            continue
        logits = predict_volume(config, apply, params, volume.image, data_sharding(mesh))
        labels = values[np.argmax(logits, axis=-1)]
        path = os.path.join(output, names[case.image])
        nifti.save_labels(path, labels, volume)
        written.append(path)
        outputs[names[case.image]] = case.image
        log(f"{case.name}: {volume.original_shape} -> {path} ({time.time() - started:.1f} s)")
    classes = ["background", *config.data.organs]
    record = {"classes": {name: int(v) for name, v in zip(classes, values)},
              "values": "class indices" if class_indices else "dataset label ids",
              "workdir": os.path.abspath(workdir), "checkpoint": checkpoint, "step": int(step),
              "outputs": outputs, "failed": failed}
    from combo_jax.workdir import write_text_atomic

    write_text_atomic(os.path.join(output, "classes.json"), json.dumps(record, indent=1))
    return {"written": written, "failed": failed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m combo_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir (config.json and checkpoints/)")
    parser.add_argument("--input", required=True, help="a .nii/.nii.gz scan or a folder of them")
    parser.add_argument("--output", required=True, help="folder for the predicted label maps (not the input folder)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                        help="the best validation checkpoint (default) or the latest one")
    parser.add_argument("--overlap", type=float, default=None, help="window overlap (default: the run's config.eval.overlap)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="windows per forward pass over all devices (default: config.train.eval_batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace predictions already in --output")
    parser.add_argument("--class_indices", action="store_true",
                        help="write class indices 0..K-1 instead of the dataset's label ids")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from combo_jax.checkpoints import CheckpointError

    try:
        result = predict(args.workdir, args.input, args.output, checkpoint=args.checkpoint, overlap=args.overlap,
                         batch_size=args.batch_size, overwrite=args.overwrite, class_indices=args.class_indices)
    except (PredictError, FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["failed"]:
        print(f"error: {len(result['failed'])} of {len(result['failed']) + len(result['written'])} scan(s) failed: "
              + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
