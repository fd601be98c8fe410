"""Multi-process runs: join this process to a ``jax.distributed`` job, and each process's share of a batch.

A multi-process (multi-controller) JAX job is N copies of the same program, one per host or one per
accelerator. Process 0 runs a small coordination service; every process connects to it, the processes exchange
their device lists, and from then on ``jax.devices()`` lists the devices of *all* processes (the global mesh)
while ``jax.local_devices()`` lists this process's own. A jitted computation on global arrays runs on every
process at once; the collectives between processes go through NCCL (GPU), the TPU interconnect, or gloo over
TCP (CPU).

``initialize`` takes the coordinator address, process count and process id from its arguments, else from the
environment of the usual launchers, read without network access by ``detect_cluster``:

==============  ==========================================================================================
launcher        what is read
==============  ==========================================================================================
environment     ``JAX_COORDINATOR_ADDRESS`` (also read by jax), ``JAX_NUM_PROCESSES`` and
                ``JAX_PROCESS_ID`` (this module's names; for a Kubernetes Indexed Job or JobSet the process
                id defaults to ``JOB_COMPLETION_INDEX``)
open-mpi        ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK``; jax derives the coordinator
slurm           ``SLURM_NTASKS``, ``SLURM_PROCID`` inside ``srun``; jax takes the first node of
                ``SLURM_STEP_NODELIST`` as coordinator and, on GPUs, one device per task (``SLURM_LOCALID``)
gke-tpu         ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``), ``TPU_WORKER_ID``,
                ``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID``
kubernetes      ``JOB_COMPLETION_INDEX`` alone: jax asks the Kubernetes API (needs ``pip install jax[k8s]``)
cloud-tpu-vm    TPU chips on this host: jax asks the TPU VM's metadata server
==============  ==========================================================================================

A plain single process (no launcher, or a launcher that started one process) is left alone: ``initialize``
returns ``False`` and JAX runs on its local devices.

**When a process dies** the others must not wait forever inside a collective. Every process sends heartbeats
to the coordination service; a process silent for ``heartbeat_timeout`` seconds is declared dead and the
service makes every other process abort with ``Terminating process because the JAX distributed service
detected fatal errors ... another task died``. When process 0 itself dies, the others lose the service and
abort the same way; a gloo collective whose peer connection drops fails at once.

**Data.** ``ProcessShareSampler`` makes every process walk one global order of the records and load only its
own rows of each global batch, so a step's global batch does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence

import jax

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A job as far as arguments and environment describe it; ``None`` where they say nothing and jax decides.

    ``launcher`` says where the values came from: ``"arguments"``, ``"environment"``, ``"open-mpi"``,
    ``"slurm"``, ``"gke-tpu"``, ``"kubernetes"`` or ``"cloud-tpu-vm"``.
    """

    launcher: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    # jax records at import time whether TPU chips are attached to this host (a private attribute).
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(environ: Mapping[str, str] | None = None, *, on_cloud_tpu_vm: bool | None = None) -> Cluster | None:
    """The launcher this process was started by, from environment variables only; ``None`` when there is none.

    Checked in this order, the first that applies winning: ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, Open MPI,
    SLURM, GKE TPU, a Kubernetes Indexed Job, a Cloud TPU VM, and finally ``JAX_COORDINATOR_ADDRESS`` alone.

    Args:
      environ: the environment (default ``os.environ``).
      on_cloud_tpu_vm: whether TPU chips are attached (default: what jax found when imported).
    """
    env = os.environ if environ is None else environ
    address = env.get(ENV_COORDINATOR_ADDRESS) or None
    if ENV_NUM_PROCESSES in env or ENV_PROCESS_ID in env:
        process_id = _int(env, ENV_PROCESS_ID)
        if process_id is None:
            process_id = _int(env, "JOB_COMPLETION_INDEX")
        return Cluster("environment", address, _int(env, ENV_NUM_PROCESSES), process_id)
    if "OMPI_COMM_WORLD_SIZE" in env:
        return Cluster("open-mpi", address, _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK"))
    # jax's own SLURM detection needs all five; SLURM_STEP_NODELIST exists only inside `srun`.
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return Cluster("slurm", address, _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"))
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts and "TPU_WORKER_ID" in env:
        per_slice = len(hosts.split(","))
        slices = _int(env, "MEGASCALE_NUM_SLICES") or 1
        slice_id = _int(env, "MEGASCALE_SLICE_ID") or 0
        return Cluster("gke-tpu", address, per_slice * slices, _int(env, "TPU_WORKER_ID") + slice_id * per_slice)
    if "JOB_COMPLETION_INDEX" in env:
        return Cluster("kubernetes", address, None, _int(env, "JOB_COMPLETION_INDEX"))
    if _on_cloud_tpu_vm() if on_cloud_tpu_vm is None else on_cloud_tpu_vm:
        return Cluster("cloud-tpu-vm", address)
    if address is not None:
        return Cluster("environment", address)
    return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            *, environ: Mapping[str, str] | None = None, on_cloud_tpu_vm: bool | None = None) -> Cluster | None:
    """The job to join: explicit arguments over ``detect_cluster``'s values; ``None`` for a single process.

    Raises:
      ValueError: naming the argument or variable, when the values cannot describe a job: a process id out of
        range, an address without a port, or an explicit job (arguments, ``JAX_*`` variables) with a value
        missing that no launcher can supply.
    """
    detected = detect_cluster(environ, on_cloud_tpu_vm=on_cloud_tpu_vm)
    given = (coordinator_address, num_processes, process_id)
    if given == (None, None, None):
        cluster = detected
    else:
        base = detected or Cluster("arguments")
        cluster = Cluster(
            "arguments" if detected is None else f"arguments + {detected.launcher}",
            coordinator_address if coordinator_address is not None else base.coordinator_address,
            num_processes if num_processes is not None else base.num_processes,
            process_id if process_id is not None else base.process_id,
        )
    if cluster is None:
        return None
    source = f"(from {cluster.launcher})"
    n, pid, address = cluster.num_processes, cluster.process_id, cluster.coordinator_address
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"num_processes must be a positive integer, got {n!r} {source}")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise ValueError(f"process_id must be a non-negative integer, got {pid!r} {source}")
    if n is not None and pid is not None and pid >= n:
        raise ValueError(f"process_id={pid} is out of range for num_processes={n} {source}: ids run from 0 to {n - 1}")
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator_address={address!r} {source} must be 'host:port', e.g. '10.0.0.1:1234'")
    if n == 1:
        return None
    missing = [name for name, value in zip(("coordinator_address", "num_processes", "process_id"), (address, n, pid))
               if value is None]
    if missing and cluster.launcher in ("arguments", "environment"):
        raise ValueError(
            f"a multi-process job needs coordinator_address, num_processes and process_id; {', '.join(missing)} "
            f"missing {source}, and no SLURM, Open MPI, Kubernetes or TPU launcher was found to supply it"
        )
    if missing and cluster.launcher == "kubernetes" and importlib.util.find_spec("kubernetes") is None:
        if pid == 0 and address is None:
            return None  # an Indexed Job of one pod
        raise ValueError(
            f"Kubernetes Indexed Job (JOB_COMPLETION_INDEX={pid}) without {', '.join(missing)}: set "
            f"{ENV_COORDINATOR_ADDRESS} and {ENV_NUM_PROCESSES} in the pod spec (docs/multihost.md), or install "
            f"jax[k8s] so that jax reads them from the Kubernetes API"
        )
    return cluster


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids: int | Sequence[int] | None = None, initialization_timeout: int = 300,
               heartbeat_timeout: int = 60, shutdown_timeout: int = 60,
               environ: Mapping[str, str] | None = None) -> bool:
    """Joins this process to its multi-process job; a no-op for a single process and when already joined.

    Call it first, before anything touches a JAX device (``jax.devices()``, an array, a jitted call). The
    values come from the arguments, else from the launcher's environment (``detect_cluster``).

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordination service, reachable from every process.
      num_processes: the number of processes in the job.
      process_id: this process's id, ``0 <= process_id < num_processes``; process 0 hosts the coordinator.
      local_device_ids: the accelerators this process drives (default: jax's choice, which under SLURM and
        Open MPI on GPUs is one per task; ``range(8)`` drives all 8 GPUs of a node from one process).
      initialization_timeout: seconds to wait for every process to connect.
      heartbeat_timeout: seconds of silence after which a process is declared dead and the others abort.
      shutdown_timeout: seconds a finishing process waits for the others at the exit barrier.
      environ: the environment to read a launcher from (default ``os.environ``).

    Returns:
      ``True`` when this process is part of a multi-process job (joined now or before), ``False`` for a single
      process.

    Raises:
      ValueError: values that cannot describe a job (see ``resolve``), or that contradict the job joined before.
      RuntimeError: the JAX backend was started before this call.
    """
    if jax.distributed.is_initialized():
        for name, wanted, actual in (("num_processes", num_processes, jax.process_count()),
                                     ("process_id", process_id, jax.process_index())):
            if wanted is not None and wanted != actual:
                raise ValueError(f"{name}={wanted} but this process already belongs to a job with {name}={actual}")
        return True
    cluster = resolve(coordinator_address, num_processes, process_id, environ=environ)
    if cluster is None:
        return False
    # Cross-process collectives on CPU: gloo over TCP (jax's default today, set so that it stays so).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            local_device_ids=None if local_device_ids is None else list(local_device_ids),
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=shutdown_timeout,
        )
    except RuntimeError as err:
        if "must be called before" in str(err):
            raise RuntimeError(
                "combo_jax.distributed.initialize must run before anything touches a JAX device (jax.devices(), "
                "an array, a jitted call); call it first"
            ) from err
        raise
    return True


