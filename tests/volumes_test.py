"""Training, evaluation and prediction on NIfTI volumes end to end: an MSD task folder written here, the two
real samples in ../shared/data (skipped when absent), and the errors a user's dataset can raise before training."""

import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from combo_jax import predict, training
from combo_jax.configs import msd, sct_gm, totalseg_ct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def _write(path, data, affine=AFFINE):
    nib.Nifti1Image(np.asarray(data), affine).to_filename(str(path))


def _case(rng, shape=(24, 20, 10)):
    """A body of soft tissue holding a large and a small box organ, with noise; labels 1 (large) and 2 (small)."""
    labels = np.zeros(shape, np.uint8)
    x, y, z = (int(rng.integers(2, 5)) for _ in range(3))
    labels[x : x + 10, y : y + 8, z : z + 5] = 1
    labels[x + 12 : x + 15, y + 2 : y + 5, z + 1 : z + 3] = 2
    image = np.where(labels == 1, 60.0, np.where(labels == 2, 140.0, 0.0)) + rng.normal(0, 20, shape)
    return image.astype(np.int16), labels


def make_msd_task(root, num_cases=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root / "imagesTr"), os.makedirs(root / "labelsTr"), os.makedirs(root / "imagesTs")
    training_list = []
    for i in range(num_cases):
        image, labels = _case(rng)
        _write(root / "imagesTr" / f"case_{i}.nii.gz", image)
        _write(root / "labelsTr" / f"case_{i}.nii.gz", labels)
        training_list.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    image, _ = _case(rng)
    _write(root / "imagesTs" / "new_0.nii.gz", image)
    meta = {"name": "Toy", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "big", "2": "small"},
            "training": training_list, "test": ["./imagesTs/new_0.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def tiny(config, cache_dir, steps=4):
    config.data.cache_dir = str(cache_dir)
    config.data.num_train = 16
    config.model.features = (4, 8)
    config.train.batch_size = 2
    config.train.eval_batch_size = 2
    config.train.num_steps = steps
    config.train.log_every = 2
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.optimizer.warmup_steps = 1
    return config


def msd_config(root, tmp_path, **data):
    config = tiny(msd.get_config(), tmp_path / "cache")
    config.data.root = str(root)
    # Class 1 is the dataset's label 2 and class 2 its label 1: predictions must write the dataset's ids back.
    config.data.organs = ("small", "big")
    config.data.label_ids = (2, 1)
    config.data.shape = (16, 16, 8)
    config.eval.window = (16, 16, 8)
    for key, value in data.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def msd_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("msd")
    root = make_msd_task(tmp_path / "Task01_Toy")
    config = msd_config(root, tmp_path, spacing=(3.0, 3.0, 2.0))
    workdir = str(tmp_path / "run")
    summary = training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return root, workdir, summary


def test_training_class_frequencies_are_those_of_the_training_cases(tmp_path):
    """config.loss.frequency_power reads the training cases' class frequencies, not the validation's."""
    from combo_jax.data import datasets

    root = make_msd_task(tmp_path / "Task01_Toy", num_cases=3)
    config = msd_config(root, tmp_path, spacing=(3.0, 3.0, 2.0))
    data = datasets.make_data(config)
    records = data.train_source._records
    assert len(records) == 2 and len(data.val_volumes) == 1
    labels = [r["labels"].open() if hasattr(r["labels"], "open") else r["labels"] for r in records]
    counts = sum(np.bincount(np.asarray(a).ravel(), minlength=3) for a in labels)
    np.testing.assert_allclose(data.train_shares, counts / counts.sum())
    val = np.bincount(np.asarray(data.val_volumes[0].labels).ravel(), minlength=3)
    np.testing.assert_allclose(data.shares, val / val.sum())


def test_an_organ_missing_from_the_training_cases_cannot_be_frequency_weighted(tmp_path):
    from combo_jax.config import ConfigError
    from combo_jax.data import datasets

    root = make_msd_task(tmp_path / "Task01_Toy", num_cases=3)
    for i in (0, 1):  # the small organ only in the validation case (the last)
        path = root / "labelsTr" / f"case_{i}.nii.gz"
        labels = np.asarray(nib.load(str(path)).dataobj)
        _write(path, np.where(labels == 2, 0, labels).astype(np.uint8))
    config = msd_config(root, tmp_path, spacing=(3.0, 3.0, 2.0))
    assert config.loss.name == "combo" and config.loss.frequency_power > 0
    with pytest.raises(ConfigError, match=r"organ\(s\) 'small' occur in no training case .*frequency_power=0"):
        datasets.make_data(config)
    config.loss.frequency_power = 0.0
    assert datasets.make_data(config).train_shares[1] == 0


def test_msd_folder_trains_and_reports_per_organ(msd_run):
    root, workdir, summary = msd_run
    written = json.load(open(os.path.join(workdir, "summary.json")))
    assert list(written["organs"]) == ["small", "big"]
    assert written["num_val_cases"] == 1 and written["spacing_mm"] == [3.0, 3.0, 2.0]
    for row in written["organs"].values():
        assert {"dice", "precision", "recall", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd", "share"} <= set(row)
    # The validation case's true organ volumes, in resampled voxels, match the dataset's label file.
    labels = np.asarray(nib.load(os.path.join(root, "labelsTr", "case_2.nii.gz")).dataobj)
    true_ml = {k: (labels == k).sum() * 1.5 * 1.5 * 2.0 / 1000 for k in (1, 2)}
    for k, name in ((1, "big"), (2, "small")):
        resampled_ml = written["organs"][name]["true_voxels"] * written["voxel_volume_ml"]
        assert resampled_ml == pytest.approx(true_ml[k], rel=0.35)
    report = open(os.path.join(workdir, "report.md")).read()
    assert "1 validation cases" in report or "2 training and 1 validation cases" in report
    assert "HD95" in report and "small" in report


def test_predict_writes_label_maps_on_the_scan_grid_with_its_affine(msd_run, tmp_path):
    root, workdir, _ = msd_run
    out = tmp_path / "pred"
    assert predict.main(["--workdir", workdir, "--input", str(root / "imagesTs"), "--output", str(out)]) == 0
    written = nib.load(str(out / "new_0.nii.gz"))
    scan = nib.load(str(root / "imagesTs" / "new_0.nii.gz"))
    assert written.shape == scan.shape  # back on the scan's 1.5 mm grid after predicting at 3 mm
    np.testing.assert_allclose(written.affine, scan.affine)
    ids = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(ids)) <= {0, 1, 2}
    record = json.load(open(out / "classes.json"))
    assert record["classes"] == {"background": 0, "small": 2, "big": 1} and record["values"] == "dataset label ids"
    assert record["outputs"] == {"new_0.nii.gz": str(root / "imagesTs" / "new_0.nii.gz")}
    # --class_indices writes 0..K-1 instead: the same prediction, relabelled.
    out2 = tmp_path / "pred_indices"
    assert predict.main(["--workdir", workdir, "--input", str(root / "imagesTs"), "--output", str(out2),
                         "--class_indices"]) == 0
    indices = np.asarray(nib.load(str(out2 / "new_0.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.array([0, 2, 1])[indices], ids)
    assert (ids > 0).any(), "the toy organs are found"


def test_predict_errors_name_the_problem(msd_run, tmp_path, capsys):
    root, workdir, _ = msd_run
    assert predict.main(["--workdir", str(tmp_path), "--input", str(root / "imagesTs"), "--output", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert predict.main(["--workdir", workdir, "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    _write(bad, np.full((8, 8, 4), np.nan, np.float32))
    assert predict.main(["--workdir", workdir, "--input", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert "NaN" in capsys.readouterr().err


def test_predict_never_overwrites_scans_or_earlier_predictions(msd_run, tmp_path, capsys):
    root, workdir, _ = msd_run
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (scans / name).write_bytes((root / "imagesTs" / "new_0.nii.gz").read_bytes())
    before = {p.name: p.read_bytes() for p in scans.iterdir()}

    def run(*args):
        return predict.main(["--workdir", workdir, "--input", str(scans), *args])

    assert run("--output", str(scans)) == 2  # the input folder itself
    assert "holds the input scans" in capsys.readouterr().err
    assert run("--output", str(tmp_path)) == 2  # a folder above it
    assert "holds the input scans" in capsys.readouterr().err
    assert run("--input", str(scans / "a.nii.gz"), "--output", str(scans)) == 2  # one scan, its own folder
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before
    out = tmp_path / "out"
    assert run("--output", str(out)) == 0
    first = (out / "a.nii.gz").read_bytes()
    assert run("--output", str(out)) == 2  # earlier predictions are kept unless --overwrite
    assert "--overwrite" in capsys.readouterr().err
    (out / "a.nii.gz").write_bytes(b"edited by hand")
    assert run("--output", str(out), "--overwrite") == 0
    assert (out / "a.nii.gz").read_bytes() == first


def test_predict_writes_every_good_scan_and_reports_every_bad_one(msd_run, tmp_path, capsys):
    root, workdir, _ = msd_run
    scans = tmp_path / "scans"
    scans.mkdir()
    good = (root / "imagesTs" / "new_0.nii.gz").read_bytes()
    (scans / "a.nii.gz").write_bytes(good)
    (scans / "b.nii.gz").write_bytes(good[: len(good) // 3])  # truncated
    (scans / "c.nii.gz").write_bytes(good)
    nib.save(nib.load(str(scans / "c.nii.gz")), str(scans / "c.nii"))  # same name, other file type
    out = tmp_path / "out"
    assert predict.main(["--workdir", workdir, "--input", str(scans), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 scan(s) failed" in err and "b.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c_nii.nii.gz", "c_nii_gz.nii.gz", "classes.json"]
    record = json.load(open(out / "classes.json"))
    assert record["outputs"]["c_nii.nii.gz"].endswith("c.nii") and list(record["failed"]) == [str(scans / "b.nii.gz")]


def _fails_before_training(config, workdir, match):
    with pytest.raises(ValueError, match=match):
        training.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert not os.path.exists(workdir)  # nothing written, not even the folder


def test_dataset_problems_fail_before_training(tmp_path):
    root = make_msd_task(tmp_path / "task")
    _fails_before_training(msd_config(tmp_path / "missing", tmp_path), tmp_path / "r1", "is not a folder")
    _fails_before_training(msd_config(root, tmp_path, label_ids=(1,)), tmp_path / "r2", "one dataset label id per organ")
    _fails_before_training(msd_config(root, tmp_path, num_val=3), tmp_path / "r3", "num_val=3 must hold out")
    _fails_before_training(msd_config(root, tmp_path, val_slab=(2, 4)), tmp_path / "r4", "splits a single case")
    # Label ids: one the dataset does not declare, one given twice, background.
    _fails_before_training(msd_config(root, tmp_path, label_ids=(2, 5)), tmp_path / "r8",
                           r"config.data.label_ids: 5 \(organ 'big'\) not among the label ids .*dataset.json declares \(0, 1, 2\)")
    _fails_before_training(msd_config(root, tmp_path, label_ids=(1, 1)), tmp_path / "r9",
                           r"names label id\(s\) \[1\] for more than one organ")
    _fails_before_training(msd_config(root, tmp_path, label_ids=(0, 1)), tmp_path / "r10", "0 is the background")
    config = msd_config(root, tmp_path)
    config.data.augment.gamma = 0.3
    _fails_before_training(config, tmp_path / "r5", r"config.data.augment has unknown options \['gamma'\]")
    # A broken scan: named, with what is wrong, before the first step.
    _write(root / "imagesTr" / "case_1.nii.gz", np.full((24, 20, 10), np.inf, np.float32))
    _fails_before_training(msd_config(root, tmp_path / "fresh"), tmp_path / "r6", r"case_1.nii.gz: .* NaN or infinite")
    _write(root / "labelsTr" / "case_0.nii.gz", np.full((24, 20, 10), 7, np.uint8))
    _fails_before_training(msd_config(root, tmp_path / "fresh2"), tmp_path / "r7", r"case_0.nii.gz")


def _shared(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"the real samples are not present at {path} (see ../shared/data/SOURCES.md)")


@pytest.mark.parametrize("module, folder, organs", [
    (totalseg_ct, "totalsegmentator_ct",
     ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal_gland_right", "adrenal_gland_left"]),
    (sct_gm, "sct_t2s", ["white_matter", "grey_matter"]),
])
def test_real_sample_config_trains_end_to_end(module, folder, organs, tmp_path):
    _shared(folder)
    config = tiny(module.get_config(), tmp_path / "cache", steps=3)
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    written = json.load(open(os.path.join(workdir, "summary.json")))
    assert list(written["organs"]) == organs
    assert all(row["true_voxels"] > 0 for row in written["organs"].values()), "every organ is in the validation slab"
    report = open(os.path.join(workdir, "report.md")).read()
    assert "validation on slices" in report and "not a benchmark" in report
    assert os.path.getsize(os.path.join(workdir, "predictions.png")) > 1000
