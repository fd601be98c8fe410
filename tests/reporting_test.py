"""What a run writes for people: metrics.jsonl (one row per step after any interruption), TensorBoard tags,
colours and the legend of predictions.png."""

import json
import os

import numpy as np
import pytest

from combo_jax import reporting


def _write(path, rows, tail=""):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_resumed_log_drops_rows_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"step": 6, "split": "eval", "mean_fg_dice": 0.5}]
    _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 9, "lo')  # killed mid-line
    log = reporting.MetricsLog(str(tmp_path), resume_step=4)
    log.write({"step": 5, "loss": 0.2})
    log.close()
    kept = reporting.read_rows(str(tmp_path))
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5] and kept[-1]["loss"] == 0.2
    # A new run (no checkpoint) starts from an empty log.
    reporting.MetricsLog(str(tmp_path), resume_step=0).close()
    assert reporting.read_rows(str(tmp_path)) == []


def test_a_link_planted_at_metrics_jsonl_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    log = reporting.MetricsLog(str(tmp_path), resume_step=0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "metrics.jsonl")


def test_tensorboard_gets_per_organ_metrics_and_a_prediction_image(tmp_path):
    log = reporting.MetricsLog(str(tmp_path), resume_step=0)
    log.write({"step": 3, "split": "eval", "mean_fg_dice": 0.5,
               "organs": {"liver": {"dice": 0.9, "precision": 0.8, "recall": 0.7, "fp_voxels": 3}}})
    example = (np.random.default_rng(0).normal(size=(16, 16, 1)), np.eye(16, dtype=int), np.eye(16, dtype=int) * 2)
    log.image("eval/prediction", reporting.example_strip(example, 3, 0), 3)
    log.close()
    events = b"".join(open(os.path.join(tmp_path, n), "rb").read() for n in os.listdir(tmp_path) if "tfevents" in n)
    for tag in (b"eval/mean_fg_dice", b"eval_dice/liver", b"eval_precision/liver", b"eval_recall/liver",
                b"eval/prediction"):
        assert tag in events, tag


@pytest.mark.parametrize("k", [2, 7, 11, 21, 22, 118])
def test_class_colours_are_distinct_for_any_number_of_classes(k):
    colors = reporting.class_colors(k)
    assert colors.shape == (k, 3) and np.all(colors[0] == 0) and np.all((colors >= 0) & (colors <= 1))
    assert len({tuple(np.round(c, 4)) for c in colors}) == k


def test_the_strip_shows_image_truth_and_prediction_in_class_colours():
    labels = np.zeros((8, 8), int)
    labels[2:4, 2:4] = 2
    pred = np.zeros((8, 8), int)
    pred[5:7, 5:7] = 1
    strip = reporting.example_strip((np.ones((8, 8, 1)), labels, pred), 3, 0)
    colors = reporting.class_colors(3)
    assert strip.shape == (8, 24, 3)
    np.testing.assert_allclose(strip[3, 8 + 3], colors[2])  # truth panel, organ 2
    np.testing.assert_allclose(strip[6, 16 + 6], colors[1])  # prediction panel, organ 1
    np.testing.assert_allclose(strip[0, 16], colors[0])


def test_predictions_png_has_a_legend_of_the_organs(tmp_path):
    names = ("background", "liver", "spleen", "adrenal")
    example = (np.zeros((8, 8, 8, 1)), np.full((8, 8, 8), 3), np.ones((8, 8, 8), int))
    fig = reporting.prediction_figure([example, example], names, slice_axis=2)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "spleen", "adrenal"]
    reporting.plot_predictions([example], str(tmp_path / "p.png"), names, slice_axis=2)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
