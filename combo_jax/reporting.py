"""What a run writes for people to read: ``metrics.jsonl``, TensorBoard events, ``report.md``, ``summary.json`` and
``predictions.png``. Only process 0 writes.

``metrics.jsonl`` holds exactly one row per logged step after any interruption: a resumed run first drops the
rows of steps after the checkpoint it resumed from (a killed run may have logged them; they are logged again),
and a run stopped by a signal writes the rows of its last steps before it saves. TensorBoard events after the
resumed step are purged the same way.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from combo_jax.workdir import write_bytes_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_rows(workdir: str) -> list[dict]:
    """The rows of ``metrics.jsonl`` (an unfinished last line, from a killed run, is left out)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class MetricsLog:
    """metrics.jsonl rows and TensorBoard scalars and images, for process 0 (a no-op elsewhere).

    ``resume_step``: the step the run continues from (0 for a new run); rows after it are dropped first.
    """

    def __init__(self, workdir: str, *, resume_step: int, active: bool = True):
        self.active = active
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if not active:
            return
        rows = read_rows(workdir)
        kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= resume_step]
        if os.path.exists(self.path) or os.path.islink(self.path):
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(workdir, flush_secs=10, purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict) -> None:
        if not self.active:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        split = row.get("split", "train")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{split}/{key}", value, step)
        for organ, values in (row.get("organs") or {}).items():
            for key in ("dice", "precision", "recall"):
                if key in values:
                    self.tb.add_scalar(f"{split}_{key}/{organ}", values[key], step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """An (H, W, 3) float image in [0, 1]."""
        if self.active:
            self.tb.add_image(tag, rgb, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------------
# Colours and pictures of label maps
# --------------------------------------------------------------------------------------------------


def class_colors(num_classes: int) -> np.ndarray:
    """(K, 3) RGB in [0, 1]: black background, then distinct colours for any number of classes.

    Up to 20 organs take matplotlib's tab10/tab20 colours; beyond, hues step by the golden angle with three
    alternating lightness levels, so neighbouring class ids never look alike.
    """
    colors = [(0.0, 0.0, 0.0)]
    organs = num_classes - 1
    if organs <= 20:
        from matplotlib import colormaps

        table = colormaps["tab10" if organs <= 10 else "tab20"].colors
        colors += [tuple(table[i]) for i in range(organs)]
    else:
        for i in range(organs):
            hue = (i * 0.618033988749895) % 1.0
            lightness = (0.45, 0.6, 0.75)[i % 3]
            colors.append(colorsys.hls_to_rgb(hue, lightness, 0.85))
    return np.asarray(colors, np.float64)


def _middle_slice(arrays, slice_axis: int):
    """2D views: the middle slice along ``slice_axis`` of 3D arrays (the image keeps its channel axis)."""
    image, labels, pred = arrays
    if labels.ndim == 3:
        mid = labels.shape[slice_axis] // 2
        image = np.take(image, mid, axis=slice_axis)
        labels, pred = np.take(labels, mid, axis=slice_axis), np.take(pred, mid, axis=slice_axis)
    return image, labels, pred


def example_strip(example, num_classes: int, slice_axis: int) -> np.ndarray:
    """One validation case as an (H, 3W, 3) RGB image: the image, the truth and the prediction side by side."""
    image, labels, pred = _middle_slice(example, slice_axis)
    gray = image[..., 0].astype(np.float64)
    lo, hi = np.percentile(gray, (1, 99)) if gray.size else (0.0, 1.0)
    gray = np.clip((gray - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    colors = class_colors(num_classes)
    panels = [np.repeat(gray[..., None], 3, axis=-1), colors[np.clip(labels, 0, num_classes - 1)],
              colors[np.clip(pred, 0, num_classes - 1)]]
    return np.concatenate(panels, axis=1)


def prediction_figure(examples, class_names: Sequence[str], slice_axis: int):
    """A matplotlib figure: image, ground truth and prediction of each case, with a legend of the organs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    k = len(class_names)
    colors = class_colors(k)
    cmap = ListedColormap(colors)
    legend_rows = math.ceil((k - 1) / 4)
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples) + 0.3 * legend_rows), squeeze=False)
    for i, (row, example) in enumerate(zip(axes, examples)):
        image, labels, pred = _middle_slice(example, slice_axis)
        for ax, data, title in zip(row, (image[..., 0], labels, pred), ("image", "ground truth", "prediction")):
            if title == "image":
                ax.imshow(data, cmap="gray")
            else:
                ax.imshow(data, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
            if i == 0:
                ax.set_title(title)
            ax.axis("off")
    handles = [Patch(facecolor=colors[i], edgecolor="0.5", label=name) for i, name in enumerate(class_names) if i]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, max(1, k - 1)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / (3 * len(examples) + 0.3 * legend_rows) + 0.01, 1, 1))
    return fig


def plot_predictions(examples, path: str, class_names: Sequence[str], slice_axis: int) -> None:
    """predictions.png: :func:`prediction_figure`, written atomically."""
    import matplotlib.pyplot as plt

    fig = prediction_figure(examples, class_names, slice_axis)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# The run's summary and report
# --------------------------------------------------------------------------------------------------


def _named(organs: dict, class_names) -> dict:
    return {class_names[k]: v for k, v in organs.items()}


def write_summary(config, data, workdir: str, summary: dict, *, elapsed: float, steps: int, skipped: int,
                  platform: str, device_count: int) -> None:
    """workdir/summary.json: the final validation metrics per organ with the run's loss and config.

    Written atomically, last, so its presence means the run finished.
    """
    from combo_jax.config import as_json_tree, loss_kwargs

    organs = _named(summary["organs"], data.class_names)
    for k, name in enumerate(data.class_names[1:], start=1):
        organs[name]["share"] = float(data.shares[k])
    row = {
        "loss": config.loss.to_dict(),
        # the weights the loss trained with: config.loss.class_weights, or those of its frequency_power
        "class_weights": loss_kwargs(config, data.train_shares).get("class_weights"),
        "steps": steps,
        "skipped_updates": skipped,
        "elapsed_s": elapsed,
        "mean_fg_dice": summary["mean_fg_dice"],
        "voxel_volume_ml": float(np.prod(data.spacing)) / 1000.0,
        "spacing_mm": list(data.spacing),
        "num_val_cases": data.num_val,
        "platform": platform,
        "device_count": device_count,
        "organs": organs,
        "config": as_json_tree(config),
    }
    write_text_atomic(os.path.join(workdir, "summary.json"), json.dumps(row, indent=1, default=str))


def _mm(value: float, inf_cases: int) -> str:
    text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
    return text + (f" ({inf_cases} inf)" if inf_cases else "")


def write_report(config, data, workdir, summary, examples, *, elapsed: float, steps: int, skipped: int,
                 platform: str, device_count: int) -> None:
    """workdir/report.md (per-organ table with class shares) and workdir/predictions.png."""
    freqs = data.shares
    options = ", ".join(f"{k}={v}" for k, v in config.loss.items() if k != "name")
    lines = [
        "# combo_jax training report",
        "",
        f"Data: {data.description}.",
        "",
        f"Loss `{config.loss.name}` ({options}); {steps} steps, global batch {config.train.batch_size}, "
        f"{device_count} device(s) ({platform}), {elapsed / 60:.1f} min.",
        "",
    ]
    if skipped:
        lines += [f"**{skipped} update(s) were skipped** because the loss or a gradient was not finite "
                  "(config.train.on_nonfinite = 'skip'); metrics.jsonl marks them with \"finite\": false.", ""]
    lines += [
        f"**Mean foreground Dice (validation, {data.num_val} cases): {summary['mean_fg_dice']:.4f}**",
        "",
        "| organ | share of voxels | Dice | precision | recall | false-positive voxels | false-negative voxels | "
        f"HD95 (mm) | mean surface distance (mm) | surface Dice at {config.eval.nsd_tolerance_mm:g} mm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in summary["organs"].items():
        lines.append(
            f"| {data.class_names[k]} | {freqs[k] * 100:.3f}% | {row['dice']:.4f} | {row['precision']:.4f} | "
            f"{row['recall']:.4f} | {row['fp_voxels']} | {row['fn_voxels']} | "
            f"{_mm(row['hd95_mm'], row['hd95_mm_inf_cases'])} | {_mm(row['msd_mm'], row['msd_mm_inf_cases'])} | "
            f"{row['nsd']:.4f} |"
        )
    lines += [
        "",
        f"Background: {freqs[0] * 100:.2f}% of voxels. Dice, precision and recall are dataset-level (voxel counts "
        "summed over the validation cases); surface metrics are means over cases, leaving out cases where the organ "
        "is missing from exactly one of prediction and truth (counted as \"inf\"). Predictions of a few validation "
        "cases: predictions.png.",
        "",
    ]
    write_text_atomic(os.path.join(workdir, "report.md"), "\n".join(lines))
    if examples:
        plot_predictions(examples, os.path.join(workdir, "predictions.png"), data.class_names, data.slice_axis)
