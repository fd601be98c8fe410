"""Multi-process training on one machine: 2 and 4 processes on 127.0.0.1 train exactly as one process does.

Each launch starts N copies of combo_jax.train's command (through tests/multihost_worker.py, which records what each
process loads) with ``--xla_force_host_platform_device_count=8/N``: 8 CPU devices in all, joined by
``jax.distributed`` over loopback with gloo collectives. The reference is the same command in one process
with 8 devices. Launches are shared between the tests (module fixture) and every process has a deadline.
The first tests are quick unit tests of launcher detection and of the per-process batch share.
"""

import glob
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from combo_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
DEADLINE_S = 240  # for one launch; a hang fails the test instead of stalling CI
HEARTBEAT_S = 10
# The variables of the launchers distributed.detect_cluster reads: kept away from the child processes, so that
# a CI runner inside SLURM or Kubernetes does not turn the single-process reference into a job member.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                      "JOB_COMPLETION_INDEX", "JAX_LOCAL_DEVICE_IDS")


# --------------------------------------------------------------------------------------------------
# Launcher detection (no processes started)
# --------------------------------------------------------------------------------------------------


def _resolve(env, *args):
    return distributed.resolve(*args, environ=env, on_cloud_tpu_vm=False)


def test_plain_process_and_single_task_launchers_are_single_process():
    assert distributed.detect_cluster({}, on_cloud_tpu_vm=False) is None
    assert _resolve({}) is None
    one_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu001", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0"}
    assert distributed.detect_cluster(one_task, on_cloud_tpu_vm=False) == distributed.Cluster("slurm", None, 1, 0)
    assert _resolve(one_task) is None
    assert _resolve({}, None, 1, 0) is None
    # Without SLURM_STEP_NODELIST (jax's SLURM detection needs it) there is no job step to join.
    assert _resolve({k: v for k, v in one_task.items() if k != "SLURM_STEP_NODELIST"} | {"SLURM_NTASKS": "16"}) is None
    assert distributed.initialize(environ={}) is False


def test_launcher_environments():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": "32", "SLURM_PROCID": "9",
             "SLURM_LOCALID": "1"}
    assert _resolve(slurm) == distributed.Cluster("slurm", None, 32, 9)  # jax finds the coordinator: gpu001
    mpi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5"}
    assert _resolve(mpi) == distributed.Cluster("open-mpi", None, 4, 3)
    # GKE TPU, two slices of four hosts: host 2 of slice 1 is process 4 + 2.
    tpu = {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2", "MEGASCALE_NUM_SLICES": "2",
           "MEGASCALE_SLICE_ID": "1"}
    assert _resolve(tpu) == distributed.Cluster("gke-tpu", None, 8, 6)
    # A JobSet pod spec that names the coordinator and the count; the id is the pod's completion index.
    jobset = {"JAX_COORDINATOR_ADDRESS": "train-workers-0-0.train:1234", "JAX_NUM_PROCESSES": "4",
              "JOB_COMPLETION_INDEX": "3"}
    assert _resolve(jobset) == distributed.Cluster("environment", "train-workers-0-0.train:1234", 4, 3)
    assert _resolve({}, "10.0.0.1:1234", 2, 1) == distributed.Cluster("arguments", "10.0.0.1:1234", 2, 1)
    # Flags override what a launcher says.
    assert _resolve(slurm, "10.0.0.9:99", None, None) == distributed.Cluster("arguments + slurm", "10.0.0.9:99", 32, 9)
    assert distributed.detect_cluster({}, on_cloud_tpu_vm=True) == distributed.Cluster("cloud-tpu-vm")


