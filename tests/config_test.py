"""Configs: loading by name or path with overrides, and every check that runs before anything is written."""

import json
import os
import subprocess
import sys

import pytest

from combo_jax import config as config_lib
from combo_jax.config import ConfigError, check_config, load_config
from combo_jax.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_by_name_by_path_and_with_an_argument():
    assert {"default", "tiny", "phantom3d", "study", "msd", "totalseg_ct", "sct_gm"} <= set(config_lib.shipped_configs())
    assert load_config("tiny").loss.name == "combo"
    assert load_config("default:dice").loss.name == "dice"
    by_path = load_config(os.path.join(ROOT, "configs", "tiny.py") + ":wce")
    assert by_path.loss.name == "wce" and by_path.data.shape == (32, 32)
    with pytest.raises(ConfigError, match=r"no shipped config named 'tinyy' \(shipped: .*tiny"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match=r"no config file at 'nowhere/x.py'"):
        load_config("nowhere/x.py")
    with pytest.raises(ConfigError, match=r"get_config\('hinge'\) failed: ValueError: unknown loss 'hinge'"):
        load_config("default:hinge")


def test_overrides_parse_as_the_field_type_and_are_checked_by_key():
    config = load_config("tiny", ["train.num_steps=5", "loss.beta=0.3", "model.features=(4, 16)",
                                  "loss.class_weights=(0, 1, 1, 1, 1, 2, 4)", "config.seed=3"])
    assert config.train.num_steps == 5 and config.loss.beta == 0.3 and config.model.features == (4, 16)
    assert config.loss.class_weights == (0, 1, 1, 1, 1, 2, 4) and config.seed == 3
    cases = {
        "foo=1": r"config.foo: config has no field 'foo' \(its fields: data, eval, loss",
        "loss.gamma=2": r"config.loss.gamma is not an option of loss 'combo' \(its options: alpha, batch_dice, beta",
        "model.features=(8,)": None,  # valid on its own (caught by check_config: one level)
        "train=3": r"config.train is a section",
        "loss.name=dice": r"config.loss.name cannot be overridden",
        "train.num_steps=ten": r"train.num_steps=ten",
    }
    for override, match in cases.items():
        if match is None:
            load_config("tiny", [override])
            continue
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [override])
    # A repeated key is an error, not a concatenation of the two tuples.
    with pytest.raises(ConfigError, match=r"config.model.features is given more than once"):
        load_config("tiny", ["model.features=(4,8)", "model.features=(8,16)"])


def _check(mutate, match, num_devices=1):
    config = tiny.get_config()
    mutate(config)
    with pytest.raises(ConfigError, match=match):
        check_config(config, num_devices=num_devices)


@pytest.mark.parametrize("key, value, match", [
    ("loss.beta", 1.5, r"config.loss \(combo\): combo_loss: beta must lie in \[0, 1\], got 1.5"),
    ("loss.alpha", -0.1, r"combo_loss: alpha must lie in \[0, 1\]"),
    ("loss.smooth", -1.0, r"combo_loss: smooth must be >= 0"),
    ("loss.class_weights", (1, 1), r"class_weights must have one entry per channel of logits, shape \(7,\)"),
    ("loss.class_weights", (1, 1, 1, 1, 1, 1, -1), r"class_weights must be >= 0"),
    ("optimizer.learning_rate", -1e-3, r"config.optimizer.learning_rate must be > 0.0, got -0.001"),
    ("optimizer.learning_rate", float("nan"), r"config.optimizer.learning_rate must be a number, got nan"),
    ("optimizer.warmup_steps", -5, r"config.optimizer.warmup_steps must be >= 0"),
    ("optimizer.clip_norm", 0.0, r"config.optimizer.clip_norm must be > 0.0"),
    ("data.num_train", 0, r"config.data.num_train must be >= 1, got 0"),
    ("data.worker_count", -1, r"config.data.worker_count must be >= 0, got -1"),
    ("train.keep_checkpoints", 0, r"config.train.keep_checkpoints must be >= 1, got 0"),
    ("train.num_steps", 0, r"config.train.num_steps must be >= 1"),
    ("eval.nsd_tolerance_mm", 0.0, r"config.eval.nsd_tolerance_mm must be > 0.0"),
    ("model.features", (8,), r"config.model.features=\(8,\) must be two or more positive widths"),
    ("model.dtype", "float16", r"config.model.dtype must be one of 'float32', 'bfloat16'"),
    ("seed", -1, r"config.seed must be >= 0"),
])
def test_values_out_of_range_are_named(key, value, match):
    def mutate(config):
        section = config
        *parents, field = key.split(".")
        for p in parents:
            section = section[p]
        with section.ignore_type():
            section[field] = value

    _check(mutate, match)


