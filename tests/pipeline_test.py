"""Tests for combo_jax.data.pipeline: patch geometry and padding, foreground oversampling statistics against
binomial tolerances, augmentation alignment, and per-seed determinism through a grain DataLoader."""

import itertools
import os
import types

import grain
import numpy as np
import pytest

from combo_jax.data import nifti, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def volume(labels, image=None, name="v"):
    labels = np.asarray(labels, np.int32)
    image = labels.astype(np.float32) if image is None else np.asarray(image, np.float32)
    return types.SimpleNamespace(name=name, image=image[..., None] if image.ndim == labels.ndim else image, labels=labels)


def coordinate_image(shape):
    """A positive image whose value encodes the voxel's coordinates: 1 + x * 10000 + y * 100 + z."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    weights = [10000, 100, 1][-len(shape):]
    return 1.0 + sum(w * g for w, g in zip(weights, grids))


def draw(sampler, record, n, seed=0):
    return [sampler.random_map(record, np.random.default_rng([seed, i])) for i in range(n)]


def within_binomial(hits, n, p, sigmas=4.5):
    """|hits/n - p| within `sigmas` binomial standard deviations (plus one count, for p near 0 or 1)."""
    return abs(hits - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


# ----------------------------------------------------------------------------------------------
# Patch geometry
# ----------------------------------------------------------------------------------------------


def test_3d_patch_is_a_contiguous_block_of_the_volume():
    shape = (20, 15, 10)
    labels = np.random.default_rng(0).integers(0, 3, shape)
    source = pipeline.VolumeSource([volume(labels, coordinate_image(shape))])
    sampler = pipeline.PatchSampler((8, 6, 4))
    for patch in draw(sampler, source[0], 20):
        image, lab = patch["image"], patch["labels"]
        assert image.shape == (8, 6, 4, 1) and image.dtype == np.float32
        assert lab.shape == (8, 6, 4) and lab.dtype == np.int32
        code = int(image[0, 0, 0, 0]) - 1
        x, y, z = code // 10000, code // 100 % 100, code % 100
        np.testing.assert_array_equal(image[..., 0], coordinate_image(shape)[x:x + 8, y:y + 6, z:z + 4])
        np.testing.assert_array_equal(lab, labels[x:x + 8, y:y + 6, z:z + 4])


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_slices_of_3d_volumes(slice_axis):
    shape = (12, 11, 10)
    labels = np.random.default_rng(1).integers(0, 3, shape)
    coords = coordinate_image(shape)
    source = pipeline.VolumeSource([volume(labels, coords)])
    sampler = pipeline.PatchSampler((5, 4), slice_axis=slice_axis)
    seen = set()
    for patch in draw(sampler, source[0], 40):
        assert patch["image"].shape == (5, 4, 1) and patch["labels"].shape == (5, 4)
        code = int(patch["image"][0, 0, 0]) - 1
        start = [code // 10000, code // 100 % 100, code % 100]
        index = list(start)
        other = [a for a in range(3) if a != slice_axis]
        index[other[0]] = slice(start[other[0]], start[other[0]] + 5)
        index[other[1]] = slice(start[other[1]], start[other[1]] + 4)
        np.testing.assert_array_equal(patch["image"][..., 0], coords[tuple(index)])
        np.testing.assert_array_equal(patch["labels"], labels[tuple(index)])
        seen.add(start[slice_axis])
    assert len(seen) > 3  # slices vary


def test_2d_patches_of_2d_volumes_and_shape_mismatch():
    labels = np.zeros((30, 20), np.int32)
    source = pipeline.VolumeSource([volume(labels)])
    assert pipeline.PatchSampler((8, 8)).random_map(source[0], np.random.default_rng(0))["image"].shape == (8, 8, 1)
    with pytest.raises(ValueError, match=r"patch_shape \(8, 8, 8\) does not fit 2D volumes"):
        pipeline.PatchSampler((8, 8, 8)).random_map(source[0], np.random.default_rng(0))


def test_volume_smaller_than_patch_is_zero_padded():
    shape = (4, 5, 3)
    labels = np.ones(shape, np.int32)
    labels[0, 0, 0] = 2
    source = pipeline.VolumeSource([volume(labels, coordinate_image(shape))])
    sampler = pipeline.PatchSampler((8, 8, 4))
    offsets = set()
    for patch in draw(sampler, source[0], 30):
        image, lab = patch["image"][..., 0], patch["labels"]
        inside = image != 0
        assert inside.sum() == 4 * 5 * 3 and (lab != 0).sum() == 4 * 5 * 3  # the whole volume, once
        (x, y, z) = [int(a.min()) for a in np.nonzero(inside)]
        np.testing.assert_array_equal(image[x:x + 4, y:y + 5, z:z + 3], coordinate_image(shape))
        np.testing.assert_array_equal(lab[x:x + 4, y:y + 5, z:z + 3], labels)
        assert lab[~inside].max() == 0
        offsets.add((x, y, z))
    assert len(offsets) > 5  # the volume sits at random offsets inside the patch


def test_patch_larger_on_one_axis_only():
    labels = np.ones((20, 3), np.int32)
    patch = pipeline.PatchSampler((6, 8)).random_map(pipeline.VolumeSource([volume(labels)])[0], np.random.default_rng(0))
    assert patch["labels"].shape == (6, 8) and patch["labels"].sum() == 6 * 3


# ----------------------------------------------------------------------------------------------
# Foreground oversampling statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 1.0])
def test_forced_foreground_fraction_within_binomial_tolerance(fraction):
    labels = np.zeros((64, 64), np.int32)
    labels[40, 20] = 1
    source = pipeline.VolumeSource([volume(labels)])
    sampler = pipeline.PatchSampler((8, 8), foreground_fraction=fraction)
    n = 3000
    hits = sum(p["labels"].any() for p in draw(sampler, source[0], n))
    # A uniform 8 x 8 patch start is one of 57 x 57; 8 x 8 of them contain the voxel.
    p_random = 64 / 57**2
    expected = fraction + (1 - fraction) * p_random
    assert within_binomial(hits, n, expected), (hits / n, expected)


def separated_organs():
    """Three organs far apart (more than a patch): 30 x 30 = 900 voxels, 5 x 5 = 25 voxels, and 1 voxel."""
    labels = np.zeros((96, 96), np.int32)
    labels[2:32, 2:32] = 1
    labels[60:65, 10:15] = 2
    labels[80, 80] = 3
    return labels


def organs_hit(sampler, labels, n, **source_options):
    source = pipeline.VolumeSource([volume(labels)], **source_options)
    counts = np.zeros(4, np.int64)
    for patch in draw(sampler, source[0], n):
        present = np.unique(patch["labels"])
        assert len(present[present > 0]) == 1  # every forced patch holds exactly one organ
        counts[present[present > 0]] += 1
    return counts[1:]


def test_class_balanced_hits_every_organ_equally_including_one_voxel():
    n = 1800
    counts = organs_hit(pipeline.PatchSampler((8, 8), foreground_fraction=1.0), separated_organs(), n)
    for c in counts:
        assert within_binomial(c, n, 1 / 3), counts


def test_not_class_balanced_hits_organs_by_voxel_count_even_when_subsampled():
    n = 1800
    sampler = pipeline.PatchSampler((8, 8), foreground_fraction=1.0, class_balanced=False)
    counts = organs_hit(sampler, separated_organs(), n, max_foreground_voxels=20)
    for c, voxels in zip(counts, (900, 25, 1)):
        assert within_binomial(c, n, voxels / 926), counts


def test_forced_voxel_lands_anywhere_in_the_patch():
    labels = np.zeros((40, 40), np.int32)
    labels[20, 17] = 1
    source = pipeline.VolumeSource([volume(labels)])
    sampler = pipeline.PatchSampler((4, 4), foreground_fraction=1.0)
    positions = np.zeros((4, 4), np.int64)
    n = 1600
    for patch in draw(sampler, source[0], n):
        (i,), (j,) = np.nonzero(patch["labels"])
        positions[i, j] += 1
    # Uniform over the 16 positions: 100 each; Poisson 5-sigma bounds.
    assert positions.min() >= 50 and positions.max() <= 150, positions


def test_forced_voxel_near_the_border_stays_inside():
    labels = np.zeros((30, 30, 30), np.int32)
    labels[0, 29, 1] = 1
    source = pipeline.VolumeSource([volume(labels)])
    sampler = pipeline.PatchSampler((8, 8, 8), foreground_fraction=1.0)
    assert all(p["labels"].sum() == 1 for p in draw(sampler, source[0], 50))


def test_volume_without_foreground_gives_random_patches():
    source = pipeline.VolumeSource([volume(np.zeros((10, 10), np.int32))])
    patch = pipeline.PatchSampler((4, 4), foreground_fraction=1.0).random_map(source[0], np.random.default_rng(0))
    assert patch["labels"].shape == (4, 4) and patch["labels"].max() == 0


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

NO_INTENSITY = dict(scale_probability=0.0, shift_probability=0.0, gamma_probability=0.0, noise_probability=0.0)


def symmetries(array, flip_axes, plane, ks):
    """Every array reachable by flips along flip_axes followed by a rotation by k * 90 degrees, k in ks."""
    out = []
    for flips in itertools.product([False, True], repeat=len(flip_axes)):
        a = array
        for axis, f in zip(flip_axes, flips):
            a = np.flip(a, axis) if f else a
        for k in ks:
            out.append(np.rot90(a, k, axes=plane))
    return out


@pytest.mark.parametrize("shape, ks", [((6, 6, 4), (0, 1, 2, 3)), ((6, 5, 4), (0, 2))])
def test_geometric_augmentation_keeps_image_and_labels_aligned(shape, ks):
    labels = np.random.default_rng(2).integers(0, 5, shape).astype(np.int32)
    record = {"image": labels.astype(np.float32)[..., None], "labels": labels}
    augment = pipeline.Augment(flip_axes=(0, 1, 2), rotate90_axes=(0, 1), rotate90_probability=0.75, **NO_INTENSITY)
    reachable = symmetries(labels, (0, 1, 2), (0, 1), ks)
    outcomes = set()
    for i in range(300):
        out = augment.random_map(record, np.random.default_rng(i))
        np.testing.assert_array_equal(out["image"][..., 0], out["labels"])
        assert out["labels"].shape == shape and out["labels"].dtype == np.int32
        matches = [j for j, r in enumerate(reachable) if np.array_equal(r, out["labels"])]
        assert matches, "output is not a flip/rotation of the input"
        outcomes.add(matches[0])
    # Distinct transforms of a random map are distinct arrays; most of them occur in 300 draws.
    distinct = {r.tobytes() for r in reachable}
    assert len({reachable[j].tobytes() for j in outcomes}) >= 0.8 * len(distinct)
    np.testing.assert_array_equal(record["labels"], labels)  # the record is not modified in place


def test_flip_probability_within_binomial_tolerance():
    labels = np.arange(10, dtype=np.int32).reshape(10, 1)
    record = {"image": labels.astype(np.float32)[..., None], "labels": labels}
    augment = pipeline.Augment(flip_axes=(0,), flip_probability=0.3, **NO_INTENSITY)
    n = 1000
    flipped = sum(augment.random_map(record, np.random.default_rng(i))["labels"][0, 0] == 9 for i in range(n))
    assert within_binomial(flipped, n, 0.3)


def intensity_only(**options):
    base = dict(NO_INTENSITY)
    base.update(options)
    return pipeline.Augment(**base)


def ramp_record():
    image = np.linspace(-2.0, 3.0, 60, dtype=np.float32).reshape(3, 4, 5, 1)
    return {"image": image, "labels": np.zeros((3, 4, 5), np.int32)}


def test_intensity_transforms_each_alone():
    record = ramp_record()
    x = record["image"].astype(np.float64)
    for i in range(20):
        rng = np.random.default_rng(i)
        out = intensity_only(scale_probability=1.0, scale_range=(0.5, 2.0)).random_map(record, rng)["image"]
        ratio = out / x
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-5) and 0.5 <= ratio.flat[0] <= 2.0
        out = intensity_only(shift_probability=1.0, shift_range=(-1.0, 1.0)).random_map(record, rng)["image"]
        diff = out - x
        assert np.allclose(diff, diff.flat[0], atol=1e-5) and -1.0 <= diff.flat[0] <= 1.0
        out = intensity_only(gamma_probability=1.0, gamma_range=(0.5, 2.0)).random_map(record, rng)["image"]
        # Range kept, and one exponent explains every voxel: (out - m) / (M - m) = ((x - m) / (M - m)) ** g.
        assert out.min() == pytest.approx(-2.0, abs=1e-5) and out.max() == pytest.approx(3.0, abs=1e-5)
        u, v = (x.ravel() + 2.0) / 5.0, (out.ravel() + 2.0) / 5.0
        g = np.log(v[30]) / np.log(u[30])
        assert 0.5 <= g <= 2.0
        np.testing.assert_allclose(v, u**g, atol=1e-5)
    noisy = intensity_only(noise_probability=1.0, noise_std_range=(0.2, 0.2)).random_map(
        {"image": np.zeros((40, 40, 10, 1), np.float32), "labels": np.zeros((40, 40, 10), np.int32)}, np.random.default_rng(0)
    )["image"]
    assert noisy.std() == pytest.approx(0.2, rel=0.03) and abs(noisy.mean()) < 0.01


def test_all_probabilities_zero_is_the_identity():
    record = ramp_record()
    out = pipeline.Augment(flip_axes=(0, 1), rotate90_axes=(0, 1), flip_probability=0.0, rotate90_probability=0.0,
                           **NO_INTENSITY).random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], record["image"])


def test_augment_argument_checks():
    with pytest.raises(ValueError, match="flip_axes"):
        pipeline.Augment(flip_axes=(0, 0))
    with pytest.raises(ValueError, match="rotate90_axes"):
        pipeline.Augment(rotate90_axes=(1, 1))
    with pytest.raises(ValueError, match="gamma_range"):
        pipeline.Augment(gamma_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="scale_probability"):
        pipeline.Augment(scale_probability=1.5)
    with pytest.raises(ValueError, match=r"axes \(2,\) do not all exist in a 2D patch"):
        pipeline.Augment(flip_axes=(2,)).random_map({"image": np.zeros((4, 4, 1)), "labels": np.zeros((4, 4), np.int32)},
                                                    np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# Source and determinism
# ----------------------------------------------------------------------------------------------


def test_volume_source_records_repr_and_errors():
    a, b = separated_organs(), np.zeros((10, 10), np.int32)
    source = pipeline.VolumeSource([volume(a, name="a"), volume(b, name="b")], num_records=5)
    assert len(source) == 5 and source.names == ("a", "b")
    np.testing.assert_array_equal(source[3]["labels"], b)  # record i is volume i % 2
    record = source[0]
    assert record["classes"].tolist() == [1, 2, 3] and record["class_counts"].tolist() == [900, 25, 1]
    assert record["class_voxels"][2].tolist() == [[80, 80]]
    assert repr(source) == repr(pipeline.VolumeSource([volume(a, name="a"), volume(b, name="b")], num_records=5))
    assert repr(source) != repr(pipeline.VolumeSource([volume(b, name="a"), volume(a, name="b")], num_records=5))
    with pytest.raises(ValueError, match="VolumeSource: x has no labels"):
        pipeline.VolumeSource([types.SimpleNamespace(name="x", image=np.zeros((2, 2, 1)), labels=None)])
    with pytest.raises(ValueError, match="no volumes"):
        pipeline.VolumeSource([])


def test_no_generator_is_a_clear_error():
    source = pipeline.VolumeSource([volume(np.zeros((8, 8), np.int32))])
    with pytest.raises(ValueError, match="give the IndexSampler a seed"):
        pipeline.PatchSampler((4, 4)).random_map(source[0], None)


def loader(source, seed, worker_count=0):
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=seed, num_epochs=1)
    operations = [pipeline.PatchSampler((8, 8), foreground_fraction=0.5),
                  pipeline.Augment(flip_axes=(0, 1), rotate90_axes=(0, 1), noise_probability=0.5),
                  grain.transforms.Batch(batch_size=4)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=worker_count)


def test_same_seed_same_patches_through_grain():
    source = pipeline.VolumeSource([volume(separated_organs(), coordinate_image((96, 96)))], num_records=16)
    first, second, other = (list(loader(source, seed)) for seed in (7, 7, 8))
    assert len(first) == 4
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_worker_processes_draw_the_same_patches():
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; train.py parses them
        flags.FLAGS.mark_as_parsed()
    source = pipeline.VolumeSource([volume(separated_organs(), coordinate_image((96, 96)))], num_records=16)

    def patches(worker_count):
        return sorted(np.array(x).tobytes() for batch in loader(source, 3, worker_count) for x in batch["image"])

    # Two workers batch their own records, so batches differ; the multiset of patches does not.
    assert patches(2) == patches(0)


# ----------------------------------------------------------------------------------------------
# Real samples (../shared/data)
# ----------------------------------------------------------------------------------------------


def shared(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real sample data not found at {os.path.normpath(path)} (see ../shared/data/SOURCES.md)")
    return path


ORGANS = {5: 1, 1: 2, 2: 3, 3: 4, 7: 5, 8: 6, 9: 7}  # liver, spleen, kidneys, pancreas, adrenal glands


def test_ct_sample_class_balanced_patches_reach_every_organ():
    folder = shared("totalsegmentator_ct")
    case = nifti.Case("ct", os.path.join(folder, "example_ct_sm.nii.gz"), os.path.join(folder, "example_seg.nii.gz"))
    ct = nifti.load_case(case, nifti.Preprocessing(modality="CT", label_map=ORGANS))
    source = pipeline.VolumeSource([ct])
    sampler = pipeline.PatchSampler((24, 24, 8), foreground_fraction=1.0)
    n = 700
    contains = np.zeros(8, np.int64)
    for patch in draw(sampler, source[0], n):
        assert patch["image"].shape == (24, 24, 8, 1)
        contains[np.unique(patch["labels"])] += 1
    # Each organ is the forced one in 1/7 of the patches, so it is in at least that many (the adrenal glands,
    # 152 and 184 of 370,000 voxels, included).
    for k in range(1, 8):
        assert contains[k] >= n / 7 - 4.5 * np.sqrt(n * (1 / 7) * (6 / 7)), (k, contains)


def test_sct_sample_2d_slices():
    folder = shared("sct_t2s")
    case = nifti.Case("t2s", os.path.join(folder, "t2s.nii.gz"),
                      (os.path.join(folder, "t2s_seg.nii.gz"), os.path.join(folder, "t2s_gmseg_manual.nii.gz")))
    mri = nifti.load_case(case, nifti.Preprocessing(modality="MRI"))
    source = pipeline.VolumeSource([mri])
    assert source[0]["class_counts"].tolist() == [2885 - 519, 519]
    patches = draw(pipeline.PatchSampler((32, 32), slice_axis=2, foreground_fraction=1.0), source[0], 100)
    assert all(p["image"].shape == (32, 32, 1) and p["labels"].max() > 0 for p in patches)
    assert sum(2 in p["labels"] for p in patches) >= 30  # grey matter is the forced class half of the time


MEMORY_PROBE = r'''
import glob, json, os, sys

from combo_jax.data import datasets, nifti, pipeline


def peak(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return max([int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")] or [0])
    except OSError:
        return 0


def main():
    root, workers = sys.argv[1], int(sys.argv[2])
    volumes = [nifti.read_volume_cache(p, os.path.basename(p)) for p in sorted(glob.glob(os.path.join(root, "v*")))]
    source = pipeline.VolumeSource(volumes, num_records=10_000)
    loader = datasets.make_loader(source, batch_size=2, shuffle=True, seed=0, num_epochs=None, worker_count=workers,
                                  operations=(pipeline.PatchSampler((96, 96, 32)), pipeline.Augment()))
    batches, worker_peak = iter(loader), 0
    for i in range(200):
        batch = next(batches)
        assert batch["image"].shape == (2, 96, 96, 32, 1) and batch["labels"].max() <= 2
        if i % 10 == 0:
            children = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                        and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
            worker_peak = max([worker_peak] + [peak(c) for c in children])
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the peak of the process before exec (the test runner's).
    print(json.dumps({"main": peak(os.getpid()), "workers": worker_peak,
                      "volumes": len(volumes)}))


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def big_cached_dataset(tmp_path_factory):
    """24 preprocessed 256^3 volumes in the cache format (1.9 GB on disk)."""
    import nibabel as nib

    from combo_jax.data import nifti

    root = tmp_path_factory.mktemp("big")
    ramp = np.linspace(-1, 1, 256, dtype=np.float32)[:, None, None, None]
    for i in range(24):
        labels = np.zeros((256, 256, 256), np.uint8)
        labels[40 + i:120 + i, 50:130, 60:140] = 1
        labels[150:160, 150:170, 100:110] = 2
        volume = nifti.Volume(name=f"v{i}", image=np.broadcast_to(ramp + np.float32(i), (256, 256, 256, 1)),
                              labels=labels, spacing=(1.0,) * 3, original_shape=(256,) * 3, original_spacing=(1.0,) * 3,
                              affine=np.eye(4), header=nib.Nifti1Header())
        nifti.write_volume_cache(str(root / f"v{i:02d}"), volume)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_stays_far_below_the_dataset_with_memory_mapped_volumes(big_cached_dataset, tmp_path, workers):
    """Each process, grain workers included, holds the patches it draws, not the volumes: a 1.9 GB dataset trains
    within 500 MB per process (the peak includes importing jax, about 200 MB)."""
    import json
    import subprocess
    import sys

    dataset_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(big_cached_dataset) for f in fs)
    assert dataset_bytes > 1.8e9
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    result = subprocess.run([sys.executable, str(probe), str(big_cached_dataset), str(workers)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["volumes"] == 24
    assert peaks["main"] < 500e6, peaks
    if workers:
        assert 0 < peaks["workers"] < 500e6, peaks


def test_a_memory_mapped_volume_gives_the_patches_of_the_same_volume_in_memory(tmp_path):
    import pickle

    import nibabel as nib

    rng = np.random.default_rng(3)
    labels = np.zeros((20, 18, 12), np.int32)
    labels[3:9, 4:10, 2:7], labels[12:14, 5:7, 8:10] = 1, 2
    volume = nifti.Volume(name="v", image=rng.normal(size=(20, 18, 12, 1)).astype(np.float32), labels=labels,
                          spacing=(1.0,) * 3, original_shape=(20, 18, 12), original_spacing=(1.0,) * 3,
                          affine=np.eye(4), header=nib.Nifti1Header())
    nifti.write_volume_cache(str(tmp_path / "v"), volume)
    mapped = nifti.read_volume_cache(str(tmp_path / "v"), "v")
    assert isinstance(mapped.image, np.memmap) and mapped.labels.dtype == np.uint8
    in_memory, on_disk = pipeline.VolumeSource([volume]), pipeline.VolumeSource([mapped])
    assert repr(in_memory) == repr(on_disk)
    assert len(pickle.dumps(on_disk)) < 20_000  # a worker gets file names and the small index, not the arrays
    sampler = pipeline.PatchSampler((8, 8, 8), foreground_fraction=0.5)
    for seed in range(12):
        a = sampler.random_map(in_memory[0], np.random.default_rng(seed))
        b = sampler.random_map(pickle.loads(pickle.dumps(on_disk))[0], np.random.default_rng(seed))
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert b["labels"].dtype == np.int32