def test_impossible_jobs_are_named():
    with pytest.raises(ValueError, match=r"process_id=2 is out of range for num_processes=2"):
        _resolve({}, "10.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"coordinator_address='10.0.0.1' .* must be 'host:port'"):
        _resolve({}, "10.0.0.1", 2, 0)
    with pytest.raises(ValueError, match=r"coordinator_address missing"):
        _resolve({}, None, 2, 0)
    with pytest.raises(ValueError, match=r"num_processes must be a positive integer, got 0"):
        _resolve({}, "10.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='four' is not an integer"):
        _resolve({"JAX_NUM_PROCESSES": "four"})
    if importlib.util.find_spec("kubernetes") is None:  # with it, jax reads the job from the Kubernetes API
        with pytest.raises(ValueError, match=r"JOB_COMPLETION_INDEX=2\) without coordinator_address, num_processes"):
            _resolve({"JOB_COMPLETION_INDEX": "2"})
        assert _resolve({"JOB_COMPLETION_INDEX": "0"}) is None  # an Indexed Job of one pod


def test_initialize_after_the_backend_started_says_so():
    jax.devices()  # starts the backend
    with pytest.raises(RuntimeError, match="must run before anything touches a JAX device"):
        distributed.initialize("127.0.0.1:1", 2, 1, environ={})
    assert not jax.distributed.is_initialized()


# --------------------------------------------------------------------------------------------------
# Each process's rows of a global batch
# --------------------------------------------------------------------------------------------------


def _shares(order, *, batch_size, process_count, steps):
    """Per process, the record keys of each local batch of ``steps`` steps."""
    out = []
    for p in range(process_count):
        s = distributed.ProcessShareSampler(order, batch_size=batch_size, process_index=p, process_count=process_count)
        b = batch_size // process_count
        keys = [s[k].record_key for k in range(steps * b)]
        out.append([keys[i * b:(i + 1) * b] for i in range(steps)])
    return out


def test_process_shares_rebuild_each_global_batch():
    order = grain.samplers.SequentialSampler(num_records=24)
    # Global batches of 8 over 2 processes: process 0 takes rows 0-3 of each, process 1 rows 4-7.
    assert _shares(order, batch_size=8, process_count=2, steps=3) == [
        [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]],
        [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]],
    ]
    assert _shares(order, batch_size=8, process_count=4, steps=2) == [
        [[0, 1], [8, 9]], [[2, 3], [10, 11]], [[4, 5], [12, 13]], [[6, 7], [14, 15]]]
    # Under a shuffled order, process-order concatenation of the shares is the one-process batch.
    shuffled = grain.samplers.IndexSampler(num_records=32, shuffle=True, num_epochs=None, seed=3)
    [single] = _shares(shuffled, batch_size=8, process_count=1, steps=10)
    for processes in (2, 4, 8):
        shares = _shares(shuffled, batch_size=8, process_count=processes, steps=10)
        assert [sum((s[i] for s in shares), []) for i in range(10)] == single
    one = distributed.ProcessShareSampler(shuffled, batch_size=8, process_index=1, process_count=4)
    assert one[3].index == 8 + 2 + 1  # metadata (and its per-record rng) is the global position's


def test_process_share_bounds_and_arguments():
    finite = grain.samplers.SequentialSampler(num_records=20)  # two whole batches of 8; 4 records left over
    s = distributed.ProcessShareSampler(finite, batch_size=8, process_index=1, process_count=2)
    assert len(s) == 8
    assert [s[k].record_key for k in range(8)] == [4, 5, 6, 7, 12, 13, 14, 15]
    with pytest.raises(IndexError):
        s[8]
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of process_count=4"):
        distributed.ProcessShareSampler(finite, batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, process_count=2\)"):
        distributed.ProcessShareSampler(finite, batch_size=8, process_index=2, process_count=2)


# --------------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``num_processes`` workers of one run (8 CPU devices in all), output in ``<base>/<name>.out.<p>``."""

    def __init__(self, base, name, num_processes, *, workdir=None, extra=()):
        self.name, self.num_processes = name, num_processes
        self.workdir = workdir or os.path.join(base, name)
        self.record = os.path.join(base, f"{name}.record")
        self.logs = [os.path.join(base, f"{name}.out.{p}") for p in range(num_processes)]
        port = _free_port()
        self.procs = []
        for p in range(num_processes):
            env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
            env.update(
                XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}",
                JAX_PLATFORMS="cpu",
                PYTHONPATH=ROOT,
                PYTHONUNBUFFERED="1",
                # Loopback only: the coordinator listens on 127.0.0.1 (gloo binds there too).
                JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
                # One compilation cache for all launches: a resumed run reuses the programs of the first.
                JAX_COMPILATION_CACHE_DIR=os.path.join(base, "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            )
            cmd = [sys.executable, WORKER, f"--config={TINY}", f"--workdir={self.workdir}", f"--record={self.record}",
                   *extra]
            if num_processes > 1:
                cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                        f"--process_id={p}", f"--heartbeat_timeout={HEARTBEAT_S}"]
            with open(self.logs[p], "w") as log:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        self.started = time.time()

    def output(self, p: int) -> str:
        with open(self.logs[p], errors="replace") as f:
            return f.read()

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)

    def wait(self, *, ok=True, timeout=DEADLINE_S) -> list[int]:
        deadline = self.started + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name}: still running after {timeout} s\n" + self._tails()) from None
        codes = [proc.returncode for proc in self.procs]
        if ok and any(codes):
            raise AssertionError(f"{self.name}: exit codes {codes}\n" + self._tails())
        return codes

    def _tails(self) -> str:
        return "\n".join(f"--- process {p} ---\n{self.output(p)[-3000:]}" for p in range(self.num_processes))

    def records(self) -> list[dict]:
        return [json.load(open(f"{self.record}.{p}.json")) for p in range(self.num_processes)]


