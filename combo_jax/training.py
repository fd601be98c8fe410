"""``train_and_evaluate(config, workdir)``: trains a U-Net with a loss chosen by name, evaluates, checkpoints.

Read top to bottom: checks, the data, the workdir, the mesh and the state, restore, the loop (log, evaluate,
checkpoint, stop on a signal), the final report. The parts live in their own modules: ``config`` (checks),
``data.datasets`` (loaders), ``workdir`` (the lock), ``train_state`` (model, optimizer, jitted steps),
``checkpoints`` (orbax), ``evaluation`` and ``reporting``.

Layout: images ``(B, *spatial, C)``, labels ``(B, *spatial)`` int32, channels-last; batches split over a
one-axis device mesh ``("data",)``, parameters replicated (``combo_jax.sharding``).
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.experimental.multihost_utils
import ml_collections
import numpy as np

from combo_jax import distributed, reporting
from combo_jax.checkpoints import Checkpoints
from combo_jax.config import ConfigError, check_config, check_resume, loss_kwargs
from combo_jax.data.datasets import make_data, make_loader
from combo_jax.evaluation import evaluate, make_predictor
from combo_jax.models.unet import compiler_options
from combo_jax.sharding import data_sharding, global_batch, make_mesh, replicated
from combo_jax.train_state import init_state, make_eval_steps, make_loss_fn, make_train_step
from combo_jax.workdir import WorkdirError, WorkdirLock, check_writable, write_text_atomic


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint; rerunning the same command resumes it.

    ``exit_code`` is the shell's convention for a process ended by that signal, 128 + signal number.
    """

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved, rerun the same command to "
                         "resume")
        self.signum, self.step, self.exit_code = signum, step, 128 + signum


def _all_processes(ok: bool, error: Exception | None) -> None:
    """Raises on every process when process 0 failed (so no process waits for the others forever)."""
    if jax.process_count() > 1:
        ok = bool(jax.experimental.multihost_utils.broadcast_one_to_all(np.int32(ok)))
    if error is not None:
        raise error
    if not ok:
        raise WorkdirError("process 0 could not take the workdir; see its error")


