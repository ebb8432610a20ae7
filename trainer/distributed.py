"""Multi-process (multi-host) launches of `alignet train`: when and how to call `jax.distributed.initialize`.

Every process runs the same command; together they train one model on one global batch, each loading only its
slice of every batch (`input_pipeline.host_slice`), and process 0 alone writes the workdir (orbax checkpoints
are collective: every process takes part). A launch is one of:

- explicit: `--coordinator HOST:PORT --num-processes N --process-id I` on every process (HOST:PORT is where
  process 0 listens; the same on all);
- `--coordinator auto`: `jax.distributed.initialize()` without arguments, i.e. JAX's own cluster detection
  (SLURM, Cloud TPU VMs through their metadata server, GKE TPU, Open MPI, Kubernetes);
- no flags: JAX's detection too, but only where the environment itself says that this process is one of
  several (read offline, without asking any metadata server):
  SLURM: `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_PROCID`, `SLURM_LOCALID` set and `SLURM_NTASKS` > 1
  (an `srun` step of several tasks; run `alignet train` under `srun`, not directly in an sbatch script). JAX
  then makes the step's first node the coordinator (port 61440 + job id % 4096, or `JAX_COORDINATOR_PORT`)
  and gives each task the one GPU of its `SLURM_LOCALID`: launch one task per GPU;
  TPU pods: `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` listing more than one host (GKE), or
  `MEGASCALE_NUM_SLICES` > 1 (multi-slice); a Cloud TPU VM pod (`gcloud ... ssh --worker=all`) keeps its worker
  list in the metadata server instead: pass `--coordinator auto` there;
- otherwise (or with `--num-processes 1`) one process, and `jax.distributed` is left alone.

On CPU, cross-process collectives use gloo (set before initializing, as JAX requires). Initializing waits at
most `timeout_s` seconds for every process to reach the coordinator; past that JAX ends the process (a fatal
error, not an exception: the CLI prints the launch it is joining first).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from alignet_data.checks import InputError

AUTO = "auto"
DEFAULT_TIMEOUT_S = 300  # jax's own default; a launch where a process never comes fails after this.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was launched: `coordinator` None = one process; "auto" = JAX detects the rest."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S
  detected: str = ""  # what in the environment asked for auto-detection, for the log

  @property
  def multi_process(self) -> bool:
    return self.coordinator is not None


def detect_environment(environ: Mapping[str, str] | None = None) -> str:
  """Which multi-process launcher the environment names ('' = none): 'slurm' or 'tpu'. Environment only."""
  env = os.environ if environ is None else environ

  def count(name: str) -> int:
    try:
      return int(env.get(name, "") or 0)
    except ValueError:
      return 0

  if all(v in env for v in _SLURM_VARS) and count("SLURM_NTASKS") > 1:
    return "slurm"
  hosts = next((env[v] for v in _TPU_HOST_LISTS if env.get(v)), "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return ""


def resolve_launch(coordinator: str | None, num_processes: int | None, process_id: int | None,
                   timeout_s: int | None = None, environ: Mapping[str, str] | None = None) -> Launch:
  """The launch the flags (else the environment) describe; InputError for an incomplete or inconsistent one."""
  timeout = DEFAULT_TIMEOUT_S if timeout_s is None else int(timeout_s)
  if timeout < 1:
    raise InputError(f"--coordinator-timeout must be >= 1 second, got {timeout}.")
  if num_processes is not None and num_processes < 1:
    raise InputError(f"--num-processes must be >= 1, got {num_processes}.")
  if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
    raise InputError(f"--process-id must be in [0, num_processes - 1], got {process_id} (--num-processes "
                     f"{num_processes}).")
  if coordinator == AUTO:
    return Launch(AUTO, num_processes, process_id, timeout, detected="--coordinator auto")
  if num_processes == 1:  # Said so explicitly: one process, whatever the environment.
    return Launch(timeout_s=timeout)
  if coordinator is not None:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise InputError(f"--coordinator must be HOST:PORT (process 0's address) or 'auto', got {coordinator!r}.")
    if num_processes is None or process_id is None:
      raise InputError("--coordinator HOST:PORT needs --num-processes N and --process-id I as well (or use "
                       "--coordinator auto to let JAX detect them).")
    return Launch(coordinator, num_processes, process_id, timeout)
  if num_processes is not None or process_id is not None:
    raise InputError("--num-processes/--process-id need --coordinator HOST:PORT (process 0's address), or "
                     "--coordinator auto.")
  found = detect_environment(environ)
  if found:
    return Launch(AUTO, timeout_s=timeout, detected=f"{found} environment")
  return Launch(timeout_s=timeout)


def initialize(launch: Launch) -> None:
  """Join the other processes (before any JAX computation); nothing for a single-process launch."""
  if not launch.multi_process:
    return
  # CPU collectives across processes need an implementation: gloo, unless one was chosen (e.g. mpi).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"initialization_timeout": launch.timeout_s}
  if launch.coordinator != AUTO:
    kwargs["coordinator_address"] = launch.coordinator
  if launch.num_processes is not None:
    kwargs["num_processes"] = launch.num_processes
  if launch.process_id is not None:
    kwargs["process_id"] = launch.process_id
  jax.distributed.initialize(**kwargs)  # Raises if a JAX backend is already up: initialize came too late.
