"""Checkpoints: no interruption point leaves a workdir that cannot resume, and an unreadable checkpoint falls back
to the next older one. Each resumed run must end with the parameters of an uninterrupted run, bit for bit."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from combo_jax import training
from combo_jax.checkpoints import CheckpointError
from combo_jax.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
# Checkpoint and evaluation on the same steps: a save of step 4 writes best, then latest.
OVERRIDES = ["--config.train.num_steps=8", "--config.train.checkpoint_every=4", "--config.train.eval_every=4",
             "--config.eval.num_predictions=0"]


def _params(workdir, kind="latest"):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints", kind))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.tree.leaves(restored["state"]["params"])


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _env(cache):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train(workdir, cache, *extra, worker_args=()):
    command = ([sys.executable, WORKER, f"--record={workdir}.record", *worker_args] if worker_args
               else [sys.executable, "-m", "combo_jax.train"])
    return subprocess.run([*command, "--config=tiny", f"--workdir={workdir}", *OVERRIDES, *extra], env=_env(cache),
                          capture_output=True, text=True, timeout=300)


def _assert_same_run(workdir, reference):
    step, params = _params(workdir)
    ref_step, ref_params = _params(reference)
    assert step == ref_step == 8
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)
    rows = _rows(workdir)
    assert [r["step"] for r in rows if "split" not in r] == list(range(1, 9))  # one row per step
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [4, 8]
    ref_loss = {r["step"]: r["loss"] for r in _rows(reference) if "split" not in r}
    assert all(r["loss"] == ref_loss[r["step"]] for r in rows if "split" not in r)
    assert os.path.exists(os.path.join(workdir, "summary.json"))
    assert _params(workdir, "best")[0] in (4, 8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    full = base / "full"
    result = _train(full, base / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return base, full


@pytest.mark.parametrize("die_at", ["before@4", "after_best@4", "during_latest@4", "after_latest@4", "after_best@8"])
def test_a_run_killed_at_any_stage_of_a_save_resumes_to_the_same_result(reference, die_at):
    base, full = reference
    workdir = base / die_at.replace("@", "_")
    killed = _train(workdir, base / "cache", worker_args=[f"--die_at={die_at}"])
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = _train(workdir, base / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    _assert_same_run(workdir, full)
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*", "*tmp*"))  # half-written saves cleaned up


def _corrupt(step_dir, how):
    state = os.path.join(step_dir, "state")
    if how == "truncated_array":
        files = [p for p in glob.glob(os.path.join(state, "**", "*"), recursive=True) if os.path.isfile(p)]
        largest = max(files, key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "missing_metadata":
        os.remove(os.path.join(state, "_METADATA"))
    else:  # an empty step folder
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)


@pytest.mark.parametrize("how", ["truncated_array", "missing_metadata", "empty_folder"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, how):
    base, full = reference
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    os.remove(workdir / "summary.json")
    _corrupt(str(workdir / "checkpoints" / "latest" / "8"), how)
    result = _train(workdir, base / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints/latest/8 cannot be read" in result.stdout and "at step 4" in result.stdout, result.stdout
    aside = glob.glob(str(workdir / "checkpoints" / "latest" / "8.unreadable-*"))
    assert len(aside) == 1, os.listdir(workdir / "checkpoints" / "latest")  # kept, not deleted
    _assert_same_run(workdir, full)


def test_no_readable_checkpoint_is_an_error_naming_each_step_and_nothing_is_moved(reference, tmp_path):
    base, full = reference
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    for step in ("4", "8"):
        _corrupt(str(workdir / "checkpoints" / "latest" / step), "missing_metadata")
    config = tiny.get_config()
    config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 8, 4, 4
    config.eval.num_predictions = 0
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: step 8: .*; step 4: "):
        training.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    assert sorted(os.listdir(workdir / "checkpoints" / "latest")) == ["4", "8"]
    assert not os.path.exists(workdir / ".lock")  # the lock is released on the way out
