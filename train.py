"""Train a segmentation U-Net: python train.py --config configs/default.py --workdir runs/demo [--config.X=Y ...]

Several processes (hosts, or one process per accelerator) run the same command; the job's coordinator
address, process count and this process's id come from the flags below or, when those are absent, from the
launcher's environment (SLURM, Open MPI, Cloud TPU VMs, GKE TPU, Kubernetes JobSet): see docs/multihost.md.

    python train.py --config configs/default.py --workdir runs/demo \\
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0    # and --process_id=1 elsewhere
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from combo_jax import distributed, training
from combo_jax.data import nifti

config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally file.py:loss_name)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, TensorBoard events and the report")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "multi-process: the number of processes in the job", lower_bound=1)
flags.DEFINE_integer("process_id", None, "multi-process: this process's id, 0 .. num_processes - 1", lower_bound=0)
flags.DEFINE_list("local_device_ids", None, "multi-process: the local accelerator ids this process drives, e.g. 0,1,2,3")
flags.DEFINE_integer("heartbeat_timeout", 60, "multi-process: seconds after which a silent process is declared dead "
                     "and the others stop", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # before jax starts its backends; orbax logs every file at INFO
    # Join the job first: nothing may touch a JAX device before this.
    try:
        distributed.initialize(
            f.coordinator_address, f.num_processes, f.process_id,
            local_device_ids=None if f.local_device_ids is None else [int(i) for i in f.local_device_ids],
            heartbeat_timeout=f.heartbeat_timeout,
        )
    except ValueError as err:  # flags or launcher variables that cannot describe a job
        raise app.UsageError(str(err)) from err
    main_process = jax.process_index() == 0
    if not main_process:
        logging.set_verbosity(logging.ERROR)
    try:
        summary = training.train_and_evaluate(f.config, f.workdir)
    except (training.ConfigError, nifti.DatasetError) as err:  # the user's config or data: no traceback
        sys.exit(f"error: {err}")
    if summary and main_process:
        print(f"mean foreground Dice {summary['mean_fg_dice']:.4f}; report: {f.workdir}/report.md")


if __name__ == "__main__":
    app.run(main)
