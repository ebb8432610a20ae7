"""Multi-host training: two local processes (CPU, gloo collectives) train the same student as one process does."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_world
from test_triplet_sources import _npz

from alignet_data.checks import InputError
from trainer import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 240  # per launch; a hung collective fails the test instead of blocking CI

# Runs `alignet train` with an audit hook that reports, on stderr, every file or folder the process creates,
# opens for writing, renames or removes under the workdir: what each process wrote, seen from inside it.
_LAUNCHER = """
import os, sys
root = os.path.abspath(sys.argv[1])
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def audit(event, args):
  if event == "open":
    mode, flags = args[1], args[2]
    writing = any(c in str(mode) for c in "wax+") if mode else isinstance(flags, int) and flags & WRITES
    paths = args[:1] if writing else ()
  elif event == "os.rename":  # os.rename and os.replace: source and destination
    paths = args[:2]
  elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
    paths = args[:1]
  else:
    return
  for path in paths:
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.abspath(os.fsdecode(path))
      if path == root or path.startswith(root + os.sep):
        sys.stderr.write(f"[wrote] {os.path.relpath(path, root)}\\n")
sys.addaudithook(audit)
from pipelines import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny demo world and a released-layout folder whose triplets index its pool."""
  from alignet_data import demo_world
  tmp = tmp_path_factory.mktemp("multihost")
  world = tiny_world(tmp, 6)
  n_images = len(demo_world.load(world).pool_images)
  _npz(tmp / "release" / "train_random.npz", 64, n_images, 0)
  _npz(tmp / "release" / "val_random.npz", 24, n_images, 1)
  return str(tmp / "release"), world


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(tmp_path, name: str, workdir, train_args: list[str], processes: int = 1, devices: int = 1) -> list[str]:
  """`alignet train` as `processes` processes of one launch (each with `devices` CPU devices); their stderr."""
  launcher = tmp_path / "launch.py"
  launcher.write_text(_LAUNCHER)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "XLA_FLAGS"))}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = _free_port()
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # loopback only, not every interface
  procs, logs = [], []
  try:
    for i in range(processes):
      launch = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                          "--process-id", str(i), "--coordinator-timeout", "60"]
      logs.append((open(tmp_path / f"{name}.{i}.out", "w"), open(tmp_path / f"{name}.{i}.err", "w")))
      procs.append(subprocess.Popen([sys.executable, str(launcher), str(workdir), "train", "--workdir", str(workdir),
                                     *train_args, *launch], cwd=REPO, env=env, stdout=logs[-1][0],
                                    stderr=logs[-1][1]))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # Until all are done; one failing ends the launch (the others would wait for it in a collective).
    while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
      assert time.monotonic() < deadline, f"{name}: still running after {RUN_TIMEOUT_S} s"
      time.sleep(0.2)
  finally:
    for p in procs:  # by pid, whatever happened above
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for out, err in logs:
      out.close()
      err.close()
  errs = [(tmp_path / f"{name}.{i}.err").read_text() for i in range(processes)]
  codes = [p.returncode for p in procs]
  assert codes == [0] * processes, f"{name}: exit codes {codes}\n" + "\n".join(
      f"--- process {i}:\n" + "\n".join(line for line in e.splitlines() if not line.startswith("[wrote] "))[-3000:]
      for i, e in enumerate(errs))
  return errs


def _files(root) -> list[str]:
  """The workdir's files but the checkpoints (orbax names its files by content and process); event files by
  folder (their names hold a time and a pid)."""
  paths = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
  return sorted(os.path.dirname(p) if p.startswith("tensorboard") else p for p in paths
                if not p.startswith("checkpoints" + os.sep))


def _figures(metrics: dict, *leave_out: str) -> dict:
  """metrics.json without its timings (and the keys left out)."""
  return {k: v for k, v in metrics.items() if k not in leave_out and "seconds" not in k and "per_second" not in k}


@pytest.mark.slow
def test_two_processes_train_the_student_one_process_trains(release, tmp_path):
  """Two processes (one CPU device each; 8 triplets a step, 4 loaded by each) against one process:

  - with two devices (the same mesh, hence the same reductions): byte-identical student.npz, equal figures;
  - with one device: every weight within rtol 1e-5 / atol 1e-6 (float32 rounding of the gradient all-reduce),
    but the attention key biases: their gradient is zero in exact arithmetic (softmax ignores a shift shared
    by all keys), so Adam turns the rounding noise into +-learning-rate steps; they stay within the summed
    learning rate (2e-3 over these 4 steps).

  Only process 0 writes the workdir; process 1 writes only its part of the collective orbax checkpoints. Two
  processes resume a one-process run from its checkpoint.
  """
  shards, world = release
  args = ["--shards", shards, "--world", world, "--student", "demo-student", "--steps", "4", "--batch-size", "8",
          "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2", "--set", "eval_batch_size=16"]
  two, one, single = tmp_path / "two", tmp_path / "one", tmp_path / "single"
  errs = _run(tmp_path, "two", two, args, processes=2)
  _run(tmp_path, "one", one, args, devices=2)
  _run(tmp_path, "single", single, args)

  written = [{line.split(" ", 1)[1] for line in e.splitlines() if line.startswith("[wrote] ")} for e in errs]
  assert {"metrics.json", "student.npz", "config.json", "metrics.jsonl"} <= written[0]  # the audit sees writes
  assert all(p.startswith("checkpoints" + os.sep) for p in written[1]), written[1]
  assert _files(two) and _files(two) == _files(one)  # one TensorBoard file, one of everything
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]

  assert (two / "student.npz").read_bytes() == (one / "student.npz").read_bytes()
  m2, m1, m0 = (json.loads((d / "metrics.json").read_text()) for d in (two, one, single))
  assert (m2["processes"], m2["devices"], m1["processes"], m1["devices"]) == (2, 2, 1, 2)
  assert (m2["input_triplets"], m1["input_triplets"]) == (4 * 8 // 2, 4 * 8)  # each process loaded its half
  assert _figures(m2, "processes", "input_triplets") == _figures(m1, "processes", "input_triplets")
  assert {"levels_coarse_accuracy", "things_accuracy", "val_triplet_accuracy"} <= set(m2)  # hooks over 2 processes
  assert m2["val_loss"] != m2["val_loss_before"]  # it trained
  assert (two / "config.json").read_text() == (one / "config.json").read_text()  # no launch flags in the config

  # A run of one process killed after its step-2 checkpoint, resumed by two: the same student, byte for byte.
  resumed = tmp_path / "resumed"
  shutil.copytree(one, resumed, ignore=shutil.ignore_patterns("4", "metrics.json", "student.*"))
  _run(tmp_path, "resumed", resumed, args, processes=2)
  assert (resumed / "student.npz").read_bytes() == (one / "student.npz").read_bytes()
  m3 = json.loads((resumed / "metrics.json").read_text())
  assert (m3["resumed_from"], m3["steps_trained"]) == (2, 2)
  resume_keys = ("processes", "resumed_from", "steps_trained", "input_triplets")
  assert _figures(m3, *resume_keys) == _figures(m1, *resume_keys)

  a, c = np.load(two / "student.npz"), np.load(single / "student.npz")
  assert sorted(a.files) == sorted(c.files)
  for k in a.files:
    if k.endswith("/key/bias"):
      assert np.abs(a[k] - c[k]).max() <= 2e-3, k
    else:
      np.testing.assert_allclose(a[k], c[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert m2["loss"] == pytest.approx(m0["loss"], rel=1e-5)


def test_launch_flags_and_environment_detection():
  assert not distributed.resolve_launch(None, None, None, environ={}).multi_process
  assert not distributed.resolve_launch(None, 1, None, environ={}).multi_process
  launch = distributed.resolve_launch("10.0.0.1:1234", 4, 3, 30, environ={})
  assert (launch.coordinator, launch.num_processes, launch.process_id, launch.timeout_s) == ("10.0.0.1:1234", 4, 3, 30)
  assert distributed.resolve_launch("auto", None, None, environ={}).coordinator == "auto"
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_NTASKS": "2"}
  assert distributed.resolve_launch(None, None, None, environ=slurm).detected == "slurm environment"
  assert not distributed.resolve_launch(None, None, None, environ={**slurm, "SLURM_NTASKS": "1"}).multi_process
  assert not distributed.resolve_launch(None, 1, None, environ=slurm).multi_process  # --num-processes 1 wins
  assert distributed.detect_environment({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == "tpu"
  assert distributed.detect_environment({"TPU_WORKER_HOSTNAMES": "t-0"}) == ""
  assert distributed.detect_environment({"MEGASCALE_NUM_SLICES": "2"}) == "tpu"
  for args, message in [(("h:1", None, 0), "needs --num-processes"), ((None, 2, 0), "need --coordinator"),
                        (("h:1", 2, 2), r"process-id must be in \[0, num_processes - 1\]"),
                        (("nohost", 2, 0), "HOST:PORT"), (("h:1", 0, 0), "num-processes must be >= 1")]:
    with pytest.raises(InputError, match=message):
      distributed.resolve_launch(*args, environ={})


def test_initialize_is_called_only_for_a_multi_process_launch(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize(distributed.resolve_launch(None, None, None, environ={}))
  assert calls == []  # one process: jax.distributed is left alone
  distributed.initialize(distributed.resolve_launch("127.0.0.1:9", 2, 1, 30, environ={}))
  distributed.initialize(distributed.resolve_launch("auto", None, None, environ={}))
  assert calls == [{"coordinator_address": "127.0.0.1:9", "num_processes": 2, "process_id": 1,
                    "initialization_timeout": 30},
                   {"initialization_timeout": distributed.DEFAULT_TIMEOUT_S}]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_batch_size_must_split_over_processes(tmp_path, capsys):
  from pipelines import cli
  argv = ["train", "--shards", "x", "--workdir", str(tmp_path / "w"), "--batch-size", "9", "--coordinator",
          "127.0.0.1:1", "--num-processes", "2", "--process-id", "0", "--no-verify"]
  assert cli.main(argv) == 1
  assert "batch_size (--batch-size) 9 does not split over 2 processes" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()
