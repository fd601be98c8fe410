"""Training loop: the tiny config end to end, device-count independence, exact resume, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from combo_jax import config as config_lib
from combo_jax import training
from combo_jax.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(workdir, split=None):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r.get("split") == split]


def _final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints", "latest"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.tree.leaves(restored["state"]["params"])


@pytest.fixture(scope="module")
def tiny_run_8(tmp_path_factory):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    workdir = str(tmp_path_factory.mktemp("tiny8"))
    summary = training.train_and_evaluate(tiny.get_config(), workdir)
    return workdir, summary


def test_tiny_config_end_to_end_on_8_devices(tiny_run_8):
    workdir, summary = tiny_run_8
    train = _rows(workdir)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) for r in train)
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < first, f"loss did not decrease: first steps {first}, last steps {last}"
    evals = _rows(workdir, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert set(evals[-1]["organs"]) == {"liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal"}
    assert 0.0 <= summary["mean_fg_dice"] <= 1.0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["12", "8"]
    assert os.listdir(os.path.join(workdir, "checkpoints", "best"))
    report = open(os.path.join(workdir, "report.md")).read()
    assert "adrenal" in report and "Mean foreground Dice" in report
    assert os.path.getsize(os.path.join(workdir, "predictions.png")) > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    # The Combo loss trained with weights w ~ f^-1/4 (mean 1) of the training cases' class frequencies (the
    # trainer reads the first 16 training cases).
    from combo_jax.data import phantom

    config = tiny.get_config()
    counts = sum(np.bincount(phantom.make_case(config.data.seed, i, tuple(config.data.shape))[1].ravel(),
                             minlength=7) for i in range(16))
    expected = (counts / counts.sum()) ** -0.25
    recorded = json.load(open(os.path.join(workdir, "summary.json")))["class_weights"]
    np.testing.assert_allclose(recorded, expected / expected.mean(), rtol=1e-6)


def test_one_device_matches_eight(tiny_run_8, tmp_path):
    workdir8, _ = tiny_run_8
    workdir1 = str(tmp_path / "one")
    training.train_and_evaluate(tiny.get_config(), workdir1, devices=jax.devices()[:1])
    loss1 = [r["loss"] for r in _rows(workdir1)]
    loss8 = [r["loss"] for r in _rows(workdir8)]
    np.testing.assert_allclose(loss1, loss8, rtol=2e-4, atol=1e-6)
    _, p1 = _final_params(workdir1)
    _, p8 = _final_params(workdir8)
    for a, b in zip(p1, p8):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def _train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "combo_jax.train", "--config", "tiny", "--workdir", workdir, *overrides]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT
    return env


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, how):
    """A run killed after a checkpoint and restarted with the same command ends where an uninterrupted run does."""
    overrides = ["--config.train.num_steps=10", "--config.train.checkpoint_every=3", "--config.train.eval_every=10"]
    full = str(tmp_path / "full")
    subprocess.run(_train_cmd(full, *overrides), env=_env(), check=True, capture_output=True, timeout=300)

    broken = str(tmp_path / "broken")
    # train.py's main under the test worker, whose batches after the 3rd take a second longer each: the signal
    # lands between checkpoints, not after a fast run has already finished.
    worker = [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), f"--record={tmp_path / 'record'}",
              "--slow_after=3"]
    proc = subprocess.Popen(worker + _train_cmd(broken, *overrides)[3:], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(os.path.join(broken, "checkpoints", "latest", "3"), proc)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM, out  # a scheduler must not read it as finished
        assert "stopped by signal 15" in out
        # The rows of the steps before the signal were written before the checkpoint.
        stopped_at = int(out.split("stopped by signal 15 at step ")[1].split(";")[0])
        assert [r["step"] for r in _rows(broken)] == list(range(1, stopped_at + 1))
    resumed = subprocess.run(_train_cmd(broken, *overrides), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    step_full, params_full = _final_params(full)
    step_broken, params_broken = _final_params(broken)
    assert step_full == step_broken == 10
    for a, b in zip(params_full, params_broken):
        np.testing.assert_array_equal(a, b)
    # The resumed run saw the same batches: its logged losses after the restart equal the uninterrupted ones.
    full_loss = {r["step"]: r["loss"] for r in _rows(full)}
    # Exactly one row per step, whatever was logged before the interruption.
    assert [r["step"] for r in _rows(broken)] == list(range(1, 11))
    assert [r["step"] for r in _rows(broken, "eval")] == [10]
    for r in _rows(broken):
        assert r["loss"] == pytest.approx(full_loss[r["step"]], rel=1e-6), r["step"]


def test_command_line_overrides_reach_the_run(tmp_path):
    workdir = str(tmp_path / "override")
    result = subprocess.run(
        _train_cmd(workdir, "--config.loss.beta=0.3", "--config.train.num_steps=2", "--config.train.eval_every=2"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "beta=0.3" in open(os.path.join(workdir, "report.md")).read()
    assert [r["step"] for r in _rows(workdir)] == [1, 2]


def test_loss_by_name_from_the_config_argument(tmp_path):
    config = tiny.get_config("dice")
    assert config.loss.name == "dice" and "smooth_nr" in config.loss and "beta" not in config.loss
    config.train.num_steps = 2
    config.train.eval_every = 2
    summary = training.train_and_evaluate(config, str(tmp_path / "dice"), devices=jax.devices()[:1])
    assert 0.0 <= summary["mean_fg_dice"] <= 1.0


def test_sgd_nesterov_poly_decay_option(tmp_path):
    config = tiny.get_config()
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05
    config.train.num_steps = 4
    config.train.eval_every = 4
    workdir = str(tmp_path / "sgd")
    training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Polynomial decay to 0 over num_steps: lr(step 1) = 0.05, decreasing.
    lrs = [r["learning_rate"] for r in rows]
    assert lrs[0] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_shipped_configs_are_valid():
    from combo_jax.configs import default, phantom3d, study

    for module in (default, phantom3d, tiny, study):
        for loss in config_lib.LOSSES:
            config = module.get_config(loss)
            config_lib.check_config(config, num_devices=1)
            # Every option of the loss is written out in the config (big_vision style).
            assert set(config.loss.keys()) - {"name"} == set(config_lib.loss_options(loss)), loss


def _bad(mutate, match, tmp_path, devices=None):
    config = tiny.get_config()
    mutate(config)
    with pytest.raises(config_lib.ConfigError, match=match):
        training.train_and_evaluate(config, str(tmp_path / "bad"), devices=devices)
    assert not os.path.exists(tmp_path / "bad")  # nothing written, not even the folder


def test_bad_configs_fail_before_training(tmp_path):
    def unknown_loss(c):
        c.loss.name = "hinge"

    def wrong_option(c):
        c.loss.name = "dice"

    def classes(c):
        c.model.num_classes = 5

    def indivisible(c):
        c.train.batch_size = 6

    def shape(c):
        c.data.shape = (31, 32)

    def nonfinite_policy(c):
        c.train.on_nonfinite = "ignore"

    _bad(unknown_loss, "config.loss.name: unknown loss 'hinge'", tmp_path)
    _bad(wrong_option, r"config.loss.alpha is not an option of loss 'dice'", tmp_path)
    _bad(classes, "config.model.num_classes is derived from the data", tmp_path)
    _bad(shape, r"config.data.shape=\(31, 32\): every size must be a positive multiple of 2", tmp_path)
    _bad(nonfinite_policy, "on_nonfinite", tmp_path)
    if jax.device_count() >= 4:
        _bad(indivisible, "batch_size=6 must be a positive multiple of the device count", tmp_path,
             devices=jax.devices()[:4])


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(training.WorkdirError, match="not writable"):
        training.train_and_evaluate(tiny.get_config(), str(blocker / "run"))


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    config = tiny.get_config()
    config.optimizer.learning_rate = 1e30  # parameters blow up after the first update
    config.optimizer.clip_norm = 1e30
    config.train.num_steps = 6
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d+"):
        training.train_and_evaluate(config, str(tmp_path / "nan"), devices=jax.devices()[:1])


def test_nonfinite_skip_keeps_parameters_finite_and_counts_the_skipped_updates(tmp_path):
    config = tiny.get_config()
    config.optimizer.learning_rate = 1e30
    config.optimizer.clip_norm = 1e30
    config.train.num_steps = 4
    config.train.eval_every = 4
    config.train.on_nonfinite = "skip"
    workdir = str(tmp_path / "skip")
    training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    _, params = _final_params(workdir)
    assert all(np.all(np.isfinite(p)) for p in params)
    skipped = sum(not r["finite"] for r in _rows(workdir))
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert skipped > 0 and summary["skipped_updates"] == skipped
    assert f"**{skipped} update(s) were skipped**" in open(os.path.join(workdir, "report.md")).read()


def test_resuming_with_another_configuration_is_refused(tmp_path):
    config = tiny.get_config()
    config.train.num_steps = 4
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    changed = tiny.get_config()
    changed.train.num_steps = 6
    changed.seed = 1
    changed.model.features = (4, 16)
    with pytest.raises(config_lib.ConfigError, match=r"config.model.features: \[4, 8\] in the saved run, \[4, 16\] now; "
                                                   r"config.seed: 0 in the saved run, 1 now"):
        training.train_and_evaluate(changed, workdir, devices=jax.devices()[:1])
    assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 0  # the saved run's record is kept
    longer = tiny.get_config()
    longer.train.num_steps = 6  # training longer is a resume, not a new run
    training.train_and_evaluate(longer, workdir, devices=jax.devices()[:1])
    assert [r["step"] for r in _rows(workdir)][-2:] == [5, 6]


def _children(pid):
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _slow_run(workdir, tmp_path, *overrides):
    worker = [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), f"--record={tmp_path / 'rec'}",
              "--slow_after=0"]
    return subprocess.Popen(worker + _train_cmd(workdir, *overrides)[3:], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_second_run_on_a_held_workdir_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    workdir = str(tmp_path / "run")
    first = _slow_run(workdir, tmp_path, "--config.train.num_steps=30")
    try:
        _wait_for(os.path.join(workdir, "config.json"), first)
        second = subprocess.run(_train_cmd(workdir, "--config.train.num_steps=30"), env=_env(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run: pid {first.pid} on host" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    third = subprocess.run(_train_cmd(workdir, "--config.train.num_steps=4", "--config.train.eval_every=4"),
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of a run that is gone ({first.pid}" in third.stdout
    assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_grain_workers_exit_when_the_training_process_is_killed(tmp_path):
    proc = _slow_run(str(tmp_path / "run"), tmp_path, "--config.data.worker_count=2", "--config.train.num_steps=100")
    try:
        deadline = time.time() + 120
        while len(workers := _children(proc.pid)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        _wait_for(os.path.join(tmp_path, "run", "metrics.jsonl"), proc)  # the workers are serving batches
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _state(w) != "Z"], "orphaned grain workers"


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
