"""Running a study's trainings: device slots, one subprocess per run, progress, interruption and resume."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from combo_jax.experiments.plan import Run, StudyError
from combo_jax.workdir import write_text_atomic


def detect_gpus() -> list[str]:
    """GPU ids from CUDA_VISIBLE_DEVICES, else from nvidia-smi; [] when there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [] if ids and ids[0] == "-1" else ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclasses.dataclass
class Slot:
    """Where one concurrent run goes: environment changes and, on a CPU, the cores it is pinned to."""

    index: int
    env: dict
    cores: tuple[int, ...] | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if self.cores is not None:
            parts.append(f"cores {','.join(map(str, self.cores))}")
        return " ".join(parts) or "all devices"


def make_slots(*, devices: str, parallel: int | None) -> list[Slot]:
    """``parallel`` slots over ``devices`` ("auto", "cpu", or comma-separated GPU ids)."""
    if devices == "auto":
        gpus = detect_gpus()
    else:
        gpus = [] if devices == "cpu" else [d.strip() for d in devices.split(",") if d.strip()]
    if gpus:
        parallel = parallel or len(gpus)
        if parallel < 1:
            raise StudyError(f"--parallel must be at least 1, got {parallel}")
        shared = parallel > len(gpus)
        per_gpu = -(-parallel // len(gpus))
        env_shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                      "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / per_gpu:.3f}"} if shared else {}
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], **env_shared}) for i in range(parallel)]
    parallel = parallel or 1
    if parallel < 1:
        raise StudyError(f"--parallel must be at least 1, got {parallel}")
    env = {"JAX_PLATFORMS": "cpu"} if devices == "cpu" else {}
    if parallel == 1 or not hasattr(os, "sched_getaffinity"):
        return [Slot(i, dict(env)) for i in range(parallel)]
    cores = sorted(os.sched_getaffinity(0))
    if parallel > len(cores):
        raise StudyError(f"--parallel {parallel} is more than the {len(cores)} CPU cores this process may use")
    chunks = np.array_split(np.asarray(cores), parallel)
    return [Slot(i, dict(env), tuple(int(c) for c in chunk)) for i, chunk in enumerate(chunks)]


_PROBE = (
    "import json, jax; d = jax.devices(); "
    "print(json.dumps({'platform': d[0].platform, 'device_count': len(d), 'device_kinds': sorted({x.device_kind for x in d}), "
    "'jax': jax.__version__}))"
)


