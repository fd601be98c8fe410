"""Checkpoints of a run: ``WORKDIR/checkpoints/latest`` (the last few) and ``WORKDIR/checkpoints/best`` (the best by
validation Dice), written by orbax.

What is guaranteed, and how:

* A checkpoint is complete or absent: orbax writes each step into a temporary folder and renames it when every
  file is written; leftover temporary folders of a killed run are removed when the managers open.
* No interruption leaves a workdir that cannot resume. Within a step the ``best`` save comes before the
  ``latest`` one; a run killed between the two resumes from an older ``latest`` step, so the ``best`` steps
  after it are removed on restore (the resumed run recomputes them exactly, and would otherwise find the step
  taken).
* A checkpoint that cannot be read is reported by step and the next older one is used; the unreadable step is
  moved aside to ``<step>.unreadable-<time>`` (never deleted), so the resumed run can save that step again. When
  no step can be read nothing is moved, and the error names every step and why.
"""

from __future__ import annotations

import os
import shutil
import time

import grain
import jax
import jax.experimental.multihost_utils
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be read."""


def _options(name: str, **kwargs) -> ocp.CheckpointManagerOptions:
    # With several processes orbax synchronizes each save at barriers named after the step; the latest and best
    # managers both save the same steps, so each needs its own barrier names.
    return ocp.CheckpointManagerOptions(
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
        **kwargs,
    )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        jax.experimental.multihost_utils.sync_global_devices(name)


def _move_aside(directory: str, step: int) -> str:
    """Renames a step folder out of orbax's sight (process 0 only); returns the new path."""
    source = os.path.join(directory, str(step))
    target = f"{source}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and os.path.exists(source):
        os.rename(source, target)
    return target


class Checkpoints:
    """The ``latest`` and ``best`` checkpoint managers of a workdir."""

    def __init__(self, workdir: str, *, keep: int, log=print):
        root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.log = log
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=_options("latest", max_to_keep=keep))
        self.best = ocp.CheckpointManager(
            os.path.join(root, "best"),
            options=_options("best", max_to_keep=1, best_fn=lambda m: m["mean_fg_dice"], best_mode="max"))

    def has_checkpoints(self) -> bool:
        return bool(self.latest.all_steps())

    def restore(self, state, data_iter):
        """The newest readable ``latest`` step as ``(state, step)`` with ``data_iter`` set to its position, or
        ``(None, None)`` when there is no checkpoint. See the module docstring for unreadable steps."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            self._forget_best_after(0)  # a run killed before its first latest save: it starts over
            return None, None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        failed = []
        for step in steps:
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint: try the next older one
                if "does not match" in str(err) and isinstance(err, ValueError) and not failed:
                    raise CheckpointError(  # grain: each process's data position is saved separately
                        f"the checkpoint in {self.latest.directory} was written by a run whose data loading differs "
                        f"from this one (another process count or dataset size?): {_short(err)}. Resume with the "
                        "run's own settings, or use a new workdir.") from err
                failed.append((step, err))
                self.log(f"checkpoint {self.latest.directory}/{step} cannot be read ({_short(err)}); trying an older one")
                continue
            for bad, _ in failed:
                moved = _move_aside(str(self.latest.directory), bad)
                self.log(f"moved the unreadable checkpoint {self.latest.directory}/{bad} aside to {moved}")
            self._forget_best_after(step)
            _sync("combo_jax_restored")
            if failed:
                self.latest.reload()
            return restored["state"], step
        raise CheckpointError(
            f"no checkpoint in {self.latest.directory} can be read: "
            + "; ".join(f"step {s}: {_short(e)}" for s, e in failed)
            + ". Nothing was changed; move the workdir aside to start a new run.")

    def _forget_best_after(self, step: int) -> None:
        """Removes ``best`` steps newer than the restored step: the resumed run recomputes them."""
        newer = [s for s in self.best.all_steps() if s > step]
        if not newer:
            return
        if jax.process_index() == 0:
            for s in newer:
                shutil.rmtree(os.path.join(str(self.best.directory), str(s)), ignore_errors=True)
            self.log(f"removed best checkpoint(s) {newer} saved after the restored step {step} (recomputed on the way)")
        _sync("combo_jax_best_forgotten")
        self.best.reload()

    def save(self, step: int, state, data_iter, *, best_metric: float | None = None, latest: bool = True) -> None:
        """Saves ``best`` with the step's validation Dice (when given), then ``latest`` (when asked and not saved
        yet). Asynchronous: see :meth:`wait`."""
        def args():
            return ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=grain.checkpoint.CheckpointSave(data_iter))

        if best_metric is not None:
            self.best.save(step, args=args(), metrics={"mean_fg_dice": float(best_metric)}, force=True)
        if latest and self.latest.latest_step() != step:
            self.latest.save(step, args=args(), force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_run(workdir: str, *, checkpoint: str = "best"):
    """(config, graphdef, params, step) of a training run's ``best`` or ``latest`` checkpoint, on the host.

    The newest readable step is used; an unreadable one is reported and skipped (nothing is moved).
    """
    import ml_collections

    from combo_jax.config import read_saved_config
    from combo_jax.train_state import init_state

    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    saved = read_saved_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} not found: {workdir!r} is not a combo_jax "
                                "training workdir")
    saved.get("model", {}).pop("num_classes", None)  # written by older versions; now derived from the data
    config = ml_collections.ConfigDict(saved)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints", checkpoint)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    if checkpoint == "latest":
        steps = sorted(manager.all_steps(), reverse=True)
    else:
        best = manager.best_step()
        steps = [best] + sorted((s for s in manager.all_steps() if s != best), reverse=True) if best is not None else []
    if not steps:
        raise FileNotFoundError(f"no {checkpoint} checkpoint under {directory}")
    graphdef, state, _, _ = init_state(config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    problems = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as err:  # noqa: BLE001
            problems.append(f"step {step}: {_short(err)}")
            continue
        if problems:
            print(f"skipped unreadable checkpoint(s) in {directory}: {'; '.join(problems)}", flush=True)
        return config, graphdef, restored["state"].params, step
    raise CheckpointError(f"no checkpoint in {directory} can be read: {'; '.join(problems)}")
