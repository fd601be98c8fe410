"""Train a segmentation U-Net from the command line.

    python -m combo_jax.train --config tiny --workdir runs/tiny
    python -m combo_jax.train --config default:dice --workdir runs/dice --config.train.num_steps=400
    python -m combo_jax.train --config path/to/my_config.py --workdir runs/mine
    combo-jax-train --config default --workdir runs/demo                  # the installed console script

``--config`` takes a config shipped with the package by name (``python -m combo_jax.train --list_configs``),
optionally with its argument (``default:dice`` picks the loss), or a config file. ``--config.KEY=VALUE``
overrides one field; each key at most once. Several processes (hosts, or one per accelerator) run the same
command; the job's coordinator address, process count and this process's id come from the flags below or from
the launcher's environment (SLURM, Open MPI, Cloud TPU VMs, Kubernetes): see docs/multihost.md.

Exit status: 0 when the run finished, 2 for a configuration, dataset or workdir problem (one line on stderr,
before anything is written; ``--debug`` shows the traceback), 128 + N when stopped by signal N after saving a
checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string("config", None, "a shipped config by name (tiny, default:dice, ...) or a config file "
                    "(path.py or path.py:arg); override fields with --config.KEY=VALUE")
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, TensorBoard events and the report")
flags.DEFINE_bool("list_configs", False, "print the names of the shipped configs and exit")
flags.DEFINE_bool("debug", False, "show the traceback of a configuration or data error (also COMBO_JAX_DEBUG=1)")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "multi-process: the number of processes in the job", lower_bound=1)
flags.DEFINE_integer("process_id", None, "multi-process: this process's id, 0 .. num_processes - 1", lower_bound=0)
flags.DEFINE_list("local_device_ids", None, "multi-process: the local accelerator ids this process drives, e.g. 0,1,2,3")
flags.DEFINE_integer("heartbeat_timeout", 60, "multi-process: seconds after which a silent process is declared dead "
                     "and the others stop", lower_bound=1)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without them, the ``KEY=VALUE`` overrides) of ``--config.KEY=VALUE`` arguments.

    Also ``--config.KEY VALUE``, ``--config.FLAG`` (true) and ``--noconfig.FLAG`` (false).
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        negated = arg.startswith("--noconfig.")
        if arg.startswith("--config.") or negated:
            body = arg[len("--noconfig."):] if negated else arg[len("--config."):]
            if "=" in body:
                overrides.append(body)
            elif negated:
                overrides.append(f"{body}=false")
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(f"{body}=true")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def run(argv, *, overrides: list[str]) -> int:
    """The command: train ``--config`` with ``overrides`` in ``--workdir``; returns the exit status."""
    from combo_jax import config as config_lib
    from combo_jax import distributed

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.list_configs:
        print("\n".join(config_lib.shipped_configs()))
        return 0
    if not f.config or not f.workdir:
        raise app.UsageError("--config and --workdir are required")
    logging.set_verbosity(logging.WARNING)  # before jax starts its backends; orbax logs every file at INFO
    debug = f.debug or os.environ.get("COMBO_JAX_DEBUG") == "1"
    try:
        config = config_lib.load_config(f.config, overrides)
        # Join the job first: nothing may touch a JAX device before this.
        distributed.initialize(
            f.coordinator_address, f.num_processes, f.process_id,
            local_device_ids=None if f.local_device_ids is None else [int(i) for i in f.local_device_ids],
            heartbeat_timeout=f.heartbeat_timeout,
        )
    except config_lib.ConfigError as err:
        return _fail(err, debug)
    except ValueError as err:  # flags or launcher variables that cannot describe a job
        raise app.UsageError(str(err)) from err
    import jax

    from combo_jax import training
    from combo_jax.checkpoints import CheckpointError
    from combo_jax.data.nifti import DatasetError

    main_process = jax.process_index() == 0
    if not main_process:
        logging.set_verbosity(logging.ERROR)
    try:
        summary = training.train_and_evaluate(config, f.workdir)
    except (config_lib.ConfigError, DatasetError, training.WorkdirError, CheckpointError) as err:
        return _fail(err, debug)
    except training.TrainingInterrupted as err:
        if main_process:
            print(f"\n{err}", flush=True)
        return err.exit_code
    if main_process:
        print(f"mean foreground Dice {summary['mean_fg_dice']:.4f}; report: {os.path.join(f.workdir, 'report.md')}")
    return 0


def _fail(err: Exception, debug: bool) -> int:
    if debug:
        raise err
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m combo_jax.train``, ``train.py`` and the ``combo-jax-train`` script."""
    argv = list(sys.argv if argv is None else argv)
    rest, overrides = split_overrides(argv)
    app.run(functools.partial(run, overrides=overrides), argv=rest)


if __name__ == "__main__":
    main()