def host_info() -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(), "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            info["cpu_model"] = models[0]
    except OSError:
        pass
    return info


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def last_step(workdir: str) -> int:
    """The last step a run logged (0 when it logged none)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        return int(json.loads(lines[-1])["step"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def compile_cache_env(cache_dir: str | None) -> dict:
    """Environment for JAX's persistent compilation cache in ``cache_dir`` (every compilation kept), or {}.

    The runs of a study compile the same functions (initialization, evaluation, and the whole train step for
    every seed of a setting), so all but the first take them from the cache: on a 2-core CPU this cuts a tiny
    run from about 19 s to 7 s of CPU time. A cache the user configured (JAX_COMPILATION_CACHE_DIR) is left alone.
    """
    if not cache_dir or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": os.path.abspath(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@dataclasses.dataclass
class Job:
    """A run in progress: its process, where it runs, and when it started."""

    run: Run
    process: subprocess.Popen
    slot: Slot
    started: float
    log: object  # the open train.log
    step_at_launch: int  # the step a resumed run started from
    resumed: bool  # whether the workdir held checkpoints at launch

    def seconds_left(self, now: float) -> float | None:
        """From its own step rate since launch; None before its first logged step."""
        step, total = last_step(self.run.workdir), self.run.config["train"]["num_steps"]
        if step <= self.step_at_launch:
            return None
        return (now - self.started) / (step - self.step_at_launch) * (total - step)

    def seconds_total(self, now: float) -> float | None:
        step, total = last_step(self.run.workdir), self.run.config["train"]["num_steps"]
        if step <= self.step_at_launch:
            return None
        return (now - self.started) / (step - self.step_at_launch) * total


class _Stop(Exception):
    pass


def _launch(run: Run, slot: Slot, cache_env: dict) -> Job:
    os.makedirs(run.workdir, exist_ok=True)
    write_text_atomic(os.path.join(run.workdir, "experiment.json"),
                      json.dumps({"name": run.name, "command": run.command(), "config": run.config}, indent=1))
    resumed = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
    log = open(os.path.join(run.workdir, "train.log"), "a")
    log.write(f"\n==== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(run.command())}\n")
    log.flush()
    cores = slot.cores
    process = subprocess.Popen(
        run.command(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **cache_env, **slot.env},
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    return Job(run, process, slot, time.time(), log, last_step(run.workdir) if resumed else 0, resumed)


def run_study(runs: Sequence[Run], *, slots: Sequence[Slot], out: str, argv: Sequence[str], progress_every: float = 60.0,
              compile_cache: str | None = None, log=print) -> dict:
    """Trains every unfinished run, up to len(slots) at once; appends this invocation to ``out/study.json``.

    ``compile_cache``: a folder for JAX's persistent compilation cache shared by the runs (None: no cache).
    Returns the invocation record. Raises StudyError listing the runs that failed or did not finish.
    """
    started_at = time.time()
    cache_env = compile_cache_env(compile_cache)
    record = {
        "command": "python -m combo_jax.experiments " + shlex.join(argv),
        "cwd": os.getcwd(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parallel": len(slots),
        "slots": [s.describe() for s in slots],
        "compile_cache": cache_env.get("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR")),
        "host": host_info(),
        "runs": [],
    }
    entries = {r.name: {"name": r.name, "workdir": r.workdir, "seed": r.seed, "loss": r.loss,
                        "command": shlex.join(r.command()), "status": "pending"} for r in runs}
    todo = []
    for run in runs:
        if run.finished:
            entries[run.name]["status"] = "skipped (finished)"
            log(f"skip {run.name}: finished ({run.summary_path})")
        else:
            todo.append(run)
    total = len(entries)
    done = total - len(todo)
    log(f"study: {total} runs, {done} already finished, {len(todo)} to train on {len(slots)} slot(s) "
        f"({'; '.join(s.describe() for s in slots)})")

    probe = None
    if todo:  # the jax devices a run sees, asked in a separate process so this one never claims a GPU
        probe = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env={**os.environ, **slots[0].env})

    def on_term(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    jobs: dict[int, Job] = {}  # slot index -> job
    free = list(slots)
    durations, failures = [], []
    last_beat = time.time()

    def eta() -> str:
        """Remaining wall time: finished runs' mean duration for the runs still to start; for a running run, its
        own step rate since launch (a resumed run counts only the steps it trained here)."""
        if not todo and not jobs:
            return "ETA 0s"
        now = time.time()
        guesses = [g for g in (j.seconds_total(now) for j in jobs.values()) if g is not None]
        per_run = float(np.mean(durations)) if durations else (float(np.mean(guesses)) if guesses else None)
        if per_run is None:
            return "ETA unknown"
        left = len(todo) * per_run + sum(per_run if x is None else x for x in (j.seconds_left(now) for j in jobs.values()))
        return f"ETA {duration(left / len(slots))}"

    def status_line() -> str:
        return f"[{done}/{total} done, {len(jobs)} running] elapsed {duration(time.time() - started_at)}, {eta()}"

    interrupted = False
    try:
        while todo or jobs:
            while todo and free:
                run, slot = todo.pop(0), free.pop(0)
                job = _launch(run, slot, cache_env)
                jobs[slot.index] = job
                entries[run.name].update(status="running", slot=slot.describe(), resumed=job.resumed)
                log(f"start {run.name}{' (resuming)' if job.resumed else ''} on {slot.describe()}; log {job.log.name}")
            for index, job in list(jobs.items()):
                code = job.process.poll()
                if code is None:
                    continue
                job.log.close()
                del jobs[index]
                free.append(job.slot)
                wall = time.time() - job.started
                entry = entries[job.run.name]
                entry["wall_s"] = round(wall, 2)
                if code == 0 and job.run.finished:
                    done += 1
                    entry["status"] = "trained"
                    if not entry.get("resumed"):
                        durations.append(wall)
                    with open(job.run.summary_path) as f:
                        dice = json.load(f).get("mean_fg_dice", float("nan"))
                    log(f"done {job.run.name} in {duration(wall)} (mean foreground Dice {dice:.4f}) {status_line()}")
                else:
                    why = _exit_reason(code)
                    entry["status"] = f"failed: {why}"
                    failures.append((job.run, why))
                    log(f"FAILED {job.run.name}: {why}; last lines of {job.run.workdir}/train.log:\n"
                        + tail(os.path.join(job.run.workdir, "train.log")))
            if jobs and time.time() - last_beat >= progress_every:
                last_beat = time.time()
                steps = ", ".join(f"{j.run.name} step {last_step(j.run.workdir)}/{j.run.config['train']['num_steps']}"
                                  for j in jobs.values())
                log(f"{status_line()}: {steps}")
            if jobs:
                time.sleep(0.2)
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        log("interrupted: asking the running trainings to save a checkpoint and stop")
        for job in jobs.values():
            if job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)
        for job in jobs.values():
            try:
                job.process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                job.process.kill()
            job.log.close()
            entries[job.run.name]["status"] = "stopped (rerun to resume)"
    finally:
        signal.signal(signal.SIGTERM, previous)
        record["runs"] = list(entries.values())
        record["wall_s"] = round(time.time() - started_at, 2)
        record["devices"] = _probe_result(probe)
        _append_study(out, record)
    if interrupted:
        raise KeyboardInterrupt("study interrupted; rerun the same command to resume")
    if failures:
        raise StudyError(f"{len(failures)} run(s) failed (the others are kept; rerun to retry): "
                         + "; ".join(f"{r.name} ({why}, log {r.workdir}/train.log)" for r, why in failures))
    log(f"all {total} runs finished; wall time {duration(record['wall_s'])}")
    return record


def _exit_reason(code: int) -> str:
    if code > 128:
        return f"stopped by signal {code - 128} (exit status {code}); rerun to resume"
    if code < 0:
        return f"killed by signal {-code}; rerun to resume"
    return f"exit status {code}" if code else "exited without summary.json (stopped before the end)"


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in [ln for ln in text.splitlines() if ln.strip()][-lines:])


def _probe_result(probe) -> dict | None:
    if probe is None:
        return None
    try:
        out, _ = probe.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        probe.kill()
        return None


def _append_study(out: str, record: dict) -> None:
    path = os.path.join(out, "study.json")
    study = {"invocations": []}
    if os.path.isfile(path):
        with open(path) as f:
            study = json.load(f)
    study["invocations"].append(record)
    os.makedirs(out, exist_ok=True)
    write_text_atomic(path, json.dumps(study, indent=1))