class ProcessShareSampler:
    """A grain sampler: this process's rows of every global batch, in one global order shared by all processes.

    With global batch ``B`` over ``P`` processes each process loads ``b = B / P`` rows per step. Global position
    ``g`` of ``sampler`` (the order every process agrees on) lands in step ``g // B``, row ``g % B``; process
    ``p`` loads rows ``[p b, (p + 1) b)`` of each step, i.e. its local position ``k`` reads

    .. math::  g(k) = \\lfloor k / b \\rfloor B + p\\, b + (k \\bmod b).

    Stacked in process order (as ``jax.make_array_from_process_local_data`` places them on a mesh whose devices
    are ordered by process), the shares rebuild exactly the global batch a single process would load, whatever
    ``P`` is. (Sharding the *records* instead, as ``grain.sharding.ShardOptions`` does, gives each process its own
    contiguous part of the dataset: a different global batch for each process count.)

    Use it with ``grain.DataLoader(..., sampler=ProcessShareSampler(...), shard_options=grain.sharding.NoSharding(),
    operations=[grain.transforms.Batch(b, drop_remainder=True)], worker_count=0)``. Record metadata (including the
    per-record ``rng``) is that of the global position, so it too is independent of ``P``.

    Args:
      sampler: the global order, e.g. ``grain.samplers.IndexSampler`` without sharding.
      batch_size: the global batch size ``B``; a multiple of ``process_count``.
      process_index: this process's index ``p``.
      process_count: the number of processes ``P``.
    """

    def __init__(self, sampler, *, batch_size: int, process_index: int, process_count: int):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
        self._sampler = sampler
        self._batch_size, self._process_index, self._process_count = batch_size, process_index, process_count
        self._share = batch_size // process_count
        self._length = len(sampler) // batch_size * self._share  # whole global batches only

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:  # grain compares a restored iterator's sampler by repr
        return (f"ProcessShareSampler({self._sampler!r}, batch_size={self._batch_size}, "
                f"process_index={self._process_index}, process_count={self._process_count})")

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        step, row = divmod(index, self._share)
        return self._sampler[step * self._batch_size + self._process_index * self._share + row]
