"""One process of a multi-process test run: combo_jax.train's command, observed. Launched by tests/multihost_test.py.

    python tests/multihost_worker.py --record=PREFIX [--slow_after=N] <combo_jax.train flags>

Runs ``combo_jax.train.run`` unchanged and writes ``PREFIX.<process_index>.json`` with what this process saw: the
device counts, a digest of every row of every batch it contributed (training and evaluation, in order), the
validation cases it read, the rows of the first global batches as assembled on the mesh, and what a second
``initialize`` call does. ``--slow_after=N`` adds one second to every batch after the N-th, so that a test can
act between two checkpoints. ``--die_at=STAGE@STEP`` ends the process with ``os._exit(137)`` (as ``kill -9``
would, with no cleanup) at a stage of the checkpoint save of step STEP: ``before`` anything is saved,
``after_best`` (the best checkpoint committed, the latest not started), ``during_latest`` (the latest
checkpoint's asynchronous write just started) or ``after_latest`` (both committed). The exit status is the
command's.
"""

import functools
import hashlib
import json
import os
import sys
import time

from absl import app, flags

from combo_jax import distributed
from combo_jax import train as train_command  # defines the training flags

flags.DEFINE_string("record", None, "path prefix of this process's JSON record")
flags.DEFINE_integer("slow_after", None, "batches assembled at full speed before each takes one more second")
flags.DEFINE_integer("digest_batches", 2, "how many global batches to gather and digest")
flags.DEFINE_string("die_at", None, "STAGE@STEP: exit abruptly at that stage of a checkpoint save")

RECORD = {"batches": [], "val_loaded": [], "global_digests": []}


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _instrument():
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from combo_jax import evaluation, sharding, training
    from combo_jax.data import datasets

    class ObservedSource(datasets.PhantomSource):
        def __getitem__(self, index):
            if self.offset != 0:  # the validation split: which cases this process reads
                RECORD["val_loaded"].append(int(index))
            return super().__getitem__(index)

    original = sharding.global_batch

    def observed_global_batch(local, batch_sharding):
        # Every batch this process contributes, one digest per row, in order (training steps and evaluation).
        RECORD["batches"].append([_digest(np.asarray(local["image"][i]), np.asarray(local["labels"][i]))
                                  for i in range(len(local["image"]))])
        batch = original(local, batch_sharding)
        if len(RECORD["global_digests"]) < flags.FLAGS.digest_batches:  # the global arrays as placed on the mesh
            gathered = multihost_utils.process_allgather(batch, tiled=True) if jax.process_count() > 1 else batch
            RECORD["global_digests"].append([_digest(np.asarray(gathered["image"][i]), np.asarray(gathered["labels"][i]))
                                             for i in range(len(gathered["image"]))])
        slow_after = flags.FLAGS.slow_after
        if slow_after is not None and len(RECORD["batches"]) > slow_after:
            time.sleep(1.0)
        return batch

    datasets.PhantomSource = ObservedSource
    training.global_batch = observed_global_batch
    evaluation.global_batch = observed_global_batch
    if flags.FLAGS.die_at:
        _die_during_save(*flags.FLAGS.die_at.split("@"))


def _die_during_save(stage: str, at: str):
    from combo_jax import checkpoints

    save = checkpoints.Checkpoints.save

    def dying_save(self, step, state, data_iter, *, best_metric=None, latest=True):
        if step != int(at):
            return save(self, step, state, data_iter, best_metric=best_metric, latest=latest)
        if stage == "before":
            os._exit(137)
        save(self, step, state, data_iter, best_metric=best_metric, latest=False)
        self.best.wait_until_finished()
        if stage == "after_best":
            os._exit(137)
        save(self, step, state, data_iter, latest=latest)
        if stage == "during_latest":
            os._exit(137)
        self.wait()
        os._exit(137)

    checkpoints.Checkpoints.save = dying_save


def main(argv, *, overrides):
    f = flags.FLAGS
    # The command joins the job; the observation needs jax's devices, so it is installed from inside: wrap the
    # training entry point that the command calls after initialize.
    from combo_jax import training

    run = training.train_and_evaluate

    def observed_run(config, workdir, **kwargs):
        import jax

        _instrument()
        RECORD.update(process_index=jax.process_index(), process_count=jax.process_count(),
                      device_count=jax.device_count(), local_device_count=jax.local_device_count())
        return run(config, workdir, **kwargs)

    training.train_and_evaluate = observed_run
    code = train_command.run(argv, overrides=overrides)

    import jax

    # A second initialize is a no-op; one that contradicts the job is an error naming the argument.
    RECORD["initialize_again"] = distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    try:
        distributed.initialize(process_id=jax.process_index() + 1)
        RECORD["initialize_conflict"] = None
    except ValueError as err:
        RECORD["initialize_conflict"] = str(err)
    path = f"{f.record}.{jax.process_index()}.json"
    with open(path + ".tmp", "w") as out:
        json.dump(RECORD, out)
    os.replace(path + ".tmp", path)
    return code


if __name__ == "__main__":
    rest, config_overrides = train_command.split_overrides(sys.argv)
    app.run(functools.partial(main, overrides=config_overrides), argv=rest)
