"""One process of a multi-process test run: train.py's main, observed. Launched by tests/multihost_test.py.

    python tests/multihost_worker.py --record=PREFIX [--slow_after=N] <train.py flags>

Runs ``train.main`` unchanged and writes ``PREFIX.<process_index>.json`` with what this process saw: the
device counts, a digest of every row of every batch it contributed (training and evaluation, in order), the
validation cases it read, the rows of the first global batches as assembled on the mesh, and what a second
``initialize`` call does. ``--slow_after=N`` adds one second to every batch after the N-th, so that a test can
act between two checkpoints.
"""

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import train  # noqa: E402  (defines the training flags)
from combo_jax import distributed  # noqa: E402

flags.DEFINE_string("record", None, "path prefix of this process's JSON record")
flags.DEFINE_integer("slow_after", None, "batches assembled at full speed before each takes one more second")
flags.DEFINE_integer("digest_batches", 2, "how many global batches to gather and digest")

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

    from combo_jax import training

    class ObservedSource(training.PhantomSource):
        def __getitem__(self, index):
            if self.offset != 0:  # the validation split: which cases this process reads
                RECORD["val_loaded"].append(int(index))
            return super().__getitem__(index)

    original = training.global_batch

    def observed_global_batch(local, sharding):
        # Every batch this process contributes, one digest per row, in order (training steps and evaluation).
        RECORD["batches"].append([_digest(np.asarray(local["image"][i]), np.asarray(local["labels"][i]))
                                  for i in range(len(local["image"]))])
        batch = original(local, sharding)
        if len(RECORD["global_digests"]) < flags.FLAGS.digest_batches:  # the global arrays as placed on the mesh
            gathered = multihost_utils.process_allgather(batch, tiled=True) if jax.process_count() > 1 else batch
            RECORD["global_digests"].append([_digest(np.asarray(gathered["image"][i]), np.asarray(gathered["labels"][i]))
                                             for i in range(len(gathered["image"]))])
        slow_after = flags.FLAGS.slow_after
        if slow_after is not None and len(RECORD["batches"]) > slow_after:
            time.sleep(1.0)
        return batch

    training.PhantomSource = ObservedSource
    training.global_batch = observed_global_batch


def main(argv):
    f = flags.FLAGS
    # train.main joins the job; the observation needs jax's devices, so it is installed from inside: wrap the
    # training entry point that train.main calls after initialize.
    from combo_jax import training

    run = training.train_and_evaluate

    def observed_run(config, workdir, **kwargs):
        import jax

        _instrument()
        RECORD.update(process_index=jax.process_index(), process_count=jax.process_count(),
                      device_count=jax.device_count(), local_device_count=jax.local_device_count())
        return run(config, workdir, **kwargs)

    training.train_and_evaluate = observed_run
    train.main(argv)

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


if __name__ == "__main__":
    app.run(main)