def _train_rows(workdir, split=None):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r.get("split") == split]


def _params(workdir, step):
    """A checkpoint's parameters as numpy arrays, read by this one process whatever topology wrote them."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints", "latest", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(checkpointer.restore(path, target)["params"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config in 1 process x 8 devices, 2 x 4 and 4 x 2, all at once (7 processes share the CPU)."""
    base = str(tmp_path_factory.mktemp("multihost"))
    out = {"base": base}
    for processes in (1, 2, 4):
        out[processes] = Launch(base, f"p{processes}", processes)
    for processes in (1, 2, 4):
        out[processes].wait()
    return out


def test_every_process_sees_the_global_mesh(runs):
    for n in (1, 2, 4):
        records = runs[n].records()
        assert [r["process_index"] for r in records] == list(range(n))
        assert {(r["process_count"], r["device_count"], r["local_device_count"]) for r in records} == {(n, 8, 8 // n)}


def test_each_process_loads_its_share_and_the_shares_make_the_global_batch(runs):
    [single] = runs[1].records()
    assert all(len(rows) == 8 for rows in single["batches"])
    assert len(single["batches"]) == 12 + 2  # 12 training steps, one validation batch at steps 6 and 12
    for n in (2, 4):
        records = runs[n].records()
        for p, r in enumerate(records):
            assert all(len(rows) == 8 // n for rows in r["batches"]), f"process {p} of {n} loaded more than its share"
            # Validation: cases p*b .. (p+1)*b - 1 of 8, read by this process alone.
            assert set(r["val_loaded"]) == set(range(p * 8 // n, (p + 1) * 8 // n))
        assert len({len(r["batches"]) for r in records}) == 1
        for i, rows in enumerate(single["batches"]):
            union = [row for r in records for row in r["batches"][i]]
            assert union == rows, f"{n} processes: global batch {i} differs from the single-process batch"
        # And the global arrays assembled on the mesh hold those rows in that order.
        for r in records:
            assert r["global_digests"] == single["global_digests"] == single["batches"][:2]


def test_losses_and_final_parameters_match_one_process(runs):
    ref = runs[1].workdir
    ref_loss = [r["loss"] for r in _train_rows(ref)]
    ref_params = _params(ref, 12)
    for n in (2, 4):
        rows = _train_rows(runs[n].workdir)
        assert [r["step"] for r in rows] == list(range(1, 13))
        np.testing.assert_allclose([r["loss"] for r in rows], ref_loss, rtol=2e-4, atol=1e-6, err_msg=f"{n} processes")
        ref_eval = [r["mean_fg_dice"] for r in _train_rows(ref, "eval")]
        np.testing.assert_allclose([r["mean_fg_dice"] for r in _train_rows(runs[n].workdir, "eval")], ref_eval, atol=1e-3)
        for a, b in zip(_params(runs[n].workdir, 12), ref_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5, err_msg=f"{n} processes")


def test_one_checkpoint_tree_and_one_log_for_the_job(runs):
    for n in (2, 4):
        launch = runs[n]
        latest = os.path.join(launch.workdir, "checkpoints", "latest")
        assert sorted(os.listdir(latest)) == ["12", "8"]  # keep_checkpoints=2; no per-process copies, no tmp dirs
        for step in ("8", "12"):
            state = os.path.join(latest, step, "state")
            assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(state, "ocdbt.process_*"))) == [
                f"ocdbt.process_{p}" for p in range(n)]
            assert sorted(os.listdir(os.path.join(latest, step, "data"))) == sorted(
                ["commit_success.txt", *(f"process_{p}-of-{n}.json" for p in range(n))])
        assert os.listdir(os.path.join(launch.workdir, "checkpoints", "best")) == ["12"]
        # metrics.jsonl, the report and the console belong to process 0.
        assert [r["step"] for r in _train_rows(launch.workdir, "eval")] == [6, 12]
        assert os.path.exists(os.path.join(launch.workdir, "report.md"))
        assert "mean foreground Dice" in launch.output(0) and "train:" in launch.output(0)
        for p in range(1, n):
            assert "mean foreground Dice" not in launch.output(p) and "train:" not in launch.output(p)


def test_initialize_twice_is_a_no_op_and_a_contradiction_is_named(runs):
    [single] = runs[1].records()
    assert single["initialize_again"] is False
    for r in runs[2].records():
        assert r["initialize_again"] is True
        assert r["initialize_conflict"] == (
            f"process_id={r['process_index'] + 1} but this process already belongs to a job with "
            f"process_id={r['process_index']}")


def _wait_for(launch, condition, what):
    while not condition():
        if any(proc.poll() is not None for proc in launch.procs):
            launch.kill()
            raise AssertionError(f"{launch.name}: a process exited before {what}\n" + launch._tails())
        if time.time() - launch.started > DEADLINE_S:
            launch.kill()
            raise AssertionError(f"{launch.name}: no {what} after {DEADLINE_S} s\n" + launch._tails())
        time.sleep(0.1)


def _wait_exit(launch, p, limit):
    """Seconds until process p exits; fails if it runs ``limit`` seconds past now."""
    begin = time.time()
    try:
        launch.procs[p].wait(timeout=limit)
    except subprocess.TimeoutExpired:
        launch.kill()
        raise AssertionError(f"{launch.name}: process {p} still running {limit} s later\n" + launch._tails()) from None
    return time.time() - begin


def test_dead_and_signalled_processes_stop_the_job_and_the_run_resumes(runs):
    """One workdir, three launches of 2 processes, against the uninterrupted 2-process run:

    1. kill -9 process 1 after the step-4 checkpoint: process 0 aborts with a clear error within a bounded
       time instead of waiting in a collective;
    2. the same command resumes both from step 4; SIGTERM to process 1 alone stops *both* at one step, with a
       checkpoint (a process that left the loop alone would leave the other waiting forever);
    3. the same command resumes again and ends with the uninterrupted run's parameters and losses.
    """
    base, reference = runs["base"], runs[2].workdir
    latest = os.path.join(base, "interrupted", "checkpoints", "latest")

    # From the 6th batch on, each step takes a second longer: time to act between checkpoints 4 and 8.
    crashed = Launch(base, "interrupted", 2, extra=["--slow_after=5"])
    _wait_for(crashed, lambda: os.path.exists(os.path.join(latest, "4")), "step-4 checkpoint")
    crashed.procs[1].send_signal(signal.SIGKILL)
    waited = _wait_exit(crashed, 0, 60 + HEARTBEAT_S)
    assert crashed.procs[0].returncode != 0
    assert waited < 60, f"process 0 took {waited:.0f} s to stop after process 1 died"
    # The coordination service names the lost task; or a gloo collective with the dead peer fails first.
    assert re.search(r"another task died|stopped sending heartbeats|gloo::|Gloo [\w-]+ failed|Connection (reset|closed) by peer",
                     crashed.output(0)), crashed.output(0)[-3000:]
    assert not os.path.exists(os.path.join(latest, "12"))

    stopped = Launch(base, "stopped", 2, workdir=crashed.workdir, extra=["--slow_after=0"])
    _wait_for(stopped, lambda: "resumed from" in stopped.output(0), "resume")
    assert re.search(r"resumed from \S+ at step 4\b", stopped.output(0))
    stopped.procs[1].send_signal(signal.SIGTERM)
    _wait_exit(stopped, 1, 60)
    _wait_exit(stopped, 0, 60)
    # Both exit with 128 + SIGTERM: a scheduler sees an interrupted run, not a finished one.
    assert [proc.returncode for proc in stopped.procs] == [143, 143], stopped._tails()
    at = re.search(r"stopped by signal 15 at step (\d+)", stopped.output(0))
    assert at, stopped.output(0)[-3000:]
    stop_step = int(at.group(1))
    assert 4 <= stop_step < 12 and str(stop_step) in os.listdir(latest)

    finished = Launch(base, "finished", 2, workdir=crashed.workdir)
    finished.wait()
    assert re.search(rf"resumed from \S+ at step {stop_step}\b", finished.output(0)), finished.output(0)[-2000:]
    for a, b in zip(_params(crashed.workdir, 12), _params(reference, 12), strict=True):
        np.testing.assert_array_equal(a, b)
    ref_loss = {r["step"]: r["loss"] for r in _train_rows(reference)}
    rows = _train_rows(crashed.workdir)
    assert {r["step"] for r in rows} == set(range(1, 13))
    for r in rows:
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=1e-6), r["step"]
