"""Train a segmentation U-Net: python train.py --config configs/default.py --workdir runs/demo [--config.X=Y ...]"""

from absl import app, flags, logging
from ml_collections import config_flags

from combo_jax import training

config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally file.py:loss_name)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, TensorBoard events and the report")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    summary = training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    if summary:
        print(f"mean foreground Dice {summary['mean_fg_dice']:.4f}; report: {flags.FLAGS.workdir}/report.md")


if __name__ == "__main__":
    app.run(main)
