"""Tests for combo_jax.data.nifti: layouts, checks, preprocessing, cache and writing, on small NIfTI files
written here with known affines, and on the real samples in ../shared/data when that folder is present."""

import json
import os
import re
import statistics

import nibabel as nib
import numpy as np
import pytest

from combo_jax.data import nifti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 3.0, 0, 5.0], [0, 0, 4.0, 20.0], [0, 0, 0, 1]])


def write(path, data, affine=AFFINE, *, qform_code=1, sform_code=2):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    img.to_filename(str(path))
    return str(path)


def make_case(tmp_path, image, labels, name="c", affine=AFFINE, label_affine=None):
    image_path = write(tmp_path / f"{name}.nii.gz", image, affine)
    label_path = None if labels is None else write(tmp_path / f"{name}_seg.nii.gz", labels, affine if label_affine is None else label_affine)
    return nifti.Case(name, image_path, label_path)


def blocky_labels(shape, block, num_classes=4, seed=0):
    """A label map constant on blocks of `block` voxels (shape divisible by block)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes, [s // b for s, b in zip(shape, block)])
    for axis, b in enumerate(block):
        coarse = np.repeat(coarse, b, axis=axis)
    return coarse.astype(np.uint8)


MRI = nifti.Preprocessing(modality="MRI")


# ----------------------------------------------------------------------------------------------
# Loading and normalization
# ----------------------------------------------------------------------------------------------


def test_round_trip_keeps_voxel_order_affine_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(-100, 100, (6, 5, 4)).astype(np.int16)
    labels = rng.integers(0, 3, (6, 5, 4)).astype(np.uint8)
    volume = nifti.load_case(make_case(tmp_path, image, labels), MRI)
    assert volume.image.shape == (6, 5, 4, 1) and volume.image.dtype == np.float32
    assert volume.labels.dtype == np.int32
    np.testing.assert_array_equal(volume.labels, labels)
    np.testing.assert_allclose(volume.affine, AFFINE)
    assert volume.spacing == (2.0, 3.0, 4.0) and volume.original_shape == (6, 5, 4)
    assert not volume.resampled
    # The file's voxel order is kept: the normalized image is a monotone map of the stored voxels.
    x = image.astype(np.float64)
    np.testing.assert_allclose(volume.image[..., 0], (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-5)
    assert int(volume.header["sform_code"]) == 2 and int(volume.header["qform_code"]) == 1


def test_ct_window_then_zscore_matches_hand_computation(tmp_path):
    values = [-1000.0, -175.0, 0.0, 100.0, 250.0, 3000.0]
    image = np.array(values, np.float32).reshape(1, 2, 3)
    volume = nifti.load_case(make_case(tmp_path, image, None), nifti.Preprocessing(modality="CT", ct_window=(-175, 250)))
    clipped = [-175.0, -175.0, 0.0, 100.0, 250.0, 250.0]
    mean, std = statistics.fmean(clipped), statistics.pstdev(clipped)
    assert mean == pytest.approx(250.0 / 6)
    np.testing.assert_allclose(volume.image.ravel(), [(c - mean) / std for c in clipped], rtol=1e-6)
    assert volume.labels is None


def test_mri_zscore_uses_the_whole_volume_and_constant_volume_is_zero(tmp_path):
    values = [1.0, 2.0, 4.0, 8.0]
    volume = nifti.load_case(make_case(tmp_path, np.array(values, np.float32).reshape(2, 2, 1), None), MRI)
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    np.testing.assert_allclose(volume.image.ravel(), [(v - mean) / std for v in values], rtol=1e-6)
    const = nifti.load_case(make_case(tmp_path, np.full((2, 2, 2), 7.0, np.float32), None, name="k"), MRI)
    np.testing.assert_array_equal(const.image, 0.0)


def test_size_one_fourth_axis_is_dropped_and_2d_files_get_a_third_axis(tmp_path):
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)
    labels = (np.arange(24).reshape(2, 3, 4, 1) % 2).astype(np.uint8)
    volume = nifti.load_case(make_case(tmp_path, image, labels), MRI)
    assert volume.image.shape == (2, 3, 4, 1) and volume.labels.shape == (2, 3, 4)
    flat = nifti.load_case(make_case(tmp_path, np.ones((3, 5), np.float32), None, name="flat"), MRI)
    assert flat.image.shape == (3, 5, 1, 1)


def test_label_map_remaps_and_drops_unlisted_ids(tmp_path):
    labels = np.array([0, 1, 3, 5, 7, 5], np.uint8).reshape(1, 2, 3)
    pre = nifti.Preprocessing(modality="MRI", label_map={5: 1, 1: 2, 3: 2})
    volume = nifti.load_case(make_case(tmp_path, np.zeros((1, 2, 3), np.float32), labels), pre)
    np.testing.assert_array_equal(volume.labels.ravel(), [0, 2, 2, 1, 0, 1])
    assert pre.num_classes == 3
    # String keys (as a config file gives them) are accepted and hash the same.
    assert nifti.Preprocessing(modality="MRI", label_map={"5": 1, "1": 2, "3": 2}) == pre


def test_label_map_must_cover_its_classes():
    with pytest.raises(ValueError, match=r"label_map classes must cover 1..3; no id maps to \[2\]"):
        nifti.Preprocessing(label_map={4: 1, 9: 3})


def test_label_map_from_names():
    names = {0: "background", 1: "spleen", 5: "liver", 7: "pancreas"}
    assert nifti.label_map_from_names(names, ["liver", "spleen"]) == {5: 1, 1: 2}
    with pytest.raises(nifti.DatasetError, match="kidney"):
        nifti.label_map_from_names(names, ["kidney"])


def test_combine_masks_paints_later_masks_over_earlier():
    cord = np.array([[0, 1, 1, 1, 0]])
    grey = np.array([[0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(nifti.combine_masks([cord, grey]), [[0, 1, 2, 1, 0]])


def test_case_with_mask_files(tmp_path):
    cord = np.zeros((4, 4, 2), np.uint8)
    cord[1:3, 1:3] = 1
    grey = np.zeros_like(cord)
    grey[1, 1, 0] = 1
    case = nifti.Case("m", write(tmp_path / "m.nii.gz", np.ones((4, 4, 2), np.float32)),
                      (write(tmp_path / "cord.nii.gz", cord), write(tmp_path / "grey.nii.gz", grey)))
    volume = nifti.load_case(case, MRI)
    assert np.bincount(volume.labels.ravel()).tolist() == [32 - 8, 7, 1]
    bad = cord * 2
    case = nifti.Case("m", case.image, (write(tmp_path / "bad.nii.gz", bad), case.label[1]))
    with pytest.raises(nifti.DatasetError, match=r"bad\.nii\.gz: a mask must hold 0 and 1 only"):
        nifti.load_case(case, MRI)


# ----------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------


def test_resampling_shape_spacing_and_affine_kept(tmp_path):
    shape = (10, 7, 5)
    case = make_case(tmp_path, np.zeros(shape, np.float32), np.zeros(shape, np.uint8))
    volume = nifti.load_case(case, nifti.Preprocessing(modality="MRI", spacing=(1.0, 2.0, 6.0)))
    # round(10 * 2 / 1) = 20, round(7 * 3 / 2) = round(10.5) = 10, round(5 * 4 / 6) = round(3.33) = 3.
    assert volume.image.shape == (20, 10, 3, 1) and volume.labels.shape == (20, 10, 3)
    assert volume.spacing == (1.0, 2.0, 6.0) and volume.original_spacing == (2.0, 3.0, 4.0)
    assert volume.original_shape == shape and volume.resampled
    np.testing.assert_allclose(volume.affine, AFFINE)  # the file's affine, for writing predictions


def test_linear_resampling_of_a_ramp_is_exact():
    x, y, z = np.meshgrid(np.arange(8.0), np.arange(6.0), np.arange(4.0), indexing="ij")
    ramp = 3.0 * x + 2.0 * y - z + 7.0
    # Down by 2 along x and y: output voxel i samples input position 2i + 1/2.
    out = nifti.resample(ramp, (2.0, 2.0, 1.0), (4, 3, 4), order=1)
    i, j, k = np.meshgrid(np.arange(4.0), np.arange(3.0), np.arange(4.0), indexing="ij")
    np.testing.assert_allclose(out, 3.0 * (2 * i + 0.5) + 2.0 * (2 * j + 0.5) - k + 7.0, rtol=1e-12, atol=1e-9)
    # Up by 2 along z: output voxel k samples (k + 1/2) / 2 - 1/2; interior samples are exact, the two outer
    # ones take the edge value.
    up = nifti.resample(ramp, (1.0, 1.0, 0.5), (8, 6, 8), order=1)
    pos = (np.arange(8) + 0.5) / 2 - 0.5
    expected = 3.0 * x[..., :1] + 2.0 * y[..., :1] - np.clip(pos, 0, 3) + 7.0
    np.testing.assert_allclose(up, expected, atol=1e-9)


def test_nearest_resampling_picks_hand_computed_voxels():
    labels = np.arange(8).reshape(8, 1, 1)
    # Down by 2: positions 2i + 1/2, rounded up: voxels 1, 3, 5, 7.
    np.testing.assert_array_equal(nifti.resample(labels, (2.0, 1.0, 1.0), (4, 1, 1), order=0).ravel(), [1, 3, 5, 7])
    # Up by 2: positions i/2 - 1/4: voxels 0, 0, 1, 1, 2, 2, ...
    np.testing.assert_array_equal(nifti.resample(labels, (0.5, 1.0, 1.0), (16, 1, 1), order=0).ravel(), np.arange(16) // 2)


def test_blocky_label_map_survives_resampling_and_back(tmp_path):
    labels = blocky_labels((8, 6, 4), (2, 3, 1))
    image = labels.astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    case = make_case(tmp_path, image, labels, affine=affine)
    for spacing in [(2.0, 3.0, 1.0), (0.5, 1.5, 0.25)]:
        volume = nifti.load_case(case, nifti.Preprocessing(modality="MRI", spacing=spacing))
        assert volume.labels.shape == nifti.resampled_shape((8, 6, 4), (1, 1, 1), spacing)
        np.testing.assert_array_equal(nifti.to_original_grid(volume.labels, volume), labels)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def test_cache_hit_does_not_decode_nifti(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    case = make_case(tmp_path, rng.normal(size=(6, 6, 3)).astype(np.float32), rng.integers(0, 3, (6, 6, 3)).astype(np.uint8))
    cache = tmp_path / "cache"
    pre = nifti.Preprocessing(modality="MRI", spacing=(1.0, 1.5, 4.0))
    first = nifti.load_case(case, pre, cache_dir=str(cache))
    (cached,) = os.listdir(cache)  # one folder, no temporary left behind
    assert cached.startswith("c-") and sorted(os.listdir(cache / cached)) == [
        "foreground.npz", "header.bin", "image.npy", "labels.npy", "meta.json"]
    assert isinstance(first.image, np.memmap) and isinstance(first.labels, np.memmap)  # not read into memory

    def fail(*args, **kwargs):
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nib, "load", fail)
    second = nifti.load_case(case, pre, cache_dir=str(cache))
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.affine, first.affine)
    assert second.spacing == first.spacing and second.original_shape == first.original_shape
    assert second.header.binaryblock == first.header.binaryblock
    assert second.labels.dtype == np.uint8  # stored compactly
    counts = np.bincount(np.asarray(second.labels).ravel(), minlength=3)
    assert second.foreground["class_counts"].tolist() == counts[1:][counts[1:] > 0].tolist()
    # Another preprocessing, or a touched file, is a miss (which here reaches the failing nibabel.load).
    with pytest.raises(nifti.DatasetError, match="nibabel.load called on a cache hit"):
        nifti.load_case(case, nifti.Preprocessing(modality="CT", spacing=(1.0, 1.5, 4.0)), cache_dir=str(cache))
    os.utime(case.label, ns=(1, 1))
    with pytest.raises(nifti.DatasetError, match="nibabel.load called on a cache hit"):
        nifti.load_case(case, pre, cache_dir=str(cache))


def test_unreadable_cache_file_is_recomputed(tmp_path):
    case = make_case(tmp_path, np.ones((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8))
    cache = tmp_path / "cache"
    nifti.load_case(case, MRI, cache_dir=str(cache))
    (path,) = [cache / f for f in os.listdir(cache)]
    (path / "image.npy").write_bytes(b"truncated")
    volume = nifti.load_case(case, MRI, cache_dir=str(cache))
    assert volume.image.shape == (2, 2, 2, 1)
    assert np.load(path / "image.npy").shape == (2, 2, 2, 1)  # rewritten
    assert os.listdir(cache) == [path.name]


# ----------------------------------------------------------------------------------------------
# Writing predictions
# ----------------------------------------------------------------------------------------------


def test_save_labels_resamples_back_and_keeps_affine_and_codes(tmp_path):
    labels = blocky_labels((8, 6, 4), (2, 2, 2))
    affine = np.array([[0.0, 0, -1.0, 3.0], [1.0, 0, 0, -2.0], [0, 1.0, 0, 7.0], [0, 0, 0, 1]])  # permuted axes
    case = make_case(tmp_path, labels.astype(np.float32), labels, affine=affine)
    volume = nifti.load_case(case, nifti.Preprocessing(modality="MRI", spacing=(2.0, 2.0, 2.0)))
    assert volume.labels.shape == (4, 3, 2)
    out = tmp_path / "pred.nii.gz"
    nifti.save_labels(out, volume.labels, volume)
    img = nib.load(out)
    assert img.shape == (8, 6, 4) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)


def test_save_labels_widens_dtype_for_many_classes(tmp_path):
    volume = nifti.load_case(make_case(tmp_path, np.zeros((2, 2, 2), np.float32), None), MRI)
    labels = np.full((2, 2, 2), 300)
    nifti.save_labels(tmp_path / "wide.nii.gz", labels, volume)
    img = nib.load(tmp_path / "wide.nii.gz")
    assert img.get_data_dtype() == np.int16 and int(np.asarray(img.dataobj).max()) == 300
    with pytest.raises(ValueError, match="fit neither"):
        nifti.save_labels(tmp_path / "x.nii.gz", np.zeros((3, 2, 2), np.int32), volume)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def make_msd(root, names=("a", "b"), *, json_file=True, suffix=""):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    for n in names:
        write(root / "imagesTr" / f"{n}{suffix}.nii.gz", np.zeros((3, 3, 2), np.int16))
        write(root / "labelsTr" / f"{n}.nii.gz", np.zeros((3, 3, 2), np.uint8))
    write(root / "imagesTs" / "t.nii.gz", np.zeros((3, 3, 2), np.int16))
    if json_file:
        meta = {
            "name": "Toy", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
            "test": ["./imagesTs/t.nii.gz"],
        }
        (root / "dataset.json").write_text(json.dumps(meta))


def test_read_msd_with_dataset_json(tmp_path):
    make_msd(tmp_path)
    info = nifti.read_msd(str(tmp_path))
    assert info.name == "Toy" and info.modalities == ("CT",)
    assert info.label_names == {0: "background", 1: "liver", 2: "tumour"} and info.label_ids == (0, 1, 2)
    assert [c.name for c in info.cases] == ["a", "b"]
    assert info.cases[1].image == os.path.join(str(tmp_path), "imagesTr", "b.nii.gz")
    assert info.cases[1].label == os.path.join(str(tmp_path), "labelsTr", "b.nii.gz")
    assert [(c.name, c.label) for c in info.test_cases] == [("t", None)]


def test_read_msd_folder_without_json_matches_names(tmp_path):
    make_msd(tmp_path, json_file=False, suffix="_0000")
    (tmp_path / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"resource fork")
    info = nifti.read_msd(str(tmp_path))
    assert [(c.name, os.path.basename(c.image), os.path.basename(c.label)) for c in info.cases] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b_0000.nii.gz", "b.nii.gz")]
    assert info.label_ids is None


def test_read_nnunet_v2_dataset_json(tmp_path):
    make_msd(tmp_path, json_file=False, suffix="_0000")
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "cord": 1, "grey": 2}, "numTraining": 2,
            "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = nifti.read_msd(str(tmp_path))
    assert [c.name for c in info.cases] == ["a", "b"] and info.modalities == ("MRI",)
    assert info.label_names == {0: "background", 1: "cord", 2: "grey"}


def test_multi_channel_cases_are_rejected(tmp_path):
    make_msd(tmp_path, json_file=False, suffix="_0000")
    write(tmp_path / "imagesTr" / "a_0001.nii.gz", np.zeros((3, 3, 2), np.int16))
    with pytest.raises(nifti.DatasetError, match=r"case 'a' has several image files \(a_0000\.nii\.gz, a_0001\.nii\.gz\)"):
        nifti.read_msd(str(tmp_path))


def test_from_pairs_names_cases():
    cases = nifti.from_pairs([("/d/x.nii.gz", "/d/x_seg.nii.gz"), ("/d/y.nii", ["/d/m1.nii", "/d/m2.nii"]), ("/d/z.nii.gz", None)])
    assert cases == (nifti.Case("x", "/d/x.nii.gz", "/d/x_seg.nii.gz"), nifti.Case("y", "/d/y.nii", ("/d/m1.nii", "/d/m2.nii")),
                     nifti.Case("z", "/d/z.nii.gz", None))


# ----------------------------------------------------------------------------------------------
# Bad input: each error names the file and the problem
# ----------------------------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path):
    with pytest.raises(nifti.DatasetError, match="neither a dataset.json nor imagesTr"):
        nifti.read_msd(str(tmp_path))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(nifti.DatasetError, match="imagesTr/ holds no"):
        nifti.read_msd(str(tmp_path))
    with pytest.raises(nifti.DatasetError, match="empty"):
        nifti.from_pairs([])


def test_empty_training_list(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [], "labels": {"0": "background"}}))
    with pytest.raises(nifti.DatasetError, match=re.escape(str(tmp_path / "dataset.json")) + '.*"training" list is missing or empty'):
        nifti.read_msd(str(tmp_path))


def test_dataset_json_referencing_missing_files(tmp_path):
    make_msd(tmp_path)
    os.remove(tmp_path / "labelsTr" / "b.nii.gz")
    with pytest.raises(nifti.DatasetError, match=r"references 1 missing file\(s\): .*labelsTr/b\.nii\.gz"):
        nifti.read_msd(str(tmp_path))


def test_unmatched_image_in_folder_layout(tmp_path):
    make_msd(tmp_path, json_file=False)
    os.remove(tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(nifti.DatasetError, match=r"images without a label in labelsTr/: \['a\.nii\.gz'\]"):
        nifti.read_msd(str(tmp_path))


def test_missing_file(tmp_path):
    case = nifti.Case("gone", str(tmp_path / "gone.nii.gz"), None)
    with pytest.raises(nifti.DatasetError, match=re.escape(str(tmp_path / "gone.nii.gz")) + ": file not found"):
        nifti.load_case(case, MRI)
    with pytest.raises(nifti.DatasetError, match="gone.nii.gz"):
        nifti.load_case(case, MRI, cache_dir=str(tmp_path / "cache"))


def test_not_a_nifti_file(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(nifti.DatasetError, match=r"junk\.nii\.gz: not a readable NIfTI file"):
        nifti.load_case(nifti.Case("j", str(tmp_path / "junk.nii.gz")), MRI)


def test_image_and_label_of_different_shapes(tmp_path):
    case = make_case(tmp_path, np.zeros((4, 4, 2), np.float32), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(nifti.DatasetError, match=r"c_seg\.nii\.gz: label grid \(4, 4, 3\) differs from the image grid \(4, 4, 2\)"):
        nifti.load_case(case, MRI)


def test_image_and_label_of_different_affines(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    case = make_case(tmp_path, np.zeros((4, 4, 2), np.float32), np.zeros((4, 4, 2), np.uint8), label_affine=shifted)
    with pytest.raises(nifti.DatasetError, match=r"c_seg\.nii\.gz: label affine differs .*largest difference 0\.5"):
        nifti.load_case(case, MRI)
    tiny = AFFINE.copy()
    tiny[0, 3] += 1e-5  # float32 header rounding: accepted
    ok = make_case(tmp_path, np.zeros((4, 4, 2), np.float32), np.zeros((4, 4, 2), np.uint8), name="ok", label_affine=tiny)
    nifti.load_case(ok, MRI)


def test_label_values_not_declared_by_the_dataset(tmp_path):
    labels = np.array([0, 1, 2, 9], np.uint8).reshape(2, 2, 1)
    case = make_case(tmp_path, np.zeros((2, 2, 1), np.float32), labels)
    with pytest.raises(nifti.DatasetError, match=r"c_seg\.nii\.gz: label values \[9\] are not ids of the dataset"):
        nifti.load_case(case, MRI, label_ids=(0, 1, 2))
    # With a label_map, undeclared values are still an error (a map only chooses among declared ids).
    with pytest.raises(nifti.DatasetError, match=r"label values \[9\]"):
        nifti.load_case(case, nifti.Preprocessing(modality="MRI", label_map={1: 1}), label_ids=(0, 1, 2))


def test_non_integer_and_negative_labels(tmp_path):
    case = make_case(tmp_path, np.zeros((2, 2, 1), np.float32), np.array([0, 1, 1.5, 2], np.float32).reshape(2, 2, 1))
    with pytest.raises(nifti.DatasetError, match=r"c_seg\.nii\.gz: label values must be integers; found 1 voxels like \[1\.5\]"):
        nifti.load_case(case, MRI)
    case = make_case(tmp_path, np.zeros((2, 2, 1), np.float32), np.array([0, -1, 1, 2], np.int16).reshape(2, 2, 1), name="n")
    with pytest.raises(nifti.DatasetError, match=r"n_seg\.nii\.gz: negative label values \[-1\]"):
        nifti.load_case(case, MRI)


def test_nan_or_inf_image_voxels(tmp_path):
    image = np.zeros((2, 2, 2), np.float32)
    image[0, 0, 0], image[1, 1, 1] = np.nan, np.inf
    with pytest.raises(nifti.DatasetError, match=r"c\.nii\.gz: 2 of 8 image voxels are NaN or infinite"):
        nifti.load_case(make_case(tmp_path, image, None), MRI)


def test_4d_image(tmp_path):
    case = make_case(tmp_path, np.zeros((3, 3, 2, 2), np.float32), None)
    with pytest.raises(nifti.DatasetError, match=r"c\.nii\.gz: 4D image of shape \(3, 3, 2, 2\)"):
        nifti.load_case(case, MRI)


def test_check_dataset_reports_every_bad_case(tmp_path):
    good = make_case(tmp_path, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), name="good")
    nan = make_case(tmp_path, np.full((2, 2, 2), np.nan, np.float32), np.zeros((2, 2, 2), np.uint8), name="nan")
    shape = make_case(tmp_path, np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 3), np.uint8), name="shape")
    with pytest.raises(nifti.DatasetError) as err:
        nifti.check_dataset([good, nan, shape], MRI)
    message = str(err.value)
    assert "2 of 3 case(s)" in message and "nan.nii.gz" in message and "shape_seg.nii.gz" in message
    assert "good" not in message
    missing = nifti.Case("m", str(tmp_path / "m.nii.gz"), str(tmp_path / "m_seg.nii.gz"))
    with pytest.raises(nifti.DatasetError, match=r"2 missing file\(s\): .*m\.nii\.gz \(case 'm'\)"):
        nifti.load_dataset([good, missing], MRI)
    assert len(nifti.load_dataset([good], MRI)) == 1


def test_preprocessing_argument_checks():
    with pytest.raises(ValueError, match="spacing must be three positive"):
        nifti.Preprocessing(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="modality must be 'CT' or 'MRI', got 'PET'"):
        nifti.Preprocessing(modality="PET")
    with pytest.raises(ValueError, match="maps an id twice"):
        nifti.Preprocessing(label_map={"5": 1, 5: 2})
    with pytest.raises(ValueError, match="label_map is empty"):
        nifti.Preprocessing(label_map={})
    with pytest.raises(ValueError, match="ct_window"):
        nifti.Preprocessing(ct_window=(100, -100))


# ----------------------------------------------------------------------------------------------
# Real samples (../shared/data)
# ----------------------------------------------------------------------------------------------

ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal_gland_right", "adrenal_gland_left"]


def shared(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real sample data not found at {os.path.normpath(path)} (see ../shared/data/SOURCES.md)")
    return path


def test_totalsegmentator_ct_sample(tmp_path):
    folder = shared("totalsegmentator_ct")
    with open(os.path.join(folder, "labels.json")) as f:
        meta = json.load(f)
    label_names = {int(k): v for k, v in meta["label_names"].items()} | {0: "background"}
    (case,) = nifti.from_pairs([(os.path.join(folder, "example_ct_sm.nii.gz"), os.path.join(folder, "example_seg.nii.gz"))])
    pre = nifti.Preprocessing(modality="CT", label_map=nifti.label_map_from_names(label_names, ORGANS))
    volume = nifti.load_case(case, pre, label_ids=sorted(label_names), cache_dir=str(tmp_path))
    assert volume.image.shape == (122, 101, 30, 1) and volume.spacing == (3.0, 3.0, 3.0)
    counts = np.bincount(volume.labels.ravel(), minlength=len(ORGANS) + 1)
    voxels = {v["name"]: v["voxels"] for v in meta["present"].values()}
    assert counts[1:].tolist() == [voxels[n] for n in ORGANS]
    assert counts[0] == 122 * 101 * 30 - sum(voxels[n] for n in ORGANS)
    assert voxels["adrenal_gland_right"] == 152  # the rarest kept organ, 0.04% of the voxels
    assert abs(float(volume.image.mean())) < 1e-5 and float(volume.image.std()) == pytest.approx(1.0, rel=1e-4)


def test_sct_t2s_sample_cord_and_grey_matter_masks():
    folder = shared("sct_t2s")
    case = nifti.Case("t2s", os.path.join(folder, "t2s.nii.gz"),
                      (os.path.join(folder, "t2s_seg.nii.gz"), os.path.join(folder, "t2s_gmseg_manual.nii.gz")))
    volume = nifti.load_case(case, nifti.Preprocessing(modality="MRI"))
    assert volume.image.shape == (49, 54, 9, 1)
    np.testing.assert_allclose(volume.spacing, (0.5, 0.5, 7.5), rtol=1e-6)
    # SOURCES.md: cord 2,885 voxels, grey matter 519 inside it: white matter is 2,885 - 519.
    assert np.bincount(volume.labels.ravel()).tolist() == [49 * 54 * 9 - 2885, 2885 - 519, 519]