def _cli(*args, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", "combo_jax.train", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(tmp_path))


def test_command_line_mistakes_are_one_line_errors_before_anything_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    for args, message in [
        (["--config.foo=1"], "config.foo: config has no field 'foo'"),
        (["--config.loss.gamma=2"], "config.loss.gamma is not an option of loss 'combo'"),
        (["--config.model.features=(4,8)", "--config.model.features=(8,16)"], "config.model.features is given more than once"),
        (["--config.loss.beta=1.5"], "beta must lie in [0, 1], got 1.5"),
        (["--config.optimizer.learning_rate=-0.1"], "config.optimizer.learning_rate must be > 0.0"),
    ]:
        result = _cli("--config", "tiny", "--workdir", workdir, *args, tmp_path=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        assert not os.path.exists(workdir)
    # --debug shows the traceback.
    result = _cli("--config", "tiny", "--workdir", workdir, "--config.foo=1", "--debug", tmp_path=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_resume_needs_a_readable_config_json(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "latest" / "4").mkdir(parents=True)
    config = tiny.get_config()
    with pytest.raises(ConfigError, match=r"holds checkpoints but no config.json"):
        config_lib.check_resume(config, str(workdir), has_checkpoints=True)
    (workdir / "config.json").write_text('{"seed": 0, "data": {"na')  # truncated
    with pytest.raises(ConfigError, match=r"config.json cannot be read .*Restore it, or move the workdir aside"):
        config_lib.check_resume(config, str(workdir), has_checkpoints=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    config_lib.check_resume(config, str(workdir), has_checkpoints=True)
    changed = tiny.get_config()
    changed.loss.beta = 0.3
    with pytest.raises(ConfigError, match=r"config.loss.beta: 0.5 in the saved run, 0.3 now"):
        config_lib.check_resume(changed, str(workdir), has_checkpoints=True)
    longer = tiny.get_config()
    longer.train.num_steps = 100
    config_lib.check_resume(longer, str(workdir), has_checkpoints=True)


def test_differences_cover_keys_on_one_side_only():
    a, b = {"x": {"y": 1, "z": [1, 2]}}, {"x": {"y": 1, "w": True}}
    assert config_lib.differences(a, b) == ["config.x.w: True in the saved run, '(absent)' now",
                                            "config.x.z: '(absent)' in the saved run, [1, 2] now"]
    assert config_lib.differences(a, json.loads(json.dumps(a))) == []
    assert config_lib.differences(a, b, allowed=("x.",)) == []


@pytest.mark.parametrize("loss", ["combo", "dice_ce"])
def test_a_run_saved_before_frequency_weighting_resumes_where_it_trained_the_same(tmp_path, loss):
    # A config.json written before loss.frequency_power existed trained unweighted: it resumes under a config
    # that is unweighted (p = 0), and a weighted one is refused naming the key.
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "latest" / "4").mkdir(parents=True)
    old = json.loads(tiny.get_config(loss).to_json_best_effort())
    del old["loss"]["frequency_power"]
    (workdir / "config.json").write_text(json.dumps(old))
    now = tiny.get_config(loss)
    if now.loss.frequency_power == 0:
        config_lib.check_resume(now, str(workdir), has_checkpoints=True)
    now.loss.frequency_power = 0.0
    config_lib.check_resume(now, str(workdir), has_checkpoints=True)
    now.loss.frequency_power = 0.25
    with pytest.raises(ConfigError, match=r"config.loss.frequency_power: '\(absent\)' in the saved run, 0.25 now"):
        config_lib.check_resume(now, str(workdir), has_checkpoints=True)


def test_frequency_power_is_checked_and_gives_the_class_weights():
    # Combo trains with weights from the class frequencies by default, the other losses without.
    assert load_config("tiny").loss.frequency_power == 0.25
    assert load_config("tiny:dice_ce").loss.frequency_power == 0.0
    assert "frequency_power" not in load_config("tiny:tversky").loss  # no class_weights to set
    # f = (0.81, 0.09, 0.09, 0.01): f^-1/2 = (10/9, 10/3, 10/3, 10), mean 40/9, so w = (1/4, 3/4, 3/4, 9/4);
    # 1/f = (100/81, 100/9, 100/9, 100), mean 2500/81, so w = (1/25, 9/25, 9/25, 81/25).
    frequencies = [0.81, 0.09, 0.09, 0.01]
    config = load_config("tiny", ["loss.frequency_power=0.5"])
    assert config_lib.loss_kwargs(config, frequencies)["class_weights"] == pytest.approx([0.25, 0.75, 0.75, 2.25])
    config.loss.frequency_power = 1.0
    assert config_lib.loss_kwargs(config, [81, 9, 9, 1])["class_weights"] == pytest.approx(
        [1 / 25, 9 / 25, 9 / 25, 81 / 25], rel=1e-6)
    with pytest.raises(ConfigError, match=r"frequency_power=1.0 needs the training data's class frequencies"):
        config_lib.loss_kwargs(config)
    config.loss.frequency_power = 0.0
    assert config_lib.loss_kwargs(config, frequencies)["class_weights"] is None

    _check(lambda c: setattr(c.loss, "frequency_power", -0.5), r"config.loss.frequency_power must be >= 0.0, got -0.5")

    def both(c):
        c.loss.class_weights = (0, 1, 1, 1, 1, 2, 4)

    _check(both, r"config.loss.class_weights and config.loss.frequency_power=0.25 both set the class weights; set "
                 r"config.loss.frequency_power=0")
    check_config(load_config("tiny", ["loss.frequency_power=0", "loss.class_weights=(0, 1, 1, 1, 1, 2, 4)"]),
                 num_devices=1)
    with pytest.raises(ConfigError, match=r"config.loss.frequency_power is not an option of loss 'tversky'"):
        load_config("tiny:tversky", ["loss.frequency_power=0.5"])