def _take_workdir(workdir: str) -> WorkdirLock | None:
    """The workdir's lock, held by process 0 for the whole run."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
            if lock.took_over:
                print(f"took over the lock of a run that is gone ({lock.took_over.get('pid')} on "
                      f"{lock.took_over.get('host')})", flush=True)
        except WorkdirError as err:
            error = err
    _all_processes(error is None, error)
    return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains, evaluates and checkpoints; resumes from ``workdir/checkpoints`` if a run is there.

    ``devices`` (default: all devices of all processes) lets a single-process caller use a subset.
    Returns the final evaluation summary ({"mean_fg_dice", "organs"}). Raises ConfigError (or
    ``nifti.DatasetError``) for a config or dataset that cannot run, before anything is written to the workdir;
    WorkdirError when another run holds the workdir; TrainingInterrupted after saving on SIGTERM/SIGINT.
    """
    distributed.initialize()
    started = time.time()
    is_main = jax.process_index() == 0
    devices = list(jax.devices() if devices is None else devices)

    # 1. Everything that can be checked without training, before the workdir is touched.
    check_config(config, num_devices=len(devices), num_processes=jax.process_count())
    check_writable(workdir)
    data = make_data(config)

    # 2. From here on SIGTERM and SIGINT stop the run at the next step, after saving a checkpoint.
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    lock = None
    try:
        # 3. The workdir: one run at a time; a resume must be the same run.
        lock = _take_workdir(workdir)
        latest = os.path.join(workdir, "checkpoints", "latest")
        check_resume(config, workdir, has_checkpoints=os.path.isdir(latest) and any(
            n.isdigit() for n in os.listdir(latest)))
        return _train(config, workdir, data, devices, started, is_main, stop)
    finally:
        if lock is not None:
            lock.release()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _train(config, workdir: str, data, devices, started: float, is_main: bool, stop: dict) -> dict:
    t = config.train
    # 4. Mesh, state and jitted steps.
    mesh = make_mesh(devices)
    batch_sharding, params_sharding = data_sharding(mesh), replicated(mesh)
    graphdef, state, tx, schedule = init_state(config)
    train_iter = iter(make_loader(data.train_source, batch_size=t.batch_size, shuffle=True, seed=config.seed,
                                  num_epochs=None, worker_count=config.data.worker_count,
                                  operations=data.train_operations))
    options = compiler_options()
    power = config.loss.get("frequency_power", 0.0)
    if power > 0 and is_main:
        weights = loss_kwargs(config, data.train_shares)["class_weights"]
        print(f"class weights (the training data's class frequencies to the power -{power:g}): "
              + ", ".join(f"{n} {w:.3g}" for n, w in zip(data.class_names, weights)), flush=True)
    train_step = jax.jit(make_train_step(graphdef, tx, make_loss_fn(config, data.train_shares)),
                         in_shardings=(params_sharding, batch_sharding), out_shardings=(params_sharding, params_sharding),
                         donate_argnums=(0,), compiler_options=options)
    steps = make_eval_steps(graphdef)
    eval_steps = {"eval": jax.jit(steps["eval"], in_shardings=(params_sharding, batch_sharding),
                                  out_shardings=batch_sharding, compiler_options=options)}
    if data.val_volumes is not None:  # whole volumes: sliding windows over every device, summed on the device
        eval_steps["predict"] = make_predictor(config, steps["apply"], mesh)

    # 5. Restore the newest readable checkpoint (state and data position); record the config.
    checkpoints = Checkpoints(workdir, keep=t.keep_checkpoints, log=print if is_main else lambda *_: None)
    restored, resumed_at = checkpoints.restore(jax.device_put(state, params_sharding), train_iter)
    state = restored if restored is not None else jax.device_put(state, params_sharding)
    if resumed_at is not None and is_main:
        print(f"resumed from {checkpoints.latest.directory} at step {resumed_at}", flush=True)
    if is_main:  # what predict (load_run) and the experiment runner read back
        write_text_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    log = reporting.MetricsLog(workdir, resume_step=resumed_at or 0, active=is_main)

    # 6. The loop. Device values are read at log steps only, so logging never waits on the current step.
    step = int(state.step)
    bar = _progress(t.num_steps, step) if is_main else None
    pending, summary, examples, evaluated_at = [], None, [], None

    def write_pending():
        for s, out in pending:
            log.write({"step": s, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]),
                       "learning_rate": float(schedule(s - 1)), "finite": bool(out["finite"])})
        pending.clear()

    try:
        while step < t.num_steps:
            signum = _stop_signal(stop["signal"], step, t.log_every)
            if signum:
                write_pending()
                checkpoints.save(step, state, train_iter)
                checkpoints.wait()
                raise TrainingInterrupted(signum, step)
            state, out = train_step(state, global_batch(next(train_iter), batch_sharding))
            step += 1
            pending.append((step, out))
            if step % t.log_every == 0 or step == t.num_steps:
                _check_finite(state, t.on_nonfinite)
                last = float(pending[-1][1]["loss"])
                write_pending()
                if bar is not None:
                    bar.set_postfix(loss=f"{last:.4f}")
            if bar is not None:
                bar.update(1)
            is_eval = step % t.eval_every == 0 or step == t.num_steps
            if is_eval:
                keep = config.eval.num_predictions if step == t.num_steps else 1
                summary, examples = evaluate(config, data, state.params, eval_steps, batch_sharding, keep_predictions=keep)
                evaluated_at = step
                log.write({"step": step, "split": "eval", "mean_fg_dice": summary["mean_fg_dice"],
                           "organs": {data.class_names[k]: v for k, v in summary["organs"].items()}})
                if examples:
                    log.image("eval/prediction", reporting.example_strip(examples[0], len(data.class_names),
                                                                         data.slice_axis), step)
            is_checkpoint = step % t.checkpoint_every == 0 or step == t.num_steps
            if is_checkpoint:
                write_pending()  # a run resumed from this checkpoint has the rows of every step up to it
            if is_eval or is_checkpoint:
                checkpoints.save(step, state, train_iter, best_metric=summary["mean_fg_dice"] if is_eval else None,
                                 latest=is_checkpoint)
    finally:
        if bar is not None:
            bar.close()
        checkpoints.wait()
        log.close()

    # 7. The final evaluation (the loop's, unless the run was already finished) and the report.
    if evaluated_at != step:
        summary, examples = evaluate(config, data, state.params, eval_steps, batch_sharding,
                                     keep_predictions=config.eval.num_predictions)
    skipped = int(state.skipped)
    if is_main:
        facts = dict(elapsed=time.time() - started, steps=step, skipped=skipped, platform=devices[0].platform,
                     device_count=len(devices))
        reporting.write_summary(config, data, workdir, summary, **facts)
        reporting.write_report(config, data, workdir, summary, examples, **facts)
        if skipped:
            print(f"{skipped} update(s) skipped for a non-finite loss or gradient (config.train.on_nonfinite='skip')",
                  flush=True)
    return summary


def _stop_signal(signum: int | None, step: int, log_every: int) -> int | None:
    """The signal to stop on, agreed by every process.

    Several processes must leave the loop at the same step: one that stops alone leaves the others waiting
    forever in the next step's collectives. They agree at every log step, where the host waits for the device
    anyway; one process's signal stops them all.
    """
    if jax.process_count() == 1:
        return signum
    if step % log_every:
        return None
    signals = jax.experimental.multihost_utils.process_allgather(np.int32(signum or 0))
    return int(np.max(signals)) or None


def _check_finite(state, on_nonfinite: str) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0 and on_nonfinite == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad + 1} (the update was not applied); set "
            "config.train.on_nonfinite='skip' to skip such steps instead")


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["ConfigError", "TrainingInterrupted", "WorkdirError", "train_and_evaluate"]
