"""Input pipeline throughput: patches per second from a real CT volume through a grain DataLoader.

The abdominal CT sample in ../shared/data/totalsegmentator_ct (122 x 101 x 30 voxels, seven organs kept) is
preprocessed once (CT window, z-score); the timed part is what runs every training step: foreground-
oversampling patch sampling (1/3 forced, class-balanced), augmentation (flips along axes 0 and 1, in-plane
90-degree rotations, intensity scale / shift / gamma / noise at their default probabilities) and batching.
Two patch configurations: 3D 64 x 64 x 16 patches and 2D 96 x 96 axial slices, each with worker_count 0 (the
main process, one core) and with grain worker processes.

The per-core rate is patches per CPU second of the main process with worker_count=0 (all work in one process),
which holds on a busy machine where wall-clock rates do not; the projection for a 16-core GPU host assumes
linear scaling over 14 worker processes (two cores left to the training process and the device).

    python benchmarks/input_pipeline.py                      # about a minute on 2 CPU cores
    python benchmarks/input_pipeline.py --workers 0 4 8 14   # on a bigger host
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import grain
from absl import flags

from combo_jax.data import nifti, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "totalsegmentator_ct")
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal_gland_right", "adrenal_gland_left")
HOST_CORES, HOST_WORKERS = 16, 14

CONFIGS = {
    "3d 64x64x16": dict(patch_shape=(64, 64, 16), batch_size=4),
    "2d 96x96 slices": dict(patch_shape=(96, 96), batch_size=16),
    # The training benchmark's input (benchmarks/train_step.py: B=2, 128^3): the CT resampled to 0.7 mm
    # (523 x 433 x 129 voxels), so that a 128^3 patch is real data, not padding.
    "3d 128^3 (0.7 mm)": dict(patch_shape=(128, 128, 128), batch_size=2, spacing=(0.7, 0.7, 0.7)),
}
# The step rate the pipeline must feed: the 3D U-Net train step, B=2, 128^3, on an H100
# (../shared/anchors/README.md: 38.7 ms in bf16, the fastest step measured there).
TARGET = {"3d 128^3 (0.7 mm)": 2 / 0.0387}


def load_ct(spacing=None):
    if not os.path.isdir(DATA):
        raise SystemExit(f"sample data not found at {os.path.normpath(DATA)} (see ../shared/data/SOURCES.md)")
    with open(os.path.join(DATA, "labels.json")) as f:
        names = {int(k): v for k, v in json.load(f)["label_names"].items()}
    case = nifti.Case("example_ct_sm", os.path.join(DATA, "example_ct_sm.nii.gz"), os.path.join(DATA, "example_seg.nii.gz"))
    pre = nifti.Preprocessing(modality="CT", spacing=spacing, label_map=nifti.label_map_from_names(names, ORGANS))
    return nifti.load_case(case, pre)


def measure(source, *, patch_shape, batch_size, worker_count, augment, seconds, warmup):
    """Patches per wall-clock second and per CPU second of this process, over at least `seconds` of batches
    after `warmup` untimed ones. With workers, this process's CPU time leaves out the workers' work."""
    operations = [pipeline.PatchSampler(patch_shape, slice_axis=2)]
    if augment:
        operations.append(pipeline.Augment(flip_axes=(0, 1), rotate90_axes=(0, 1)))
    operations.append(grain.transforms.Batch(batch_size=batch_size, drop_remainder=True))
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=None)
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=worker_count)
    it = iter(loader)
    for _ in range(warmup):  # includes starting the worker processes
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(it)
        batches += 1
    cpu = time.process_time() - cpu_start
    assert batch["image"].shape == (batch_size, *patch_shape, 1)
    del it
    return batches * batch_size / elapsed, batches * batch_size / cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="grain worker counts to time")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "input_pipeline.json"))
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker pool reads absl flags

    volume = load_ct()
    sources = {None: pipeline.VolumeSource([volume], num_records=1024)}
    rows = []
    for name, config in CONFIGS.items():
        config = dict(config)
        spacing = config.pop("spacing", None)
        if spacing not in sources:
            sources[spacing] = pipeline.VolumeSource([load_ct(spacing)], num_records=1024)
        source = sources[spacing]
        runs = [(0, False)] + [(w, True) for w in args.workers]
        for workers, augment in runs:
            rate, cpu_rate = measure(source, worker_count=workers, augment=augment, seconds=args.seconds, warmup=args.warmup,
                           **config)
            rows.append({"config": name, "batch": config["batch_size"], "augment": augment, "workers": workers,
                         "patches_per_s": round(rate, 1),
                         "patches_per_cpu_s": round(cpu_rate, 1) if workers == 0 else None})
    per_core = {name: next(r["patches_per_cpu_s"] for r in rows if r["config"] == name and r["augment"] and r["workers"] == 0)
                for name in CONFIGS}

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"input pipeline, CT sample {volume.image.shape[:3]}, {cores} CPU cores available ({platform.processor() or platform.machine()})")
    print(f"{'config':<18} {'batch':>5} {'augment':>7} {'workers':>7} {'patches/s':>10} {'patches/CPU-s':>13}")
    for r in rows:
        cpu = "" if r["patches_per_cpu_s"] is None else f"{r['patches_per_cpu_s']:.1f}"
        print(f"{r['config']:<18} {r['batch']:>5} {str(r['augment']):>7} {r['workers']:>7} {r['patches_per_s']:>10.1f} {cpu:>13}")
    for name, rate in per_core.items():
        need = f"; the H100 step needs {TARGET[name]:.0f}/s" if name in TARGET else ""
        print(f"{name}: {rate:.1f} patches/s per core -> about {rate * HOST_WORKERS:.0f} patches/s with "
              f"{HOST_WORKERS} workers on a {HOST_CORES}-core host (linear scaling assumed){need}")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({
            "date": datetime.date.today().isoformat(), "cpu_cores": cores, "machine": platform.machine(),
            "volume_shape": list(volume.image.shape[:3]), "rows": rows,
            "per_core_patches_per_s": per_core,
            "projection": {"host_cores": HOST_CORES, "workers": HOST_WORKERS,
                           "patches_per_s": {k: round(v * HOST_WORKERS) for k, v in per_core.items()},
                           "needed_patches_per_s": {k: round(v, 1) for k, v in TARGET.items()}},
        }, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
